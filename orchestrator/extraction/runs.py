"""Driver side of one extraction whose pipeline is not one row per image: whole slides (one bag
entry for all slides) and dense maps (the cached/online rule, then one fp16 file per case).

Called by the sweep's extraction phase (orchestrator/extraction/phase.py), it runs the pipelines
through `ray_backend` and commits the entries. Layering: extraction.phase -> this module ->
ray_backend -> the worker-side modules (decode, extract, extraction.slides, extract_dense) -> cache;
nothing below imports it.
"""

from __future__ import annotations

import json
import time
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from orchestrator import console
from orchestrator.console.progress import Progress, files_with_suffix, watch_output
from orchestrator.extraction.jobs import ExtractionJob, ExtractResult, extract_line
from orchestrator.extraction.weights import planned_precision
from orchestrator.store import storage
from orchestrator.store.cache import FeatureCache

if TYPE_CHECKING:
    from orchestrator.extraction.dense import DenseExtractResult
    from orchestrator.grid.config import SweepConfig


def report_failed(failed: dict[str, str], what: str, show: int = 20) -> None:
    """Each item that failed alone, by name (the first `show`; all are in the cache metadata)."""
    for case, msg in sorted(failed.items())[:show]:
        console.note(f"  {what} {case} FAILED (left out of the features): {msg}")
    if len(failed) > show:
        console.note(f"  ... and {len(failed) - show} more failed {what}s (see the cells' failed_cases.csv)")


