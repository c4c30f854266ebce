"""Kvasir-Capsule, CT-RATE (and AutoLaparo): `datasets check` on planted faults, and sweeps in which
the synthetic tasks are learned and a broken file fails its dataset's cells alone, by name."""

from __future__ import annotations

import gzip
import shutil
from pathlib import Path

import pandas as pd
import pytest

from orchestrator.cli import main
from orchestrator.grid.config import parse_config
from orchestrator.sweep.driver import run_sweep
from tasks.datasets import dataset_class, get_dataset
from tasks.datasets.autolaparo import FPS, frame_number, parse_ref, read_frames

from .conftest import sweep_config
from .test_sweep import _runs

SIZES = {"kvasir_capsule": (110, 32), "ct_rate": (40, 32), "autolaparo": (147, 32)}  # (n, image side): tiny and fast


@pytest.fixture(scope="module")
def roots(tmp_path_factory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("breadth")
    return {name: dataset_class(name).synth(base / name, n=n, seed=0, image_size=s) for name, (n, s) in SIZES.items()}


def copy(roots: dict[str, Path], name: str, tmp_path: Path) -> Path:
    dst = tmp_path / name
    shutil.copytree(roots[name], dst)
    return dst


def check_out(name: str, root: Path, capsys) -> str:
    code = main(["datasets", "check", name, "--root", str(root)])
    out = capsys.readouterr().out
    assert code == 1, out
    return out


def test_kvasir_layout_classes_and_split(roots):
    ds = get_dataset("kvasir_capsule", roots["kvasir_capsule"])
    idx = ds.index()
    assert len(ds.classes) == 11 and "Polyp" not in ds.classes  # < 50 samples in the release: dropped
    assert len(idx) == SIZES["kvasir_capsule"][0]  # the Polyp frame in the split files is ignored
    split0 = (roots["kvasir_capsule"] / "official_splits/split_0.csv").read_text()
    for r in idx.itertuples():
        assert (f"{Path(r.path).name}," in split0) == (r.split in ("train", "val"))
        assert Path(r.path).parent.name == dict(enumerate(c for c in (
            "Angiectasia", "Blood - fresh", "Erosion", "Erythema", "Foreign body", "Ileocecal valve",
            "Lymphangiectasia", "Normal clean mucosa", "Pylorus", "Reduced mucosal view", "Ulcer")))[r.target.index(1)]
    assert idx.groupby("patient_id")["split"].nunique().max() == 1  # video-wise


def test_kvasir_check_names_planted_faults(roots, tmp_path, capsys):
    root = copy(roots, "kvasir_capsule", tmp_path)
    idx = get_dataset("kvasir_capsule", root).index()
    gone, bad = Path(idx["path"].iloc[0]), Path(idx["path"].iloc[1])
    gone.unlink()
    bad.write_bytes(b"not a jpeg")
    split1 = root / "official_splits/split_1.csv"
    split1.write_text(split1.read_text() + "ffffffffffffffff_1.jpg,Gastric cancer\n")
    out = check_out("kvasir_capsule", root, capsys)
    assert f"{gone}: image listed in the labels is missing" in out
    assert f"{bad}: cannot decode image" in out
    assert f"{split1}: line" in out and "unknown label 'Gastric cancer'" in out


def test_ct_rate_check_names_planted_faults(roots, tmp_path, capsys):
    root = copy(roots, "ct_rate", tmp_path)
    idx = get_dataset("ct_rate", root).index()
    broken, gone = Path(idx["path"].iloc[0]), Path(idx["path"].iloc[1])
    data = gzip.decompress(broken.read_bytes())
    broken.write_bytes(gzip.compress(b"\0" * 348 + data[348:]))
    gone.unlink()
    meta = root / "dataset/metadata/train_metadata.csv"
    lines = meta.read_text().splitlines()
    victim = lines[3].split(",")[0]
    meta.write_text("\n".join(lines[:3] + lines[4:]) + "\n")
    out = check_out("ct_rate", root, capsys)
    assert f"{broken}: cannot read NIfTI header" in out
    assert f"{gone}: image listed in the labels is missing" in out
    assert f"{victim} has no row (RescaleSlope/Intercept)" in out


def test_autolaparo_samples_one_frame_per_second(roots):
    ds = get_dataset("autolaparo", roots["autolaparo"])
    idx = ds.index()
    assert len(idx) == SIZES["autolaparo"][0]
    assert sorted(idx.groupby("split")["patient_id"].nunique().items()) == [("test", 7), ("train", 10), ("val", 4)]
    video, _ = parse_ref(idx["path"].iloc[0])
    times = [t for v, t in map(parse_ref, idx["path"]) if v == video]
    assert times == list(range(len(times)))  # one row per labelled second
    # The frame taken for second t is the one whose timestamp is t: frame number t * 25.
    for (ts, img), t in zip(read_frames(video, times, None), times, strict=True):
        assert ts == pytest.approx(t, abs=1e-6) and frame_number(img) == t * FPS
    # A batch is read in one streaming pass per video and equals frame-by-frame reads at 250 px.
    batch = list(idx["path"].iloc[:10])
    imgs = ds.read_images(batch)
    assert all(i.shape == (250, 250, 3) for i in imgs)
    assert [frame_number(i) for i in imgs] == [parse_ref(p)[1] * FPS for p in batch]
    assert all((a == ds.read_image(p)).all() for a, p in zip(imgs[:3], batch[:3], strict=True))


def test_autolaparo_check_names_planted_faults(roots, tmp_path, capsys):
    root = copy(roots, "autolaparo", tmp_path)
    corrupt, gone = root / "videos/03.mp4", root / "videos/16.mp4"
    data = corrupt.read_bytes()
    corrupt.write_bytes(data[:64] + b"\xff" * (len(data) - 64))
    gone.unlink()
    labels = root / "labels/label_05.txt"
    labels.write_text(labels.read_text() + "7\t9\n")
    out = check_out("autolaparo", root, capsys)
    assert f"{corrupt}: cannot decode video" in out
    assert f"{gone}: video listed in the labels is missing" in out
    assert f"{labels}: line 9: expected '<second><TAB><phase 1-7>'" in out
    assert out.count(f"{corrupt}:") == 1  # one line per broken video, not one per frame


@pytest.mark.slow
def test_sweep_learns_the_synthetic_tasks_and_broken_files_fail_alone_by_name(ray_session, roots, tmp_path):
    """One sweep over the three layouts, with one CT volume's header zeroed and one AutoLaparo video
    corrupted: the broken volume and every frame of the corrupt video are left out of the features
    and named, every cell still runs on the rest, records what it lost, and learns its task."""
    ct = copy(roots, "ct_rate", tmp_path)
    broken = Path(get_dataset("ct_rate", ct).index()["path"].iloc[5])
    data = gzip.decompress(broken.read_bytes())
    broken.write_bytes(gzip.compress(b"\0" * 348 + data[348:]))
    lap = copy(roots, "autolaparo", tmp_path)
    corrupt = lap / "videos/12.mp4"
    data = corrupt.read_bytes()
    corrupt.write_bytes(data[:64] + b"\xff" * (len(data) - 64))
    frames = get_dataset("autolaparo", lap).index()
    n_frames = int(frames["path"].str.startswith(f"{corrupt}#").sum())
    assert n_frames > 0
    cfg = parse_config(sweep_config(tmp_path, {**roots, "ct_rate": ct, "autolaparo": lap},
                                    grid={"resolutions": [32]}, resources={"extract_batch_size": 32}))
    outcome = run_sweep(cfg)
    assert set(outcome.cells.values()) == {"FINISHED"} and len(outcome.cells) == 6
    runs = _runs(cfg)
    assert len(runs) == 6 and set(runs["status"]) == {"FINISHED"}
    for cell, r in zip(runs["cell"], runs["run"], strict=True):
        m = r.data.metrics
        lost = Path(cfg.sweep_root) / "cells" / cell / "failed_cases.csv"
        if cell.startswith("kvasir"):
            assert m["n_failed_cases"] == 0 and not lost.exists()
            assert {"test_precision_macro", "test_recall_weighted", "test_f1_macro", "test_acc"} <= set(m), m
            assert m["test_acc"] > 2 / 11, (cell, m["test_acc"])  # chance: 1/11
            continue
        errors = pd.read_csv(lost)["error"]
        if cell.startswith("ct_rate"):
            assert m["n_failed_cases"] == 1
            assert errors.str.contains(f"{broken}: cannot read NIfTI header", regex=False).all()
            assert m["test_auc"] > 0.55, (cell, m["test_auc"])  # chance: 0.5
        else:
            assert m["n_failed_cases"] == n_frames == len(errors)
            assert errors.str.startswith(f"{corrupt}: cannot decode video").all()
            assert {"test_jaccard_macro", "test_video_acc", "test_video_precision", "test_video_recall",
                    "test_video_jaccard"} <= set(m), m
            assert m["test_acc"] > 2 / 7 and m["test_video_acc"] > 2 / 7, (cell, m)  # chance: 1/7
