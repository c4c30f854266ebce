"""Embed a dataset once per (encoder, weights, resolution, pooling) into the feature cache.

The pipeline (run by `ray_backend.run_embedding_pipeline`): index rows -> `decode.decode_batch` on
CPU workers (read, decode, resize to uint8) -> `EncoderUDF` in an actor pool (GPU when present) ->
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
from tasks.errors import WeightsError

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
    precision: str = "fp32"  # what the encoder actors will run in (planned_precision); part of the keys

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
    # Slide datasets: per grid seed, the slides (case_id, path, split, patient_id, target) and the
    # split's name (official or a CV fold); and the slides that failed, with the reason.
    cases: dict[int, tuple[list[dict[str, Any]], str]] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)
    coords_uri: str = ""  # slide datasets: where the tile coordinates of every slide are kept


# -- worker-side callables (decoding is orchestrator/decode.py's) ---------------------------------

class EncoderUDF:
    """Holds one frozen encoder per actor; turns pixel batches into an Arrow table of embeddings."""

    def __init__(self, encoder: str, weights: str, pooling: str, expected_digest: str,
                 torch_threads: int | None = None, expected_precision: str | None = None):
        import torch

        from tasks.encoders import create_encoder

        self.encoder = create_encoder(encoder, weights=weights)
        if self.encoder.device.type == "cpu":
            # Ray sets OMP_NUM_THREADS to the actor's CPU reservation (1); an encoder on CPU
            # should use the machine's cores unless told otherwise.
            torch.set_num_threads(torch_threads or usable_cpus())
        check_planned(self.encoder, expected_digest, expected_precision)
        self.pooling = pooling

    def __call__(self, batch: dict[str, Any]) -> pa.Table:
        # Rows that failed upstream carry their error and keep a zero embedding (never encoded).
        ok = np.array([not e for e in batch["error"]], dtype=bool)
        if ok.all():
            emb = self.encoder.embed(batch["pixels"], pooling=self.pooling)
        else:
            emb = np.zeros((len(ok), self.encoder.embedding_dim(self.pooling)), np.float32)
            if ok.any():
                emb[ok] = self.encoder.embed(batch["pixels"][ok], pooling=self.pooling)
        if "x" in batch:  # tiles of slides
            from orchestrator.extract_slides import tile_embeddings_table

            return tile_embeddings_table(batch, emb)
        return embeddings_table(batch, emb)


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


def usable_cpus() -> int:
    """CPUs this process may run on: its affinity mask where the OS has one (Linux), else all."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


# -- precision -------------------------------------------------------------------------------

def planned_precision(n_gpus: float, extract_gpus: float, requested: str = "auto") -> str:
    """What the encoder actors of a sweep run in: with `requested` "auto" (resources.precision),
    bf16 autocast when they get a GPU (the cluster has GPUs and resources.extract_gpus > 0), fp32
    on CPU; "fp32" forces full precision on GPUs too. Decided when the sweep is planned, because it
    is part of every feature cache key and every cell's identity."""
    if requested == "fp32":
        return "fp32"
    return "bf16" if n_gpus > 0 and extract_gpus > 0 else "fp32"


def encoder_precision(encoder: Any) -> str:
    """The precision a loaded FrozenEncoder computes in (bf16 autocast on CUDA, else fp32)."""
    return "bf16" if getattr(encoder, "autocast", False) else "fp32"


def check_planned(encoder: Any, expected_digest: str, precision: str | None) -> Any:
    """Hold a loaded FrozenEncoder to what the sweep planned: full precision when `precision` is
    "fp32" (autocast off, GPU or not), and refuse an encoder whose precision or weights digest
    differ from the plan, since the plan is in the cache keys and the cells' identities. Used by
    the extraction actors and by every cell that encodes online (dense, seg3d, registration)."""
    if precision == "fp32":
        encoder.autocast = False
    actual = encoder_precision(encoder)
    if precision and actual != precision:
        # Features of another precision must not be filed under this key (bf16 != fp32).
        raise WeightsError(
            f"{encoder.spec.name}: the encoder runs in {actual} on {encoder.device}, but the sweep planned "
            f"{precision} (resources.extract_gpus, resources.precision and the cluster's GPUs decide it: a node "
            "that offers a GPU Ray cannot use with CUDA?); rerun to re-plan.")
    if expected_digest and encoder.weights.digest != expected_digest:
        # The weights changed since the keys were computed: refuse to file or report features
        # under an identity that does not describe them.
        raise WeightsError(
            f"{encoder.weights.source}: weights digest {encoder.weights.digest[:12]} differs from the planned "
            f"{expected_digest[:12]}; were the weights replaced during the sweep? Rerun to re-plan.")
    return encoder


# -- weights identity ------------------------------------------------------------------------



