"""Planning a sweep's cells (pure logic): cells that make no sense are skipped with the reason."""

from __future__ import annotations

from orchestrator.config import parse_config
from orchestrator.sweep import plan_cells
from tasks.datasets import DATASETS
from tasks.datasets.nih14 import NIH14

from .conftest import TINY


class _KnnOnlyNIH(NIH14):
    name = "nih14_knn_only"
    protocols = ("knn",)


def test_unsupported_protocols_are_skipped_with_a_note(monkeypatch, tmp_path):
    monkeypatch.setitem(DATASETS, _KnnOnlyNIH.name, _KnnOnlyNIH)
    cfg = parse_config({
        "name": "p", "output": str(tmp_path), "data": {"nih14": "a", _KnnOnlyNIH.name: "b"},
        "grid": {"encoders": [TINY], "resolutions": [32, 48], "datasets": ["nih14", _KnnOnlyNIH.name],
                 "protocols": ["linear_probe", "knn"], "seeds": [0, 1]},
    })
    cells, skipped = plan_cells(cfg)
    assert len(cells) + len(skipped) == cfg.n_cells() == 16
    assert {c.dataset for c in cells if c.protocol == "linear_probe"} == {"nih14"}
    assert len(skipped) == 4 and all("__linear_probe__" in cid for cid in skipped)
    assert set(skipped.values()) == {"nih14_knn_only does not support linear_probe (supports knn)"}
    # Cells share extractions: 2 resolutions x 2 datasets, whatever the protocols and seeds.
    assert len({c.extraction for c in cells}) == 4
