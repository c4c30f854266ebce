"""Embed a dataset once per (encoder, weights, resolution, pooling) into the feature cache.

The pipeline (run by `ray_backend.run_embedding_pipeline`): index rows -> `decode_batch` on CPU
workers (read, decode, resize to uint8) -> `EncoderUDF` in an actor pool (GPU when present) ->
Parquet partitioned by split in a scratch directory -> one cache entry per split, committed
atomically. This module holds the logic and the worker-side callables; it never imports Ray.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from orchestrator.cache import CacheKey, FeatureCache
from tasks.errors import DatasetError, WeightsError

SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class ExtractionJob:
    encoder: str
    weights: str  # the user's spec: random | hub | file:PATH
    resolution: int
    pooling: str  # resolved (never "auto")
    dataset: str
    root: str
    val_fraction: float = 0.1
    split_seed: int = 0
    options: str = "{}"  # the dataset's reading options (config.dataset_options), as sorted JSON

    @property
    def label(self) -> str:
        return f"{self.encoder}@{self.resolution}px/{self.dataset}"


@dataclass
class ExtractResult:
    job: ExtractionJob
    keys: dict[str, CacheKey]
    weights_source: str
    weights_digest: str
    n_encoded: int = 0  # rows the encoder produced in this call (0 when everything was cached)
    seconds: float = 0.0
    cached_splits: list[str] = field(default_factory=list)
    actors: int = 0  # encoder actors of the pipeline (0 when everything was cached)
    gpus_per_actor: float = 0.0
    interpolation: str = "bicubic"
    # Slide datasets: every slide (case_id, path, split, patient_id, target), and those that failed.
    cases: list[dict[str, Any]] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)


# -- worker-side callables -------------------------------------------------------------------

def decode_batch(batch: dict[str, Any], dataset: str, root: str, resolution: int,
                 interpolation: str, val_fraction: float, split_seed: int, options: str = "{}") -> dict[str, Any]:
    """Read and resize one batch of images to uint8 (B, 3, r, r). Runs on CPU workers."""
    from tasks.datasets import get_dataset
    from tasks.preprocess import prepare_image

    ds = get_dataset(dataset, root, val_fraction=val_fraction, seed=split_seed, **json.loads(options))
    paths = [str(p) for p in batch["path"]]
    pixels = np.empty((len(paths), 3, resolution, resolution), dtype=np.uint8)
    for i, (path, img) in enumerate(zip(paths, ds.read_images(paths), strict=True)):
        try:
            pixels[i] = prepare_image(img, resolution, interpolation)
        except Exception as e:  # a malformed decoded array: name the file, keep the cause
            raise DatasetError(path, f"cannot prepare image: {e}") from e
    out = {k: batch[k] for k in ("case_id", "split", "patient_id", "target")}
    out["pixels"] = pixels
    return out


class EncoderUDF:
    """Holds one frozen encoder per actor; turns pixel batches into an Arrow table of embeddings."""

    def __init__(self, encoder: str, weights: str, pooling: str, expected_digest: str,
                 torch_threads: int | None = None):
        import torch

        from tasks.encoders import create_encoder

        self.encoder = create_encoder(encoder, weights=weights)
        if self.encoder.device.type == "cpu":
            # Ray sets OMP_NUM_THREADS to the actor's CPU reservation (1); an encoder on CPU
            # should use the machine's cores unless told otherwise.
            torch.set_num_threads(torch_threads or len(os.sched_getaffinity(0)))
        if self.encoder.weights.digest != expected_digest:
            # The weights changed since the cache key was computed: refuse to file features
            # under a key that does not describe them.
            raise WeightsError(
                f"{self.encoder.weights.source}: weights digest {self.encoder.weights.digest[:12]} "
                f"differs from the planned {expected_digest[:12]}; were the weights replaced "
                "during the sweep? Rerun to re-plan."
            )
        self.pooling = pooling

    def __call__(self, batch: dict[str, Any]) -> pa.Table:
        if "x" not in batch:
            return embeddings_table(batch, self.encoder.embed(batch["pixels"], pooling=self.pooling))
        # Tiles of slides: rows of a slide that failed upstream carry its error and stay zero.
        from orchestrator.extract_slides import tile_embeddings_table

        ok = np.array([not e for e in batch["error"]], dtype=bool)
        emb = np.zeros((len(ok), self.encoder.embedding_dim(self.pooling)), np.float32)
        if ok.any():
            emb[ok] = self.encoder.embed(batch["pixels"][ok], pooling=self.pooling)
        return tile_embeddings_table(batch, emb)


def embeddings_table(batch: dict[str, Any], emb: np.ndarray) -> pa.Table:
    emb = np.ascontiguousarray(emb, dtype=np.float32)
    targets = [[int(v) for v in t] for t in batch["target"]]
    return pa.table({
        "case_id": pa.array([str(c) for c in batch["case_id"]]),
        "split": pa.array([str(s) for s in batch["split"]]),
        "patient_id": pa.array([str(p) for p in batch["patient_id"]]),
        "target": pa.array(targets, pa.list_(pa.int8())),
        # Fixed-size list: opens in polars as Array(Float32, D), in numpy as one reshape.
        "embedding": pa.FixedSizeListArray.from_arrays(pa.array(emb.ravel()), emb.shape[1]),
    })


# -- weights identity ------------------------------------------------------------------------

def weights_memo_key(encoder: str, weights: str) -> str:
    """What determines a weights digest without loading the weights (for the digest memo)."""
    import timm
    import torch

    ident: dict[str, Any] = {"encoder": encoder, "weights": weights}
    if weights.startswith("file:"):
        p = Path(weights[5:]).expanduser()
        files = sorted(p.glob(f"{encoder}.*")) if p.is_dir() else [p]
        ident["files"] = [(str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files if f.exists()]
    if weights == "random":
        # Random init depends on the library code that draws it.
        ident["versions"] = [timm.__version__, torch.__version__.split("+")[0]]
    return json.dumps(ident, sort_keys=True)


def compute_weights_info(encoder: str, weights: str) -> dict[str, str]:
    """Load the weights once and return their kind, source and digest (run as a Ray task)."""
    from tasks.encoders import create_encoder

    enc = create_encoder(encoder, weights=weights, device="cpu")
    return {"kind": enc.weights.kind, "source": enc.weights.source, "digest": enc.weights.digest,
            "interpolation": enc.preprocess_info().get("interpolation", "bicubic")}


class DigestMemo:
    """Weights digests remembered across runs, so planning a sweep does not reload every model."""

    def __init__(self, path: Path):
        self.path = path
        self.data: dict[str, dict[str, str]] = json.loads(path.read_text()) if path.exists() else {}

    def get(self, key: str) -> dict[str, str] | None:
        return self.data.get(key)

    def put(self, key: str, info: dict[str, str]) -> None:
        self.data[key] = info
        tmp = self.path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(self.data, indent=1, sort_keys=True))
        tmp.replace(self.path)


# -- planning and committing -----------------------------------------------------------------

def cache_keys(job: ExtractionJob, weights_info: dict[str, str], fingerprint: str,
               preprocess_version: str) -> dict[str, CacheKey]:
    return {
        split: CacheKey(
            encoder=job.encoder, weights_kind=weights_info["kind"], weights_digest=weights_info["digest"],
            resolution=job.resolution, pooling=job.pooling, preprocess_version=preprocess_version,
            dataset=job.dataset, dataset_fingerprint=fingerprint, split=split,
        )
        for split in SPLITS
    }


def index_rows(index: Any, splits: list[str]) -> list[dict[str, Any]]:
    """Rows of the dataset index the pipeline needs, for the splits not yet cached."""
    sub = index[index["split"].isin(splits)]
    return [
        {"case_id": str(r.case_id), "path": str(r.path), "split": str(r.split),
         "patient_id": str(r.patient_id), "target": [int(v) for v in r.target]}
        for r in sub.itertuples(index=False)
    ]


def commit_splits(cache: FeatureCache, scratch: str, keys: dict[str, CacheKey], splits: list[str],
                  meta: dict[str, Any]) -> int:
    """Move `scratch/split=<s>` directories into their cache entries. Returns rows committed."""
    import pyarrow.dataset as pads

    total = 0
    for split in splits:
        part = f"{scratch}/split={split}"
        n = pads.dataset(part, filesystem=cache.fs, format="parquet").count_rows()
        cache.commit(keys[split], part, {**meta, "n_rows": n, "split": split})
        total += n
    cache.fs.delete_dir(scratch)
    return total


def describe(result: ExtractResult) -> dict[str, Any]:
    return {"job": asdict(result.job), "keys": {s: k.digest for s, k in result.keys.items()},
            "n_encoded": result.n_encoded, "seconds": round(result.seconds, 2),
            "cached_splits": result.cached_splits, "actors": result.actors,
            "gpus_per_actor": result.gpus_per_actor, "weights_source": result.weights_source,
            "weights_digest": result.weights_digest, "failed": result.failed, "time": time.time()}


# -- volumes: (volume, z) items, pooled back to one row per volume ------------------------------

def expand_volume(row: dict[str, Any]) -> list[dict[str, Any]]:
    """One volume row -> one row per axial slice, from the NIfTI header alone (no pixel read)."""
    from tasks.datasets.ct_rate import n_slices

    return [{**row, "z": z} for z in range(n_slices(str(row["path"])))]


def decode_slices(batch: dict[str, Any], resolution: int, interpolation: str) -> dict[str, Any]:
    """Read, window and resize one batch of slices to uint8 (B, 3, r, r); each volume in the
    batch is opened once and only its listed slices are read (`dataobj`)."""
    from tasks.datasets.ct_rate import read_slices
    from tasks.preprocess import prepare_image

    paths = [str(p) for p in batch["path"]]
    pixels = np.empty((len(paths), 3, resolution, resolution), dtype=np.uint8)
    for path in dict.fromkeys(paths):
        rows = [i for i, p in enumerate(paths) if p == path]
        i0 = rows[0]
        slices = read_slices(path, [int(batch["z"][i]) for i in rows], float(batch["slope"][i0]),
                             float(batch["intercept"][i0]), float(batch["lo"][i0]), float(batch["hi"][i0]))
        for i, sl in zip(rows, slices, strict=True):
            pixels[i] = prepare_image(sl, resolution, interpolation)
    out = {k: batch[k] for k in ("case_id", "split", "patient_id", "target")}
    out["pixels"] = pixels
    return out


def pool_volumes(fs: Any, slice_dir: str, out_dir: str, splits: list[str], pooling: str) -> None:
    """Slice embeddings (Parquet under `slice_dir/split=<s>`) -> one row per volume under
    `out_dir/split=<s>`, the schema of an image entry, so protocols and cells see no difference.
    Streams record batches; memory is one accumulator per volume (the size of the output)."""
    import pyarrow.dataset as pads
    import pyarrow.parquet as pq

    for split in splits:
        acc: dict[str, list[Any]] = {}  # case_id -> [pooled (D,), count, patient_id, target]
        src = pads.dataset(f"{slice_dir}/split={split}", filesystem=fs, format="parquet")
        for rb in src.to_batches(columns=["case_id", "patient_id", "target", "embedding"], batch_size=4096):
            emb = rb.column("embedding")
            X = emb.values.to_numpy(zero_copy_only=False).reshape(len(rb), -1).astype(np.float64)
            ids, pids, tgts = (rb.column(c).to_pylist() for c in ("case_id", "patient_id", "target"))
            for i, cid in enumerate(ids):
                a = acc.get(cid)
                if a is None:
                    acc[cid] = [X[i].copy(), 1, pids[i], tgts[i]]
                else:
                    a[0] = a[0] + X[i] if pooling == "mean" else np.maximum(a[0], X[i])
                    a[1] += 1
        cids = sorted(acc)
        pooled = np.stack([acc[c][0] / (acc[c][1] if pooling == "mean" else 1) for c in cids]).astype(np.float32)
        batch = {"case_id": cids, "split": [split] * len(cids), "patient_id": [acc[c][2] for c in cids],
                 "target": [acc[c][3] for c in cids]}
        table = embeddings_table(batch, pooled).drop_columns(["split"])  # split lives in the path
        fs.create_dir(f"{out_dir}/split={split}", recursive=True)
        pq.write_table(table, f"{out_dir}/split={split}/volumes.parquet", filesystem=fs)
