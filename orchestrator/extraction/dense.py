"""Dense features: the Ray Data pipeline's worker-side steps, what a head asks for, and
`CachedFeatures`, the reader of a dense cache entry. This module never imports Ray; the driver that
applies the cached/online rule per extraction and runs the pipeline is orchestrator/extraction/runs.py.

Pipeline (run by `pipelines.run_dense_pipeline`): one row per case (2D image or whole volume)
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

import importlib
import io
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from orchestrator.extraction.images import EncoderUDF
from orchestrator.extraction.jobs import ExtractResult
from orchestrator.store import storage
from orchestrator.store.cache import CacheKey, FeatureCache
from orchestrator.store.dense_maps import INDEX_FILE, case_file
from tasks.dense import FEATURE_DTYPE, SourceChoice, choose_source
from tasks.errors import DatasetError

DENSE_TARGETS = ("mask2d", "mask3d", "instances", "pairs")


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
                 precision: str, torch_threads: int | None = None, batch_size: int = 32, compile: bool = False):
        # EncoderUDF loads the weights, checks their digest and the planned precision (the key must
        # describe the numbers), holds bf16 weights and compiles when planned.
        super().__init__(encoder, weights, "auto", expected_digest, torch_threads, expected_precision=precision,
                         compile=compile, batch_size=batch_size, chunks=1)
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
                arr = np.asarray(next(maps).numpy(), dtype=FEATURE_DTYPE)  # fp16 already: no copy
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
        # fp16 on the device, copied out into pinned buffers while the next batch runs.
        chunks = (flat[i:i + self.batch_size] for i in range(0, len(flat), self.batch_size))
        parts = list(self.encoder.dense_stream(chunks, layers=self.layers, dtype=torch.float16))
        starts = np.cumsum([0] + [len(p) for p in parts])
        maps, at = [], 0
        for _, px in cases:
            m, s = px.shape[:2]
            f = _rows(parts, starts, at, m * s)
            at += m * s
            c, h, w = f.shape[1:]
            maps.append(f.reshape(m, s, c, h, w).permute(1, 0, 2, 3, 4).reshape(s, m * c, h, w))
        return maps


def _rows(parts: list[Any], starts: np.ndarray, a: int, n: int) -> Any:
    """Rows [a, a+n) of the concatenation of `parts` (first-axis tensors starting at `starts`): a
    view when they lie in one part, a copy only for a case that straddles two batches (joining every
    batch first copied each map once more on the host, half the actor's time at 512 px)."""
    import torch

    i = int(np.searchsorted(starts, a, side="right")) - 1
    lo = a - int(starts[i])
    if lo + n <= len(parts[i]):
        return parts[i][lo:lo + n]
    out, need = [], n
    while need > 0:
        take = parts[i][lo:lo + need]
        out.append(take)
        need -= len(take)
        i, lo = i + 1, 0
    return torch.cat(out)


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
