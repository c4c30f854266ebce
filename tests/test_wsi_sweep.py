"""Whole slides in a sweep: the Ray Data bag pipeline, ABMIL cells, slides that fail alone."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from sklearn.metrics import roc_auc_score

from orchestrator.cli import main
from orchestrator.extraction.slides import coords_root
from orchestrator.grid.config import parse_config
from orchestrator.store.cache import FeatureCache
from orchestrator.sweep.driver import run_sweep
from tasks.datasets import get_dataset
from tasks.encoders import create_encoder
from tasks.wsi.synth import synth_slide
from tasks.wsi.tiling import load_coordinates, read_coordinate_tiles, tile_slide

from .conftest import TINY, sweep_config
from .test_sweep import _runs

TILING = {"tile_size": 112}  # 4x fewer, smaller tiles than the paper's 224 px: CPU-sized


@pytest.fixture(scope="module")
def camelyon(tmp_path_factory) -> tuple[Path, dict[str, Path], Path]:
    """Synthetic CAMELYON16 plus three bad slides in training/normal: no tissue, a truncated TIFF
    and a text file named .tif; and a small synthetic CAMELYON17."""
    from tasks.datasets import dataset_class

    base = tmp_path_factory.mktemp("camelyon")
    root = dataset_class("camelyon16").synth(base / "camelyon16", n=30, seed=0)
    c17 = dataset_class("camelyon17").synth(base / "camelyon17", n=20, seed=1)
    normal = root / "training/normal"
    bad = {"blank": synth_slide(normal / "normal_900.tif", tissue=False, size=(1024, 768)).path,
           "truncated": normal / "normal_901.tif", "text": normal / "normal_902.tif"}
    data = (normal / "normal_001.tif").read_bytes()
    bad["truncated"].write_bytes(data[: len(data) // 3])
    bad["text"].write_text("this is not a slide\n")
    return root, bad, c17


@pytest.fixture(scope="module")
def first_sweep(ray_session, camelyon, tmp_path_factory):
    """ABMIL and the linear probe on CAMELYON16 (with its three bad slides), seed 0."""
    root, _, _ = camelyon
    tmp = tmp_path_factory.mktemp("wsi-sweep")
    cfg = parse_config(sweep_config(
        tmp, {"camelyon16": root}, grid={"resolutions": [32], "protocols": ["abmil", "linear_probe"]},
        protocols={"abmil": {"epochs": 40, "patience": 15, "embed_dim": 32, "attn_dim": 32}},
        dataset_options={"camelyon16": TILING}, resources={"extract_batch_size": 32}))
    return tmp, cfg, run_sweep(cfg)


@pytest.fixture(scope="module")
def second_sweep(first_sweep, camelyon, tmp_path_factory):
    """Seed 1 in the same store and cache: CAMELYON16's fold 2 of the paper's 5-fold CV with
    CAMELYON17's unseen centres as its out-of-domain test set, and BCNB's JPEG slides beside it
    (one sweep: each sweep is a Tune trial process and a Ray Data pipeline more on a CI machine)."""
    from tasks.datasets import dataset_class

    tmp, _, _ = first_sweep
    root, _, c17_root = camelyon
    bcnb = dataset_class("bcnb").synth(tmp_path_factory.mktemp("bcnb") / "bcnb", n=20, seed=0)
    cfg = parse_config(sweep_config(
        tmp, {"camelyon16": root, "camelyon17": c17_root, "bcnb": bcnb}, name="t2",
        grid={"datasets": ["camelyon16", "bcnb"], "resolutions": [32], "protocols": ["abmil", "linear_probe"],
              "seeds": [1]},
        protocols={"abmil": {"epochs": 5}},
        dataset_options={"camelyon16": {**TILING, "cv_folds": 5}, "bcnb": TILING},
        evaluate_on={"camelyon16": ["camelyon17"]}))
    return cfg, run_sweep(cfg)


def test_abmil_sweep_on_slides_learns_and_bad_slides_fail_alone(first_sweep, second_sweep, camelyon, tmp_path):
    root, bad, c17_root = camelyon
    _, cfg, outcome = first_sweep
    prefix = "camelyon16__abmil__test_vit_tiny16__32px__s0"
    cell = next(c for c in outcome.cells if c.startswith(prefix + "__"))  # + the digest of its identity
    assert outcome.cells == {cell: "FINISHED", prefix.replace("abmil", "linear_probe"): "SKIPPED"}

    # The three bad slides are named with their problem; the other slides have bags.
    res = cfg.sweep_root / "cells" / cell if isinstance(cfg.sweep_root, Path) else Path(cfg.sweep_root) / "cells" / cell
    failed = pd.read_csv(res / "failed_slides.csv").set_index("case_id")
    assert set(failed.index) == {"normal_900", "normal_901", "normal_902"}
    assert f"{bad['blank']}: no tissue found" in failed.loc["normal_900", "error"]
    assert str(bad["truncated"]) in failed.loc["normal_901", "error"]
    assert str(bad["text"]) in failed.loc["normal_902", "error"]
    metrics = json.loads((res / "metrics.json").read_text())
    assert metrics["n_failed_slides"] == 3

    # ABMIL learns the synthetic task from the tiny random encoder's tile features.
    pred = pd.read_parquet(res / "predictions.parquet")
    test = pred[pred["split"] == "test"]
    assert len(test) == 10 and roc_auc_score(test["target_Tumor"], test["score_Tumor"]) > 0.9
    assert metrics["test_auc"] == pytest.approx(roc_auc_score(test["target_Tumor"], test["score_Tumor"]))

    # Attention: one weight per tile of every val/test slide, summing to 1 per slide.
    att = pd.read_parquet(res / "attention.parquet")
    assert set(att["case_id"]) == set(pred["case_id"])
    np.testing.assert_allclose(att.groupby("case_id")["attention"].sum(), 1.0, rtol=1e-4)
    # ... and drawn over the thumbnails of the three test slides the model scores highest.
    top = test.sort_values("score_Tumor", ascending=False)["case_id"].head(3)
    assert sorted(p.stem for p in (res / "heatmaps").glob("*.png")) == sorted(top)
    assert not (res / "heatmaps_error.txt").exists()

    # A bag is exactly the encoder's embeddings of the slide's tiles, in row-major tile order.
    ds = get_dataset("camelyon16", root, **TILING)
    ex = outcome.extractions[0]
    cache = FeatureCache(cfg.cache_root)
    key = ex.keys["slides"]
    bags = cache.read_bags(key)
    assert len(bags) == len(ds.index()) - 3 and cache.meta(key)["n_slides"] == len(bags)
    slide = ds.index().iloc[0]
    coords = tile_slide(slide.path, ds.tiling).sort_values(["y", "x"])
    xy, X = bags[slide.case_id]
    np.testing.assert_array_equal(xy, coords[["x", "y"]].to_numpy())
    enc = create_encoder(TINY, device="cpu")
    from tasks.preprocess import prepare_image

    tiles = np.stack([prepare_image(t, 32, "bicubic") for t in read_coordinate_tiles(slide.path, coords)])
    ref = enc.embed(tiles, pooling=ex.job.pooling)  # bags are stored fp16: within half precision
    np.testing.assert_allclose(X, ref, rtol=2e-3, atol=2e-3 * np.abs(ref).max())
    assert key.feature_kind == "bag" and X.dtype == np.float32

    # Coordinates are kept per slide and reused: the stored file is what tile_slide gives.
    stored = load_coordinates(f"{coords_root(str(cfg.cache_root), 'camelyon16', ds.tiling.key())}/{slide.case_id}.parquet")
    assert len(stored) == len(coords)

    # `medscale wsi heatmap` draws a cell's attention over a slide, tiles matched by position.
    case = att["case_id"].iloc[0]
    path = ds.index().set_index("case_id").loc[case, "path"]
    png = tmp_path / "heat.png"
    assert main(["wsi", "heatmap", path, "--coords", f"{coords_root(str(cfg.cache_root), 'camelyon16', ds.tiling.key())}/"
                 f"{case}.parquet", "--attention", str(res / "attention.parquet"), "--out", str(png)]) == 0
    assert min(Image.open(png).size) > 100

    # Another seed, the paper's 5-fold CV on the training set (seed 1 = fold 2) and CAMELYON17's
    # unseen centres as the out-of-domain test set: CAMELYON16's bags come from the cache (folds
    # do not re-embed), CAMELYON17 is embedded with CAMELYON16's tiling.
    c17 = get_dataset("camelyon17", c17_root)
    cfg2, again = second_sweep
    cell2 = next(c for c in again.cells if c.startswith(prefix.replace("__s0", "__s1") + "__"))
    assert again.cells[cell2] == "FINISHED"
    c17_ex = next(e for e in again.extractions if e.job.dataset == "camelyon17")
    assert c17_ex.n_encoded > 0 and c17_ex.job.options == json.dumps(TILING)
    assert [e.n_encoded for e in again.extractions if e.job.dataset == "camelyon16"] == [0]  # folds: no re-embedding
    run = _runs(cfg2).set_index("cell").loc[cell2, "run"]
    assert run.data.params["split_scheme"] == "cv fold 2/5" and run.data.params["evaluate_on"] == "camelyon17"
    pred = pd.read_parquet(Path(cfg2.sweep_root) / "cells" / cell2 / "predictions.parquet")
    official = ds.index().set_index("case_id")["split"]
    cv_test = set(pred.loc[pred["split"] == "test", "case_id"])
    assert cv_test and all(official[c] != "test" for c in cv_test)  # folds come from the training set
    unseen = set(c17.index().query("split == 'test'")["case_id"])
    assert set(pred.loc[pred["split"] == "camelyon17_test", "case_id"]) == unseen
    assert "camelyon17_test_auc" in run.data.metrics

    # `medscale analyze` sees the out-of-domain test set as a curve of its own, with its own cases.
    from orchestrator.tracking import load_points, load_predictions

    points = load_points(cfg2.resolved_tracking_uri, [cfg2.name])
    ood = points[points["dataset"] == "camelyon16->camelyon17"].set_index("metric")
    assert ood.loc["auc", "value"] == pytest.approx(run.data.metrics["camelyon17_test_auc"])
    assert points.loc[points["dataset"] == "camelyon16", "run_id"].iloc[0] == run.info.run_id
    preds = load_predictions(cfg2.resolved_tracking_uri, points["run_id"].unique())
    assert set(preds[ood["run_id"].iloc[0]]["case_id"]) == unseen
    assert set(preds[run.info.run_id]["case_id"]) == cv_test


def test_bcnb_multilabel_abmil_on_jpeg_slides_runs_its_cv_fold(second_sweep):
    """BCNB's slides are plain JPEGs (OpenSlide's ImageSlide, no pyramid, no mpp): five tasks in one
    multilabel ABMIL head, on the fold the seed names (5-fold CV at 7:1:2)."""
    cfg, outcome = second_sweep
    cell = next(c for c in outcome.cells if c.startswith("bcnb__abmil__test_vit_tiny16__32px__s1__"))
    assert outcome.cells[cell] == "FINISHED"
    assert next(e for e in outcome.extractions if e.job.dataset == "bcnb").n_encoded > 0
    run = _runs(cfg).set_index("cell").loc[cell, "run"]
    assert run.data.params["split_scheme"] == "cv fold 2/5"
    pred = pd.read_parquet(Path(cfg.sweep_root) / "cells" / cell / "predictions.parquet")
    assert pred["split"].value_counts().to_dict() == {"test": 4, "val": 2}  # 7:1:2 of 20 patients
    assert {f"score_{c}" for c in ("ALN N+", "ER", "PR", "HER2", "Ki67")} <= set(pred.columns)
    per_class = pd.read_csv(Path(cfg.sweep_root) / "cells" / cell / "per_class_test.csv")
    assert len(per_class) == 5 and run.data.metrics["n_failed_slides"] == 0
