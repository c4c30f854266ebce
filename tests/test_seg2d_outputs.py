"""The mask2d target handler: per-case metrics equal medpy / scikit-learn recomputed from the saved
PNG masks, a 1280x1024 frame's prediction is saved 1280x1024, aggregates, overlays."""

from __future__ import annotations

import io
import warnings

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from tasks.datasets import dataset_class, get_dataset
from tasks.dense import Sample
from tasks.encoders import create_encoder
from tasks.features import OnlineFeatures
from tasks.protocols import create_protocol
from tasks.targets import TARGET_HANDLERS
from tasks.targets.mask2d import case_score, overlap

TINY = "test_vit_tiny16"


def _medpy_sklearn(pred: np.ndarray, gt: np.ndarray) -> tuple[float, float]:
    from medpy.metric.binary import dc
    from sklearn.metrics import jaccard_score

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return float(dc(pred, gt)), float(jaccard_score(gt.ravel(), pred.ravel(), zero_division=0))


def _fit(name: str, root, res: int = 64, steps: int = 15):
    ds = get_dataset(name, root)
    src = OnlineFeatures(create_encoder(TINY, "random", "cpu"), ds, res, keep=1000)
    split, _ = ds.cell_splits(0)
    ids = {s: sorted(c for c, v in split.items() if v == s) for s in ("train", "val", "test")}
    head = create_protocol("seg2d_linear", task=ds.task, max_steps=steps, val_every=5, batch_size=4,
                           device="cpu").fit(src, ids["train"], ids["val"])
    return ds, src, head, ids


@pytest.fixture(scope="module")
def endovis_root(tmp_path_factory):
    return dataset_class("endovis18").synth(tmp_path_factory.mktemp("ev") / "endovis18", n=30, image_size=80)


@pytest.fixture(scope="module")
def edd_root(tmp_path_factory):
    return dataset_class("edd2020").synth(tmp_path_factory.mktemp("edd") / "edd2020", n=20, image_size=64)


def test_parity_multiclass_png(endovis_root, tmp_path, one_torch_thread):
    """Each case's Dice / IoU equal medpy's dc and scikit-learn's jaccard_score recomputed from the
    saved palette PNG (whose pixel values are the label values) and the ground truth."""
    ds, src, head, ids = _fit("endovis18", endovis_root)
    h = TARGET_HANDLERS["mask2d"]
    checked = 0
    for cid in ids["test"]:
        s = src.sample(cid)
        pred = head.predict(src, cid)
        files = h.prediction_files(s, pred)
        assert list(files) == [f"{cid.split('/')[0]}/{cid.split('/')[1]}.png"]  # seq_N/frameNNN.png
        (tmp_path / cid.split("/")[0]).mkdir(exist_ok=True)
        (tmp_path / list(files)[0]).write_bytes(files[list(files)[0]])
        saved = np.asarray(Image.open(tmp_path / list(files)[0]))
        np.testing.assert_array_equal(saved, pred)
        rows = h.case_metrics(s, pred, ds.classes)
        in_gt = []
        for r in rows:
            if r["kind"] == "frame":  # the challenge IoU: mean over the classes in the ground truth
                want = np.mean(in_gt) if in_gt else np.nan
                assert r["class"] == "challenge" and r["iou"] == pytest.approx(want, abs=1e-12, nan_ok=True)
                continue
            if r["kind"] == "class":
                k = ds.classes.index(r["class"]) + 1
                p, g = saved == k, s.target == k
                if g.any():
                    in_gt.append(_medpy_sklearn(p, g)[1])
            else:
                vals = s.meta["groups"][r["class"]]
                p, g = np.isin(saved, vals), np.isin(s.target, vals)
            if not (p.any() or g.any()):  # the stated convention: nothing to score -> NaN
                assert np.isnan(r["dice"]) and np.isnan(r["iou"])
                continue
            d, j = _medpy_sklearn(p, g)
            assert r["dice"] == pytest.approx(d, abs=1e-12) and r["iou"] == pytest.approx(j, abs=1e-12)
            checked += 1
    assert checked > 10


def test_parity_multilabel_pngs(edd_root, tmp_path, one_torch_thread):
    ds, src, head, ids = _fit("edd2020", edd_root)
    h = TARGET_HANDLERS["mask2d"]
    checked = 0
    for cid in ids["test"]:
        s = src.sample(cid)
        pred = head.predict(src, cid)
        assert pred.dtype == bool and pred.shape == s.target.shape
        files = h.prediction_files(s, pred)
        assert sorted(files) == sorted(f"{cid}_{c}.png" for c in ds.classes)
        for r in h.case_metrics(s, pred, ds.classes):
            if r["kind"] == "frame":  # the challenge IoU row (checked in the multiclass test)
                continue
            k = ds.classes.index(r["class"])
            (tmp_path / f"{cid}_{r['class']}.png").write_bytes(files[f"{cid}_{r['class']}.png"])
            saved = np.asarray(Image.open(tmp_path / f"{cid}_{r['class']}.png")) == 255
            assert saved.shape == s.target.shape[1:]
            g = s.target[k]
            if not (saved.any() or g.any()):
                assert np.isnan(r["dice"])
                continue
            d, j = _medpy_sklearn(saved, g)
            assert r["dice"] == pytest.approx(d, abs=1e-12) and r["iou"] == pytest.approx(j, abs=1e-12)
            checked += 1
    assert checked >= 4


