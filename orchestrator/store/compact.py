"""One Parquet file per pooled cache entry, whatever the pipeline that made it wrote.

Ray Data writes one file per block: an extraction of NIH-14 (112,120 images, batches of 32) would
leave thousands of files of a few dozen rows per split, slow to list and open on NFS or an object
store, and each with its own footer. `compact_parquet` rewrites a split's files into one file
before the entry is committed (in the writer's private scratch directory, so the entry's atomic
publish is untouched), streaming record batches so memory stays one row group.

The writer options are chosen so the bytes on disk follow from the rows (orchestrator/plan/model.py
predicts them, tests/test_plan_cost.py holds the plan within 5% of what a sweep writes):
- no dictionary on the embedding column: pyarrow's default dictionary-encodes floats until the
  dictionary page overflows (1 MB), and a dictionary of distinct floats plus its indices takes
  ~1.5x the plain bytes (measured: 1,000 x 128 floats took 795 kB dictionary-encoded, 530 kB plain);
- no compression: float32 embeddings do not compress (snappy gained nothing on them), and the id
  columns are a few percent of a row; uncompressed pages read without a decompression pass;
- dictionary on patient_id and error (repeated values), statistics on case_id only (the sort key);
- row groups of about ROW_GROUP_BYTES, so a reader can stream an entry in pieces.
"""

from __future__ import annotations

from typing import Any

import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from orchestrator.store import storage

LAYOUT = "one-file-per-split-v1"  # recorded in each entry's marker (cache.commit's meta)
FILE_NAME = "part-0.parquet"
ROW_GROUP_BYTES = 64 << 20
WRITE_OPTIONS: dict[str, Any] = {"compression": "none", "use_dictionary": ["patient_id", "error"],
                                 "write_statistics": ["case_id"]}


def row_group_rows(schema: pa.Schema) -> int:
    """Rows per row group: ~ROW_GROUP_BYTES of embeddings (at least 1,024 rows)."""
    emb = schema.field("embedding").type if "embedding" in schema.names else None
    width = 4 * emb.list_size if isinstance(emb, pa.FixedSizeListType) else 4 * 1024
    return max(1024, ROW_GROUP_BYTES // (width + 64))


def compact_parquet(fs: Any, directory: str) -> int:
    """Rewrite every Parquet file under `directory` as one, `FILE_NAME`; returns its rows. The old
    files are deleted after the new one is closed (the directory is the caller's private scratch)."""
    old = [f"{directory}/{f}" for f in storage.files_under(fs, directory) if f.endswith(".parquet")]
    src = pads.dataset(old, filesystem=fs, format="parquet")
    # Ray's and pandas' schema metadata describe the blocks, not the entry.
    schema = src.schema.remove_metadata()
    step = row_group_rows(schema)
    target = f"{directory}/{FILE_NAME}.tmp"  # not *.parquet: never taken for a part until renamed
    rows, buf, n_buf = 0, [], 0
    with pq.ParquetWriter(target, schema, filesystem=fs, **WRITE_OPTIONS) as w:
        # Blocks are far smaller than a row group: gather them so each row group is full-sized.
        for rb in src.to_batches(batch_size=step):
            buf.append(rb)
            n_buf += rb.num_rows
            if n_buf >= step:
                w.write_table(pa.Table.from_batches(buf, schema=schema), row_group_size=step)
                rows, buf, n_buf = rows + n_buf, [], 0
        if buf or rows == 0:
            w.write_table(pa.Table.from_batches(buf, schema=schema), row_group_size=step)
            rows += n_buf
    for f in old:
        fs.delete_file(f)
    fs.move(target, f"{directory}/{FILE_NAME}")
    return rows
