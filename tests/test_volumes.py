"""CT-RATE volumes through the slice pipeline: (volume, z) items on Ray Data, pooled per volume."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest
import torch

from orchestrator.extraction.jobs import ExtractionJob
from orchestrator.extraction.phase import extract_one
from orchestrator.extraction.weights import DigestMemo
from orchestrator.grid.config import parse_config
from orchestrator.store.cache import FeatureCache
from tasks.datasets import dataset_class, get_dataset
from tasks.datasets.ct_rate import n_slices, read_slices
from tasks.encoders import create_encoder
from tasks.errors import DatasetError
from tasks.preprocess import prepare_image

from .conftest import TINY, sweep_config

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def ct_root(tmp_path_factory) -> Path:
    return dataset_class("ct_rate").synth(tmp_path_factory.mktemp("ct") / "ct_rate", n=16, seed=0, image_size=32)


def _extract(tmp_path: Path, root: Path, **ds_kwargs):
    cfg = parse_config(sweep_config(tmp_path, {"ct_rate": root}, resources={"extract_batch_size": 16}))
    ds = get_dataset("ct_rate", str(root), **ds_kwargs)
    cache = FeatureCache(str(tmp_path / "cache"))
    job = ExtractionJob(TINY, "random", 32, "cls+mean", "ct_rate", str(root))
    return extract_one(job, cache, DigestMemo(tmp_path / "d.json"), cfg, 0.0, ds, ds.fingerprint()), cache, ds


def _bare_slices(enc, ds, path: str, case_id: str) -> np.ndarray:
    slope, intercept = ds.scaling(case_id)
    slices = read_slices(path, list(range(n_slices(path))), slope, intercept, *ds.hu_window)
    pixels = np.stack([prepare_image(s, 32) for s in slices])
    return enc.embed(torch.from_numpy(pixels), pooling="cls+mean")


def test_volume_embedding_is_the_mean_of_its_slice_embeddings(ray_session, ct_root, tmp_path):
    pooling = "mean"
    result, cache, ds = _extract(tmp_path, ct_root, slice_pooling=pooling)
    index = ds.index()
    assert result.n_encoded == len(index)  # one cached row per volume, not per slice
    enc = create_encoder(TINY, weights="random", device="cpu")
    for split, key in result.keys.items():
        ids, X, Y, _ = cache.read_arrays(key)
        sub = index[index["split"] == split].sort_values("case_id")
        assert ids == list(sub["case_id"])
        np.testing.assert_array_equal(Y, np.stack(sub["target"].to_numpy()))
        assert cache.meta(key)["slice_pooling"] == pooling
    ids, X, _, _ = cache.read_arrays(result.keys["test"])
    rows = index.set_index("case_id")
    for i, cid in enumerate(ids[:3]):
        emb = _bare_slices(enc, ds, rows.loc[cid, "path"], cid)
        want = emb.mean(0) if pooling == "mean" else emb.max(0)
        np.testing.assert_allclose(X[i], want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("pooling", ["mean", "max"])
def test_pool_volumes_streams_slices_into_one_row_per_volume(tmp_path, pooling):
    import pyarrow.fs as pafs
    import pyarrow.parquet as pq

    from orchestrator.extraction.images import embeddings_table, pool_volumes

    rng = np.random.default_rng(0)
    emb = rng.standard_normal((9, 5)).astype(np.float32)
    # Slices of three volumes, interleaved, and a fourth whose second slice failed to read.
    cids = ["v1", "v2", "v1", "v1", "v4", "v2", "v3", "v2", "v4"]
    errors = [""] * 8 + ["v4.nii.gz: cannot read slices: truncated"]
    batch = {"case_id": cids, "split": ["test"] * 9, "patient_id": [c + "p" for c in cids],
             "target": [[int(c == "v2"), 1] for c in cids], "error": errors}
    (tmp_path / "slices/split=test").mkdir(parents=True)
    for part, rows in enumerate((slice(0, 5), slice(5, 9))):  # two Parquet files, as Ray writes
        sub = {k: v[rows] for k, v in batch.items()}
        pq.write_table(embeddings_table(sub, emb[rows]).drop_columns(["split"]),
                       tmp_path / f"slices/split=test/{part}.parquet")
    failed = pool_volumes(pafs.LocalFileSystem(), str(tmp_path / "slices"), str(tmp_path), ["test"], pooling)
    assert failed == {"test": {"v4": errors[-1]}}
    t = pq.read_table(tmp_path / "split=test/volumes.parquet")
    assert t.column("case_id").to_pylist() == ["v1", "v2", "v3"]
    assert t.column("patient_id").to_pylist() == ["v1p", "v2p", "v3p"]
    assert t.column("target").to_pylist() == [[0, 1], [1, 1], [0, 1]]
    X = np.asarray(t.column("embedding").to_pylist(), dtype=np.float32)
    for i, c in enumerate(["v1", "v2", "v3"]):
        rows = emb[[j for j, x in enumerate(cids) if x == c]]
        np.testing.assert_allclose(X[i], rows.mean(0) if pooling == "mean" else rows.max(0), rtol=1e-6)


def test_slices_are_read_lazily_and_in_hu(ct_root):
    ds = get_dataset("ct_rate", ct_root)
    row = ds.index().iloc[0]
    import nibabel as nib

    img = nib.load(row["path"])
    sx, sy, sz = img.header.get_zooms()
    assert sx == sy and sz > sx  # anisotropic, as CT is
    raw = np.asarray(img.dataobj)
    slope, intercept = ds.scaling(row["case_id"])
    hu = raw * slope + intercept
    assert hu.min() <= -990 and hu.max() >= 700  # air and bone
    z = n_slices(row["path"]) // 2
    sl = read_slices(row["path"], [z], slope, intercept, -1000, 1000)[0]
    want = np.clip(np.rint((hu[:, :, z].T + 1000) * 255 / 2000), 0, 255)
    np.testing.assert_array_equal(sl, want.astype(np.uint8))


def test_broken_header_is_named(ct_root, tmp_path):
    import shutil

    root = tmp_path / "ct"
    shutil.copytree(ct_root, root)
    ds = get_dataset("ct_rate", root)
    path = ds.index()["path"].iloc[2]
    data = gzip.decompress(Path(path).read_bytes())
    Path(path).write_bytes(gzip.compress(b"\0" * 348 + data[348:]))  # sizeof_hdr and magic gone
    with pytest.raises(DatasetError, match="cannot read NIfTI header"):
        n_slices(path)
    problems = get_dataset("ct_rate", root).check()
    assert [p.path for p in problems] == [path]
