"""Reading a dense cache entry: `index.parquet` (one row per case) and one fp16 `(S, C, h, w)`
`.npy` per case under `maps/`. `CachedFeatures` is the tasks.dense.FeatureSource the dense heads
train on, memory-mapping one case at a time."""

from __future__ import annotations

import hashlib
import io
import re
from typing import Any

import numpy as np

from orchestrator.store import storage
from orchestrator.store.cache import CacheKey, FeatureCache
from tasks.dense import Sample

DENSE_SPLIT = "cases"  # the key's split field: every case of the dataset, whatever a cell's split


INDEX_FILE = "index.parquet"


MAPS_DIR = "maps"


def case_file(case_id: str) -> str:
    """A file name for a case id: readable, filesystem-safe, unique (ids may hold '/' or spaces)."""
    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", case_id)[:80]
    return f"{MAPS_DIR}/{safe}-{hashlib.sha1(case_id.encode()).hexdigest()[:10]}.npy"


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
