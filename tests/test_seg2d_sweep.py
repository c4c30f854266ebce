"""Acceptance of issue 11's 2D half: a sweep on synthetic EndoVis18 and EDD2020 with the tiny
encoder runs both heads; every run FINISHED with the paper's metrics (Tables 7-8), per-case
tables, masks at the original size and best/worst overlays."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from orchestrator.grid.config import parse_config
from orchestrator.sweep.driver import run_sweep
from tasks.datasets import dataset_class

from .conftest import TINY, sweep_config
from .test_sweep import _runs

PROTOCOLS = ("seg2d_linear", "seg2d_decoder")


@pytest.fixture(scope="module")
def roots(tmp_path_factory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("seg2d")
    return {"endovis18": dataset_class("endovis18").synth(base / "endovis18", n=30, image_size=80),
            "edd2020": dataset_class("edd2020").synth(base / "edd2020", n=20, image_size=64)}


def test_seg2d_sweep_end_to_end(ray_session, roots, tmp_path, one_torch_thread):
    raw = sweep_config(tmp_path, roots, grid={"resolutions": [64], "protocols": list(PROTOCOLS)},
                       resources={"extract_batch_size": 8})
    steps = {"max_steps": 40, "val_every": 10, "batch_size": 4}
    # the linear head trains on targets brought to 64 px on their longest side (EndoVis18's frames
    # are 80 px wide), the decoder on full-size ones (the default 256 is above every frame)
    raw["protocols"] = {"seg2d_linear": {**steps, "train_size": 64}, "seg2d_decoder": {**steps, "width": 32}}
    cfg = parse_config(raw)
    outcome = run_sweep(cfg)
    from orchestrator.grid.identity import prefix_of

    # ids: readable prefix + identity digest
    assert {prefix_of(c): st for c, st in outcome.cells.items()} == {
        f"{d}__{p}__{TINY}__64px__s0": "FINISHED" for d in roots for p in PROTOCOLS}
    cells = dict(outcome.cells)

    runs = _runs(cfg)
    assert sorted(runs["cell"]) == sorted(cells) and set(runs["status"]) == {"FINISHED"}
    for cell in cells:
        res = Path(cfg.sweep_root) / "cells" / cell
        m = json.loads((res / "metrics.json").read_text())
        pc = pd.read_parquet(res / "per_case.parquet")
        test = pc[pc["split"] == "test"]
        run = runs.set_index("cell").loc[cell, "run"]
        params = run.data.params
        # both heads train from the dense cache: one fp16 map per frame, written by the extraction
        assert params["feature_source"] == "cached" and params["feature_source_reason"], params
        assert params["feature_kind"] == "dense" and run.data.metrics["n_failed_cases"] == 0
        assert params["feature_precision"] == "fp32"  # planned (no GPU) and held by cached and online cells
        assert len(test["case_id"].unique()) == m["n_test"] > 0
        assert params["hp_train_size"] == ("64" if "__seg2d_linear__" in cell else "256"), params
        if cell.startswith("endovis18"):
            # Table 7: binary instrument IoU, scene-class IoU and Dice
            for k in ("test_iou_instrument", "test_miou", "test_mdice", "test_iou_instrument_shaft",
                      "test_dice_kidney_parenchyma"):
                assert np.isfinite(m[k]), k
            assert m["test_iou_instrument"] > 0.0 and m["test_miou"] > 0.0  # all-background scores 0
            assert sorted(test["case_id"].unique()) == sorted(
                f"seq_{s}/frame{f:03d}" for s in (2, 5, 9, 15) for f in range(2))
            grp = test[test["kind"] == "group"]
            assert set(grp["class"]) == {"instrument"}
            assert m["test_iou_instrument"] == pytest.approx(grp["iou"].mean())
            pred = np.asarray(Image.open(res / "predictions" / "seq_2" / "frame000.png"))
            assert pred.shape == (64, 80) and set(np.unique(pred)) <= set(range(12))
        else:
            # Table 8: Dice per class and mean, mIoU, precision, recall
            for k in ("test_mdice", "test_miou", "test_precision", "test_recall", "test_dice_be"):
                assert np.isfinite(m[k]), k
            assert m["test_mdice"] > 0.0
            assert set(test["class"]) == {"BE", "suspicious", "HGD", "cancer", "polyp", "challenge"}
            assert m["test_iou_challenge"] == pytest.approx(test.loc[test["kind"] == "frame", "iou"].mean())
            cid = sorted(test["case_id"].unique())[0]
            img = Image.open(roots["edd2020"] / "originalImages" / f"{cid}.jpg")
            pred = Image.open(res / "predictions" / f"{cid}_polyp.png")
            assert pred.size == img.size
        assert m["test_mdice"] == pytest.approx(np.mean([
            test.loc[(test["class"] == c) & (test["kind"] == "class"), "dice"].mean()
            for c in test.loc[test["kind"] == "class", "class"].unique()
            if test.loc[test["class"] == c, "dice"].notna().any()]))
        figs = sorted(p.name for p in (res / "figures").glob("*.png"))
        assert len(figs) == 2 and figs[0].startswith("best_") and figs[1].startswith("worst_")
