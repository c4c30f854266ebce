"""`medscale plan CONFIG`: what a sweep will cost before it runs (also printed before every sweep).

Per extraction (encoder, resolution, dataset): items counted from the dataset's index (images,
volumes and their slices, slides; "unknown" where the root or index is missing, so a plan runs
without data), GFLOPs per item, the feature cache it writes and whether it is cached already. Per
cell: the GPU share it asks for and the memory its features (or bags) take. Totals: device-hours on
an accelerator class (orchestrator/plan/throughput.py: measured where known, else estimated from
GFLOPs), cache bytes, cells and runs. Warnings: a cache larger than the storage's free space, a cell
whose features exceed its GPU share's memory, a resolution above the encoder's pretraining one.

`gather` reads what a plan needs (indexes, cache markers, free space); `build_plan` is pure on what
it gathered, so tests can feed it any counts.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from orchestrator.grid.cells import Cell
from orchestrator.grid.config import SweepConfig
from orchestrator.plan.format import format_markdown, format_plan, human_bytes, write_plan
from orchestrator.plan.model import (
    CLASS_BYTES,
    DENSE_FAMILIES,
    FILE_OVERHEAD,
    HEADER_SAMPLE,
    MARKER_BYTES,
    RAY_FILE_OVERHEAD,
    RAY_ROW_OVERHEAD,
    ROW_OVERHEAD,
    CellPlan,
    Counts,
    ExtractionPlan,
    Plan,
)
from orchestrator.plan.throughput import UTIL_FIT, bounded_rate, get_accelerator, items_per_second

# Published dataset sizes (images), used to plan before a download (`medscale plan` without data):
# NIH ChestX-ray14 112,120 frontal films; RSNA Pneumonia (stage 2 train) 26,684.
PUBLISHED_SIZES: dict[str, int] = {"nih14": 112_120, "rsna_pneumonia": 26_684}


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
    from orchestrator.extraction.jobs import SPLITS, ExtractionJob, cache_keys
    from orchestrator.extraction.weights import DigestMemo, weights_memo_key
    from orchestrator.store.cache import FeatureCache
    from tasks.datasets import get_dataset
    from tasks.encoders import get_encoder_spec
    from tasks.preprocess import PREPROCESS_VERSION

    memo_path = cfg.output_path / "weights_digests.json"
    info = DigestMemo(memo_path).get(weights_memo_key(encoder, cfg.weights_of(encoder))) if memo_path.exists() else None
    root = cfg.data_root(name)
    if info is None or not root.is_dir() or "://" not in cfg.cache_root and not Path(cfg.cache_root).is_dir():
        return "unknown", {}
    try:
        ds = get_dataset(name, str(root), val_fraction=cfg.val_fraction, seed=cfg.split_seed, **cfg.options_for(name))
        pooling = get_encoder_spec(encoder).resolve_pooling(cfg.pooling)
        job = ExtractionJob(encoder, cfg.weights_of(encoder), resolution, pooling, name, str(root), cfg.val_fraction,
                            cfg.split_seed, json.dumps(cfg.options_for(name), sort_keys=True))
        keys = cache_keys(job, info, ds.fingerprint(), PREPROCESS_VERSION)
        cache = FeatureCache(cfg.cache_root)
    except Exception:  # noqa: BLE001
        return "unknown", {}
    if getattr(ds, "kind", "image") == "slide":
        from dataclasses import replace

        from orchestrator.store.bags import SLIDES

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


def pooled_bytes(rows_per_split: dict[str, int], dim: int, id_bytes: float = 24.0, n_classes: int = 1) -> int:
    """Pooled cache entries (one per split, one Parquet file each: store/compact.py) of `dim`-wide
    float32 vectors on disk; `id_bytes`: mean length of case_id + patient_id."""
    n = sum(rows_per_split.values())
    per_row = dim * 4 + ROW_OVERHEAD + id_bytes + CLASS_BYTES * n_classes
    return int(n * per_row + len(rows_per_split) * (FILE_OVERHEAD + MARKER_BYTES))


def bag_bytes(tiles: int, dim: int, batch_size: int = 32) -> int:
    """A slide entry's bags, which keep Ray Data's layout (a file per block in each slide's
    directory): the per-row and per-file figures fitted on that layout before pooled entries were
    compacted (not refitted on bags)."""
    files = max(1, min(tiles // batch_size, 4096))
    return int(tiles * (dim * 4 + RAY_ROW_OVERHEAD + 26) + files * RAY_FILE_OVERHEAD + MARKER_BYTES)


def _n_or(v: int | None) -> str:
    return "unknown" if v is None else str(v)


def _families(cfg: SweepConfig, cells: list[Cell], extraction: tuple[str, int, str]) -> set[str]:
    from tasks.protocols import PROTOCOLS

    return {PROTOCOLS[c.protocol].family for c in cells if c.extraction == extraction}


def _dim(encoder: str, pooling: str) -> int:
    from tasks.encoders import get_encoder_spec

    return get_encoder_spec(encoder).embedding_dim(pooling)


Extraction = tuple[str, int, str]  # (encoder, resolution, dataset)


def build_plan(cfg: SweepConfig, cells: list[Cell], skipped: dict[str, str], gathered: dict[str, Any],
               accelerator: str = "H100") -> Plan:
    """The plan of a sweep from what `gather` read (item counts, cache state, free space): pure."""
    from tasks.encoders import get_encoder_spec

    acc = get_accelerator(accelerator)
    warnings = [f"{name}: item counts unknown ({c})" for name, c in gathered["counts"].items() if isinstance(c, str)]
    exps: list[ExtractionPlan] = []
    row_bytes: dict[Extraction, tuple[int | None, int | None]] = {}  # per extraction: (rows, bytes/row)
    above: dict[str, set[int]] = {}
    for ext in gathered["extractions"]:
        plan, row_bytes[ext] = _plan_extraction(cfg, cells, gathered, acc.name, ext)
        exps.append(plan)
        pretrain = get_encoder_spec(ext[0]).pretrain_resolution
        if pretrain and ext[1] > pretrain:
            above.setdefault(ext[0], set()).add(ext[1])
    for enc, rs in above.items():
        warnings.append(f"{enc} at {', '.join(str(r) for r in sorted(rs))} px: above its pretraining resolution "
                        f"({get_encoder_spec(enc).pretrain_resolution} px)")
    cell_plans = _plan_cells(cfg, cells, gathered, row_bytes, acc, warnings)
    new = [e for e in exps if e.cached != "yes"]
    new_bytes = sum(e.cache_bytes or 0 for e in new)
    free = gathered.get("free_bytes")
    warnings += _storage_warnings(cfg, new, new_bytes, free)
    totals = {
        "cells": len(cells), "skipped_cells": len(skipped), "runs": len(cells), "extractions": len(exps),
        "extractions_cached": sum(e.cached == "yes" for e in exps),
        "items_to_encode": sum(e.items or 0 for e in new),
        "device_hours": sum(e.device_hours or 0.0 for e in new),
        "device_hours_all": sum(e.device_hours or 0.0 for e in exps),
        "estimated": any(e.throughput == "estimated" for e in new),
        "incomplete": any(e.device_hours is None for e in new),
        "cache_bytes": sum(e.cache_bytes or 0 for e in exps), "cache_bytes_new": new_bytes,
        "free_bytes": free,
    }
    a, b = UTIL_FIT
    util: float | str = acc.utilisation if acc.utilisation is not None else f"{a:.3f} + {b:.3f} ln(GFLOPs/item)"
    return Plan(cfg.name, acc.name, util, exps, cell_plans, dict(skipped), totals, warnings)


def _plan_extraction(cfg: SweepConfig, cells: list[Cell], gathered: dict[str, Any], accelerator: str,
                     ext: Extraction) -> tuple[ExtractionPlan, tuple[int | None, int | None]]:
    """One extraction's row of the plan (items, cache bytes, hours) and its cells' (rows, bytes/row)."""
    from tasks.datasets import dataset_class
    from tasks.dense import planned_bytes
    from tasks.encoders import get_encoder_spec

    enc, res, ds = ext
    spec = get_encoder_spec(enc)
    batch = cfg.resources.extract_batch(enc, res, get_accelerator(accelerator).gpu)
    counts = gathered["counts"][ds]
    cached, meta = gathered["cached"].get(ext, ("unknown", {}))
    dim = _dim(enc, spec.default_pooling if cfg.pooling == "auto" else cfg.pooling)
    known = not isinstance(counts, str)
    kind = counts.kind if known else "image"
    n_cases = sum(counts.cases.values()) if known else None
    note = counts.note if known else ""
    published = None if known else PUBLISHED_SIZES.get(ds)
    if published is not None:  # no data on disk: plan with the dataset's published size, marked so
        from orchestrator.plan.model import Counts

        counts, known, n_cases = Counts("image", {"all": published}), True, published
        note = f"published size ({published:,} images; no data on disk)"
    if kind == "slide":
        tiles = meta.get("n_tiles")
        items = int(sum(tiles.values())) if isinstance(tiles, dict) else None
        item, feature = "tile", "bags"
        nbytes = bag_bytes(items, dim, batch) if items else None
        note = f"{_n_or(n_cases)} slides; tiles are counted once tiled (a cached entry)" if items is None else ""
        rows: tuple[int | None, int | None] = (items, dim * 4)
    elif _families(cfg, cells, ext) & set(DENSE_FAMILIES):
        item, feature = "slice", "dense"
        items = counts.slices if known else None
        # channels = modalities x layers x width (tasks.dense.FeatureSource); layers from a
        # protocol's `layers` hyperparameter where it has one, else the last block
        layers = max([len(cfg.protocols.get(c.protocol, {}).get("layers", [0]) or [0]) for c in cells
                      if c.extraction == ext] or [1])
        channels = getattr(dataset_class(ds), "n_modalities", 1) * layers * spec.embed_dim
        nbytes = planned_bytes(items, res // spec.patch_size, channels) if items is not None else None
        rows = (None, None)
    else:
        item, feature = ("slice" if kind == "volume" else "image"), "pooled"
        items = (counts.slices if kind == "volume" else n_cases) if known else None
        nbytes = pooled_bytes(counts.cases, dim, counts.id_bytes, counts.n_classes) if known else None
        rows = (n_cases, dim * 4)
    gf = float(spec.gflops(res))
    rate, source = items_per_second(accelerator, enc, res, gf)
    per_item = nbytes / items if feature == "dense" and nbytes and items else None
    shared = 1  # one decode feeds every uncached resolution of this encoder on this dataset
    if feature == "pooled" and kind == "image" and cfg.resources.shared_decode:
        shared = len({c.resolution for c in cells if (c.encoder, c.dataset) == (enc, ds)
                      and gathered["cached"].get((enc, c.resolution, ds), ("",))[0] != "yes"}) or 1
    rate, bound = bounded_rate(accelerator, rate, res, per_item, decode_shared_by=shared)
    hours = items / rate / 3600 if items is not None else None
    return ExtractionPlan(enc, res, ds, item, feature, items, n_cases, gf, nbytes, cached, rate, source, hours,
                          note, bound=bound), rows


def _plan_cells(cfg: SweepConfig, cells: list[Cell], gathered: dict[str, Any],
                row_bytes: dict[Extraction, tuple[int | None, int | None]], acc: Any,
                warnings: list[str]) -> list[CellPlan]:
    """Each cell's GPU share, feature memory and train size; a warning per (dataset, protocol,
    encoder, resolution) whose features exceed the cell's share of the GPU."""
    import numpy as np

    from tasks.datasets import dataset_class
    from tasks.encoders import get_encoder_spec
    from tasks.subsets import train_subset

    cell_plans = []
    gpu_mem = int(acc.memory_gb * 1e9)
    too_big: dict[str, list[str]] = {}
    for c in cells:
        share = cfg.resources.cell_gpu_share(get_encoder_spec(c.encoder).size, c.resolution)
        rows, per_row = row_bytes.get(c.extraction, (None, None))
        counts = gathered["counts"].get(c.dataset)
        n_train = None
        if not isinstance(counts, str) and counts is not None and counts.train is not None:
            pats, tgts = counts.train
            ds_cls = dataset_class(c.dataset)
            n_train = train_subset(pats, np.array(tgts, dtype=np.int64).reshape(len(pats), -1), c.train_size,
                                   seed=c.seed, classes=list(ds_cls.classes), task=ds_cls.task).n_cases
        mem = rows * per_row if rows is not None and per_row is not None else None
        cell_plans.append(CellPlan(c.cell_id, share, mem, int(share * gpu_mem), n_train))
        if mem is not None and mem > share * gpu_mem:
            too_big.setdefault(f"{c.dataset}/{c.protocol}/{c.encoder}@{c.resolution}px", []).append(c.cell_id)
    for what, ids in too_big.items():
        first = next(p for p in cell_plans if p.cell_id == ids[0])
        warnings.append(f"{what}: features {human_bytes(first.memory_bytes)} exceed the cell's GPU share "
                        f"({first.gpu_share:g} x {acc.memory_gb:g} GB on {acc.name}) in {len(ids)} cell(s); "
                        "raise resources.cell_gpus")
    return cell_plans


def _storage_warnings(cfg: SweepConfig, new: list[ExtractionPlan], new_bytes: int, free: int | None) -> list[str]:
    dense_new = sum(e.cache_bytes or 0 for e in new if e.feature == "dense")
    if free is not None and dense_new > free:
        return [f"the dense cache to write ({human_bytes(dense_new)}) is larger than the storage's free space "
                f"({human_bytes(free)}) at {cfg.cache_root}"]
    if free is not None and new_bytes > free:
        return [f"the feature cache to write ({human_bytes(new_bytes)}) is larger than the storage's free space "
                f"({human_bytes(free)}) at {cfg.cache_root}"]
    return []


def plan_sweep(cfg: SweepConfig, accelerator: str = "H100") -> Plan:
    from orchestrator.grid.cells import plan_cells

    cells, skipped = plan_cells(cfg)
    return build_plan(cfg, cells, skipped, gather(cfg, cells), accelerator)


__all__ = ["Plan", "build_plan", "format_markdown", "format_plan", "gather", "plan_sweep", "write_plan"]
