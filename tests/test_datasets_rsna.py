"""RSNA Pneumonia (MGCA splits) and DICOM reading: the official layout, real DICOM films, check() on
damaged copies. Real files through pydicom; no Ray, CPU only."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import pytest

from tasks.datasets import dataset_class, get_dataset
from tasks.datasets.base import SPLITS, read_dicom
from tasks.datasets.rsna import FilmWriter, dicom_bytes, film_dataset, film_uids, jpeg_bytes
from tasks.errors import DatasetError

from .conftest import damaged, problem_paths

N, SIZE = 40, 32  # as tests/test_datasets.py


@pytest.fixture(scope="module")
def roots(tmp_path_factory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("rsna")
    return {"rsna_pneumonia": dataset_class("rsna_pneumonia").synth(base / "rsna_pneumonia", n=N, seed=0, image_size=SIZE)}


def test_rsna_layout_mgca_splits_and_targets(roots):
    root = roots["rsna_pneumonia"]
    labels = pd.read_csv(root / "stage_2_train_labels.csv")
    assert list(labels.columns) == ["patientId", "x", "y", "width", "height", "Target"]
    assert labels.loc[labels["Target"] == 0, ["x", "y", "width", "height"]].isna().all().all()
    assert labels.loc[labels["Target"] == 1, ["x", "y", "width", "height"]].notna().all().all()
    info = pd.read_csv(root / "stage_2_detailed_class_info.csv")
    assert len(info) == len(labels) and set(info["class"]) <= {"Lung Opacity", "No Lung Opacity / Not Normal", "Normal"}
    idx = get_dataset("rsna_pneumonia", root).index().set_index("case_id")
    assert (idx.index == idx["patient_id"]).all()
    truth = labels.groupby("patientId")["Target"].max()
    assert {k: [int(v)] for k, v in truth.items()} == idx["target"].to_dict()
    for split in SPLITS:
        mgca = pd.read_csv(root / f"{split}.csv")
        assert list(mgca.columns) == ["patientId", "bbox", "Target"]
        assert set(mgca["patientId"]) == set(idx.index[idx["split"] == split])
        assert mgca["bbox"].isna().eq(mgca["Target"] == 0).all()
    assert 0.2 < np.mean([t[0] for t in idx["target"]]) < 0.4
    # MGCA's split carries its own validation set: val_fraction/seed change neither index nor key.
    other = get_dataset("rsna_pneumonia", root, val_fraction=0.3, seed=5)
    assert other.index().equals(get_dataset("rsna_pneumonia", root).index())
    assert other.fingerprint() == get_dataset("rsna_pneumonia", root).fingerprint()


def test_rsna_films_are_real_dicom(roots):
    root = roots["rsna_pneumonia"]
    ds = get_dataset("rsna_pneumonia", root)
    path = ds.index()["path"].iloc[0]
    dcm = pydicom.dcmread(path)
    assert dcm.file_meta.TransferSyntaxUID == pydicom.uid.JPEGBaseline8Bit
    assert dcm.SOPClassUID == pydicom.uid.SecondaryCaptureImageStorage and dcm.Modality == "CR"
    assert dcm.PhotometricInterpretation == "MONOCHROME2" and (dcm.Rows, dcm.Columns) == (SIZE, SIZE)
    assert dcm.PatientID == Path(path).stem
    np.testing.assert_array_equal(ds.read_image(path), dcm.pixel_array)
    # The fast writer writes exactly what pydicom writes for the same film.
    px = ds.read_image(path)
    pid = dcm.PatientID
    ref = dicom_bytes(film_dataset(jpeg_bytes(px), px.shape, pid, film_uids(0, pid)))
    assert FilmWriter(px.shape, 0).film_bytes(px, pid) == ref


def test_read_dicom_rescales_windows_and_inverts(tmp_path):
    def write(arr: np.ndarray, **attrs) -> Path:
        ds = pydicom.Dataset()
        ds.file_meta = pydicom.dataset.FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
        ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID = pydicom.uid.generate_uid()
        ds.Rows, ds.Columns, ds.SamplesPerPixel = *arr.shape, 1
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
        ds.PhotometricInterpretation = "MONOCHROME2"
        for k, v in attrs.items():
            setattr(ds, k, v)
        ds.PixelData = arr.astype(np.uint16).tobytes()
        path = tmp_path / f"{len(list(tmp_path.iterdir()))}.dcm"
        pydicom.dcmwrite(path, ds, enforce_file_format=True)
        return path

    ramp = np.arange(0, 4096, 16, dtype=np.uint16).reshape(16, 16)
    out = read_dicom(write(ramp))
    assert out.dtype == np.uint8 and out.min() == 0 and out.max() == 255 and out[0, 1] < out[15, 15]
    inverted = read_dicom(write(ramp, PhotometricInterpretation="MONOCHROME1"))
    np.testing.assert_array_equal(inverted, 255 - out)
    windowed = read_dicom(write(ramp, RescaleSlope=2, RescaleIntercept=-1000, WindowCenter=1000, WindowWidth=2000))
    x = ramp * 2.0 - 1000
    np.testing.assert_array_equal(windowed, np.clip(np.rint(x / 2000 * 255), 0, 255).astype(np.uint8))


@pytest.mark.filterwarnings("ignore:End of file reached")  # pydicom on the truncated file
def test_rsna_check_reports_every_problem_with_its_file(roots, tmp_path):
    root = damaged(roots, "rsna_pneumonia", tmp_path)
    idx = get_dataset("rsna_pneumonia", root).index()
    truncated, garbage, gone = (Path(p) for p in idx["path"].iloc[:3])
    truncated.write_bytes(truncated.read_bytes()[:-200])
    garbage.write_bytes(b"\0" * 128 + b"DICM" + os.urandom(300))
    gone.unlink()
    val = (root / "val.csv").read_text().splitlines()
    (root / "test.csv").write_text((root / "test.csv").read_text() + val[1] + "\n")

    text = problem_paths(get_dataset("rsna_pneumonia", root).check())
    assert f"{truncated}: cannot read DICOM" in text
    assert f"{garbage}: cannot read DICOM" in text
    assert f"{gone}: image listed in the labels is missing" in text
    assert f"test.csv: line {len(pd.read_csv(root / 'test.csv')) + 1}: {val[1].split(',')[0]} is also in val.csv" in text
    for p in (truncated, garbage):
        with pytest.raises(DatasetError) as e:
            get_dataset("rsna_pneumonia", root).read_image(p)
        assert str(p) in str(e.value)


def test_rsna_check_reports_label_problems(roots, tmp_path):
    root = damaged(roots, "rsna_pneumonia", tmp_path)
    labels = (root / "stage_2_train_labels.csv").read_text().splitlines()
    neg = next(i for i, line in enumerate(labels) if line.endswith(",,,,,0"))
    pid = labels[neg].split(",")[0]
    labels[neg] = f"{pid},,,,,2"
    pos = next(i for i, line in enumerate(labels) if line.endswith(",1"))
    labels[pos] = labels[pos].split(",")[0] + ",,,,,1"
    labels.append("stranger,,,,,0")
    (root / "stage_2_train_labels.csv").write_text("\n".join(labels) + "\n")
    train = (root / "train.csv").read_text().splitlines()
    train.append("not-a-patient,,0")
    (root / "train.csv").write_text("\n".join(train) + "\n")
    text = problem_paths(get_dataset("rsna_pneumonia", root).check())
    assert f"stage_2_train_labels.csv: line {neg + 1}: malformed row (patientId '{pid}', Target '2')" in text
    assert f"stage_2_train_labels.csv: line {pos + 1}: " in text and "Target 1 with box" in text
    assert f"train.csv: line {len(train)}: 'not-a-patient' is not in stage_2_train_labels.csv" in text


def test_rsna_missing_label_csv_is_named(roots, tmp_path):
    root = damaged(roots, "rsna_pneumonia", tmp_path)
    (root / "stage_2_train_labels.csv").unlink()
    problems = get_dataset("rsna_pneumonia", root).check()
    assert [p.path for p in problems] == [str(root / "stage_2_train_labels.csv")]
    for call in ("index", "fingerprint"):
        with pytest.raises(DatasetError, match="stage_2_train_labels.csv"):
            getattr(get_dataset("rsna_pneumonia", root), call)()


