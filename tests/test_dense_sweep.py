"""Dense cells in a sweep, end to end on a tiny test-only dataset and head (tests/dense_toy.py):
dense maps into the cache (one fp16 file per case), the source rule chosen and recorded, cached
and online sources giving the same metrics, a bad case failing alone."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from orchestrator.grid.config import parse_config
from orchestrator.sweep.driver import run_sweep

from . import dense_toy
from .conftest import TINY, sweep_config
from .test_sweep import _runs

CELL = f"toy_dense__toy_seg__{TINY}__64px__s0"  # the readable prefix; the id adds its identity digest


@pytest.fixture(scope="module")
def toy_root(tmp_path_factory) -> Path:
    root = dense_toy.ToyDense.synth(tmp_path_factory.mktemp("dense") / "toy", n=12)
    dense_toy.corrupt(root, "case005")  # a train case that cannot be read
    return root


def _raw(tmp: Path, root: Path, hparams: dict, **resources) -> dict:
    raw = sweep_config(tmp, {"toy_dense": root}, grid={"resolutions": [64], "protocols": ["toy_seg"]},
                       resources={"extract_batch_size": 4, **resources})
    raw["protocols"] = {"toy_seg": hparams}
    return raw


def _cfg(tmp: Path, root: Path, **resources):
    return parse_config(_raw(tmp, root, {"epochs": 25}, **resources))


def _cell_dir(cfg) -> Path:
    dirs = list((Path(cfg.sweep_root) / "cells").glob(f"{CELL}__*"))
    assert len(dirs) == 1, dirs
    return dirs[0]


def _by_prefix(outcome) -> dict[str, str]:
    from orchestrator.grid.identity import prefix_of

    return {prefix_of(c): s for c, s in outcome.cells.items()}


def test_dense_sweep_cached_and_online_agree(ray_session, toy_root, tmp_path, monkeypatch, one_torch_thread):
    dense_toy.register(monkeypatch)
    cached = _cfg(tmp_path / "cached", toy_root)
    online = _cfg(tmp_path / "online", toy_root, dense_cache_max_gb=0.0)  # nothing fits: online
    assert _by_prefix(run_sweep(cached)) == {CELL: "FINISHED"}
    assert _by_prefix(run_sweep(online)) == {CELL: "FINISHED"}

    # The rule and its reason are recorded on each run.
    p_cached = _runs(cached)["run"].iloc[0].data.params
    p_online = _runs(online)["run"].iloc[0].data.params
    assert p_cached["feature_source"] == "cached" and "<= resources.dense_cache_max_gb 200" in \
        p_cached["feature_source_reason"]
    assert p_online["feature_source"] == "online" and "> resources.dense_cache_max_gb 0" in \
        p_online["feature_source_reason"]
    assert p_cached["feature_layers"] == "last" and p_cached["resolution"] == "64"
    assert p_cached["feature_precision"] == "fp32" and "cache_key_dense" in p_cached

    # One fp16 .npy file per readable case in the cache entry, and an index naming them.
    entries = list((Path(cached.cache_root) / "features").glob("toy_dense-cases-*"))
    assert len(entries) == 1
    maps = sorted((entries[0] / "maps").glob("*.npy"))
    assert len(maps) == 11 and np.load(maps[0]).dtype == np.float16
    meta = json.loads((entries[0] / "_medscale.json").read_text())
    assert list(meta["failed"]) == ["case005"] and meta["key"]["feature_kind"] == "dense"

    # Same seed, same head: cached (fp16 maps) and online (fp32) metrics agree within tolerance.
    m_c = json.loads((_cell_dir(cached) / "metrics.json").read_text())
    m_o = json.loads((_cell_dir(online) / "metrics.json").read_text())
    for k in ("test_dice_mean", "test_iou_mean", "val_dice_mean"):
        assert m_c[k] == pytest.approx(m_o[k], abs=0.02), k
    assert m_c["test_dice_mean"] > 0.5  # the head learns the blob from the tiny encoder's maps

    for cfg, m in ((cached, m_c), (online, m_o)):
        res = _cell_dir(cfg)
        # The bad case fails alone, named with its file, in both sources.
        failed = pd.read_csv(res / "failed_cases.csv")
        assert failed["case_id"].tolist() == ["case005"] and "case005.png" in failed["error"].iloc[0]
        assert m["n_failed_cases"] == 1 and m["n_train"] == 5
        # Per-case table: every val and test case with its metrics; the aggregate is its mean.
        pc = pd.read_parquet(res / "per_case.parquet")
        assert list(pc.columns[:3]) == ["case_id", "split", "class"]
        assert sorted(pc.loc[pc["split"] == "test", "case_id"]) == ["case003", "case007", "case011"]
        assert m["test_dice_mean"] == pytest.approx(pc.loc[pc["split"] == "test", "dice"].mean())
        # Predictions at each image's original (non-square) size; figures of best and worst.
        for cid in ("case003", "case007", "case011"):
            pred = np.asarray(Image.open(res / "predictions" / f"{cid}.png"))
            img = Image.open(toy_root / "images" / f"{cid}.png")
            assert pred.shape == (img.height, img.width)
        assert len(list((res / "figures").glob("*.png"))) >= 2


def test_augmenting_head_runs_online_and_layers_are_validated(ray_session, toy_root, tmp_path, monkeypatch,
                                                              one_torch_thread):
    from tasks.errors import ConfigError

    dense_toy.register(monkeypatch)
    raw = _raw(tmp_path, toy_root, {"epochs": 3, "augment": True, "layers": [0, 1]})
    cfg = parse_config(raw)
    assert _by_prefix(run_sweep(cfg)) == {CELL: "FINISHED"}
    p = _runs(cfg)["run"].iloc[0].data.params
    assert p["feature_source"] == "online" and "geometric augmentation" in p["feature_source_reason"]
    assert p["feature_layers"] == "0,1"
    assert not list((Path(cfg.cache_root) / "features").glob("toy_dense-*"))  # nothing cached for it
    m = json.loads((_cell_dir(cfg) / "metrics.json").read_text())
    assert m["feature_channels"] == 2 * 64  # two blocks of the tiny encoder, concatenated

    raw["protocols"]["toy_seg"]["layers"] = [0, 5]
    with pytest.raises(ConfigError, match="protocols.toy_seg.layers: test_vit_tiny16 has 2 blocks; layer 5"):
        parse_config(raw)
