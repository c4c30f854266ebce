"""Datasets: official layouts, index invariants, fingerprints, check() on damaged copies, the CLI.

Real file formats throughout (PNG through Pillow, DICOM through pydicom); no Ray, CPU only. RSNA
Pneumonia and DICOM reading have their own file (tests/test_datasets_rsna.py).
"""

from __future__ import annotations

import csv
import io
import os
import shutil
from contextlib import redirect_stdout
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from orchestrator.cli import main
from tasks.datasets import DATASETS, dataset_class, get_dataset, list_datasets
from tasks.datasets.base import INDEX_COLUMNS, SPLITS, carve_val
from tasks.datasets.nih14 import CLASSES, HEADER
from tasks.errors import ConfigError, DatasetError
from tasks.protocols import protocols_for

from .conftest import damaged, problem_paths

TASKS = ("binary", "multilabel", "multiclass")
SLIDE_LABEL_EDITS = {"camelyon16": ("Normal", "Tumor"), "camelyon17": ("negative", "macro"),
                     "bcnb": ("Negative", "Positive")}
N, SIZE = 40, 32  # small and fast; the learnable signal is measured elsewhere (test_sweep)
# The label-vector datasets; dense ones (masks, instances, pairs) have their own tests (test_em, ...).
LABEL_DATASETS = [n for n in list_datasets() if dataset_class(n).target_kind == "labels"]


