"""The one-pass volume decoder gives the pixels of the per-slice reader, bit for bit."""

from __future__ import annotations

import gzip
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from orchestrator.extraction.decode import decode_volumes
from tasks.datasets.ct_rate import iter_slices, read_slices, window_lut
from tasks.errors import DatasetError
from tasks.preprocess import prepare_image, to_rgb_uint8


def _nifti(path: Path, data: np.ndarray, slope: float | None = None, inter: float | None = None) -> str:
    img = nib.Nifti1Image(data, np.diag([0.7, 0.7, 2.5, 1.0]))
    img.header.set_data_dtype(data.dtype)
    if slope is not None:
        img.header.set_slope_inter(slope, inter)
    nib.save(img, path)
    return str(path)


def _volumes(tmp_path: Path) -> dict[str, str]:
    rng = np.random.default_rng(0)
    shape = (23, 17, 11)  # X != Y catches a transposed slice; 11 slices = one slab and a remainder
    return {
        "int16": _nifti(tmp_path / "a.nii.gz", rng.integers(-32768, 32767, shape, endpoint=True, dtype=np.int16)),
        "int16-be": _nifti(tmp_path / "b.nii.gz", rng.integers(-3000, 3000, shape).astype(">i2")),
        "uint16": _nifti(tmp_path / "c.nii", rng.integers(0, 65535, shape, endpoint=True).astype(np.uint16)),
        "uint8": _nifti(tmp_path / "d.nii.gz", rng.integers(0, 255, shape, endpoint=True).astype(np.uint8)),
        "float32": _nifti(tmp_path / "e.nii.gz", rng.normal(0, 800, shape).astype(np.float32)),
        "scaled": _nifti(tmp_path / "f.nii.gz", rng.integers(-2000, 2000, shape).astype(np.int16), 0.5, -24.0),
    }


@pytest.mark.parametrize("scaling", [(1.0, -1024.0), (0.37, 12.5)])
def test_iter_slices_equals_read_slices_bit_for_bit(tmp_path, scaling):
    for kind, path in _volumes(tmp_path).items():
        depth = nib.load(path).shape[2]
        want = read_slices(path, list(range(depth)), *scaling, -1000.0, 1000.0)
        got = list(iter_slices(path, *scaling, -1000.0, 1000.0, slab=4))
        assert [z for z, _ in got] == list(range(depth)), kind
        for z, (w, (_, g)) in enumerate(zip(want, got, strict=True)):
            assert g.dtype == np.uint8 and g.shape == (17, 23), kind
            np.testing.assert_array_equal(g, w, err_msg=f"{kind} z={z}")


def test_window_lut_covers_every_int16_value():
    lut = window_lut(np.dtype(np.int16), 1.0, -1024.0, -1000.0, 1000.0)
    assert lut.shape == (65536,)
    raw = np.arange(-32768, 32768).astype(np.int16)
    want = np.clip(np.rint((raw.astype(np.float32) - 1024 + 1000) * (255 / 2000)), 0, 255).astype(np.uint8)
    np.testing.assert_array_equal(lut[raw.view(np.uint16)], want)
    assert window_lut(np.dtype(np.float32), 1.0, 0.0, -1.0, 1.0) is None


def test_prepare_image_grey_is_replicated_rgb():
    img = np.random.default_rng(1).integers(0, 256, (40, 30), dtype=np.uint8)
    for r in (32, 40):
        got = prepare_image(img, r)
        small = img if img.shape == (r, r) else prepare_image(np.repeat(img[:, :, None], 3, 2), r)
        assert got.shape == (3, r, r) and got.flags.c_contiguous
        np.testing.assert_array_equal(got, small)
    sq = img[:30, :30]
    np.testing.assert_array_equal(prepare_image(sq, 30), np.ascontiguousarray(to_rgb_uint8(sq).transpose(2, 0, 1)))


def test_decode_volumes_batches_each_volume_and_a_bad_file_fails_alone(tmp_path):
    vols = _volumes(tmp_path)
    good = [vols["int16"], vols["uint8"]]
    bad = str(tmp_path / "bad.nii.gz")
    data = gzip.decompress(Path(vols["int16"]).read_bytes())
    Path(bad).write_bytes(gzip.compress(data[: len(data) // 2]))  # truncated pixel data
    paths = [good[0], bad, good[1]]
    batch = {"case_id": np.array(["g0", "bad", "g1"], dtype=object), "path": np.array(paths, dtype=object),
             "split": np.array(["test"] * 3, dtype=object), "patient_id": np.array(["p0", "p1", "p2"], dtype=object),
             "target": np.array([[0, 1], [1, 0], [1, 1]]), "slope": np.array([1.0, 1.0, 0.5]),
             "intercept": np.array([-1024.0, 0.0, 3.0]), "lo": np.full(3, -1000.0), "hi": np.full(3, 1000.0)}
    out = list(decode_volumes(batch, 32, "bicubic", batch_size=4))
    rows = {k: np.concatenate([b[k] for b in out]) for k in out[0]}
    assert all(len(b["error"]) <= 4 and len(set(b["case_id"])) == 1 for b in out)
    for cid, path, (slope, inter) in (("g0", good[0], (1.0, -1024.0)), ("g1", good[1], (0.5, 3.0))):
        mine = rows["case_id"] == cid
        want = np.stack([prepare_image(s, 32) for s in read_slices(path, list(range(11)), slope, inter, -1000, 1000)])
        np.testing.assert_array_equal(rows["pixels"][mine], want)
        assert not any(rows["error"][mine])
        np.testing.assert_array_equal(rows["target"][mine][0], batch["target"][list(batch["case_id"]).index(cid)])
    errors = rows["error"][rows["case_id"] == "bad"]
    assert errors[-1].startswith(f"{bad}: cannot read NIfTI") and any(errors)
    with pytest.raises(DatasetError, match="volume file is missing"):
        list(iter_slices(str(tmp_path / "none.nii.gz"), 1.0, 0.0, -1.0, 1.0))
