"""Dense features: the Ray Data pipeline's worker-side steps, what a head asks for, and
`CachedFeatures`, the reader of a dense cache entry. This module never imports Ray; the driver that
applies the cached/online rule per extraction and runs the pipeline is orchestrator/extract_runs.py.

Pipeline (run by `ray_backend.run_dense_pipeline`): one row per case (2D image or whole volume)
-> `decode_cases` on CPU workers (`Dataset.read_sample` -> `tasks.features.prepare_slices`: every
slice of every modality at r x r, uint8) -> `DenseEncoderUDF` in the encoder actor pool (the
frozen encoder's `dense` maps of the configured layers, bf16 on CUDA, written as ONE fp16
`(S, C, h, w)` `.npy` FILE PER CASE under the scratch directory) -> small index rows back to the
driver -> `index.parquet` -> the entry is committed atomically (`FeatureCache.commit`).

Rows are whole cases, not slices: the writer needs a case's slices together to write its one file,
and a Ray Data block holds a few cases (a 300-slice volume at 224 px is 45 MB of uint8), which
keeps memory to a few cases per worker. A case that cannot be read fails alone: its row carries the
error (file and problem), it gets no file, and the entry's metadata names it.

Cache entry layout (`<cache>/features/<dataset>-cases-<encoder>-<r>px-<digest>/`):

    _medscale.json        marker (written last): key, index file, failed cases, planned bytes
    index.parquet         case_id, file, n_slices, channels, grid (one row per good case)
    maps/<case>.npy       fp16 (S, C, h, w), read memory-mapped (`np.load(mmap_mode="r")`)

The key (`CacheKey`) has `feature_kind="dense"`, `layers` ("" = last block, else "4,11") and
`precision` (bf16 when the encoder actors run on CUDA, fp32 on CPU); `split="cases"`: one entry
holds every case, and each cell takes its split from `dataset.cell_splits(seed)`.
"""

from __future__ import annotations

import hashlib
import importlib
import io
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from orchestrator import storage
from orchestrator.cache import CacheKey, FeatureCache
from orchestrator.extract import EncoderUDF, ExtractResult
from tasks.dense import FEATURE_DTYPE, Sample, SourceChoice, choose_source
from tasks.errors import DatasetError

DENSE_SPLIT = "cases"  # the key's split field: every case of the dataset, whatever a cell's split
INDEX_FILE = "index.parquet"
MAPS_DIR = "maps"
DENSE_TARGETS = ("mask2d", "mask3d", "instances", "pairs")


# -- identities that travel to workers ------------------------------------------------------------

def class_path(obj: Any) -> str:
    """'module:QualName' of a class (or of an instance's class): workers import it by path, so a
    dataset, head or target handler needs no registry entry in their process (tests register
    theirs in the driver only)."""
    cls = obj if isinstance(obj, type) else type(obj)
    return f"{cls.__module__}:{cls.__qualname__}"


def load_class(path: str) -> Any:
    module, _, name = path.partition(":")
    obj: Any = importlib.import_module(module)
    for part in name.split("."):
        obj = getattr(obj, part)
    return obj


def dataset_ref(ds: Any, options: dict[str, Any] | None = None) -> dict[str, Any]:
    """What rebuilds `ds` in another process (plain data, JSON-able)."""
    return {"cls": class_path(ds), "root": str(ds.root), "val_fraction": ds.val_fraction, "seed": ds.seed,
            "options": options or {}}


def open_dataset(ref: dict[str, Any]) -> Any:
    return load_class(ref["cls"])(ref["root"], val_fraction=ref["val_fraction"], seed=ref["seed"], **ref["options"])


def is_dense(dataset_cls: Any) -> bool:
    return getattr(dataset_cls, "target_kind", "labels") in DENSE_TARGETS


# -- what a head asks for -------------------------------------------------------------------------

def head_layers(head: Any) -> tuple[int, ...] | None:
    """The encoder blocks a dense head wants: its `layers` hyperparameter (None or absent = the last
    block; a list of block indices, negative from the end, for decoders with skips)."""
    layers = getattr(head, "layers", None)
    return None if layers is None else tuple(int(i) for i in layers)


def head_augments(head: Any) -> bool:
    """True when the head trains with geometric augmentation: its `augment` hyperparameter if it
    has one, else the class's `augments` flag (tasks.protocols.dense_base.DenseHead)."""
    return bool(getattr(head, "augment", getattr(head, "augments", False)))


def layers_key(encoder: Any, layers: Sequence[int] | None) -> str:
    """The cache key's `layers`: "" for the last block, else the non-negative indices "4,11"."""
    idx = encoder.check_layers(layers)
    return "" if idx is None else ",".join(str(i) for i in idx)


def channels(encoder: Any, dataset: Any, layers: Sequence[int] | None) -> int:
    return int(getattr(dataset, "n_modalities", 1)) * max(1, len(layers or ())) * encoder.spec.embed_dim


def case_file(case_id: str) -> str:
    """A file name for a case id: readable, filesystem-safe, unique (ids may hold '/' or spaces)."""
    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", case_id)[:80]
    return f"{MAPS_DIR}/{safe}-{hashlib.sha1(case_id.encode()).hexdigest()[:10]}.npy"


