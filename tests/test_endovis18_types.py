"""endovis18_types: EndoVis18 frames with ISINet's instrument-type annotations
(`seq_N/instrument_labels_2017/<frame>_class<C>_inst<K>.png`). The reader paints instance masks
into the type label values; bad files fail alone and are named; per-type IoU from the saved
prediction PNGs equals scikit-learn's jaccard_score; a sweep FINISHES above all-background."""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from tasks.datasets import dataset_class, get_dataset
from tasks.datasets.endovis18_types import INSTANCE_DIR, TYPES
from tasks.errors import DatasetError
from tasks.targets import TARGET_HANDLERS
from tasks.targets.mask2d import slug

from .conftest import TINY, sweep_config

REL = "miccai_challenge_2018_release_1"
H, W = 10, 12


def _png(arr: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)


def _box(y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
    m = np.zeros((H, W), dtype=bool)
    m[y0:y1, x0:x1] = True
    return m


@pytest.fixture
def tiny_root(tmp_path) -> Path:
    """Hand-built layout: seq_1, seq_3 (train / val) and seq_2 (test), two frames each, masks in
    every encoding ISINet reads (0/255 grey, 0/1 grey, RGB)."""
    root = tmp_path / "ev"
    for seq in (1, 2, 3):
        sd = root / REL / f"seq_{seq}"
        for f in range(2):
            _png(np.full((H, W, 3), 40 * f + seq, dtype=np.uint8), sd / "left_frames" / f"frame{f:03d}.png")
        (sd / INSTANCE_DIR).mkdir()
    inst = root / REL / "seq_1" / INSTANCE_DIR
    _png(_box(0, 4, 0, 6).astype(np.uint8) * 255, inst / "frame000_class1_inst0.png")  # bipolar, 0/255
    _png(_box(6, 10, 0, 3).astype(np.uint8), inst / "frame000_class6_inst0.png")  # monopolar scissors, 0/1
    rgb = np.zeros((H, W, 3), dtype=np.uint8)
    rgb[_box(6, 10, 8, 12), 2] = 7  # any channel > 0
    _png(rgb, inst / "frame000_class8_inst0.png")  # suction, RGB
    _png(_box(2, 5, 4, 9).astype(np.uint8) * 255, inst / "frame000_class9_inst0.png")  # clip applier over bipolar
    _png(_box(0, 2, 0, 2).astype(np.uint8) * 255, inst / "frame000_class1_inst1.png")  # a second bipolar
    _png(_box(3, 7, 3, 7).astype(np.uint8) * 255, root / REL / "seq_2" / INSTANCE_DIR / "frame001_class7_inst0.png")
    (inst / "notes.txt").write_text("not a mask")  # other files are ignored
    return root


def test_reader_paints_instances_into_type_values(tiny_root):
    ds = get_dataset("endovis18_types", tiny_root)
    assert ds.classes == TYPES and ds.task == "multiclass" and ds.target_kind == "mask2d"
    s = ds.read_sample("seq_1/frame000")
    want = np.zeros((H, W), dtype=np.int64)
    # file-name order: class1_inst0, class1_inst1, class6, class8, class9 (the last wins overlaps)
    want[_box(0, 4, 0, 6)] = TYPES.index("bipolar-forceps") + 1
    want[_box(6, 10, 0, 3)] = TYPES.index("monopolar-curved-scissors") + 1
    want[_box(6, 10, 8, 12)] = TYPES.index("suction-instrument") + 1
    want[_box(2, 5, 4, 9)] = TYPES.index("clip-applier") + 1
    np.testing.assert_array_equal(s.target, want)
    assert s.images.shape == (1, 1, H, W, 3) and s.meta["classes"] == list(TYPES)
    assert s.meta["groups"] == {"instrument": list(range(1, 8))}
    np.testing.assert_array_equal(ds.read_sample("seq_2/frame001").target, np.where(_box(3, 7, 3, 7), 5, 0))
    assert not ds.read_sample("seq_1/frame001").target.any()  # no instance file: no instrument

    idx = ds.index().set_index("case_id")
    assert idx.loc["seq_1/frame000", "target"] == [1, 0, 0, 1, 0, 1, 1]  # presence from the file names
    assert idx.loc["seq_2/frame001", "target"] == [0, 0, 0, 0, 1, 0, 0]
    assert set(idx.loc[idx["patient_id"] == "seq_2", "split"]) == {"test"}
    assert ds.check() == []
    # its own identity: not the scene dataset's, and a changed mask file changes it
    fp = ds.fingerprint()
    assert fp != get_dataset("endovis18", tiny_root).fingerprint()
    _png(_box(0, 5, 0, 6).astype(np.uint8), tiny_root / REL / "seq_1" / INSTANCE_DIR / "frame001_class2_inst0.png")
    assert get_dataset("endovis18_types", tiny_root).fingerprint() != fp


def test_bad_masks_fail_alone_and_are_named(tiny_root):
    inst = tiny_root / REL / "seq_1" / INSTANCE_DIR
    _png(np.full((H + 2, W, 3), 255, dtype=np.uint8), inst / "frame001_class2_inst0.png")  # wrong size
    _png(np.full((H, W), 255, dtype=np.uint8), tiny_root / REL / "seq_2" / INSTANCE_DIR / "frame000_class4_inst0.png")
    (inst / "frame000_tool.png").write_bytes(b"x")  # not ISINet's naming
    ds = get_dataset("endovis18_types", tiny_root)
    with pytest.raises(DatasetError, match=r"frame001_class2_inst0\.png.*mask size 12x12 does not match the frame's 12x10"):
        ds.read_sample("seq_1/frame001")
    with pytest.raises(DatasetError, match=r"frame000_class4_inst0\.png.*class id 4 is EndoVis 2017's vessel sealer"):
        ds.read_sample("seq_2/frame000")
    assert ds.read_sample("seq_1/frame000").target.any()  # the others still read
    assert len(ds.index()) == 6  # the index does not refuse the dataset for one bad frame
    problems = {Path(p.path).name: p.message for p in ds.check()}
    assert set(problems) == {"frame001_class2_inst0.png", "frame000_class4_inst0.png", "frame000_tool.png"}


def test_missing_instance_folder_is_named(tiny_root, capsys):
    missing = tiny_root / REL / "seq_2" / INSTANCE_DIR
    shutil.rmtree(missing)
    ds = get_dataset("endovis18_types", tiny_root)
    with pytest.raises(DatasetError, match="missing instrument_labels_2017 folder") as e:
        ds.index()
    assert e.value.path == str(missing)
    with pytest.raises(DatasetError, match="instrument_labels_2017") as e:
        ds.read_sample("seq_2/frame000")
    assert e.value.path == str(missing)
    assert [p.path for p in ds.check()] == [str(missing), str(tiny_root)]  # and then no test split
    assert [p.path for p in ds.layout_problems()] == [str(missing)]
    from orchestrator.cli import main

    assert main(["datasets", "check", "endovis18_types", "--root", str(tiny_root)]) == 1
    assert f"{missing}: missing instrument_labels_2017 folder" in capsys.readouterr().out


def _jaccard(gt: np.ndarray, pred: np.ndarray) -> float:
    from sklearn.metrics import jaccard_score

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return float(jaccard_score(gt.ravel(), pred.ravel(), zero_division=0))


def _check_parity(ds, per_case: pd.DataFrame, metrics: dict[str, float], pred_png) -> int:
    """Per case and type: the row's IoU equals jaccard_score on the saved PNG vs the ground truth
    (NaN where neither has the type); iou_<type> = mean over those cases; miou = mean over types."""
    per_type: dict[str, list[float]] = {t: [] for t in TYPES}
    challenge = []  # ISINet's: per frame, the mean over the types in its ground truth
    for cid, rows in per_case[per_case["kind"] == "class"].groupby("case_id"):
        gt = ds.read_sample(cid).target
        pred = pred_png(cid)
        assert pred.shape == gt.shape
        in_gt = []
        for k, t in enumerate(TYPES, start=1):
            row = rows[rows["class"] == t].iloc[0]
            if not ((gt == k) | (pred == k)).any():
                assert np.isnan(row["iou"])
                continue
            j = _jaccard(gt == k, pred == k)
            assert row["iou"] == pytest.approx(j, abs=1e-12)
            per_type[t].append(j)
            if (gt == k).any():
                in_gt.append(j)
        if in_gt:
            challenge.append(np.mean(in_gt))
    assert metrics["iou_challenge"] == pytest.approx(np.mean(challenge), abs=1e-12)
    means = []
    for t, v in per_type.items():
        got = metrics[f"iou_{slug(t)}"]
        if v:
            assert got == pytest.approx(np.mean(v), abs=1e-12)
            means.append(np.mean(v))
        else:
            assert np.isnan(got)  # absent from every case and never predicted: left out of miou
    assert metrics["miou"] == pytest.approx(np.mean(means), abs=1e-12)
    return sum(len(v) for v in per_type.values())


def test_per_type_iou_equals_sklearn_from_saved_png(tmp_path):
    import io

    root = dataset_class("endovis18_types").synth(tmp_path / "ev", n=15, image_size=48)
    ds = get_dataset("endovis18_types", root)
    h = TARGET_HANDLERS["mask2d"]
    rng = np.random.default_rng(0)
    rows, saved = [], {}
    for cid in ds.index()["case_id"]:
        s = ds.read_sample(cid)
        pred = s.target.copy()  # the truth, shifted, with some pixels of random types
        pred = np.roll(pred, 2, axis=1)
        noise = rng.random(pred.shape) < 0.05
        pred[noise] = rng.integers(0, len(TYPES) + 1, int(noise.sum()))
        rows += h.case_metrics(s, pred, ds.classes)
        (name, data), = h.prediction_files(s, pred).items()
        assert name == f"{cid}.png"
        saved[cid] = np.asarray(Image.open(io.BytesIO(data)))
    per_case = pd.DataFrame(rows)
    n = _check_parity(ds, per_case, h.aggregate(per_case, ds.classes), saved.__getitem__)
    assert n > 20


def test_sweep_finishes_with_type_metrics_above_background(ray_session, tmp_path, one_torch_thread):
    from orchestrator.grid.config import parse_config
    from orchestrator.sweep.driver import run_sweep

    root = dataset_class("endovis18_types").synth(tmp_path / "ev", n=30, image_size=80)
    raw = sweep_config(tmp_path, {"endovis18_types": root}, grid={"resolutions": [64], "protocols": ["seg2d_linear"]},
                       resources={"extract_batch_size": 8})
    raw["protocols"] = {"seg2d_linear": {"max_steps": 60, "val_every": 20, "batch_size": 4}}
    cfg = parse_config(raw)
    outcome = run_sweep(cfg)
    (cell, status), = outcome.cells.items()
    assert status == "FINISHED" and cell.startswith(f"endovis18_types__seg2d_linear__{TINY}__64px__s0")
    res = Path(cfg.sweep_root) / "cells" / cell
    m = json.loads((res / "metrics.json").read_text())
    pc = pd.read_parquet(res / "per_case.parquet")
    test = pc[pc["split"] == "test"]
    assert set(test.loc[test["kind"] == "class", "class"]) == set(TYPES)
    present = test[(test["kind"] == "class") & (test["gt_pixels"] > 0)]["class"].unique()
    assert len(present) >= 3
    for t in present:
        assert np.isfinite(m[f"test_iou_{slug(t)}"]) and np.isfinite(m[f"test_dice_{slug(t)}"]), t
    # all-background scores 0 on every present type, so 0 mean IoU and 0 instrument IoU
    assert m["test_miou"] > 0.05 and m["test_iou_instrument"] > 0.2 and m["test_iou_challenge"] > 0.1, m
    ds = get_dataset("endovis18_types", root)
    _check_parity(ds, test, {k[5:]: v for k, v in m.items() if k.startswith("test_")},
                  lambda cid: np.asarray(Image.open(res / "predictions" / f"{cid}.png")))
