"""The plan's data: per extraction (items, hours, cache bytes, state) and per cell, with totals and
warnings. Built by plan/build.py, printed and written by plan/format.py. Byte-size constants of
the cache's Parquet layout live here because the estimate and its test both need them."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

# Bytes a pooled cache entry takes, for the layout store/compact.py writes (one uncompressed Parquet
# file per split, no dictionary on the floats), fitted by least squares on files pyarrow wrote
# (10-5,000 rows, 128-1,536 dims, 1-14 classes, ids of 8-16 characters; largest error 1.1%):
# per row the float32 vector, the id strings as they are, ROW_OVERHEAD (string offsets, list
# levels) and CLASS_BYTES per target class (int8 + levels); per file FILE_OVERHEAD (footer,
# schema, page headers); per entry the marker. tests/test_plan_cost.py holds the plan within 10%
# of what a sweep writes.
ROW_OVERHEAD = 4


CLASS_BYTES = 4


FILE_OVERHEAD = 1_350


MARKER_BYTES = 930


# Slide bags keep Ray Data's layout (one file per block in each slide's directory), planned with
# the figures fitted on that layout (pyarrow's defaults: dictionary-encoded floats, snappy).
RAY_ROW_OVERHEAD = 90


RAY_FILE_OVERHEAD = 2_600


DENSE_FAMILIES = ("dense", "training_free")


HEADER_SAMPLE = 500  # volume headers read for a slice count before sampling


@dataclass
class Counts:
    """What an index says about a dataset (None: not known without reading more)."""

    kind: str  # image | volume | slide
    cases: dict[str, int]  # per split (slides: "all")
    slices: int | None = None  # volumes: slices the encoder sees (headers), else None
    train: tuple[list[str], list[list[int]]] | None = None  # train rows: patients, targets
    tiles: int | None = None  # slides: from a cached entry's metadata only
    note: str = ""
    id_bytes: float = 24.0  # mean len(case_id) + len(patient_id): what a cache row stores besides floats
    n_classes: int = 1


@dataclass
class ExtractionPlan:
    encoder: str
    resolution: int
    dataset: str
    item: str  # what one encoder pass sees: image | slice | tile
    feature: str  # pooled | dense | bags
    items: int | None
    cases: int | None
    gflops_per_item: float
    cache_bytes: int | None
    cached: str  # yes | no | unknown
    items_per_s: float | None
    throughput: str  # measured | estimated
    device_hours: float | None
    note: str = ""
    bound: str = "gpu"  # what limits the rate: gpu | decode | disk (plan/throughput.py bounded_rate)


@dataclass
class CellPlan:
    cell_id: str
    gpu_share: float
    memory_bytes: int | None
    gpu_memory_bytes: int
    n_train: int | None  # training cases after the cell's subset (data axis)


@dataclass
class Plan:
    sweep: str
    accelerator: str
    utilisation: float | str  # a number, or the fitted function of GFLOPs/item
    extractions: list[ExtractionPlan]
    cells: list[CellPlan]
    skipped: dict[str, str]
    totals: dict[str, Any]
    warnings: list[str] = field(default_factory=list)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1, sort_keys=False, default=str)
