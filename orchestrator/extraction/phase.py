"""The sweep's first phase: every (encoder, resolution, dataset) the pending cells need, embedded
once into the feature cache. A failure (bad dataset root, missing weights, a corrupt image) is
caught per extraction and handed back, so only the cells that depend on it fail.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import replace
from typing import Any

from orchestrator import console
from orchestrator.console.progress import Progress, watch_output
from orchestrator.extraction.images import commit_splits, index_rows, pool_volumes
from orchestrator.extraction.jobs import SPLITS, ExtractionJob, ExtractResult, cache_keys, extract_line
from orchestrator.extraction.runs import extract_bags, extract_dense, pool_size, report_failed
from orchestrator.extraction.shared import extract_group, shared_decode_groups
from orchestrator.extraction.weights import DigestMemo, planned_compile, weights_info, weights_memo_key
from orchestrator.grid.cells import Cell
from orchestrator.grid.config import SweepConfig
from orchestrator.store.cache import FeatureCache

Extraction = tuple[str, int, str]  # (encoder, resolution, dataset)

def plan_one(job: ExtractionJob, memo: DigestMemo, cfg: SweepConfig, dataset: Any, fingerprint: str) -> ExtractResult:
    """The extraction's cache keys (weights digest, precision, pooling, fingerprint, ...) without
    encoding anything; slide datasets: also every grid seed's split of the slides."""
    from orchestrator.extraction.slides import coords_root
    from orchestrator.store.bags import SLIDES
    from tasks.preprocess import PREPROCESS_VERSION

    info = weights_info(job.encoder, job.weights, memo)
    keys = cache_keys(job, info, fingerprint, PREPROCESS_VERSION)
    result = ExtractResult(job, keys, info["source"], info["digest"],
                           interpolation=info.get("interpolation", "bicubic"))
    if getattr(dataset, "kind", "image") == "slide":
        result.keys = {SLIDES: replace(keys["test"], split=SLIDES, feature_kind="bag")}  # bags, stored fp16
        result.coords_uri = coords_root(cfg.cache_root, job.dataset, dataset.tiling.key())
        for seed in cfg.grid.seeds:  # each cell's split (official, or its CV fold)
            cases, scheme = dataset.cell_cases(seed)
            result.cases[seed] = ([{"case_id": str(r.case_id), "path": str(r.path), "split": str(r.split),
                                    "patient_id": str(r.patient_id), "target": [int(v) for v in r.target]}
                                   for r in cases.itertuples(index=False)], scheme)
    return result


def extract_one(job: ExtractionJob, cache: FeatureCache, memo: DigestMemo, cfg: SweepConfig,
                n_gpus: float, dataset: Any, fingerprint: str, dense: set | None = None,
                planned: ExtractResult | None = None) -> ExtractResult:
    """Encode what the cache lacks of one extraction (`planned`: its keys, from plan_one)."""
    from orchestrator.extraction import pipelines

    t0 = time.perf_counter()
    result = planned or plan_one(job, memo, cfg, dataset, fingerprint)
    job, keys = result.job, result.keys
    info = {"digest": result.weights_digest, "source": result.weights_source, "interpolation": result.interpolation}
    if getattr(dataset, "kind", "image") == "slide":
        return extract_bags(job, cache, cfg, n_gpus, dataset, result, t0)
    if dense is not None:  # dense maps (one file per case), the cached/online rule: extraction.runs
        return extract_dense(job, cache, cfg, n_gpus, dataset, result, dense, t0)
    missing = [s for s in SPLITS if not cache.is_complete(keys[s])]
    result.cached_splits = [s for s in SPLITS if s not in missing]
    for s in result.cached_splits:
        result.failed.update(cache.meta(keys[s]).get("failed", {}))
    if not missing:
        extract_line(job, "cached", 0, 0.0)
        return result
    rows = index_rows(dataset.index(), missing, job.root, job.dataset)
    res = cfg.resources
    actors, gpus = pool_size(cfg, n_gpus)
    result.actors, result.gpus_per_actor = actors, gpus
    extract_line(job, "start", len(rows), 0.0)
    scratch = cache.scratch_dir()
    volumes = getattr(dataset, "kind", "image") == "volume"
    run = pipelines.run_slice_pipeline if volumes else pipelines.run_embedding_pipeline
    try:
        if volumes:  # slice rows need each volume's scaling and the HU window (driver-side dataset)
            rows = [dataset.slice_rows(r) for r in rows]
        out_dir = f"{scratch}/slices" if volumes else scratch
        bar = Progress(job.label, None if volumes else len(rows), "slices" if volumes else "images")
        with watch_output(cache.fs, out_dir, bar):
            run(rows, job, interpolation=info.get("interpolation", "bicubic"), expected_digest=info["digest"],
                out_dir=out_dir, filesystem=cache.fs, batch_size=res.extract_batch(job.encoder, job.resolution, gpus > 0), actors=actors,
                gpus_per_actor=gpus, torch_threads=res.torch_threads)
        meta: dict[str, Any] = {"weights_source": info["source"], "rows_planned": len(rows)}
        failed = None
        if volumes:
            # One row per volume: its slice embeddings pooled (the cache entry keeps the image schema).
            failed = pool_volumes(cache.fs, f"{scratch}/slices", scratch, missing, dataset.slice_pooling)
            cache.fs.delete_dir(f"{scratch}/slices")
            meta["slice_pooling"] = dataset.slice_pooling
        result.n_encoded, result.failed = commit_splits(cache, scratch, keys, missing, meta, failed)
        report_failed(result.failed, "volume" if volumes else "case")
    finally:
        cache.release(scratch)
    result.seconds = time.perf_counter() - t0
    extract_line(job, "done", result.n_encoded, result.seconds)
    return result


