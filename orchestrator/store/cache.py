"""Content-addressed feature cache.

One entry per (encoder, weights digest, resolution, pooling, preprocessing version, dataset
fingerprint, split): a directory of Parquet files plus `_medscale.json`, which names them. An entry
is complete only when that marker exists, so an interrupted extraction never leaves anything that
looks complete. Entries are built in a scratch directory, marker included, and published in one
step (`storage.publish_dir`): on a local disk or NFS the first complete entry of a key wins and a
second writer (another sweep, another node) discards its copy, so each key is written once.

Paths go through pyarrow filesystems, so the cache can live on a local disk, NFS or s3:// alike.
"""

from __future__ import annotations

import hashlib
import json
import time
import uuid
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.fs as pafs

from orchestrator.store import storage
from orchestrator.store.scratch import Leases, clean_stale

MARKER = "_medscale.json"
CACHE_FORMAT = 2  # 2: feature kind, layers and precision joined the key


@dataclass(frozen=True)
class CacheKey:
    encoder: str
    weights_kind: str
    weights_digest: str
    resolution: int
    pooling: str
    preprocess_version: str
    dataset: str
    dataset_fingerprint: str
    split: str
    # What else changes the numbers: pooled vectors or dense maps, which blocks (dense, "" = last),
    # and the precision the encoder ran in (bf16 on CUDA and fp32 on CPU differ).
    feature_kind: str = "pooled"  # pooled | dense
    layers: str = ""
    precision: str = "fp32"
    # torch.compile'd forward (resources.compile): the same maths, different kernels, so the last
    # bits differ. A new field changes every key's digest, so entries written before it are never
    # read again without a CACHE_FORMAT bump (bf16 keys written with autocast over fp32 weights,
    # whose numbers differ from today's bf16-held weights, included).
    compiled: bool = False

    @property
    def digest(self) -> str:
        blob = json.dumps({"format": CACHE_FORMAT, **asdict(self)}, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:32]

    @property
    def dirname(self) -> str:
        # Readable prefix for people browsing the cache; the digest alone decides identity.
        return f"{self.dataset}-{self.split}-{self.encoder}-{self.resolution}px-{self.digest}"


