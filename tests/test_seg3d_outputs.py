"""The mask3d target handler against medpy, from the saved NIfTI prediction and the label file."""

from __future__ import annotations

import gzip

import nibabel as nib
import numpy as np
import pytest
from medpy.metric.binary import dc, hd95

from tasks.datasets import dataset_class, get_dataset
from tasks.targets import TARGET_HANDLERS


def _oblique_case(root):
    """An MSD-layout task whose case 1 has permuted, flipped axes and anisotropic voxels."""
    dataset_class("msd_liver").synth(root, n=5, image_size=20, n_slices=9)
    d = root / "Task03_Liver"
    img = nib.load(d / "imagesTr" / "liver_1.nii.gz")
    lab = nib.load(d / "labelsTr" / "liver_1.nii.gz")
    aff = np.array([[0.0, -0.7, 0.0, 5.0], [1.1, 0.0, 0.0, -3.0], [0.0, 0.0, 2.5, 40.0], [0, 0, 0, 1]])
    nib.save(nib.Nifti1Image(np.asarray(img.dataobj), aff), d / "imagesTr" / "liver_1.nii.gz")
    nib.save(nib.Nifti1Image(np.asarray(lab.dataobj), aff), d / "labelsTr" / "liver_1.nii.gz")
    return get_dataset("msd_liver", d), d


def _saved(files: dict[str, bytes], tmp_path, cid):
    path = tmp_path / f"{cid}.nii.gz"
    path.write_bytes(files[f"predictions/{cid}.nii.gz"])
    return nib.load(path)


def test_case_metrics_equal_medpy_on_saved_nifti_anisotropic(tmp_path):
    ds, d = _oblique_case(tmp_path)
    handler = TARGET_HANDLERS["mask3d"]
    s = ds.read_sample("liver_1")
    assert s.target.max() == 2
    pred = np.roll(s.target, 1, axis=2)  # off by one voxel in x: HD95 > 0 and spacing matters
    pred[:, :2] = 0
    rows = handler.case_metrics(s, pred, ds.classes)
    saved = _saved(handler.prediction_files(s, pred), tmp_path, "liver_1")
    image = nib.load(d / "imagesTr" / "liver_1.nii.gz")
    np.testing.assert_array_equal(saved.affine, image.affine)  # opens over the image in a viewer
    assert saved.shape == image.shape
    label = nib.load(d / "labelsTr" / "liver_1.nii.gz")
    p, g = np.asarray(saved.dataobj), np.asarray(label.dataobj)
    spacing = label.header.get_zooms()[:3]
    assert len(set(np.round(spacing, 3))) == 3  # anisotropic, in the file's axis order
    for k, row in enumerate(rows, start=1):
        assert row["class"] == ds.classes[k - 1]
        assert row["dice"] == pytest.approx(dc(p == k, g == k), abs=1e-12)
        assert row["hd95"] == pytest.approx(hd95(p == k, g == k, voxelspacing=spacing), abs=1e-9)
        assert row["hd95"] > 0
        # isotropic spacing would give another number: the spacing is really used
        assert row["hd95"] != pytest.approx(hd95(p == k, g == k), abs=1e-6)
    tp = np.sum((p == 1) & (g == 1))
    assert rows[0]["precision"] == pytest.approx(tp / np.sum(p == 1))
    assert rows[0]["recall"] == pytest.approx(tp / np.sum(g == 1))


def test_empty_prediction_is_nan_hd95_and_counted(tmp_path):
    ds, _ = _oblique_case(tmp_path)
    handler = TARGET_HANDLERS["mask3d"]
    rows = []
    for cid in ("liver_1", "liver_2"):
        s = ds.read_sample(cid)
        pred = np.zeros_like(s.target) if cid == "liver_1" else s.target.copy()
        rows += handler.case_metrics(s, pred, ds.classes)
    empty = [r for r in rows if r["case_id"] == "liver_1"]
    assert all(np.isnan(r["hd95"]) and r["empty_prediction"] == 1 and r["dice"] == 0 and r["precision"] == 0
               for r in empty)
    agg = handler.aggregate(rows, ds.classes)
    assert agg["n_empty_predictions"] == 2  # two classes of liver_1, never dropped silently
    assert agg["dice_liver"] == pytest.approx(0.5) and agg["dice_mean"] == pytest.approx(0.5)
    assert agg["hd95_liver"] == 0.0  # the perfect case; the empty one is NaN and counted above


def test_prediction_bytes_are_gzip_nifti_with_labels(tmp_path):
    ds, _ = _oblique_case(tmp_path)
    s = ds.read_sample("liver_3")
    files = TARGET_HANDLERS["mask3d"].prediction_files(s, s.target)
    raw = files["predictions/liver_3.nii.gz"]
    assert gzip.decompress(raw)[344:348] == b"n+1\x00"  # single-file NIfTI-1 magic
    img = _saved(files, tmp_path, "liver_3")
    np.testing.assert_array_equal(np.asarray(img.dataobj), np.asarray(nib.load(s.meta["label_path"]).dataobj))
    figs = TARGET_HANDLERS["mask3d"].figures([(s, s.target, 1.0)])
    assert list(figs) == ["figures/liver_3_dice1.000.png"] and next(iter(figs.values()))[:4] == b"\x89PNG"