def _extract_with_retries(job: ExtractionJob, cache: FeatureCache, memo: DigestMemo, cfg: SweepConfig,
                          n_gpus: float, dataset: Any, fingerprint: str, dense: set | None = None,
                          planned: ExtractResult | None = None) -> ExtractResult:
    """`extract_one`, again (up to max_failures times) when Ray lost a node or worker under it:
    splits committed before the loss come from the cache, only the rest is encoded again."""
    from orchestrator import ray_backend

    for attempt in range(cfg.max_failures + 1):
        try:
            return extract_one(job, cache, memo, cfg, n_gpus, dataset, fingerprint, dense, planned)
        except Exception as e:
            if attempt == cfg.max_failures or not ray_backend.is_system_error(e):
                raise
            console.note(f"  {job.label}: Ray lost a worker or node ({ray_backend.error_text(e)}); retrying")
    raise AssertionError("unreachable")


class PlannedExtractions:
    """Every extraction a sweep's cells need, resolved to cache keys before anything is encoded
    (the keys are part of each cell's identity), with the failures met on the way."""

    def __init__(self) -> None:
        self.results: dict[Extraction, ExtractResult] = {}
        self.failures: dict[Extraction, str] = {}
        self.info: dict[Extraction, tuple[str, dict[str, Any]]] = {}  # (fingerprint, preprocessing record)
        self.datasets: dict[str, tuple[Any, str]] = {}  # name -> (dataset, fingerprint)
        self.memo_keys: dict[Extraction, str | None] = {}


def needed_extractions(cfg: SweepConfig, cells: list[Cell]) -> list[Extraction]:
    needed = {c.extraction for c in cells}
    needed |= {(c.encoder, c.resolution, d) for c in cells for d in cfg.evaluate_on.get(c.dataset, [])}
    return sorted(needed, key=lambda e: (e[2], e[0], e[1]))


