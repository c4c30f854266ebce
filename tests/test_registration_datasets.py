"""CAMUS (both releases) and ACDC pair datasets: layouts, pairs, preprocessing geometry, `check`,
and the paper's registration config."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from tasks.datasets import dataset_class, get_dataset
from tasks.errors import DatasetError

from .conftest import REPO


def test_camus_releases_read_alike_and_pairs_go_ed_to_es(tmp_path):
    cls = dataset_class("camus")
    nifti = get_dataset("camus", cls.synth(tmp_path / "nifti", n=10, seed=4, image_size=40), image_size=32)
    legacy_root = cls.synth(tmp_path / "legacy", n=10, seed=4, image_size=40, release="legacy")
    legacy = get_dataset("camus", legacy_root, image_size=32)
    assert (nifti.release, legacy.release) == ("nifti", "legacy")
    assert (legacy_root / "training/patient0001/patient0001_2CH_ED.raw").is_file()
    a, b = nifti.read_sample("patient0003_4CH_ES"), legacy.read_sample("patient0003_4CH_ES")
    assert a.images.shape == (1, 1, 32, 32) and a.target.shape == (32, 32)
    assert np.array_equal(a.images, b.images) and np.array_equal(a.target, b.target)
    assert set(np.unique(a.target)) == {0, 1, 2, 3} and a.unit == "px"
    # NIfTI release: the official split files (1/1/8 patients here); legacy: seeded 80/10/10.
    assert nifti.index().groupby("split")["patient_id"].nunique().to_dict() == {"test": 1, "train": 8, "val": 1}
    assert legacy.index().groupby("split")["patient_id"].nunique().to_dict() == {"test": 1, "train": 8, "val": 1}
    pairs = nifti.pairs("test")
    assert [(p.pair_id, p.fixed, p.moving) for p in pairs] == [
        ("patient0001_2CH", "patient0001_2CH_ES", "patient0001_2CH_ED"),
        ("patient0001_4CH", "patient0001_4CH_ES", "patient0001_4CH_ED")]
    assert len(nifti.pairs()) == 20 and nifti.check() == [] and legacy.check() == []
    assert nifti.layout_problems() == [] and "nifti release" in nifti.layout_notes()[0]
    assert "no CAMUS layout" in get_dataset("camus", tmp_path).layout_problems()[0].message


def test_camus_check_names_every_problem(tmp_path):
    import SimpleITK as sitk

    root = dataset_class("camus").synth(tmp_path / "c", n=10, seed=0, image_size=32)
    base = root / "database_nifti"
    (base / "patient0002/patient0002_2CH_ES_gt.nii.gz").unlink()
    bad = np.zeros((40, 32), np.uint8)
    bad[5, 5] = 7
    sitk.WriteImage(sitk.GetImageFromArray(bad), str(base / "patient0003/patient0003_4CH_ED_gt.nii.gz"))
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((20, 20), np.uint8)),
                    str(base / "patient0004/patient0004_2CH_ED_gt.nii.gz"))
    (base / "patient0005/patient0005_4CH_ES.nii.gz").write_text("not an image")
    problems = {(p.path.split("/")[-1], p.message.split(":")[0]) for p in get_dataset("camus", root).check()}
    assert ("patient0002_2CH_ES_gt.nii.gz", "file is missing") in problems
    assert ("patient0003_4CH_ED_gt.nii.gz", "unexpected label values [7]") in problems
    assert any(n == "patient0004_2CH_ED_gt.nii.gz" and m.startswith("label size") for n, m in problems)
    assert any(n == "patient0005_4CH_ES.nii.gz" and m.startswith("cannot read image") for n, m in problems)
    assert len(problems) == 4
    # Split-file problems (the layout itself: samples are checked once it is sound).
    with open(root / "database_split/subgroup_testing.txt", "a") as f:
        f.write("patient0006\npatient0077\n")
    problems = {(p.path.split("/")[-1], p.message.split(":")[0]) for p in get_dataset("camus", root).check()}
    assert ("subgroup_testing.txt", "patient patient0006 is also listed in the train split") in problems \
        or ("subgroup_training.txt", "patient patient0006 is also listed in the test split") in problems
    assert ("patient0077", "patient listed in the test split has no directory") in problems
    shutil.rmtree(root / "database_split")
    assert any("missing" in p.message and "split" in p.message for p in get_dataset("camus", root).check())
    with pytest.raises(DatasetError, match="subgroup_training.txt: missing"):
        get_dataset("camus", root).index()


def test_acdc_preprocessing_geometry_and_splits(tmp_path):
    import nibabel as nib

    root = dataset_class("acdc").synth(tmp_path / "a", n=12, seed=2, image_size=40, n_test=2)
    ds = get_dataset("acdc", root, spacing=(4.0, 1.5, 1.5), crop=(12, 32, 32))
    idx = ds.index()
    assert idx.groupby("split")["patient_id"].nunique().to_dict() == {"test": 2, "train": 8, "val": 2}
    assert ds.pairs("test")[0].fixed.endswith("_ES") and ds.pairs("test")[0].moving.endswith("_ED")
    s = ds.read_sample("patient003_ED")
    assert s.images.shape == (1, 12, 32, 32) and s.target.shape == (12, 32, 32) and s.unit == "mm"
    assert s.spacing == (4.0, 1.5, 1.5) and s.raw.min() == -1.0 and s.raw.max() == 1.0
    # The crop is centred on the ED myocardium, and its affine puts it where the original is.
    myo = np.argwhere(s.target == 2).mean(0)
    assert np.allclose(myo, np.array([12, 32, 32]) / 2, atol=1.5)
    orig = nib.load(str(root / "training/patient003/patient003_frame01_gt.nii.gz"))
    world_orig = orig.affine @ [*np.argwhere(np.asarray(orig.dataobj) == 2).mean(0), 1]
    world_crop = s.affine @ [*myo[::-1], 1]
    assert np.allclose(world_orig[:3], world_crop[:3], atol=1.5)
    # ED and ES of a patient share one window: identical geometry.
    assert np.allclose(ds.read_sample("patient003_ES").affine, s.affine)
    assert ds.check() == []


def test_acdc_check_names_every_problem(tmp_path):
    import nibabel as nib

    root = dataset_class("acdc").synth(tmp_path / "a", n=6, seed=0, image_size=32, n_test=1)

    def problems() -> set[tuple[str, str]]:
        return {(p.path.split("/")[-1], p.message.split(" (")[0].split(":")[0])
                for p in get_dataset("acdc", root, crop=(12, 32, 32)).check()}

    gt = next((root / "training/patient003").glob("*_frame01_gt.nii.gz"))
    gt.write_bytes(b"garbage")
    es = next(p for p in (root / "training/patient004").glob("*_gt.nii.gz") if "frame01" not in p.name)
    nib.save(nib.Nifti1Image(np.full((32, 32, 8), 5, np.uint8), np.eye(4)), str(es))
    (root / "testing/patient006/patient006_frame01.nii.gz").unlink()
    found = problems()
    assert ("patient003_frame01_gt.nii.gz", "cannot read NIfTI") in found
    assert (es.name, "unexpected label values [5]") in found
    assert ("patient006_frame01.nii.gz", "image of a listed patient is missing") in found
    # Layout problems (Info.cfg): reported from the layout, before any sample is read.
    (root / "training/patient001/Info.cfg").unlink()
    (root / "training/patient002/Info.cfg").write_text("ED: one\nES: 9\n")
    found = problems()
    assert ("Info.cfg", "missing Info.cfg") in found and ("Info.cfg", "needs integer 'ED") in found


def test_registration_config_loads():
    from orchestrator.grid.cells import plan_cells
    from orchestrator.grid.config import load_config

    cfg = load_config(REPO / "configs" / "registration.yaml")
    assert cfg.grid.datasets == ["camus", "acdc"]
    assert cfg.protocols["convexadam_reg"]["n_components"] == 24
    cells, skipped = plan_cells(cfg)
    assert len(cells) == 3 * 2 * 2 * 2 and not skipped
