"""Whole-slide extraction: slides -> tile coordinates -> tiles -> one feature bag per slide.

The pipeline (run by `pipelines.run_slide_pipeline`): slide rows -> `expand_slide` (flat_map:
tile coordinates, computed once per slide and tiling and kept beside the feature cache, so every
encoder reuses them) -> repartition into batches of neighbouring tiles -> `decode_tiles` (CPU
tasks; each slide opened once per batch, tiles read lazily from the best pyramid level) -> the
encoder actor pool -> Parquet partitioned by `case_id`: a slide's bag is one directory.

A slide that cannot be opened, has no tissue, or breaks while its tiles are read fails alone: its
rows carry the error through the pipeline (no exception, which would stop every slide), the
directory of its bag is dropped before the entry is committed, and the entry's metadata names it
with the reason. Cells then train and score on the slides that have bags, and record the rest.
This module holds logic and worker-side callables only; it never imports Ray.
"""

from __future__ import annotations

import io
import json
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute  # noqa: F401 - pa.compute, for SlideBags

from orchestrator.extraction.images import EncoderUDF
from orchestrator.store import storage
from orchestrator.store.bags import BAG_DTYPE, bag_dirs
from tasks.errors import DatasetError
from tasks.wsi.tiling import TILING_VERSION

TILE_COLUMNS = ("case_id", "path", "x", "y", "level", "read_size", "tile_size", "error")


def coords_root(cache_base: str, dataset: str, tiling: dict[str, Any]) -> str:
    """Where a dataset's tile coordinates live for one set of tiling parameters (one file a slide)."""
    import hashlib

    digest = hashlib.sha256(json.dumps({"v": TILING_VERSION, **tiling}, sort_keys=True).encode()).hexdigest()[:16]
    return f"{cache_base}/tiles/{dataset}-{digest}"


def slide_coordinates(fs: Any, root: str, case_id: str, path: str, tiling: dict[str, Any]):
    """The slide's tile coordinates: read from `root`, or tiled now and written there (atomically:
    written beside, then renamed, so a reader never sees half a file)."""
    import uuid

    import pyarrow.parquet as pq

    from tasks.wsi.tiling import TilingParams, coordinates_table, load_coordinates, tile_slide

    target = f"{root}/{case_id}.parquet"
    if storage.exists(fs, target):
        coords = load_coordinates(target, filesystem=fs)
        if coords.attrs.get("slide") == path:
            return coords
    coords = tile_slide(path, TilingParams(**tiling))
    buf = io.BytesIO()
    pq.write_table(coordinates_table(coords), buf)
    fs.create_dir(root, recursive=True)
    tmp = f"{root}/.{case_id}.{uuid.uuid4().hex[:8]}.tmp"
    storage.write_bytes(fs, tmp, buf.getvalue())
    fs.move(tmp, target)
    return coords


def expand_slide(row: dict[str, Any], tiling: str, coords_uri: str) -> list[dict[str, Any]]:
    """One slide row -> one row per tissue tile; a slide that fails gives one row carrying the error."""
    fs, root = storage.split_uri(coords_uri)
    case, path = str(row["case_id"]), str(row["path"])
    try:
        c = slide_coordinates(fs, root, case, path, json.loads(tiling))
    except DatasetError as e:
        return [{"case_id": case, "path": path, "x": -1, "y": -1, "level": 0, "read_size": 0, "tile_size": 0,
                 "error": str(e)}]
    except Exception as e:  # noqa: BLE001 - OpenSlide and PIL raise their own types; name the slide
        return [{"case_id": case, "path": path, "x": -1, "y": -1, "level": 0, "read_size": 0, "tile_size": 0,
                 "error": f"{path}: cannot tile the slide: {type(e).__name__}: {e}"}]
    cols = {k: c[k].to_numpy().tolist() for k in ("x", "y", "level", "read_size", "tile_size")}
    return [{"case_id": case, "path": path, "x": x, "y": y, "level": lv, "read_size": rs, "tile_size": ts,
             "error": ""}
            for x, y, lv, rs, ts in zip(cols["x"], cols["y"], cols["level"], cols["read_size"], cols["tile_size"],
                                        strict=True)]


def decode_tiles(batch: dict[str, Any], resolution: int, interpolation: str) -> dict[str, Any]:
    """Read one batch of tiles to uint8 (B, 3, r, r), opening each slide once. A slide whose read
    fails marks its rows with the error (their pixels stay zero and are never encoded)."""
    from orchestrator.extraction.decode import decode_by_file
    from tasks.wsi.tiling import read_tiles

    def read(path: str, rows: list[int]) -> np.ndarray:
        return read_tiles(path, batch["x"][rows], batch["y"][rows], batch["level"][rows],
                          batch["read_size"][rows], batch["tile_size"][rows])

    pixels, errors = decode_by_file(batch, resolution, interpolation, "tiles", read)
    return {"case_id": batch["case_id"], "x": batch["x"], "y": batch["y"], "error": errors, "pixels": pixels}


class TileEncoderUDF(EncoderUDF):
    """The encoder actor of the slide pipeline: rows are tiles (slide, x, y), written by slide."""

    def table(self, batch: dict[str, Any], emb: np.ndarray) -> pa.Table:
        return tile_embeddings_table(batch, emb)


def tile_embeddings_table(batch: dict[str, Any], emb: np.ndarray) -> pa.Table:
    """Encoder output for tiles: (case_id, x, y, error, embedding fp16); failed rows keep zeros.
    Bags are stored in fp16 (half the bytes; ABMIL reads them back as float32 one slide at a time)."""
    emb = np.ascontiguousarray(emb, dtype=BAG_DTYPE)
    return pa.table({
        "case_id": pa.array([str(c) for c in batch["case_id"]]),
        "x": pa.array(np.asarray(batch["x"], np.int64)),
        "y": pa.array(np.asarray(batch["y"], np.int64)),
        "error": pa.array([str(e) for e in batch["error"]]),
        "embedding": pa.FixedSizeListArray.from_arrays(pa.array(emb.ravel()), emb.shape[1]),
    })


def finish_bags(fs: Any, out_dir: str) -> tuple[dict[str, int], dict[str, str]]:
    """After the pipeline wrote `out_dir/case_id=<slide>/`: drop the bags of failed slides.
    Returns (tiles per good slide, error message per failed slide). Reads two small columns only."""
    import pyarrow.compute as pc
    import pyarrow.dataset as pads

    if not storage.exists(fs, out_dir):
        return {}, {}
    t = pads.dataset(out_dir, filesystem=fs, format="parquet", partitioning="hive").to_table(
        columns=["case_id", "error"])
    case = t.column("case_id").cast(pa.string()).to_numpy(zero_copy_only=False)
    err = t.column("error").to_numpy(zero_copy_only=False)
    failed: dict[str, str] = {}
    for c, e in zip(case[err != ""], err[err != ""], strict=True):
        failed.setdefault(str(c), str(e))
    counts = pc.value_counts(pa.array(case)).to_pylist()
    n_tiles = {str(v["values"]): int(v["counts"]) for v in counts if str(v["values"]) not in failed}
    for c, d in bag_dirs(fs, out_dir).items():
        if c in failed:
            storage.delete_dir(fs, d)
    return n_tiles, failed
