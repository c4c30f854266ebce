"""Acceptance: a sweep on synthetic CREMI and AC3/AC4 in their official layouts with the tiny
encoder: em_affinity cells FINISHED with VOI split/merge, VOI and ARAND, the segmentation as HDF5
whose scikit-image VOI equals the run's, the figures, and one cached map per volume."""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import pandas as pd
import pytest
from skimage.metrics import variation_of_information

from orchestrator.grid.config import parse_config
from orchestrator.store.cache import CacheKey, FeatureCache
from orchestrator.store.dense_maps import CachedFeatures
from orchestrator.sweep.driver import run_sweep
from tasks.datasets import dataset_class, get_dataset
from tasks.protocols.em_affinity import DEFAULT_SCORING

from .conftest import TINY, sweep_config
from .test_sweep import _runs


def test_em_sweep_cremi_and_ac3ac4(ray_session, tmp_path, one_torch_thread):
    roots = {"cremi_a": dataset_class("cremi_a").synth(tmp_path / "cremi", image_size=48, seed=0),
             "ac3ac4": dataset_class("ac3ac4").synth(tmp_path / "ac3ac4", image_size=48, seed=1)}
    raw = sweep_config(tmp_path, roots, grid={"resolutions": [192], "protocols": ["em_affinity"]},
                       resources={"extract_batch_size": 32})
    raw["protocols"] = {"em_affinity": {"epochs": 8, "thresholds": [0.3, 0.5, 0.7]}}
    cfg = parse_config(raw)
    from orchestrator.grid.identity import prefix_of

    cells = run_sweep(cfg).cells  # ids: readable prefix + identity digest
    assert {prefix_of(c): st for c, st in cells.items()} == {
        f"{d}__em_affinity__{TINY}__192px__s0": "FINISHED" for d in roots}
    runs = _runs(cfg)
    for run in runs["run"]:  # what produced the numbers is on the run: scorer, source, threshold grid
        p = run.data.params
        assert p["hp_scoring_function"] == DEFAULT_SCORING and p["feature_source"] == "cached", p
        assert p["hp_thresholds"] == "[0.3, 0.5, 0.7]" and p["target_kind"] == "instances"

    for name, root in roots.items():
        res = Path(cfg.sweep_root) / "cells" / next(
            c for c in cells if prefix_of(c) == f"{name}__em_affinity__{TINY}__192px__s0")
        m = json.loads((res / "metrics.json").read_text())
        for k in ("voi_split", "voi_merge", "voi", "arand"):
            assert 0 <= m[f"test_{k}"] < 10, (name, k, m)
        assert m["test_voi"] == pytest.approx(m["test_voi_split"] + m["test_voi_merge"])
        assert m["head_threshold"] in (0.3, 0.5, 0.7)  # chosen on the validation slab, recorded
        pc = pd.read_parquet(res / "per_case.parquet")
        test = pc[pc["split"] == "test"]
        assert sorted(test["case_id"]) == (["A_test"] if name == "cremi_a" else ["AC3_test"])
        cid = test["case_id"].iloc[0]
        with h5py.File(res / "predictions" / f"{cid}_segmentation.h5", "r") as f:
            seg = f["volumes/labels/neuron_ids"][:]
            assert f.attrs["threshold"] in (0.3, 0.5, 0.7)
        ds = get_dataset(name, root)
        gt = ds.read_sample(cid).target
        split, merge = variation_of_information(gt, seg, ignore_labels=(0,))
        assert m["test_voi"] == pytest.approx(split + merge, abs=1e-9)
        assert (res / "figures" / f"{cid}_montage.png").is_file()
        assert (res / "figures" / f"{cid}_features_pca.png").is_file()
        # Volumes go through the dense pipeline: a case's S slices are one fp16 (S, C, h, w) entry
        # of the cache, from which the EM head (target kind instances) trained.
        (entry,) = (Path(cfg.cache_root) / "features").glob(f"{name}-cases-*")
        meta = json.loads((entry / "_medscale.json").read_text())
        src = CachedFeatures(FeatureCache(cfg.cache_root), CacheKey(**meta["key"]), ds)
        assert src.case_ids()
        for case in src.case_ids():
            assert src.features(case).shape == (ds.n_slices(case), 64, 192 // 16, 192 // 16), case

