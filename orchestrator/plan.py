"""`medscale plan CONFIG`: what a sweep will cost before it runs (also printed before every sweep).

Per extraction (encoder, resolution, dataset): items counted from the dataset's index (images,
volumes and their slices, slides; "unknown" where the root or index is missing, so a plan runs
without data), GFLOPs per item, the feature cache it writes and whether it is cached already. Per
cell: the GPU share it asks for and the memory its features (or bags) take. Totals: device-hours on
an accelerator class (orchestrator/throughput.py: measured where known, else estimated from
GFLOPs), cache bytes, cells and runs. Warnings: a cache larger than the storage's free space, a cell
whose features exceed its GPU share's memory, a resolution above the encoder's pretraining one.

`gather` reads what a plan needs (indexes, cache markers, free space); `build_plan` is pure on what
it gathered, so tests can feed it any counts.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from orchestrator.config import SweepConfig
from orchestrator.grid import Cell
from orchestrator.plan_format import format_markdown, format_plan, human_bytes, write_plan
from orchestrator.throughput import get_accelerator, items_per_second

# Bytes a pooled cache entry takes beyond its float32 vectors, fitted to entries the pipeline wrote
# (tests/test_plan_cost.py keeps the estimate within 10%). Per row: the id strings as they are, two
# bytes per target class (int8 + list levels) and ROW_OVERHEAD (offsets, levels of the embedding
# list, the empty error string). Per Parquet file: FILE_OVERHEAD (footer, page headers); the
# pipeline writes one file per Ray block (rows / extract_batch_size) and split. Per entry: MARKER.
ROW_OVERHEAD = 90
FILE_OVERHEAD = 2_600
MARKER_BYTES = 930
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
    utilisation: float
    extractions: list[ExtractionPlan]
    cells: list[CellPlan]
    skipped: dict[str, str]
    totals: dict[str, Any]
    warnings: list[str] = field(default_factory=list)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1, sort_keys=False, default=str)


# -- gathering (reads indexes, cache markers, free space) ---------------------------------------

def count_items(cfg: SweepConfig, name: str) -> Counts | str:
    """The dataset's counts from its index, or why they are unknown."""
    from tasks.datasets import get_dataset

    root = cfg.data_root(name)
    if not root.is_dir():
        return f"{root}: dataset root missing"
    try:
        ds = get_dataset(name, str(root), val_fraction=cfg.val_fraction, seed=cfg.split_seed, **cfg.options_for(name))
        idx = ds.index()
    except Exception as e:  # noqa: BLE001 - a plan reports, it does not stop at a bad index
        return f"{root}: index unreadable ({type(e).__name__}: {str(e).splitlines()[0][:200]})"
    kind = getattr(ds, "kind", "image")
    if kind == "slide":
        return Counts(kind, {"all": len(idx)})
    cases = {str(s): int(n) for s, n in idx["split"].value_counts().items()}
    train = idx[idx["split"] == "train"]
    counts = Counts(kind, cases, train=(train["patient_id"].astype(str).tolist(), train["target"].tolist()),
                    id_bytes=float(idx["case_id"].astype(str).str.len().mean() + idx["patient_id"].astype(str).str.len().mean()),
                    n_classes=len(ds.classes))
    from tasks.datasets.dense_base import DenseDataset

    if isinstance(ds, DenseDataset):  # dense datasets: slices per case (1 for 2D), from headers
        try:
            counts.slices = sum(int(ds.n_slices(str(c))) for c in idx["case_id"])
        except Exception:  # noqa: BLE001
            counts.slices = None
    elif kind == "volume":  # CT-RATE: volumes embedded slice by slice, pooled per volume
        from tasks.datasets.ct_rate import n_slices

        paths = [str(p) for p in idx["path"]]
        # Headers only, but tens of thousands of them on NFS take minutes: above HEADER_SAMPLE
        # volumes, an evenly spaced sample is read and scaled (the plan says so).
        sample = paths if len(paths) <= HEADER_SAMPLE else paths[:: len(paths) // HEADER_SAMPLE]
        try:
            counts.slices = round(sum(n_slices(p) for p in sample) * len(paths) / len(sample))
            if len(sample) < len(paths):
                counts.note = f"slices scaled from {len(sample)} of {len(paths)} volume headers"
        except Exception:  # noqa: BLE001 - a bad header: slices unknown, volumes still counted
            counts.slices = None
    return counts


def cache_state(cfg: SweepConfig, encoder: str, resolution: int, name: str) -> tuple[str, dict[str, Any]]:
    """("yes" | "no" | "unknown", metadata of a complete entry). Needs the weights digest from the
    sweep's memo (known after a first run) and the dataset fingerprint; unknown without them."""
    from orchestrator.cache import FeatureCache
    from orchestrator.extract import SPLITS, DigestMemo, ExtractionJob, cache_keys, weights_memo_key
    from tasks.datasets import get_dataset
    from tasks.encoders import create_encoder
    from tasks.preprocess import PREPROCESS_VERSION

    memo_path = cfg.output_path / "weights_digests.json"
    info = DigestMemo(memo_path).get(weights_memo_key(encoder, cfg.weights_of(encoder))) if memo_path.exists() else None
    root = cfg.data_root(name)
    if info is None or not root.is_dir() or "://" not in cfg.cache_root and not Path(cfg.cache_root).is_dir():
        return "unknown", {}
    try:
        ds = get_dataset(name, str(root), val_fraction=cfg.val_fraction, seed=cfg.split_seed, **cfg.options_for(name))
        pooling = create_encoder(encoder, weights="random", device="meta").resolve_pooling(cfg.pooling)
        job = ExtractionJob(encoder, cfg.weights_of(encoder), resolution, pooling, name, str(root), cfg.val_fraction,
                            cfg.split_seed, json.dumps(cfg.options_for(name), sort_keys=True))
        keys = cache_keys(job, info, ds.fingerprint(), PREPROCESS_VERSION)
        cache = FeatureCache(cfg.cache_root)
    except Exception:  # noqa: BLE001
        return "unknown", {}
    if getattr(ds, "kind", "image") == "slide":
        from dataclasses import replace

        from orchestrator.extract_slides import SLIDES

        key = replace(keys["test"], split=SLIDES)
        return ("yes", cache.meta(key)) if cache.is_complete(key) else ("no", {})
    done = [cache.is_complete(keys[s]) for s in SPLITS]
    return ("yes" if all(done) else "no"), {}


def free_bytes(cfg: SweepConfig) -> int | None:
    """Free space where the cache goes (a local path or NFS); None for object stores."""
    if "://" in cfg.cache_root:
        return None
    p = Path(cfg.cache_root)
    while not p.exists() and p != p.parent:
        p = p.parent
    try:
        return int(shutil.disk_usage(p).free)
    except OSError:
        return None


def gather(cfg: SweepConfig, cells: list[Cell]) -> dict[str, Any]:
    extractions = sorted({c.extraction for c in cells} |
                         {(c.encoder, c.resolution, d) for c in cells for d in cfg.evaluate_on.get(c.dataset, [])},
                         key=lambda e: (e[2], e[0], e[1]))
    counts = {d: count_items(cfg, d) for d in sorted({e[2] for e in extractions})}
    cached = {e: cache_state(cfg, *e) for e in extractions}
    return {"extractions": extractions, "counts": counts, "cached": cached, "free_bytes": free_bytes(cfg)}


# -- the plan (pure) -----------------------------------------------------------------------------

def pooled_bytes(rows_per_split: dict[str, int], dim: int, id_bytes: float = 24.0, n_classes: int = 1,
                 batch_size: int = 32) -> int:
    """Pooled cache entries (one per split) of `dim`-wide vectors on disk; `id_bytes`: mean length
    of case_id + patient_id."""
    n = sum(rows_per_split.values())
    blocks = max(1, min(n // batch_size, 4096))  # as ray_backend.run_embedding_pipeline cuts them
    files = sum(min(blocks, k) for k in rows_per_split.values())
    per_row = dim * 4 + ROW_OVERHEAD + id_bytes + 2 * n_classes
    return int(n * per_row + files * FILE_OVERHEAD + len(rows_per_split) * MARKER_BYTES)


def _n_or(v: int | None) -> str:
    return "unknown" if v is None else str(v)


def _families(cfg: SweepConfig, cells: list[Cell], extraction: tuple[str, int, str]) -> set[str]:
    from tasks.protocols import PROTOCOLS

    return {PROTOCOLS[c.protocol].family for c in cells if c.extraction == extraction}


def _dim(encoder: str, pooling: str) -> int:
    from tasks.encoders import create_encoder

    return create_encoder(encoder, weights="random", device="meta").embedding_dim(pooling)


def build_plan(cfg: SweepConfig, cells: list[Cell], skipped: dict[str, str], gathered: dict[str, Any],
               accelerator: str = "H100") -> Plan:
    from tasks.dense import planned_bytes
    from tasks.encoders import get_encoder_spec
    from tasks.subsets import train_subset

    acc = get_accelerator(accelerator)
    warnings: list[str] = []
    exps: list[ExtractionPlan] = []
    row_bytes: dict[tuple[str, int, str], tuple[int | None, int | None]] = {}  # per extraction: (rows, bytes/row)
    for name, c in gathered["counts"].items():
        if isinstance(c, str):
            warnings.append(f"{name}: item counts unknown ({c})")
    above: dict[str, set[int]] = {}
    for enc, res, ds in gathered["extractions"]:
        spec = get_encoder_spec(enc)
        counts = gathered["counts"][ds]
        cached, meta = gathered["cached"].get((enc, res, ds), ("unknown", {}))
        pooling = spec.default_pooling if cfg.pooling == "auto" else cfg.pooling
        dim = _dim(enc, pooling)
        known = not isinstance(counts, str)
        kind = counts.kind if known else "image"
        n_cases = sum(counts.cases.values()) if known else None
        families = _families(cfg, cells, (enc, res, ds))
        note = counts.note if known else ""
        if kind == "slide":
            tiles = meta.get("n_tiles")
            items = int(sum(tiles.values())) if isinstance(tiles, dict) else None
            item, feature = "tile", "bags"
            nbytes = pooled_bytes({"all": items}, dim, batch_size=cfg.resources.extract_batch_size) if items else None
            note = f"{_n_or(n_cases)} slides; tiles are counted once tiled (a cached entry)" if items is None else ""
            row_bytes[(enc, res, ds)] = (items, dim * 4)
        elif families & set(DENSE_FAMILIES):
            item, feature = "slice", "dense"
            items = counts.slices if known else None
            from tasks.datasets import dataset_class

            # channels = modalities x layers x width (tasks.dense.FeatureSource); layers from a
            # protocol's `layers` hyperparameter where it has one, else the last block
            layers = max([len(cfg.protocols.get(c.protocol, {}).get("layers", [0]) or [0]) for c in cells
                          if c.extraction == (enc, res, ds)] or [1])
            channels = getattr(dataset_class(ds), "n_modalities", 1) * layers * spec.embed_dim
            nbytes = planned_bytes(items, res // spec.patch_size, channels) if items is not None else None
            row_bytes[(enc, res, ds)] = (None, None)
        else:
            item, feature = ("slice" if kind == "volume" else "image"), "pooled"
            items = (counts.slices if kind == "volume" else n_cases) if known else None
            nbytes = (pooled_bytes(counts.cases, dim, counts.id_bytes, counts.n_classes,
                                   cfg.resources.extract_batch_size) if known else None)
            row_bytes[(enc, res, ds)] = (n_cases, dim * 4)
        gf = float(spec.gflops(res))
        rate, source = items_per_second(acc.name, enc, res, gf)
        hours = items / rate / 3600 if items is not None else None
        exps.append(ExtractionPlan(enc, res, ds, item, feature, items, n_cases, gf, nbytes, cached, rate, source,
                                   hours, note))
        if spec.pretrain_resolution and res > spec.pretrain_resolution:
            above.setdefault(enc, set()).add(res)

    for enc, rs in above.items():
        warnings.append(f"{enc} at {', '.join(str(r) for r in sorted(rs))} px: above its pretraining resolution "
                        f"({get_encoder_spec(enc).pretrain_resolution} px)")
    cell_plans = []
    gpu_mem = int(acc.memory_gb * 1e9)
    too_big: dict[str, list[str]] = {}
    for c in cells:
        spec = get_encoder_spec(c.encoder)
        share = cfg.resources.cell_gpu_share(spec.size, c.resolution)
        rows, per_row = row_bytes.get(c.extraction, (None, None))
        counts = gathered["counts"].get(c.dataset)
        n_train = None
        if not isinstance(counts, str) and counts is not None and counts.train is not None:
            pats, tgts = counts.train
            import numpy as np

            from tasks.datasets import dataset_class

            ds_cls = dataset_class(c.dataset)
            n_train = train_subset(pats, np.array(tgts, dtype=np.int64).reshape(len(pats), -1), c.train_size,
                                   seed=c.seed, classes=list(ds_cls.classes), task=ds_cls.task).n_cases
        mem = rows * per_row if rows is not None and per_row is not None else None
        cell_plans.append(CellPlan(c.cell_id, share, mem, int(share * gpu_mem), n_train))
        if mem is not None and mem > share * gpu_mem:
            too_big.setdefault(f"{c.dataset}/{c.protocol}/{c.encoder}@{c.resolution}px", []).append(c.cell_id)
    for what, ids in too_big.items():
        mem = next(p.memory_bytes for p in cell_plans if p.cell_id == ids[0])
        share = next(p.gpu_share for p in cell_plans if p.cell_id == ids[0])
        warnings.append(f"{what}: features {human_bytes(mem)} exceed the cell's GPU share ({share:g} x {acc.memory_gb:g} GB "
                        f"on {acc.name}) in {len(ids)} cell(s); raise resources.cell_gpus")

    new = [e for e in exps if e.cached != "yes"]
    new_bytes = sum(e.cache_bytes or 0 for e in new)
    dense_new = sum(e.cache_bytes or 0 for e in new if e.feature == "dense")
    free = gathered.get("free_bytes")
    if free is not None and dense_new > free:
        warnings.append(f"the dense cache to write ({human_bytes(dense_new)}) is larger than the storage's free space "
                        f"({human_bytes(free)}) at {cfg.cache_root}")
    elif free is not None and new_bytes > free:
        warnings.append(f"the feature cache to write ({human_bytes(new_bytes)}) is larger than the storage's free space "
                        f"({human_bytes(free)}) at {cfg.cache_root}")
    unknown_time = [e for e in new if e.device_hours is None]
    totals = {
        "cells": len(cells), "skipped_cells": len(skipped), "runs": len(cells), "extractions": len(exps),
        "extractions_cached": sum(e.cached == "yes" for e in exps),
        "items_to_encode": sum(e.items or 0 for e in new),
        "device_hours": sum(e.device_hours or 0.0 for e in new),
        "device_hours_all": sum(e.device_hours or 0.0 for e in exps),
        "estimated": any(e.throughput == "estimated" for e in new),
        "incomplete": bool(unknown_time),
        "cache_bytes": sum(e.cache_bytes or 0 for e in exps), "cache_bytes_new": new_bytes,
        "free_bytes": free,
    }
    return Plan(cfg.name, acc.name, acc.utilisation, exps, cell_plans, dict(skipped), totals, warnings)


def plan_sweep(cfg: SweepConfig, accelerator: str = "H100") -> Plan:
    from orchestrator.grid import plan_cells

    cells, skipped = plan_cells(cfg)
    return build_plan(cfg, cells, skipped, gather(cfg, cells), accelerator)


__all__ = ["Plan", "build_plan", "format_markdown", "format_plan", "gather", "plan_sweep", "write_plan"]