def hf_cache_dir() -> str:
    """The Hugging Face hub cache a worker started now would read (huggingface_hub's precedence:
    HF_HUB_CACHE, HF_HOME/hub, XDG_CACHE_HOME/huggingface/hub, ~/.cache/huggingface/hub); read
    from the environment at call time, not at import time."""
    env = os.environ
    if env.get("HF_HUB_CACHE") or env.get("HUGGINGFACE_HUB_CACHE"):
        return str(Path(env.get("HF_HUB_CACHE") or env["HUGGINGFACE_HUB_CACHE"]).expanduser())
    if env.get("HF_HOME"):
        return str(Path(env["HF_HOME"]).expanduser() / "hub")
    xdg = Path(env["XDG_CACHE_HOME"]).expanduser() if env.get("XDG_CACHE_HOME") else Path.home() / ".cache"
    return str(xdg / "huggingface" / "hub")


def hub_snapshot(encoder: str) -> dict[str, Any] | None:
    """The cached hub snapshot timm would load for `encoder`: cache dir, revision (the commit
    refs/main points at), file, size and mtime. None when nothing is cached (then the weights
    would be downloaded, and no memo can vouch for them)."""
    from huggingface_hub import try_to_load_from_cache

    from tasks.encoders import get_encoder_spec

    spec = get_encoder_spec(encoder)
    repo = spec.hf_hub_id
    if repo is None:
        return None
    cache = hf_cache_dir()
    for name in spec.hub_files:  # the files its family's loader reads, in its order
        path = try_to_load_from_cache(repo, name, cache_dir=cache)
        if isinstance(path, str) and Path(path).is_file():
            st = Path(path).stat()  # the blob behind the snapshot's symlink
            return {"repo": repo, "cache": cache, "revision": Path(path).parent.name, "file": name,
                    "size": st.st_size, "mtime_ns": st.st_mtime_ns}
    return None


def weights_memo_key(encoder: str, weights: str) -> str | None:
    """The resolved source of a weights spec, without loading the weights: the key of the digest
    memo. `file:` -> the file the loader would pick, with its size and mtime; `hub` -> the cached
    snapshot (revision, file, size, mtime); `random` -> the library versions that draw it. None
    when the source cannot be resolved locally (missing file, nothing cached): nothing is memoised
    then, so a memo can never vouch for weights it has not seen."""
    import timm
    import torch

    from tasks.weights import parse_weights, resolve_file

    ident: dict[str, Any] = {"encoder": encoder, "weights": weights}
    kind, path = parse_weights(weights)
    if kind == "file":
        try:
            f = resolve_file(path, encoder).resolve()
        except WeightsError:
            return None
        st = f.stat()
        ident["source"] = {"path": str(f), "size": st.st_size, "mtime_ns": st.st_mtime_ns}
    elif kind == "hub":
        ident["source"] = hub_snapshot(encoder)
        if ident["source"] is None:
            return None
    else:
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

    def get(self, key: str | None) -> dict[str, str] | None:
        return self.data.get(key) if key is not None else None

    def put(self, key: str | None, info: dict[str, str]) -> None:
        if key is None:  # an unresolvable source: never memoised
            return
        self.data[key] = info
        self._save()

    def drop(self, key: str | None) -> None:
        """Forget an entry the weights contradicted (the digest differed at extraction)."""
        if key is not None and self.data.pop(key, None) is not None:
            self._save()

    def _save(self) -> None:
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
            dataset=job.dataset, dataset_fingerprint=fingerprint, split=split, precision=job.precision,
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
    """Move `scratch/split=<s>` directories into their cache entries. Returns (good rows committed,
    {case_id: error} of the cases left out). Failed image rows stay in the files (zero embedding,
    error set; `FeatureCache.read_table` drops them); `failed` gives, per split, cases already
    left out of the files (volumes dropped by `pool_volumes`). The entry's metadata names them."""
    import pyarrow.dataset as pads

    counts: dict[str, tuple[int, dict[str, str]]] = {}
    for split in splits:
        part = f"{scratch}/split={split}"
        ds = pads.dataset(part, filesystem=cache.fs, format="parquet")
        bad = failed.get(split, {}) if failed is not None else failed_rows(cache.fs, part)
        n = ds.count_rows() - (0 if failed is not None else len(bad))
        if n == 0:  # nothing to train or score on: fail the extraction, with the first reason
            raise ValueError(f"every case of the {split} split failed to decode; first: "
                             f"{next(iter(bad.values()), 'none recorded')}")
        counts[split] = (n, bad)
    all_failed: dict[str, str] = {}
    for split, (n, bad) in counts.items():
        cache.commit(keys[split], f"{scratch}/split={split}", {**meta, "n_rows": n, "split": split, "failed": bad})
        all_failed.update(bad)
    cache.release(scratch)
    return sum(n for n, _ in counts.values()), all_failed


def describe(result: ExtractResult) -> dict[str, Any]:
    return {"job": asdict(result.job), "keys": {s: k.digest for s, k in result.keys.items()},
            "n_encoded": result.n_encoded, "seconds": round(result.seconds, 2),
            "cached_splits": result.cached_splits, "actors": result.actors,
            "gpus_per_actor": result.gpus_per_actor, "weights_source": result.weights_source,
            "weights_digest": result.weights_digest, "failed": result.failed, "time": time.time()}


# -- volumes: slice embeddings pooled back to one row per volume ---------------------------------

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
