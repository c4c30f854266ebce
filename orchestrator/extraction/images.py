"""Embed a dataset once per (encoder, weights, resolution, pooling) into the feature cache.

The pipeline (run by `pipelines.run_embedding_pipeline`): index rows -> `decode.decode_batch` on
CPU workers (read, decode to uint8) -> `EncoderUDF` (an actor pool on GPUs, kept-instance tasks on
CPU: ray_backend.Step; resizes on its device, then embeds) ->
Parquet partitioned by split in a scratch directory -> one cache entry per split, committed
atomically. This module holds the logic and the worker-side callables; it never imports Ray.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa

from orchestrator.extraction.weights import check_planned, usable_cpus
from orchestrator.store.cache import CacheKey, FeatureCache

# Pieces a GPU actor splits each batch into: one in flight while the next is copied in (docs/gpu.md).
CUDA_CHUNKS = 4


class EncoderUDF:
    """Holds one frozen encoder per actor; turns pixel batches into an Arrow table of embeddings.

    With a planned bf16 precision the weights are held in bf16 (after the digest check: the digest
    is the loaded state dict's). `compile` (resources.compile, planned on GPU actors only) compiles
    the forward at a fixed batch of `batch_size / chunks`. On CUDA each batch is streamed in
    `chunks` pieces, so the host's copy of one piece overlaps the forward of the previous one.
    With `resolution`, the batches hold images as decoded (uint8 (C, H, W), any size) and are
    resized here, on the encoder's device (tasks/device_resize.py); without it, uint8 (B, 3, r, r)."""

    def __init__(self, encoder: str, weights: str, pooling: str, expected_digest: str,
                 torch_threads: int | None = None, expected_precision: str | None = None,
                 compile: bool = False, batch_size: int | None = None, chunks: int | None = None,
                 resolution: int | None = None, interpolation: str = "bicubic"):
        import torch

        from tasks.encoders import create_encoder

        self.encoder = create_encoder(encoder, weights=weights)
        cuda = self.encoder.device.type == "cuda"
        if not cuda:
            # Ray sets OMP_NUM_THREADS to the actor's CPU reservation (1); an encoder on CPU
            # should use the machine's cores unless told otherwise.
            torch.set_num_threads(torch_threads or usable_cpus())
        check_planned(self.encoder, expected_digest, expected_precision)
        if expected_precision == "bf16":
            self.encoder.hold_bf16()
        self.pooling = pooling
        self.resolution, self.interpolation = resolution, interpolation
        self.chunks = max(1, chunks or (CUDA_CHUNKS if cuda else 1))
        if compile and cuda and batch_size:
            self.encoder.enable_compile(-(-batch_size // self.chunks))

    def pieces(self, pixels: Any) -> list[Any]:
        step = max(1, -(-len(pixels) // self.chunks))
        return [pixels[i:i + step] for i in range(0, len(pixels), step)]

    def embed(self, pixels: Any) -> np.ndarray:
        if self.resolution is not None:
            from tasks.device_resize import resize_on_device

            # One resize of the batch on the device; its pieces then stream through the encoder
            # as host batches do (DeviceIO passes device tensors through).
            pixels = resize_on_device(list(pixels), self.resolution, self.interpolation, self.encoder.io)
        return np.concatenate(list(self.encoder.embed_stream(self.pieces(pixels), self.pooling)))

    def __call__(self, batch: dict[str, Any]) -> pa.Table:
        # Rows that failed upstream carry their error and keep a zero embedding (never encoded).
        ok = np.array([not e for e in batch["error"]], dtype=bool)
        if ok.all():
            emb = self.embed(batch["pixels"])
        else:
            emb = np.zeros((len(ok), self.encoder.embedding_dim(self.pooling)), np.float32)
            if ok.any():
                emb[ok] = self.embed(batch["pixels"][ok])
        return self.table(batch, emb)

    def table(self, batch: dict[str, Any], emb: np.ndarray) -> pa.Table:
        """The rows written for a batch: one per image (slides' tiles: `slides.TileEncoderUDF`)."""
        return embeddings_table(batch, emb)


class ResolutionsEncoderUDF(EncoderUDF):
    """One decoded batch, embedded at every resolution of a shared-decode group (`extraction.shared`):
    decoding is the CPU's costliest step per image and does not depend on the resolution, so it runs
    once for all of them. Each resolution is resized on the device and embedded in pieces of its own
    batch size (`batch_sizes`: the largest resolution's is the smallest); rows carry `resolution`."""

    def __init__(self, resolutions: list[int], batch_sizes: dict[int, int], **kwargs: Any):
        super().__init__(resolution=resolutions[0], **kwargs)
        self.resolutions = [int(r) for r in resolutions]
        self.batch_sizes = {int(r): int(b) for r, b in batch_sizes.items()}

    def embed(self, pixels: Any) -> np.ndarray:
        step = self.batch_sizes[self.resolution]
        return np.concatenate([super(ResolutionsEncoderUDF, self).embed(pixels[i:i + step])
                               for i in range(0, len(pixels), step)])

    def __call__(self, batch: dict[str, Any]) -> pa.Table:
        tables = []
        for r in self.resolutions:
            self.resolution = r
            t = super().__call__(batch)
            tables.append(t.append_column("resolution", pa.array([r] * t.num_rows, pa.int32())))
        return pa.concat_tables(tables)


def embeddings_table(batch: dict[str, Any], emb: np.ndarray) -> pa.Table:
    """(case_id, split, patient_id, target, embedding[, error]): `error` when the batch has one
    (pipeline output; "" for a good row); cache readers drop rows whose error is set."""
    emb = np.ascontiguousarray(emb, dtype=np.float32)
    targets = [[int(v) for v in t] for t in batch["target"]]
    cols = {
        "case_id": pa.array([str(c) for c in batch["case_id"]]),
        "split": pa.array([str(s) for s in batch["split"]]),
        "patient_id": pa.array([str(p) for p in batch["patient_id"]]),
        "target": pa.array(targets, pa.list_(pa.int8())),
        # Fixed-size list: opens in polars as Array(Float32, D), in numpy as one reshape.
        "embedding": pa.FixedSizeListArray.from_arrays(pa.array(emb.ravel()), emb.shape[1]),
    }
    if "error" in batch:
        cols["error"] = pa.array([str(e) for e in batch["error"]])
    return pa.table(cols)


def index_rows(index: Any, splits: list[str], root: str, dataset: str) -> list[dict[str, Any]]:
    """Rows of the dataset index the pipeline needs, for the splits not yet cached; ValueError naming
    the root when one of those splits has no case (nothing to train or score on)."""
    sub = index[index["split"].isin(splits)]
    rows = [
        {"case_id": str(r.case_id), "path": str(r.path), "split": str(r.split),
         "patient_id": str(r.patient_id), "target": [int(v) for v in r.target]}
        for r in sub.itertuples(index=False)
    ]
    empty = [s for s in splits if not any(r["split"] == s for r in rows)]
    if empty:
        raise ValueError(f"{root}: split(s) {empty} of {dataset} have no cases")
    return rows


def failed_rows(fs: Any, part: str) -> dict[str, str]:
    """{case_id: error} of the rows in a pipeline output directory that failed to decode."""
    import pyarrow.dataset as pads

    ds = pads.dataset(part, filesystem=fs, format="parquet")
    if "error" not in ds.schema.names:
        return {}
    t = ds.to_table(columns=["case_id", "error"], filter=pads.field("error") != "")
    return dict(zip(t.column("case_id").to_pylist(), t.column("error").to_pylist(), strict=True))


def commit_splits(cache: FeatureCache, scratch: str, keys: dict[str, CacheKey], splits: list[str],
                  meta: dict[str, Any], failed: dict[str, dict[str, str]] | None = None) -> tuple[int, dict[str, str]]:
    """Compact each `scratch/split=<s>` directory into one Parquet file (store.compact) and move it
    into its cache entry. Returns (good rows committed, {case_id: error} of the cases left out).
    Failed image rows stay in the files (zero embedding, error set; `FeatureCache.read_table` drops
    them); `failed` gives, per split, cases already left out of the files (volumes dropped by
    `pool_volumes`). The entry's metadata names them."""
    from orchestrator.store.compact import LAYOUT, compact_parquet

    counts: dict[str, tuple[int, dict[str, str]]] = {}
    for split in splits:
        part = f"{scratch}/split={split}"
        rows = compact_parquet(cache.fs, part)
        bad = failed.get(split, {}) if failed is not None else failed_rows(cache.fs, part)
        n = rows - (0 if failed is not None else len(bad))
        if n == 0:  # nothing to train or score on: fail the extraction, with the first reason
            raise ValueError(f"every case of the {split} split failed to decode; first: "
                             f"{next(iter(bad.values()), 'none recorded')}")
        counts[split] = (n, bad)
    all_failed: dict[str, str] = {}
    for split, (n, bad) in counts.items():
        cache.commit(keys[split], f"{scratch}/split={split}",
                     {**meta, "n_rows": n, "split": split, "failed": bad, "layout": LAYOUT})
        all_failed.update(bad)
    cache.release(scratch)
    return sum(n for n, _ in counts.values()), all_failed


def pool_volumes(fs: Any, slice_dir: str, out_dir: str, splits: list[str],
                 pooling: str) -> dict[str, dict[str, str]]:
    """Slice embeddings (Parquet under `slice_dir/split=<s>`) -> one row per volume under
    `out_dir/split=<s>`, the schema of an image entry, so protocols and cells see no difference.
    Streams record batches; memory is one accumulator per volume (the size of the output).
    A volume with any failed slice is left out; returns {split: {case_id: error}} of those."""
    import pyarrow.dataset as pads
    import pyarrow.parquet as pq

    failed_by_split: dict[str, dict[str, str]] = {}
    for split in splits:
        failed = failed_by_split.setdefault(split, {})
        acc: dict[str, list[Any]] = {}  # case_id -> [pooled (D,), count, patient_id, target]
        src = pads.dataset(f"{slice_dir}/split={split}", filesystem=fs, format="parquet")
        for rb in src.to_batches(columns=["case_id", "patient_id", "target", "embedding", "error"], batch_size=4096):
            emb = rb.column("embedding")
            X = emb.values.to_numpy(zero_copy_only=False).reshape(len(rb), -1).astype(np.float64)
            ids, pids, tgts, errs = (rb.column(c).to_pylist() for c in ("case_id", "patient_id", "target", "error"))
            for i, cid in enumerate(ids):
                if errs[i]:
                    failed.setdefault(cid, errs[i])
                    continue
                a = acc.get(cid)
                if a is None:
                    acc[cid] = [X[i].copy(), 1, pids[i], tgts[i]]
                else:
                    a[0] = a[0] + X[i] if pooling == "mean" else np.maximum(a[0], X[i])
                    a[1] += 1
        cids = sorted(c for c in acc if c not in failed)
        fs.create_dir(f"{out_dir}/split={split}", recursive=True)
        if not cids:
            continue
        pooled = np.stack([acc[c][0] / (acc[c][1] if pooling == "mean" else 1) for c in cids]).astype(np.float32)
        batch = {"case_id": cids, "split": [split] * len(cids), "patient_id": [acc[c][2] for c in cids],
                 "target": [acc[c][3] for c in cids]}
        table = embeddings_table(batch, pooled).drop_columns(["split"])  # split lives in the path
        fs.create_dir(f"{out_dir}/split={split}", recursive=True)
        pq.write_table(table, f"{out_dir}/split={split}/volumes.parquet", filesystem=fs)
    return failed_by_split
