"""Reading slide bags from a cache entry: `case_id=<slide>/*.parquet` with (x, y, embedding),
fp16, one directory per slide as Ray Data's hive partitioning wrote it. `read_bags` gives a lazy
mapping that reads one slide when indexed, so a cell's memory never grows with the slide count."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute  # noqa: F401 - pa.compute, for SlideBags

from orchestrator.store import storage

SLIDES = "slides"  # the cache key's split field for a bag entry: all slides, whatever the cell's split


BAG_DTYPE = np.float16  # stored tile embeddings (the cache key's feature_kind "bag" says so)


def bag_dirs(fs: Any, out_dir: str) -> dict[str, str]:
    """{case_id: directory} of the bags under `out_dir`, read from the directory names Ray Data's
    hive partitioning wrote (`case_id=<value>`, the value URL-escaped), not rebuilt from the id."""
    from urllib.parse import unquote

    import pyarrow.fs as pafs

    out = {}
    for info in fs.get_file_info(pafs.FileSelector(out_dir)):
        name = info.path.rsplit("/", 1)[-1]
        if info.type == pafs.FileType.Directory and name.startswith("case_id="):
            out[unquote(name.removeprefix("case_id="))] = info.path
    return out


def read_bags(fs: Any, entry: str, files: list[str] | None = None) -> SlideBags:
    """The entry's bags as a lazy mapping: case_id -> (tile coordinates (n, 2) int64 as x, y;
    embeddings (n, D) float32), each slide read from its own files when asked for."""
    return SlideBags(fs, entry, files)


class SlideBags(Mapping):
    """case_id -> (xy (n, 2) int64, embeddings (n, D) float32) of a bag entry, read per slide on
    access (never the dataset's bags together: a cell's memory does not grow with the number of
    slides). Tiles in row-major order (y, then x), so a bag's order does not depend on how Ray
    split the work; rows that failed are dropped."""

    def __init__(self, fs: Any, entry: str, files: list[str] | None = None):
        from urllib.parse import unquote

        self.fs, self.entry = fs, entry
        files = files if files is not None else storage.files_under(fs, entry)
        self._files: dict[str, list[str]] = {}
        for f in files:
            head, _, _ = f.partition("/")
            if head.startswith("case_id=") and f.endswith(".parquet"):
                self._files.setdefault(unquote(head.removeprefix("case_id=")), []).append(f"{entry}/{f}")

    def __len__(self) -> int:
        return len(self._files)

    def __iter__(self):
        return iter(sorted(self._files))

    def __contains__(self, case_id: object) -> bool:
        return case_id in self._files

    def __getitem__(self, case_id: str) -> tuple[np.ndarray, np.ndarray]:
        import pyarrow.parquet as pq

        parts = [pq.read_table(f, filesystem=self.fs, columns=["x", "y", "error", "embedding"])
                 for f in self._files[case_id]]
        t = pa.concat_tables(parts)
        t = t.filter(pa.compute.equal(t.column("error"), "")).sort_by([("y", "ascending"), ("x", "ascending")])
        emb = t.column("embedding").combine_chunks()
        X = emb.values.to_numpy(zero_copy_only=False).astype(np.float32).reshape(len(t), -1)
        xy = np.stack([t.column("x").to_numpy(), t.column("y").to_numpy()], axis=1).astype(np.int64)
        return xy, X