class FeatureCache:
    def __init__(self, root: str, clean: bool = False):
        """`clean`: first remove the scratch directories of writers that died (a killed
        extraction's); a live writer's, on any node, stays (see orchestrator.store.scratch). The sweep
        driver opens the cache this way; cells, which only read, do not."""
        self.root = root
        self.fs, self.base = storage.split_uri(root)
        self.fs.create_dir(f"{self.base}/features", recursive=True)
        self.fs.create_dir(f"{self.base}/tmp", recursive=True)
        self.leases = Leases(self.fs, f"{self.base}/tmp")
        self.cleaned: list[str] = clean_stale(self.fs, f"{self.base}/tmp") if clean else []

    def entry_path(self, key: CacheKey) -> str:
        return f"{self.base}/features/{key.dirname}"

    def is_complete(self, key: CacheKey) -> bool:
        info = self.fs.get_file_info(f"{self.entry_path(key)}/{MARKER}")
        return info.type == pafs.FileType.File

    def meta(self, key: CacheKey) -> dict[str, Any]:
        with self.fs.open_input_stream(f"{self.entry_path(key)}/{MARKER}") as f:
            return json.loads(f.read().decode())

    def scratch_dir(self) -> str:
        """A fresh directory for one extraction's output; never looks like an entry. It is leased
        to this process until `release`: a writer that dies leaves it to the next clean open."""
        return self.leases.acquire()

    def release(self, scratch: str) -> None:
        """Remove a scratch directory (whatever is left of it) and its lease."""
        self.leases.release(scratch)

    def commit(self, key: CacheKey, staged_dir: str, meta: dict[str, Any]) -> bool:
        """Publish a staged directory of Parquet files as the entry of `key`. Returns False, and
        drops the staged copy, when a complete entry is already there (the first one wins)."""
        final = self.entry_path(key)
        if not self.is_complete(key):
            files = [f for f in storage.files_under(self.fs, staged_dir) if f.endswith(".parquet")]
            record = {"key": asdict(key), "key_digest": key.digest, "created": time.time(),
                      "files": files, **meta}
            storage.write_bytes(self.fs, f"{staged_dir}/{MARKER}",
                                json.dumps(record, indent=2, sort_keys=True).encode())
            if storage.publish_dir(self.fs, staged_dir, final, last=MARKER):
                self.leases.release(staged_dir)  # published: only its lease is left to drop
                return True
            if not self.is_complete(key):
                # A directory without a marker: left by a writer that died mid-publish. Move it
                # aside (never delete in place: a rename cannot race with a reader) and retry.
                self.fs.move(final, f"{self.base}/tmp/stale-{uuid.uuid4().hex[:8]}")
                if storage.publish_dir(self.fs, staged_dir, final, last=MARKER):
                    self.leases.release(staged_dir)
                    return True
        self.fs.delete_dir(staged_dir)  # another writer's complete entry won
        self.leases.release(staged_dir)
        return False

    def read_table(self, key: CacheKey) -> pa.Table:
        if not self.is_complete(key):
            raise FileNotFoundError(f"no complete cache entry at {self.entry_path(key)}")
        entry = self.entry_path(key)
        # Read the files the marker names, not whatever lies in the directory (see storage.py).
        files = self.meta(key).get("files")
        source = [f"{entry}/{f}" for f in files] if files else entry
        dataset = pads.dataset(source, filesystem=self.fs, format="parquet")
        # Rows that failed to decode keep their place in the files (error set): leave them out.
        ok = pads.field("error") == "" if "error" in dataset.schema.names else None
        table = dataset.to_table(filter=ok)
        # Row order across Parquet parts is not meaningful: sort by case id so reads are stable.
        return table.sort_by("case_id")

    def read_bags(self, key: CacheKey) -> Any:
        """A slide entry's bags, a lazy mapping read per slide: case_id -> (tile x, y (n, 2); embeddings
        (n, D) float32, stored fp16); see extraction.slides.SlideBags."""
        from orchestrator.store.bags import read_bags

        if not self.is_complete(key):
            raise FileNotFoundError(f"no complete cache entry at {self.entry_path(key)}")
        return read_bags(self.fs, self.entry_path(key), self.meta(key).get("files"))

    def read_arrays(self, key: CacheKey) -> tuple[list[str], np.ndarray, np.ndarray, list[str]]:
        """(case ids, embeddings (n, D) float32, targets (n, C) int, patient ids)."""
        t = self.read_table(key)
        emb = t.column("embedding").combine_chunks()
        dim = emb.type.list_size
        # writable=True: an Arrow zero-copy view is read-only, and torch cannot wrap read-only memory
        # (protocols hand X to torch.from_numpy); one copy here, and the Arrow buffer is freed.
        X = emb.values.to_numpy(zero_copy_only=False, writable=True).astype(np.float32, copy=False).reshape(-1, dim)
        tgt = t.column("target").combine_chunks()
        Y = np.asarray(tgt.values.to_numpy(zero_copy_only=False), dtype=np.int64)
        Y = Y.reshape(len(t), -1) if len(t) else Y.reshape(0, 0)
        return t.column("case_id").to_pylist(), X, Y, t.column("patient_id").to_pylist()

    def clean_scratch(self, older_than_s: float = 0.0) -> None:
        now = time.time()
        for info in self.fs.get_file_info(pafs.FileSelector(f"{self.base}/tmp")):
            if info.mtime is None or now - info.mtime.timestamp() >= older_than_s:
                if info.type == pafs.FileType.Directory:
                    self.fs.delete_dir(info.path)
