"""One decode for every resolution of an encoder (issue 24, "feeding the GPU").

A scaling grid asks one dataset of one encoder at several resolutions. Decoding an image is the CPU's
costliest step per image (a 1024-px film: ~4.5 ms of a core, docs/gpu.md) and does not depend on
the resolution: the actor resizes on its device. So the extraction phase groups the image
extractions that differ only in resolution (same encoder, weights, pooling, precision, compile,
dataset and splits still to encode) and runs one pipeline per group: each decoded batch is embedded
at every resolution by one actor holding the encoder once (`images.ResolutionsEncoderUDF`), and
written partitioned by resolution, then committed per extraction exactly as a lone one is. The
numbers are the lone extraction's (same decode, resize and encoder), so cache keys do not change.

Volumes, slides and dense maps keep one pipeline per extraction (their decode workers resize). A
group that fails is not the verdict on its members: the phase runs each of them alone, so one bad
resolution (too large for the device, say) fails alone.
"""

from __future__ import annotations

import time
from dataclasses import replace
from typing import Any

from orchestrator import console
from orchestrator.console.progress import Progress, watch_output
from orchestrator.extraction.images import commit_splits, index_rows
from orchestrator.extraction.jobs import SPLITS, ExtractResult, extract_line
from orchestrator.extraction.runs import pool_size, report_failed
from orchestrator.grid.config import SweepConfig
from orchestrator.store.cache import FeatureCache

Extraction = tuple[str, int, str]  # (encoder, resolution, dataset)


def shared_decode_groups(needed: list[Extraction], results: dict[Extraction, ExtractResult],
                         datasets: dict[str, tuple[Any, str]], cache: FeatureCache,
                         skip: set[Extraction]) -> list[list[Extraction]]:
    """Groups of >= 2 planned image extractions that one decode can feed: equal but for the
    resolution, with the same splits missing from the cache. `skip`: failed or dense extractions."""
    groups: dict[tuple, list[Extraction]] = {}
    for ext in needed:
        if ext in skip or ext not in results:
            continue
        dataset, _ = datasets[ext[2]]
        if getattr(dataset, "kind", "image") != "image":
            continue
        r = results[ext]
        missing = tuple(s for s in SPLITS if not cache.is_complete(r.keys[s]))
        if missing:
            key = (replace(r.job, resolution=0), r.weights_digest, r.interpolation, missing)
            groups.setdefault(key, []).append(ext)
    return [sorted(g, key=lambda e: e[1]) for g in groups.values() if len(g) > 1]


def extract_group(planned: list[ExtractResult], cache: FeatureCache, cfg: SweepConfig, n_gpus: float,
                  dataset: Any) -> list[ExtractResult]:
    """Encode the group's missing splits with one decode; commit each member's entries."""
    from orchestrator.extraction import pipelines

    t0 = time.perf_counter()
    first = planned[0]
    missing = [s for s in SPLITS if not cache.is_complete(first.keys[s])]
    rows = index_rows(dataset.index(), missing, first.job.root, first.job.dataset)
    actors, gpus = pool_size(cfg, n_gpus)
    batch_sizes = {r.job.resolution: cfg.resources.extract_batch(r.job.encoder, r.job.resolution, gpus > 0)
                   for r in planned}
    label = f"{first.job.encoder}@{'/'.join(str(r) for r in sorted(batch_sizes))}px/{first.job.dataset}"
    console.line(f"   {label}: encoding {len(rows)} images, decoded once for {len(planned)} resolutions "
                 f"(pooling {first.job.pooling}, weights {first.job.weights})")
    scratch = cache.scratch_dir()
    try:
        bar = Progress(label, len(rows) * len(planned), "embeddings")
        with watch_output(cache.fs, scratch, bar):
            pipelines.run_shared_decode_pipeline(
                rows, [r.job for r in planned], interpolation=first.interpolation,
                expected_digest=first.weights_digest, out_dir=scratch, filesystem=cache.fs,
                batch_sizes=batch_sizes, actors=actors, gpus_per_actor=gpus, torch_threads=cfg.resources.torch_threads)
        seconds = time.perf_counter() - t0
        for r in planned:
            r.cached_splits = [s for s in SPLITS if s not in missing]
            for s in r.cached_splits:
                r.failed.update(cache.meta(r.keys[s]).get("failed", {}))
            meta = {"weights_source": r.weights_source, "rows_planned": len(rows),
                    "shared_decode": sorted(batch_sizes)}
            n, failed = commit_splits(cache, f"{scratch}/resolution={r.job.resolution}", r.keys, missing, meta)
            r.n_encoded, r.actors, r.gpus_per_actor, r.seconds = n, actors, gpus, seconds
            r.failed.update(failed)
            r.shared_decode = sorted(batch_sizes)
            extract_line(r.job, "done", r.n_encoded, seconds)
        report_failed(first.failed, "case")
    finally:
        cache.release(scratch)
    return planned
