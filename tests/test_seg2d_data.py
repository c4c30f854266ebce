"""EndoVis18 and EDD2020: official layouts written by synth, splits, samples, and check naming every
bad file (a bad file fails alone)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from tasks.datasets import dataset_class, get_dataset
from tasks.datasets.endovis18 import CLASS_COLORS, NAMES, RELEASES
from tasks.errors import DatasetError


@pytest.fixture
def endovis(tmp_path):
    return dataset_class("endovis18").synth(tmp_path / "endovis18", n=30, image_size=80)


@pytest.fixture
def edd(tmp_path):
    return dataset_class("edd2020").synth(tmp_path / "edd2020", n=20, image_size=64)


def test_endovis_layout_split_and_samples(endovis):
    ds = get_dataset("endovis18", endovis)
    idx = ds.index()
    assert len(idx) == 30 and (endovis / "__MACOSX").is_dir()  # zip junk present, ignored
    seqs = {int(p.split("_")[1]) for p in idx["patient_id"]}
    assert seqs == set(range(1, 8)) | set(range(9, 17))
    test = {int(p.split("_")[1]) for p in idx.loc[idx["split"] == "test", "patient_id"]}
    val = set(idx.loc[idx["split"] == "val", "patient_id"])
    assert test == {2, 5, 9, 15} and len(val) == 1  # 10% of the 11 training sequences, seeded
    assert val == set(get_dataset("endovis18", endovis).index().query("split == 'val'")["patient_id"])
    assert ds.cell_splits(3)[1] == "official"
    s = ds.read_sample("seq_2/frame000")
    assert s.images.shape == (1, 1, 64, 80, 3) and s.images.dtype == np.uint8
    assert s.target.shape == (64, 80) and s.target.dtype == np.int64
    lab = np.asarray(Image.open(endovis / RELEASES[0] / "seq_2" / "labels" / "frame000.png"))
    for k in np.unique(s.target):  # label value k is drawn in NAMES[k]'s colour
        assert tuple(lab[s.target == k][0]) == CLASS_COLORS[NAMES[k]]
    present = idx.set_index("case_id").loc["seq_2/frame000", "target"]
    assert present == [int(k in set(np.unique(s.target))) for k in range(1, len(NAMES))]
    assert ds.check() == []


def test_endovis_check_names_every_bad_file(endovis):
    seq = endovis / RELEASES[0]
    (seq / "seq_1" / "labels" / "frame001.png").unlink()  # a frame without a label
    lab = np.asarray(Image.open(seq / "seq_3" / "labels" / "frame000.png")).copy()
    lab[:4, :4] = (1, 2, 3)  # a colour labels.json does not name
    Image.fromarray(lab).save(seq / "seq_3" / "labels" / "frame000.png")
    Image.fromarray(lab[:32]).save(seq / "seq_4" / "labels" / "frame000.png")  # mask smaller than image
    (seq / "seq_4" / "left_frames" / "frame001.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    problems = {(p.path.split("endovis18/")[1], p.message) for p in get_dataset("endovis18", endovis).check()}
    paths = {p for p, _ in problems}
    assert paths == {f"{RELEASES[0]}/seq_1/left_frames/frame001.png", f"{RELEASES[0]}/seq_3/labels/frame000.png",
                     f"{RELEASES[0]}/seq_4/labels/frame000.png", f"{RELEASES[0]}/seq_4/left_frames/frame001.png"}
    msg = dict(problems)
    assert "has no label" in msg[f"{RELEASES[0]}/seq_1/left_frames/frame001.png"]
    assert "(1, 2, 3)" in msg[f"{RELEASES[0]}/seq_3/labels/frame000.png"]
    assert "does not match image size 80x64" in msg[f"{RELEASES[0]}/seq_4/labels/frame000.png"]
    assert "cannot decode" in msg[f"{RELEASES[0]}/seq_4/left_frames/frame001.png"]
    # index() refuses the frame without a label; once it has one, a bad file fails alone
    (seq / "seq_1" / "labels" / "frame001.png").write_bytes((seq / "seq_1" / "labels" / "frame000.png").read_bytes())
    ds = get_dataset("endovis18", endovis)
    with pytest.raises(DatasetError, match="not in"):
        ds.read_sample("seq_3/frame000")
    assert ds.read_sample("seq_3/frame001").target.shape == (64, 80)


def test_endovis_labels_json_by_name(endovis):
    """labels.json is matched by name: another numbering maps to the same label values."""
    p = endovis / RELEASES[1] / "seq_5" / "labels.json"
    entries = json.loads(p.read_text())[::-1]
    for i, e in enumerate(entries):
        e["classid"] = i
    p.write_text(json.dumps(entries))
    ds = get_dataset("endovis18", endovis)
    assert ds.colour_map(p.parent) == ds.colour_map(endovis / RELEASES[0] / "seq_1")
    p.write_text(json.dumps([{"name": "mystery", "color": [1, 1, 1], "classid": 0}]))
    with pytest.raises(DatasetError, match="unknown class 'mystery'"):
        get_dataset("endovis18", endovis).colour_map(p.parent)


def test_edd_layout_cv_and_samples(edd):
    ds = get_dataset("edd2020", edd)
    idx = ds.index()
    assert len(idx) == 20 and ds.task == "multilabel"
    tests = []
    for seed in range(5):
        split, scheme = ds.cell_splits(seed)
        assert scheme == f"cv fold {seed + 1}/5" and set(split) == set(idx["case_id"])
        tests.append({c for c, v in split.items() if v == "test"})
        assert sum(v == "val" for v in split.values()) == 2  # 10% of the 16 others
    assert set().union(*tests) == set(idx["case_id"]) and sum(map(len, tests)) == 20  # folds partition
    test_of = [{c for c, v in ds.cell_splits(s)[0].items() if v == "test"} for s in (0, 5)]
    assert test_of[0] == test_of[1]  # seed 5 tests fold 1 again (its val is drawn anew)
    assert dict(zip(idx["case_id"], idx["split"], strict=True)) == ds.cell_splits(0)[0]
    assert get_dataset("edd2020", edd, seed=1).cell_splits(0)[0] != ds.cell_splits(0)[0]
    for cid, present in zip(idx["case_id"], idx["target"], strict=True):
        s = ds.read_sample(cid)
        assert s.target.dtype == bool and s.target.shape == (5, *s.images.shape[2:4])
        assert [int(m.any()) for m in s.target] == present
    overlapping = sum(int((ds.read_sample(c).target.sum(0) > 1).any()) for c in idx["case_id"])
    assert overlapping > 0  # some pixels carry two classes (HGD inside BE)
    assert ds.check() == []


def test_edd_check_names_every_bad_file(edd):
    masks = edd / "masks"
    by_image: dict[str, str] = {}
    for p in sorted(masks.iterdir()):
        by_image.setdefault(p.name.rsplit("_", 1)[0], p.name)
    names = list(by_image.values())[:2]  # masks of two different frames (a frame reports its first problem)
    (masks / names[0]).write_bytes(b"II*\x00garbage")  # unreadable mask
    Image.fromarray(np.zeros((5, 5), np.uint8)).save(masks / names[1])  # wrong size
    Image.fromarray(np.zeros((5, 5), np.uint8)).save(masks / "EDD2020_NOPE0001_polyp.tif")  # no image
    Image.fromarray(np.zeros((5, 5), np.uint8)).save(masks / "EDD2020_SYN0001_ulcer.tif")  # unknown class
    problems = {p.path.split("edd2020/")[1]: p.message for p in get_dataset("edd2020", edd).check()}
    assert set(problems) == {f"masks/{names[0]}", f"masks/{names[1]}", "masks/EDD2020_NOPE0001_polyp.tif",
                             "masks/EDD2020_SYN0001_ulcer.tif"}
    assert "cannot decode mask" in problems[f"masks/{names[0]}"]
    assert "does not match image size" in problems[f"masks/{names[1]}"]
    assert "has no image" in problems["masks/EDD2020_NOPE0001_polyp.tif"]
    assert "not a <stem>_<class>.tif" in problems["masks/EDD2020_SYN0001_ulcer.tif"]