# -- worker-side callables ------------------------------------------------------------------------

def decode_cases(batch: dict[str, Any], dataset: str, resolution: int, interpolation: str) -> dict[str, Any]:
    """Read each case's Sample and bring every slice to the encoder's input: uint8 (M, S, 3, r, r)
    per case (a ragged batch: cases differ in S). A case that cannot be read fails alone: its
    row carries the error and an empty array, never encoded."""
    from tasks.features import prepare_slices

    ds = open_dataset(json.loads(dataset))
    ids = [str(c) for c in batch["case_id"]]
    pixels: list[np.ndarray] = []
    errors: list[str] = []
    for cid in ids:
        try:
            s = ds.read_sample(cid)
            pixels.append(prepare_slices(s.images, resolution, interpolation))
            errors.append("")
        except Exception as e:  # noqa: BLE001 - the case fails alone, named with its file
            msg = str(e) if isinstance(e, DatasetError) else str(DatasetError(_path(ds, cid), f"cannot read: {e}"))
            pixels.append(np.zeros((0, 0, 3, resolution, resolution), np.uint8))
            errors.append(msg)
    out = np.empty(len(ids), dtype=object)
    out[:] = pixels
    return {"case_id": np.array(ids, dtype=object), "pixels": out, "error": np.array(errors, dtype=object)}


def _path(ds: Any, case_id: str) -> str:
    try:
        return str(ds.row(case_id)["path"])
    except Exception:  # noqa: BLE001 - the index itself may be what is broken
        return case_id


class DenseEncoderUDF(EncoderUDF):
    """One frozen encoder per actor (EncoderUDF's loading and weights check); writes each case's
    fp16 maps as its own `.npy` file under `out_dir` and returns one small row per case."""

    def __init__(self, encoder: str, weights: str, expected_digest: str, layers: str, out_uri: str,
                 precision: str, torch_threads: int | None = None, batch_size: int = 32):
        # EncoderUDF loads the weights, checks their digest and the planned precision (the key must
        # describe the numbers).
        super().__init__(encoder, weights, "auto", expected_digest, torch_threads, expected_precision=precision)
        self.layers = [int(i) for i in layers.split(",")] if layers else None
        self.fs, self.out = storage.split_uri(out_uri)
        self.batch_size = batch_size

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        cases = [(str(c), np.asarray(px)) for c, px, e in zip(batch["case_id"], batch["pixels"], batch["error"],
                                                                strict=True) if not e]
        maps = iter(self._encode(cases))
        rows: dict[str, list[Any]] = {k: [] for k in ("case_id", "file", "n_slices", "channels", "grid", "error")}
        for cid, err in zip(batch["case_id"], batch["error"], strict=True):
            cid, f, shape = str(cid), "", (0, 0, 0, 0)
            if not err:
                arr = next(maps).numpy().astype(FEATURE_DTYPE)
                f, shape = case_file(cid), arr.shape
                buf = io.BytesIO()
                np.save(buf, arr, allow_pickle=False)
                storage.write_bytes(self.fs, f"{self.out}/{f}", buf.getvalue())
            for k, v in zip(rows, (cid, f, shape[0], shape[1], shape[2], str(err)), strict=True):
                rows[k].append(v)
        return {k: np.array(v, dtype=object if k in ("case_id", "file", "error") else np.int64)
                for k, v in rows.items()}

    def _encode(self, cases: list[tuple[str, np.ndarray]]) -> list[Any]:
        """Every slice of every case in one stream of `batch_size` forward passes (2D cases are one
        image each: one pass per case would starve the encoder), then each case's (S, M*C, h, w),
        modalities concatenated on channels exactly as tasks.features.encode_prepared does."""
        import torch

        if not cases:
            return []
        flat = np.concatenate([px.reshape(-1, *px.shape[2:]) for _, px in cases])  # (sum M*S, 3, r, r)
        out = torch.cat([self.encoder.dense(torch.from_numpy(np.ascontiguousarray(flat[i:i + self.batch_size])),
                                            layers=self.layers).cpu()
                         for i in range(0, len(flat), self.batch_size)])
        maps, at = [], 0
        for _, px in cases:
            m, s = px.shape[:2]
            f = out[at:at + m * s]
            at += m * s
            c, h, w = f.shape[1:]
            maps.append(f.reshape(m, s, c, h, w).permute(1, 0, 2, 3, 4).reshape(s, m * c, h, w))
        return maps


# -- planning and committing (the driver that extracts: orchestrator/extract_runs.py) --------------

@dataclass
class DenseExtractResult(ExtractResult):
    """An extraction of a dense dataset: per requested layers, the source the rule chose (and the
    cache key when cached); `failed` names cases that could not be read (cached entries)."""

    choices: dict[str, SourceChoice] = field(default_factory=dict)  # layers key -> choice (no augmentation)
    dense_keys: dict[str, CacheKey] = field(default_factory=dict)  # layers key -> cache key (cached only)
    precision: str = "fp32"
    dataset_ref: dict[str, Any] = field(default_factory=dict)


