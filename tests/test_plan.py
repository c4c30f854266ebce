"""Planning a sweep's cells (pure logic): cells that make no sense are skipped with the reason."""

from __future__ import annotations

from orchestrator.grid.cells import plan_cells
from orchestrator.grid.config import parse_config
from tasks.datasets import DATASETS
from tasks.datasets.nih14 import NIH14

from .conftest import TINY


class _MaskNIH(NIH14):
    """NIH-14 pretending to carry 2D masks: no classification protocol accepts it."""

    name = "nih14_masks"
    target_kind = "mask2d"


def test_unsupported_protocols_are_skipped_with_a_note(monkeypatch, tmp_path):
    monkeypatch.setitem(DATASETS, _MaskNIH.name, _MaskNIH)
    cfg = parse_config({
        "name": "p", "output": str(tmp_path), "data": {"nih14": "a", _MaskNIH.name: "b"},
        "grid": {"encoders": [TINY], "resolutions": [32, 48], "datasets": ["nih14", _MaskNIH.name],
                 "protocols": ["linear_probe", "knn"], "seeds": [0, 1]},
    })
    cells, skipped = plan_cells(cfg)
    # kNN ignores the seed: one cell per (encoder, resolution, dataset), not one per seed.
    assert cfg.n_cells() == 16 and len(cells) + len(skipped) == 16 - 4
    assert {c.dataset for c in cells} == {"nih14"}
    assert len(skipped) == 6 and all(cid.startswith("nih14_masks__") for cid in skipped)
    assert set(skipped.values()) == {f"{p} takes labels targets, nih14_masks has mask2d"
                                     for p in ("linear_probe", "knn")}
    # Cells share extractions: 2 resolutions x 1 dataset, whatever the protocols and seeds.
    assert len({c.extraction for c in cells}) == 2
