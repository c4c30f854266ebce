"""The feature cache: content-addressed keys, atomic commits, nothing half-written looks complete."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow.parquet as pq
import pytest

from orchestrator.extraction.images import embeddings_table
from orchestrator.store.cache import CacheKey, FeatureCache

KEY = CacheKey("test_vit_tiny16", "random", "ab" * 32, 32, "cls+mean", "1", "nih14", "f" * 64, "train")


def _stage(cache: FeatureCache, n: int = 5, dim: int = 4) -> tuple[str, np.ndarray]:
    emb = np.random.default_rng(0).normal(size=(n, dim)).astype(np.float32)
    batch = {"case_id": [f"c{i}" for i in range(n)][::-1], "split": ["train"] * n,
             "patient_id": [f"p{i}" for i in range(n)][::-1], "target": [[i % 2, 1] for i in range(n)][::-1]}
    d = cache.scratch_dir()
    pq.write_table(embeddings_table(batch, emb[::-1]), f"{d}/part-0.parquet")
    return d, emb


def test_every_key_field_changes_the_digest():
    seen = {KEY.digest}
    for f in dataclasses.fields(KEY):
        v = getattr(KEY, f.name)
        changed = dataclasses.replace(KEY, **{f.name: v + 1 if isinstance(v, int) else v + "x"})
        seen.add(changed.digest)
    assert len(seen) == 1 + len(dataclasses.fields(KEY))


def test_commit_then_read_round_trips(tmp_path):
    cache = FeatureCache(str(tmp_path / "c"))
    assert not cache.is_complete(KEY)
    staged, emb = _stage(cache)
    cache.commit(KEY, staged, {"n_rows": 5})
    assert cache.is_complete(KEY)
    ids, X, Y, patients = cache.read_arrays(KEY)
    assert ids == [f"c{i}" for i in range(5)]  # sorted by case id, whatever the file order
    np.testing.assert_array_equal(X, emb)
    np.testing.assert_array_equal(Y, [[i % 2, 1] for i in range(5)])
    assert patients == [f"p{i}" for i in range(5)]
    assert cache.meta(KEY)["key"]["encoder"] == "test_vit_tiny16"
    # The embedding column is a fixed-size list: polars sees Array(Float32, 4).
    df = pl.read_parquet(f"{cache.entry_path(KEY)}/part-0.parquet")
    assert df.schema["embedding"] == pl.Array(pl.Float32, 4)


def test_entry_without_marker_is_not_complete_and_is_replaced(tmp_path):
    cache = FeatureCache(str(tmp_path / "c"))
    staged, _ = _stage(cache)
    # Simulate a crash after the move but before the marker: data present, no marker.
    cache.fs.move(staged, cache.entry_path(KEY))
    assert not cache.is_complete(KEY)
    with pytest.raises(FileNotFoundError):
        cache.read_table(KEY)
    staged2, emb = _stage(cache, n=3)
    cache.commit(KEY, staged2, {})
    ids, X, _, _ = cache.read_arrays(KEY)
    assert ids == ["c0", "c1", "c2"]
    np.testing.assert_array_equal(X, emb)


def test_commit_keeps_an_existing_complete_entry(tmp_path):
    cache = FeatureCache(str(tmp_path / "c"))
    staged, emb = _stage(cache, n=4)
    cache.commit(KEY, staged, {})
    staged2, _ = _stage(cache, n=2)
    cache.commit(KEY, staged2, {})  # a second writer of the same key: first complete entry wins
    assert len(cache.read_arrays(KEY)[0]) == 4


def _race(root: str, n: int, barrier, out) -> None:
    cache = FeatureCache(root)
    staged, _ = _stage(cache, n=n)
    barrier.wait()
    out.put((n, cache.commit(KEY, staged, {"n_rows": n})))


def test_two_writers_of_one_key_write_it_once(tmp_path):
    """Writers in separate processes (as on two nodes over NFS) commit the same key at once:
    exactly one wins, the entry holds its rows only, the losers' copies are gone."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    barrier, out = ctx.Barrier(4), ctx.Queue()
    procs = [ctx.Process(target=_race, args=(str(tmp_path / "c"), n, barrier, out)) for n in (3, 4, 5, 6)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    results = [out.get(timeout=5) for _ in procs]
    winners = [n for n, won in results if won]
    assert len(winners) == 1
    cache = FeatureCache(str(tmp_path / "c"))
    assert len(cache.read_arrays(KEY)[0]) == winners[0] == cache.meta(KEY)["n_rows"]
    assert not list((tmp_path / "c" / "tmp").iterdir())  # no staged copy left behind


def test_cache_and_results_through_a_uri(tmp_path):
    """The same code paths with a filesystem URI instead of a path (s3:// and gs:// go the same way)."""
    from orchestrator.store.results import ResultStore

    cache = FeatureCache(f"file://{tmp_path}/c")
    staged, emb = _stage(cache)
    assert cache.commit(KEY, staged, {"n_rows": 5})
    np.testing.assert_array_equal(cache.read_arrays(KEY)[1], emb)
    results = ResultStore(f"file://{tmp_path}/cells")
    results.mark_running("c1", {"node_id": "n1", "t_start": 0.0})
    assert results.running() == {"c1": {"node_id": "n1", "t_start": 0.0}}
    results.write("c1", {"metrics.json": b'{"test_auc": 0.5}', "predictions.parquet": b"x"})
    assert results.read("c1") == {"test_auc": 0.5} and results.running() == {}
    results.write("c1", {"metrics.json": b'{"test_auc": 0.7}'})  # a retry replaces it whole
    assert results.read("c1") == {"test_auc": 0.7}
    with results.local_dir("c1") as d:
        assert sorted(p.name for p in Path(d).iterdir()) == ["metrics.json"]


def test_rows_that_failed_to_decode_are_named_and_never_read(tmp_path):
    from orchestrator.extraction.images import commit_splits

    cache = FeatureCache(str(tmp_path / "c"))
    scratch = cache.scratch_dir()
    emb = np.random.default_rng(1).normal(size=(4, 3)).astype(np.float32)
    emb[2] = 0.0  # what the encoder actor leaves for a failed row
    errors = ["", "", "/d/c2.png: cannot decode image: truncated", ""]
    batch = {"case_id": ["c0", "c1", "c2", "c3"], "split": ["train"] * 4, "patient_id": ["p"] * 4,
             "target": [[1]] * 4, "error": errors}
    Path(f"{scratch}/split=train").mkdir(parents=True)
    pq.write_table(embeddings_table(batch, emb).drop_columns(["split"]), f"{scratch}/split=train/p.parquet")
    n, failed = commit_splits(cache, scratch, {"train": KEY}, ["train"], {})
    assert n == 3 and failed == {"c2": errors[2]} and cache.meta(KEY)["failed"] == failed
    ids, X, _, _ = cache.read_arrays(KEY)
    assert ids == ["c0", "c1", "c3"]
    np.testing.assert_array_equal(X, emb[[0, 1, 3]])


def test_a_split_of_many_block_files_is_committed_as_one_file_whose_bytes_the_plan_predicts(tmp_path):
    """Ray writes a file per block; the commit compacts a split into one file with full row groups,
    the rows unchanged, and its size is what plan.build.pooled_bytes predicts (the demo's layout:
    NIH-14's 14 classes, a 384-wide ViT-S embedding, ids as long as NIH-14's)."""
    import pyarrow.parquet as pq

    from orchestrator.extraction.images import commit_splits
    from orchestrator.plan.build import pooled_bytes
    from orchestrator.store import compact

    cache = FeatureCache(str(tmp_path / "c"))
    scratch = cache.scratch_dir()
    rng = np.random.default_rng(2)
    n, dim, blocks = 1200, 384, 40
    emb = rng.normal(size=(n, dim)).astype(np.float32)
    ids = [f"{i:08d}_000.png" for i in range(n)]
    batch = {"case_id": ids, "split": ["train"] * n, "patient_id": [f"{i // 3:08d}" for i in range(n)],
             "target": rng.integers(0, 2, size=(n, 14)).tolist(), "error": [""] * n}
    Path(f"{scratch}/split=train").mkdir(parents=True)
    for b in range(blocks):  # like Ray's blocks: a file each, in no particular order of case ids
        sel = slice(b * n // blocks, (b + 1) * n // blocks)
        part = {k: v[sel] for k, v in batch.items()}
        pq.write_table(embeddings_table(part, emb[sel]).drop_columns(["split"]), f"{scratch}/split=train/b{b:03d}.parquet")
    assert commit_splits(cache, scratch, {"train": KEY}, ["train"], {}) == (n, {})
    entry = Path(cache.entry_path(KEY))
    files = sorted(entry.rglob("*.parquet"))
    assert [f.name for f in files] == [compact.FILE_NAME] == cache.meta(KEY)["files"]
    assert cache.meta(KEY)["layout"] == compact.LAYOUT
    meta = pq.ParquetFile(files[0]).metadata
    assert meta.num_row_groups == 1 and meta.num_rows == n  # one group of 1,200, not 40 of 30
    got_ids, X, Y, _ = cache.read_arrays(KEY)
    assert got_ids == ids
    np.testing.assert_array_equal(X, emb)
    np.testing.assert_array_equal(Y, np.array(batch["target"]))
    written = sum(f.stat().st_size for f in entry.rglob("*") if f.is_file())
    id_bytes = float(np.mean([len(c) for c in ids]) + np.mean([len(p) for p in batch["patient_id"]]))
    planned = pooled_bytes({"train": n}, dim, id_bytes, 14)
    assert abs(planned - written) <= 0.02 * written, (planned, written)


def test_row_groups_hold_about_64_mib_of_embeddings():
    import pyarrow as pa

    from orchestrator.store.compact import row_group_rows

    schema = pa.schema([("embedding", pa.list_(pa.float32(), 1024))])
    assert row_group_rows(schema) == (64 << 20) // (4 * 1024 + 64)  # ViT-L: ~16k rows a group
    assert row_group_rows(pa.schema([("embedding", pa.list_(pa.float32(), 1 << 20))])) == 1024