@pytest.fixture(scope="module")
def roots(tmp_path_factory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("datasets")
    return {name: dataset_class(name).synth(base / name, n=N, seed=0, image_size=SIZE) for name in list_datasets()}


# -- the contract, for every registered dataset ------------------------------------------------------

@pytest.mark.parametrize("name", LABEL_DATASETS)
def test_contract(name, roots):
    cls = dataset_class(name)
    assert DATASETS[name] is cls and cls.name == name
    assert cls.task in TASKS
    assert isinstance(cls.classes, tuple) and cls.classes and len(set(cls.classes)) == len(cls.classes)
    assert all(isinstance(c, str) for c in cls.classes)
    slide = getattr(cls, "kind", "image") == "slide"  # whole slides: ABMIL on tile bags, no read_image
    # Protocols pair with datasets by target and item kind (no dataset lists its protocols).
    assert set(protocols_for(cls)) == ({"abmil"} if slide else {"linear_probe", "knn"}) or cls.target_kind != "labels"
    if cls.task == "binary":
        assert len(cls.classes) == 1

    ds = get_dataset(name, roots[name])
    assert type(get_dataset(name, str(roots[name]), val_fraction=0.2, seed=3)) is cls
    idx = ds.index()
    assert tuple(idx.columns) == INDEX_COLUMNS and len(idx) == N
    assert idx["case_id"].is_unique and all(isinstance(c, str) for c in idx["case_id"])
    # A video's frames are "<video>#t=<second>": the file is the part before the fragment.
    assert all(isinstance(p, str) and os.path.isabs(p) and os.path.isfile(p.split("#")[0]) for p in idx["path"])
    assert set(idx["split"]) == set(SPLITS)
    assert all(isinstance(p, str) for p in idx["patient_id"])
    assert idx.groupby("patient_id")["split"].nunique().max() == 1
    Y = np.array(idx["target"].tolist())
    assert Y.shape == (N, len(cls.classes)) and set(np.unique(Y)) <= {0, 1}
    assert all(isinstance(v, int) for t in idx["target"] for v in t)
    if cls.task == "multiclass":
        assert (Y.sum(1) == 1).all()
    assert (Y.sum(0) > 0).all(), "every class has positives"
    assert ds.index() is idx  # cached

    if slide:  # a slide is tiled, never decoded whole: read_image points to the tile reader
        with pytest.raises(DatasetError, match="tile_slide"):
            ds.read_image(idx["path"].iloc[0])
        assert len(ds.fingerprint()) == 64 and ds.check() == []
        return
    img = ds.read_image(idx["path"].iloc[0])
    assert img.dtype == np.uint8 and (img.ndim == 2 or (img.ndim == 3 and img.shape[2] == 3))
    side = getattr(ds, "frame_size", SIZE)  # video frames are resized as the paper does (250 px)
    assert img.shape[:2] == (side, side)
    fp = ds.fingerprint()
    assert len(fp) == 64 and int(fp, 16) >= 0
    assert ds.check() == []


@pytest.mark.parametrize("name", list_datasets())
def test_synth_is_deterministic_and_refuses_a_used_directory(name, roots, tmp_path):
    again = dataset_class(name).synth(tmp_path / "again", n=N, seed=0, image_size=SIZE)
    assert get_dataset(name, again).fingerprint() == get_dataset(name, roots[name]).fingerprint()
    other = dataset_class(name).synth(tmp_path / "other", n=N, seed=1, image_size=SIZE)
    assert get_dataset(name, other).fingerprint() != get_dataset(name, roots[name]).fingerprint()
    with pytest.raises(ConfigError, match="not an empty directory"):
        dataset_class(name).synth(again, n=N, seed=0, image_size=SIZE)


def test_registry_names_unknown_datasets():
    with pytest.raises(ConfigError, match="nih14.*rsna_pneumonia"):
        dataset_class("chexpert")
    with pytest.raises(ConfigError, match="val_fraction"):
        get_dataset("nih14", "/nonexistent", val_fraction=1.5)
    get_dataset("nih14", "/nonexistent")  # construction is lazy: nothing is read yet


# -- NIH ChestX-ray14 ---------------------------------------------------------------------------

def test_nih_layout_and_targets_match_the_csv(roots):
    root = roots["nih14"]
    lines = (root / "Data_Entry_2017.csv").read_text().splitlines()
    assert lines[0] == HEADER and HEADER.startswith("Image Index,Finding Labels,Follow-up #,Patient ID,")
    rows = list(csv.reader(lines[1:]))
    assert all(len(r) == 12 and Path(root, "images", r[0]).is_file() for r in rows)
    assert all(r[0] == f"{int(r[3]):08d}_{int(r[2]):03d}.png" for r in rows)
    idx = get_dataset("nih14", root).index().set_index("case_id")
    for r in rows[:: max(1, len(rows) // 10)]:
        row = idx.loc[r[0].removesuffix(".png")]
        expect = [int(c in r[1].split("|")) for c in CLASSES]
        assert row["target"] == expect and row["patient_id"] == r[3]
        assert row["path"] == str(root / "images" / r[0])
    assert any(r[1] == "No Finding" for r in rows) or all("|" in r[1] or r[1] in CLASSES for r in rows)


def test_nih_splits_are_official_and_val_is_carved_patient_wise(roots):
    root = roots["nih14"]
    test_list = set((root / "test_list.txt").read_text().split())
    tv_list = set((root / "train_val_list.txt").read_text().split())
    assert test_list and tv_list and not test_list & tv_list
    idx = get_dataset("nih14", root).index()
    names = idx["case_id"] + ".png"
    assert set(names[idx["split"] == "test"]) == test_list
    assert set(names[idx["split"].isin(["train", "val"])]) == tv_list
    val_p = set(idx.loc[idx["split"] == "val", "patient_id"])
    assert val_p and not val_p & set(idx.loc[idx["split"] != "val", "patient_id"])

    def val_patients(**kw) -> set[str]:
        df = get_dataset("nih14", root, **kw).index()
        return set(df.loc[df["split"] == "val", "patient_id"])

    assert val_patients(seed=0) == val_p == val_patients(val_fraction=0.1, seed=0)
    assert val_patients(seed=1) != val_p
    assert len(val_patients(val_fraction=0.3)) > len(val_p)
    assert val_patients(val_fraction=0.0) == set()
    # The carve depends on the set of patients, not on their order.
    assert carve_val(["3", "1", "2", "4"], 0.5, 7) == carve_val(["4", "2", "1", "3"], 0.5, 7)


def test_nih_reads_rgba_films_as_grey_and_the_kaggle_layout(roots, tmp_path):
    root = damaged(roots, "nih14", tmp_path)
    ds = get_dataset("nih14", root)
    path = ds.index()["path"].iloc[0]
    grey = ds.read_image(path)
    Image.fromarray(np.stack([grey] * 3 + [np.full_like(grey, 255)], -1), "RGBA").save(path)
    np.testing.assert_array_equal(get_dataset("nih14", root).read_image(path), grey)
    # Kaggle's copy spreads the films over images_001/images, images_002/images, ...
    for i, f in enumerate(sorted((root / "images").glob("*.png"))):
        d = root / f"images_00{1 + i % 2}" / "images"
        d.mkdir(parents=True, exist_ok=True)
        f.rename(d / f.name)
    (root / "images").rmdir()
    kaggle = get_dataset("nih14", root)
    assert kaggle.check() == []
    assert {Path(p).parent.parent.name for p in kaggle.index()["path"]} == {"images_001", "images_002"}


def test_nih_check_reports_every_problem_with_its_file(roots, tmp_path):
    root = damaged(roots, "nih14", tmp_path)
    idx = get_dataset("nih14", root).index()
    missing = Path(idx["path"].iloc[3])
    missing.unlink()
    corrupt = Path(idx["path"].iloc[5])
    corrupt.write_bytes(corrupt.read_bytes()[:60])  # truncated PNG
    lines = (root / "Data_Entry_2017.csv").read_text().splitlines()
    first = lines[1].split(",")
    lines[1] = ",".join([first[0], "Atelectasis|Pneumonitis"] + first[2:])
    lines[2] = "garbage"
    (root / "Data_Entry_2017.csv").write_text("\n".join(lines) + "\n")
    tv = (root / "train_val_list.txt").read_text().split()
    n_test = len((root / "test_list.txt").read_text().splitlines())
    (root / "test_list.txt").write_text((root / "test_list.txt").read_text() + tv[-1] + "\nnot_there.png\n")

    problems = get_dataset("nih14", root).check()
    text = problem_paths(problems)
    assert f"{missing}: image listed in the labels is missing" in text
    assert f"{corrupt}: cannot decode image" in text
    assert "Data_Entry_2017.csv: line 2: " in text and "'Pneumonitis'" in text
    assert "Data_Entry_2017.csv: line 3: malformed row" in text
    assert f"test_list.txt: line {n_test + 1}: {tv[-1]} is also in train_val_list.txt" in text
    assert f"test_list.txt: line {n_test + 2}: not_there.png is not in Data_Entry_2017.csv" in text
    assert all(p.path.startswith(str(root)) for p in problems)

    with pytest.raises(DatasetError) as e:  # index() refuses the first of them
        get_dataset("nih14", root).index()
    assert "Data_Entry_2017.csv" in str(e.value) and "Pneumonitis" in e.value.problem


def test_nih_patient_in_two_splits_is_refused(roots, tmp_path):
    root = damaged(roots, "nih14", tmp_path)
    tv = (root / "train_val_list.txt").read_text().split()
    pid = next(n[:8] for n in tv if sum(m.startswith(n[:8]) for m in tv) > 1)  # a patient with 2+ films
    moved = next(n for n in tv if n.startswith(pid))
    (root / "train_val_list.txt").write_text("".join(f"{n}\n" for n in tv if n != moved))
    (root / "test_list.txt").write_text((root / "test_list.txt").read_text() + moved + "\n")
    text = problem_paths(get_dataset("nih14", root).check())
    assert f"patient {int(pid)} is in several splits" in text and "train_val_list.txt, test_list.txt" in text
    with pytest.raises(DatasetError, match=f"patient {int(pid)} is in more than one split"):
        get_dataset("nih14", root).index()


def test_nih_missing_files_are_named(roots, tmp_path):
    root = damaged(roots, "nih14", tmp_path)
    (root / "test_list.txt").unlink()
    (root / "Data_Entry_2017.csv").unlink()
    text = problem_paths(get_dataset("nih14", root).check())
    assert f"{root / 'test_list.txt'}: missing official split list" in text
    assert f"{root / 'Data_Entry_2017.csv'}: missing label CSV" in text
    for call in ("index", "fingerprint"):
        with pytest.raises(DatasetError, match="Data_Entry_2017.csv"):
            getattr(get_dataset("nih14", root), call)()


# -- fingerprint and read_image ----------------------------------------------------------------------

@pytest.mark.parametrize("name", LABEL_DATASETS)
def test_fingerprint_tracks_content_not_location(name, roots, tmp_path):
    root = damaged(roots, name, tmp_path)
    fp = get_dataset(name, roots[name]).fingerprint()
    assert get_dataset(name, root).fingerprint() == fp  # a copy elsewhere (new mtimes) is the same data
    assert get_dataset(name, root).fingerprint() == get_dataset(name, root).fingerprint()

    label = root / dataset_class(name).files[0].name
    text = label.read_text()
    if name in SLIDE_LABEL_EDITS:  # whole-slide datasets: flip one slide's label
        text = text.replace(*SLIDE_LABEL_EDITS[name], 1)
    label.write_text(text.replace(",0\n", ",1\n", 1) if name in ("rsna_pneumonia", "ct_rate") else
                     text.replace("No Finding", "Hernia", 1) if "No Finding" in text else
                     text.replace("|", "|Hernia|", 1) if "|" in text else
                     text.replace("\t2\n", "\t3\n", 1) if name == "autolaparo" else
                     text.replace(",Erosion\n", ",Ulcer\n", 1))
    fp_label = get_dataset(name, root).fingerprint()
    assert fp_label != fp

    img = root / Path(get_dataset(name, roots[name]).index()["path"].iloc[0].split("#")[0]).relative_to(roots[name])
    img.write_bytes(img.read_bytes() + b"\0")
    fp_size = get_dataset(name, root).fingerprint()
    assert fp_size != fp_label
    img.unlink()
    assert get_dataset(name, root).fingerprint() not in (fp, fp_label, fp_size)


def test_nih_fingerprint_includes_the_val_carve(roots):
    fps = {get_dataset("nih14", roots["nih14"], val_fraction=f, seed=s).fingerprint()
           for f, s in ((0.1, 0), (0.1, 1), (0.2, 0))}
    assert len(fps) == 3


def test_read_image_names_unreadable_files(roots, tmp_path):
    ds = get_dataset("nih14", roots["nih14"])
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not a png at all")
    for path, what in ((bad, "cannot decode image"), (tmp_path / "none.png", "missing"),
                       (tmp_path / "none.dcm", "missing")):
        with pytest.raises(DatasetError) as e:
            ds.read_image(path)
        assert e.value.path == str(path) and what in e.value.problem
    buf = io.BytesIO()
    Image.fromarray(np.arange(256 * 4, dtype=np.uint16).reshape(32, 32) * 64).save(buf, format="PNG")
    (tmp_path / "deep.png").write_bytes(buf.getvalue())
    deep = ds.read_image(tmp_path / "deep.png")
    assert deep.dtype == np.uint8 and deep.shape == (32, 32) and deep.max() > 200


# -- command line ------------------------------------------------------------------------------------

def test_cli_synth_check_and_list(tmp_path, capsys):
    root = tmp_path / "rsna"
    assert main(["datasets", "synth", "rsna_pneumonia", "--root", str(root), "--n", "40"]) == 0
    assert len(list((root / "stage_2_train_images").glob("*.dcm"))) == 40
    assert main(["datasets", "check", "rsna_pneumonia", "--root", str(root)]) == 0
    assert "OK" in capsys.readouterr().out
    assert main(["datasets", "list"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in list_datasets())

    victim = next((root / "stage_2_train_images").glob("*.dcm"))
    victim.write_bytes(b"garbage")
    assert main(["datasets", "check", "rsna_pneumonia", "--root", str(root)]) == 1
    out = capsys.readouterr()
    assert f"{victim}: cannot read DICOM" in out.out and "1 problem(s)" in out.err
    (root / "stage_2_train_labels.csv").unlink()
    (root / "train.csv").unlink()
    assert main(["datasets", "check", "rsna_pneumonia", "--root", str(root)]) == 1
    out = capsys.readouterr().out
    assert "stage_2_train_labels.csv: missing label CSV" in out and "train.csv: missing MGCA split" in out
    (root / "stage_2_train_labels.csv").write_text("patientId,x,y,width,height,Target\n")
    assert main(["datasets", "synth", "nih14", "--root", str(root)]) == 2  # not an empty directory
    assert main(["datasets", "check", "nih14", "--root", str(tmp_path / "nowhere")]) == 1


def test_nih_reads_the_2020_index_and_records_which(roots, tmp_path):
    """NIH's own download names the index Data_Entry_2017_v2020.csv: it is read (preferred when both
    exist), `check` says which file was used, and the choice is part of the fingerprint."""
    root = damaged(roots, "nih14", tmp_path)
    before = get_dataset("nih14", root).fingerprint()
    (root / "Data_Entry_2017.csv").rename(root / "Data_Entry_2017_v2020.csv")
    ds = get_dataset("nih14", root)
    assert ds.label_csv == "Data_Entry_2017_v2020.csv" and len(ds.index()) == len(get_dataset("nih14", roots["nih14"]).index())
    assert ds.fingerprint() != before
    out = io.StringIO()
    with redirect_stdout(out):
        assert main(["datasets", "check", "nih14", "--root", str(root), "--no-decode"]) == 0
    assert "labels read from Data_Entry_2017_v2020.csv" in out.getvalue()
    # Both present: the 2020 update wins.
    shutil.copy(root / "Data_Entry_2017_v2020.csv", root / "Data_Entry_2017.csv")
    assert get_dataset("nih14", root).label_csv == "Data_Entry_2017_v2020.csv"
