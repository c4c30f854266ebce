"""3D segmentation datasets: MSD (ten tasks), AutoPET-II, HECKTOR22 in their official layouts."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest

from tasks.datasets import DATASETS, dataset_class, get_dataset
from tasks.errors import ConfigError, DatasetError

MSD = ["msd_brain", "msd_heart", "msd_liver", "msd_hippocampus", "msd_prostate", "msd_lung", "msd_pancreas",
       "msd_hepatic_vessel", "msd_spleen", "msd_colon"]


def test_all_twelve_registered_as_mask3d_volumes():
    for name in [*MSD, "autopet2", "hecktor22"]:
        cls = DATASETS[name]
        assert cls.target_kind == "mask3d" and cls.kind == "volume" and cls.task == "multiclass", name
    assert DATASETS["msd_brain"].n_modalities == 4 and DATASETS["msd_prostate"].n_modalities == 2
    assert DATASETS["hecktor22"].classes == ("GTVp", "GTVn")


@pytest.mark.parametrize("name", MSD)
def test_msd_synth_checks_clean_and_reads_canonical(tmp_path, name):
    dataset_class(name).synth(tmp_path, n=6, image_size=16, n_slices=5)
    ds = get_dataset(name, tmp_path)  # the directory holding TaskNN_Name/ works as the root
    assert ds.check() == []
    idx = ds.index()
    assert len(idx) == 6 and not any(c.startswith("._") for c in idx["case_id"])  # resource fork ignored
    cid = idx["case_id"][0]
    s = ds.read_sample(cid)
    assert s.images.shape == (ds.n_modalities, 5, 16, 16) and s.images.dtype == np.uint8
    assert s.target.shape == (5, 16, 16) and 1 <= s.target.max() <= len(ds.classes)
    assert ds.n_slices(cid) == 5
    np.testing.assert_allclose(s.spacing, (2.5, 0.8, 0.8), rtol=1e-6)
    # The file is LPS-like (x and y flipped): canonical (z, y, x) is the file's array flipped on x, y.
    raw = np.asarray(nib.load(ds.label_path(cid)).dataobj)
    np.testing.assert_array_equal(s.target, raw[::-1, ::-1, :].transpose(2, 1, 0))
    np.testing.assert_array_equal(s.affine, nib.load(s.meta["path"]).affine)


def test_msd_folds_partition_patients_and_seed_is_fold(tmp_path):
    dataset_class("msd_spleen").synth(tmp_path, n=20, image_size=8, n_slices=3)
    ds = get_dataset("msd_spleen", tmp_path)
    tests = []
    for seed in range(5):
        splits, scheme = ds.cell_splits(seed)
        assert scheme == f"cv5-fold{seed}"
        test = {c for c, v in splits.items() if v == "test"}
        val = [c for c, v in splits.items() if v == "val"]
        assert len(test) == 4 and len(val) == round(0.2 * 16)  # 80/20 train/val within the fold
        tests.append(test)
    assert set().union(*tests) == set(ds.index()["case_id"]) and sum(map(len, tests)) == 20
    assert ds.cell_splits(7) == ds.cell_splits(2)  # seed % folds
    assert ds.fingerprint() != get_dataset("msd_spleen", tmp_path, ct_window=(-100, 200)).fingerprint()


def test_msd_bad_file_fails_alone_and_layout_errors_name_the_file(tmp_path):
    dataset_class("msd_prostate").synth(tmp_path, n=5, image_size=8, n_slices=3)
    d = tmp_path / "Task05_Prostate"
    (d / "labelsTr" / "prostate_2.nii.gz").write_bytes(b"not a nifti")
    ds = get_dataset("msd_prostate", d)
    problems = ds.check()
    assert [p.path.endswith("labelsTr/prostate_2.nii.gz") for p in problems] == [True]
    assert ds.read_sample("prostate_3").images.shape[0] == 2  # the others still read
    with pytest.raises(DatasetError, match="prostate_2"):
        ds.read_sample("prostate_2")
    meta = json.loads((d / "dataset.json").read_text())
    meta["modality"] = {"0": "T2"}
    (d / "dataset.json").write_text(json.dumps(meta))
    assert any("1 modalities" in p.message for p in get_dataset("msd_prostate", d).check())
    with pytest.raises(ConfigError, match="ct_window"):
        get_dataset("msd_spleen", d, ct_window=(5, 1))


@pytest.mark.parametrize("name", ["autopet2", "hecktor22"])
def test_petct_modalities_split_and_check(tmp_path, name):
    dataset_class(name).synth(tmp_path, n=10, image_size=16, n_slices=4)
    both = get_dataset(name, tmp_path)
    assert both.check() == []
    idx = both.index()
    assert (idx["split"] == "test").sum() == 2  # 80/20, seeded
    cid = idx["case_id"][0]
    s = both.read_sample(cid)
    assert s.images.shape == (2, 4, 16, 16) and s.meta["modality"] == "ct+pet"
    ct, pet = (get_dataset(name, tmp_path, modality=m).read_sample(cid).images for m in ("ct", "pet"))
    np.testing.assert_array_equal(ct[0], s.images[0])
    np.testing.assert_array_equal(pet[0], s.images[1])
    # The PET signal is on the label grid (HECKTOR's coarser PET is resampled): hot where lesions are.
    assert pet[0][s.target > 0].mean() > pet[0][s.target == 0].mean() + 50
    fps = {get_dataset(name, tmp_path, modality=m).fingerprint() for m in ("ct", "pet", "ct+pet")}
    assert len(fps) == 3  # the modality is part of the identity (and so of every cache key)
    with pytest.raises(ConfigError, match="modality"):
        get_dataset(name, tmp_path, modality="mri")


def test_hecktor_missing_pet_fails_alone(tmp_path):
    dataset_class("hecktor22").synth(tmp_path, n=6, image_size=8, n_slices=3)
    (tmp_path / "imagesTr" / "CHUP-001__PT.nii.gz").unlink()
    problems = get_dataset("hecktor22", tmp_path).check()
    assert len(problems) == 1 and "CHUP-001__PT.nii.gz" in problems[0].message
    assert get_dataset("hecktor22", tmp_path).layout_problems() == []
    assert "labelsTr" in str(get_dataset("hecktor22", tmp_path / "imagesTr").layout_problems())
    assert "dataset.json" in str(get_dataset("msd_heart", tmp_path).layout_problems()[0])