def plan_extractions(cfg: SweepConfig, cells: list[Cell], memo: DigestMemo, precision: str) -> PlannedExtractions:
    """Resolve every extraction the cells need: the dataset (its fingerprint), the weights (their
    digest, from the memo when its source still matches), pooling and precision, into cache keys.
    A failure (bad dataset root, missing weights) is kept per extraction; its cells fail alone."""
    from orchestrator import ray_backend
    from tasks.datasets import get_dataset
    from tasks.encoders import get_encoder_spec

    plan = PlannedExtractions()
    for enc, res, ds_name in needed_extractions(cfg, cells):
        try:
            if ds_name not in plan.datasets:
                root = str(cfg.data_root(ds_name))
                if not os.path.isdir(root):
                    raise FileNotFoundError(f"{root}: dataset root of {ds_name} does not exist "
                                            f"(write a synthetic one: medscale datasets synth {ds_name} --root {root})")
                ds = get_dataset(ds_name, root, val_fraction=cfg.val_fraction, seed=cfg.split_seed,
                                 **cfg.options_for(ds_name))
                plan.datasets[ds_name] = (ds, ds.fingerprint())
            dataset, fingerprint = plan.datasets[ds_name]
            spec = get_encoder_spec(enc)  # pooling and preprocessing come from the spec: no model built
            pooling = spec.resolve_pooling(cfg.pooling)
            job = ExtractionJob(enc, cfg.weights_of(enc), res, pooling, ds_name, str(cfg.data_root(ds_name)),
                                cfg.val_fraction, cfg.split_seed,
                                json.dumps(cfg.options_for(ds_name), sort_keys=True), precision,
                                compile=planned_compile(precision, cfg.resources.compile))
            plan.memo_keys[(enc, res, ds_name)] = weights_memo_key(enc, cfg.weights_of(enc))
            plan.results[(enc, res, ds_name)] = plan_one(job, memo, cfg, dataset, fingerprint)
            plan.info[(enc, res, ds_name)] = (fingerprint, {**spec.preprocess_info(), "pooling": pooling,
                                                            "precision": precision})
        except Exception as e:  # noqa: BLE001 - one extraction fails alone; its cells carry the reason
            plan.failures[(enc, res, ds_name)] = ray_backend.error_text(e)
    return plan


def extract_all(cfg: SweepConfig, cells: list[Cell], cache: FeatureCache, memo: DigestMemo, n_gpus: float,
                plan: PlannedExtractions) -> tuple[dict[Extraction, ExtractResult], dict[Extraction, str]]:
    """Encode what the cache lacks for the extractions these cells need (planned in `plan`).
    Returns (results, failure messages, planning failures included) per extraction."""
    from orchestrator import ray_backend
    from orchestrator.extraction.dense import dense_requests

    dense = dense_requests(cfg, cells)  # dense datasets: (layers, augment) per extraction
    needed = needed_extractions(cfg, cells)
    results: dict[Extraction, ExtractResult] = {}
    failures = {e: plan.failures[e] for e in needed if e in plan.failures}
    groups = shared_decode_groups(needed, plan.results, plan.datasets, cache, set(failures) | set(dense)) \
        if cfg.resources.shared_decode else []
    leader = {g[0]: g for g in groups}
    for i, ext in enumerate(needed, 1):
        enc, res, ds_name = ext
        console.note(f"features [{i}/{len(needed)}] {enc} @ {res}px on {ds_name}")
        if ext in failures:
            console.note(f"  FAILED: {failures[ext]}")
            continue
        if ext in leader:
            results |= _extract_group(leader[ext], plan, cache, cfg, n_gpus)
        elif ext in results:  # a later member of a group: its entries were committed with the first
            console.line(f"   {results[ext].job.label}: encoded above (one decode for "
                         f"{'/'.join(str(r) for r in results[ext].shared_decode)} px)")
        if ext in results:
            continue
        planned = plan.results[ext]
        dataset, fingerprint = plan.datasets[ds_name]
        try:
            results[ext] = _extract_with_retries(planned.job, cache, memo, cfg, n_gpus, dataset, fingerprint,
                                                 dense.get(ext), planned)
        except Exception as e:  # noqa: BLE001 - one extraction fails alone; its cells carry the reason
            failures[ext] = ray_backend.error_text(e)
            if "differs from the planned" in failures[ext]:
                memo.drop(plan.memo_keys.get(ext))  # the weights changed under the memo: re-plan next time
            console.note(f"  FAILED: {failures[ext]}")
    return results, failures


def _extract_group(group: list[Extraction], plan: PlannedExtractions, cache: FeatureCache, cfg: SweepConfig,
                   n_gpus: float) -> dict[Extraction, ExtractResult]:
    """A shared-decode group's results, or none when it failed: its members then run alone, so a
    resolution that cannot run fails by itself (the group's error is printed first)."""
    from orchestrator import ray_backend

    dataset, _ = plan.datasets[group[0][2]]
    try:
        done = extract_group([replace(plan.results[e], failed=dict(plan.results[e].failed)) for e in group],
                             cache, cfg, n_gpus, dataset)
    except Exception as e:  # noqa: BLE001 - the members are tried one by one next
        console.note(f"  one decode for {len(group)} resolutions failed ({ray_backend.error_text(e)}); "
                     "running them one by one")
        return {}
    return dict(zip(group, done, strict=True))