def test_full_size_frame_gives_full_size_mask(tmp_path, one_torch_thread):
    """A 1280x1024 EndoVis18 frame (the real size) among small ones: read at 1280x1024, predicted
    and saved at 1280x1024, whatever size the head trained at."""
    root = dataset_class("endovis18").synth(tmp_path / "ev", n=15, image_size=80)
    seq2 = root / "miccai_challenge_2018_release_1" / "seq_2"
    for sub in ("left_frames", "labels"):
        small = Image.open(seq2 / sub / "frame000.png")
        small.resize((1280, 1024), Image.Resampling.NEAREST).save(seq2 / sub / "frame000.png")
    ds, src, head, ids = _fit("endovis18", root, res=32, steps=3)
    cid = "seq_2/frame000"
    assert cid in ids["test"]
    s = src.sample(cid)
    assert s.images.shape == (1, 1, 1024, 1280, 3) and s.target.shape == (1024, 1280)
    pred = head.predict(src, cid)
    assert pred.shape == (1024, 1280)
    png = next(iter(TARGET_HANDLERS["mask2d"].prediction_files(s, pred).values()))
    assert Image.open(io.BytesIO(png)).size == (1280, 1024)  # PIL: (W, H)
    assert head.predict_scores(src, cid).shape == (len(ds.classes) + 1, 1024, 1280)


def test_aggregate_names_and_conventions():
    h = TARGET_HANDLERS["mask2d"]
    gt = np.zeros((4, 6), dtype=np.int64)
    gt[:2, :3] = 1
    pred = gt.copy()
    pred[:2, 3] = 2  # class 2 predicted where absent: dice 0, precision 0
    s = Sample("a", np.zeros((1, 1, 4, 6, 3), np.uint8), gt, meta={"groups": {"any": [1, 2]}})
    rows = h.case_metrics(s, pred, ("one", "two", "three"))
    by = {r["class"]: r for r in rows}
    assert by["one"]["dice"] == 1.0 and by["two"]["dice"] == 0.0 and by["two"]["precision"] == 0.0
    assert np.isnan(by["three"]["dice"])  # absent from both: not scored
    assert by["any"]["kind"] == "group" and by["any"]["iou"] == pytest.approx(6 / 8)
    agg = h.aggregate(rows, ("one", "two", "three"))
    assert agg["dice_one"] == 1.0 and agg["dice_two"] == 0.0 and np.isnan(agg["dice_three"])
    assert agg["mdice"] == 0.5 and agg["miou"] == 0.5 and agg["iou_any"] == pytest.approx(0.75)
    assert agg["n_cases"] == 1.0
    assert case_score(rows) == 0.5
    assert overlap(np.zeros(3, bool), np.ones(3, bool))["recall"] == 0.0
    with pytest.raises(ValueError, match="prediction size"):
        h.case_metrics(s, pred[:, :5], ("one", "two", "three"))


def test_best_and_worst_overlays(endovis_root):
    ds = get_dataset("endovis18", endovis_root)
    h = TARGET_HANDLERS["mask2d"]
    cases = []
    for cid, score in zip(ds.index()["case_id"][:3], (0.2, float("nan"), 0.9), strict=True):
        s = ds.read_sample(cid)
        cases.append((s, s.target, score))
    figs = h.figures(cases)
    names = sorted(figs)
    assert len(names) == 2 and names[0].startswith("best_") and names[1].startswith("worst_")
    assert cases[2][0].meta["stem"] in names[0] and cases[0][0].meta["stem"] in names[1]
    im = Image.open(io.BytesIO(figs[names[0]]))
    assert im.size == (80 * 3, 64)  # image | ground truth | prediction, at the frame's size


def test_challenge_iou_is_a_per_case_value_analyze_can_resample():
    """iou_challenge has per-case values in the per-case table (its `frame` rows), and the
    analysis' case mean over them is the logged aggregate."""
    from analysis.casemetrics import case_mean, case_values

    h = TARGET_HANDLERS["mask2d"]
    classes = ["a", "b"]
    gt = [np.array([[1, 1], [2, 0]]), np.array([[0, 0], [0, 0]]), np.array([[2, 2], [0, 0]])]
    pred = [np.array([[1, 0], [2, 2]]), np.array([[1, 0], [0, 0]]), np.array([[2, 0], [0, 0]])]
    rows = [r for i, (g, p) in enumerate(zip(gt, pred, strict=True))
            for r in h.case_metrics(Sample(case_id=f"c{i}", images=np.zeros((1, 1, 2, 2), np.uint8), target=g),
                                    p, classes)]
    table = pd.DataFrame(rows)
    v = case_values(table, "iou_challenge")
    # c0: mean(iou a = 1/2, iou b = 1/2); c1: nothing in the ground truth -> NaN; c2: iou b = 1/2
    assert list(v.columns) == ["challenge"] and v["challenge"].tolist()[0::2] == [0.5, 0.5]
    assert np.isnan(v.loc["c1", "challenge"])
    logged = h.aggregate(table, classes)["iou_challenge"]
    assert case_mean(v.to_numpy(), None, np.ones((1, 3))) == pytest.approx([logged])