def source_for(ex: DenseExtractResult, layers: str, augment: bool, budget_gb: float) -> SourceChoice:
    """The rule's answer for one cell: its head's layers and augmentation on this extraction."""
    base = ex.choices[layers]
    if augment:
        return SourceChoice("online", choose_source(0, 0, 0, budget_gb, True).reason, base.planned_bytes)
    return base


def planned_slices(dataset: Any) -> int:
    """Slices the encoder sees over the whole dataset (headers only for volumes)."""
    return int(sum(dataset.n_slices(str(c)) for c in dataset.index()["case_id"]))


def commit_dense(cache: FeatureCache, key: CacheKey, scratch: str, rows: list[dict[str, Any]],
                 meta: dict[str, Any]) -> tuple[int, dict[str, str]]:
    """Write index.parquet (good cases) beside the maps and publish the entry. Returns (cases
    committed, {case_id: error} of those left out)."""
    import pandas as pd

    df = pd.DataFrame(rows, columns=["case_id", "file", "n_slices", "channels", "grid", "error"])
    bad = df[df["error"] != ""]
    failed = dict(zip(bad["case_id"].astype(str), bad["error"].astype(str), strict=True))
    good = df[df["error"] == ""].drop(columns=["error"]).sort_values("case_id").reset_index(drop=True)
    if good.empty:
        raise ValueError(f"every case failed to decode; first: {next(iter(failed.values()), 'none recorded')}")
    buf = io.BytesIO()
    good.to_parquet(buf, index=False)
    storage.write_bytes(cache.fs, f"{scratch}/{INDEX_FILE}", buf.getvalue())
    cache.commit(key, scratch, {**meta, "n_cases": len(good), "failed": failed,
                                "n_slices": int(good["n_slices"].sum()), "channels": int(good["channels"].iloc[0]),
                                "grid": int(good["grid"].iloc[0])})
    return len(good), failed


# -- reading ----------------------------------------------------------------------------------------

class CachedFeatures:
    """tasks.dense.FeatureSource over a dense cache entry: `features(case_id)` is the case's fp16
    (S, C, h, w) map, memory-mapped from its own file (np.load mmap_mode="r": pages are read when
    a head touches them and the OS may drop them again, so a dataset never sits in RAM). On an
    object store a case is read whole, one at a time. `sample(case_id)` reads the case's Sample
    (targets and geometry) from the dataset.

    splits: case_id -> split of the cell (dataset.cell_splits); default: the index's split."""

    kind = "cached"

    def __init__(self, cache: FeatureCache, key: CacheKey, dataset: Any, splits: dict[str, str] | None = None):
        import pandas as pd

        if not cache.is_complete(key):
            raise FileNotFoundError(f"no complete dense cache entry at {cache.entry_path(key)}")
        self.cache, self.key, self.dataset = cache, key, dataset
        self.entry = cache.entry_path(key)
        meta = cache.meta(key)
        self.failed: dict[str, str] = dict(meta.get("failed", {}))
        index = pd.read_parquet(io.BytesIO(storage.read_bytes(cache.fs, f"{self.entry}/{INDEX_FILE}")))
        self.files = dict(zip(index["case_id"].astype(str), index["file"].astype(str), strict=True))
        self.channels = int(meta["channels"])
        self.grid = int(meta["grid"])
        self.layers = tuple(int(i) for i in key.layers.split(",")) if key.layers else ()
        self._splits = splits

    def case_ids(self, split: str | None = None) -> list[str]:
        if self._splits is None:
            idx = self.dataset.index()
            splits = dict(zip(idx["case_id"].astype(str), idx["split"].astype(str), strict=True))
        else:
            splits = self._splits
        return [c for c in self.files if split is None or splits.get(c) == split]

    def features(self, case_id: str) -> np.ndarray:
        try:
            f = self.files[case_id]
        except KeyError:
            why = self.failed.get(case_id, "not in the dataset when the entry was made")
            raise KeyError(f"{case_id!r} has no cached features ({why})") from None
        path = f"{self.entry}/{f}"
        if storage.is_local(self.cache.fs):
            return np.load(path, mmap_mode="r")
        return np.load(io.BytesIO(storage.read_bytes(self.cache.fs, path)))

    def sample(self, case_id: str) -> Sample:
        return self.dataset.read_sample(case_id)


def dense_requests(cfg: Any, cells: Sequence[Any]) -> dict[tuple[str, int, str], set[tuple[tuple[int, ...] | None, bool]]]:
    """Per dense extraction (encoder, resolution, dataset): the (layers, augment) its cells' heads
    ask for; the rule runs once per layers, the cache holds one entry per layers."""
    from tasks.datasets import dataset_class
    from tasks.protocols import create_protocol

    out: dict[tuple[str, int, str], set[tuple[tuple[int, ...] | None, bool]]] = {}
    for c in cells:
        cls = dataset_class(c.dataset)
        if not is_dense(cls):
            continue
        head = create_protocol(c.protocol, task=cls.task, seed=c.seed, **cfg.protocols.get(c.protocol, {}))
        out.setdefault(c.extraction, set()).add((head_layers(head), head_augments(head)))
    return out