def pool_size(cfg: SweepConfig, n_gpus: float) -> tuple[int, float]:
    res = cfg.resources
    gpus = res.extract_gpus if n_gpus > 0 else 0.0
    return res.extract_actors or (max(1, int(n_gpus // gpus)) if gpus else 1), gpus


def extract_bags(job: ExtractionJob, cache: FeatureCache, cfg: SweepConfig, n_gpus: float, dataset: Any,
                 result: ExtractResult, t0: float) -> ExtractResult:
    """One bag entry for all slides of the dataset (cells assign the splits; plan_one did); slides
    that fail are dropped from it and named in its metadata, as `result.failed`."""
    from orchestrator.extraction import pipelines
    from orchestrator.extraction.slides import finish_bags
    from orchestrator.store.bags import SLIDES

    key = result.keys[SLIDES]
    tiling = dataset.tiling.key()
    if cache.is_complete(key):
        result.cached_splits = [SLIDES]
        result.failed = cache.meta(key).get("failed", {})
        extract_line(job, "cached", 0, 0.0)
        return result
    rows = [{"case_id": str(r.case_id), "path": str(r.path)} for r in dataset.index().itertuples(index=False)]
    result.actors, result.gpus_per_actor = pool_size(cfg, n_gpus)
    extract_line(job, "start", len(rows), 0.0, "slides")
    scratch = cache.scratch_dir()
    try:
        with watch_output(cache.fs, scratch, Progress(job.label, None, "tiles")):
            pipelines.run_slide_pipeline(
                rows, job, tiling=json.dumps(tiling, sort_keys=True), coords_uri=result.coords_uri,
                interpolation=result.interpolation, expected_digest=result.weights_digest, out_dir=scratch,
                filesystem=cache.fs, batch_size=cfg.resources.extract_batch(job.encoder, job.resolution,
                                                                             result.gpus_per_actor > 0),
                actors=result.actors,
                gpus_per_actor=result.gpus_per_actor, torch_threads=cfg.resources.torch_threads)
        n_tiles, failed = finish_bags(cache.fs, scratch)
        report_failed(failed, "slide")
        if not n_tiles:
            raise ValueError(f"{job.root}: no slide of {job.dataset} could be tiled and embedded; "
                             f"first error: {next(iter(failed.values()), 'none recorded')}")
        cache.commit(key, scratch, {"weights_source": result.weights_source, "tiling": tiling, "n_tiles": n_tiles,
                                    "failed": failed, "n_slides": len(n_tiles)})
        result.n_encoded, result.failed = sum(n_tiles.values()), failed
    finally:
        cache.release(scratch)
    result.seconds = time.perf_counter() - t0
    extract_line(job, "done", result.n_encoded, result.seconds, "tiles")
    return result


def extract_dense(job: Any, cache: FeatureCache, cfg: Any, n_gpus: float, dataset: Any, result: ExtractResult,
                  requests: set[tuple[tuple[int, ...] | None, bool]], t0: float) -> DenseExtractResult:
    """Apply the rule to each (layers, augment) the extraction's cells ask for, and fill the cache for
    the layer sets it sends to the cache. `result` carries the weights identity and pooled keys."""
    from orchestrator.extraction import pipelines
    from orchestrator.extraction.dense import (
        DenseExtractResult,
        channels,
        commit_dense,
        dataset_ref,
        layers_key,
        planned_slices,
    )
    from orchestrator.store.dense_maps import DENSE_SPLIT, MAPS_DIR
    from tasks.dense import choose_source
    from tasks.encoders import create_encoder

    meta_enc = create_encoder(job.encoder, weights="random", device="meta")
    res = cfg.resources
    precision = planned_precision(n_gpus, res.extract_gpus, res.precision)
    options = json.loads(job.options)
    out = DenseExtractResult(job, {}, result.weights_source, result.weights_digest, interpolation=result.interpolation,
                             precision=precision, dataset_ref=dataset_ref(dataset, options))
    grid = job.resolution // meta_enc.spec.patch_size
    n_slices = planned_slices(dataset)
    base_key = replace(result.keys["test"], split=DENSE_SPLIT, pooling="patch", feature_kind="dense",
                       precision=precision)
    for layers, _augment in sorted(requests, key=lambda r: (str(r[0]), r[1])):
        lk = layers_key(meta_enc, layers)
        if lk in out.choices:
            continue
        choice = choose_source(n_slices, grid, channels(meta_enc, dataset, layers), res.dense_cache_max_gb, False)
        out.choices[lk] = choice
        if choice.kind != "cached" or all(a for ly, a in requests if layers_key(meta_enc, ly) == lk):
            continue  # online, or every cell of these layers augments: nothing to cache
        key = replace(base_key, layers=lk)
        out.dense_keys[lk] = key
        if cache.is_complete(key):
            out.cached_splits.append(f"{DENSE_SPLIT}[{lk or 'last'}]")
            out.failed.update(cache.meta(key).get("failed", {}))
            extract_line(job, "cached", 0, 0.0)
            continue
        rows = [{"case_id": str(c)} for c in dataset.index()["case_id"]]
        out.actors, out.gpus_per_actor = pool_size(cfg, n_gpus)
        extract_line(job, "start", len(rows), 0.0, "cases")
        batch = res.extract_batch(job.encoder, job.resolution, out.gpus_per_actor > 0)
        scratch = cache.scratch_dir()
        try:
            bar = Progress(job.label, len(rows), "cases")
            with watch_output(cache.fs, f"{scratch}/{MAPS_DIR}", bar, files_with_suffix(".npy")):
                index = pipelines.run_dense_pipeline(
                    rows, dataset=json.dumps(out.dataset_ref, sort_keys=True), job=job, layers=lk,
                    precision=precision, interpolation=result.interpolation, expected_digest=result.weights_digest,
                    out_uri=_uri(cache, scratch), batch_size=batch,
                    cases_per_batch=max(1, batch * len(rows) // max(1, n_slices)),
                    actors=out.actors, gpus_per_actor=out.gpus_per_actor, torch_threads=res.torch_threads)
            n, failed = commit_dense(cache, key, scratch, index, {
                "weights_source": result.weights_source, "planned_bytes": choice.planned_bytes,
                "source_reason": choice.reason})
            report_failed(failed, "case")
            out.n_encoded += n
            out.failed.update(failed)
        finally:
            storage.delete_dir(cache.fs, scratch)
    out.keys = {DENSE_SPLIT: base_key}
    out.seconds = time.perf_counter() - t0
    extract_line(job, "done", out.n_encoded, out.seconds, "cases")
    return out


def _uri(cache: FeatureCache, path: str) -> str:
    """A scratch path as a URI workers can open (a local path stays a path)."""
    if "://" not in cache.root:
        return path
    scheme = cache.root.split("://", 1)[0]
    return f"{scheme}://{path}"
