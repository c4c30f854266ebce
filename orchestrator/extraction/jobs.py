"""What one extraction is (`ExtractionJob`: encoder, weights, resolution, pooling, dataset,
precision) and what it gave (`ExtractResult`: cache keys, weights identity, counts), the cache keys
an extraction files its features under, and the console line it prints."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any

from orchestrator import console
from orchestrator.store.cache import CacheKey

SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class ExtractionJob:
    encoder: str
    weights: str  # the user's spec: random | hub | file:PATH
    resolution: int
    pooling: str  # resolved (never "auto")
    dataset: str
    root: str
    val_fraction: float = 0.1
    split_seed: int = 0
    options: str = "{}"  # the dataset's reading options (config.dataset_options), as sorted JSON
    precision: str = "fp32"  # what the encoder actors will run in (planned_precision); part of the keys
    compile: bool = False  # torch.compile on the actors (planned_compile); part of the keys

    @property
    def label(self) -> str:
        return f"{self.encoder}@{self.resolution}px/{self.dataset}"


@dataclass
class ExtractResult:
    job: ExtractionJob
    keys: dict[str, CacheKey]
    weights_source: str
    weights_digest: str
    n_encoded: int = 0  # rows the encoder produced in this call (0 when everything was cached)
    seconds: float = 0.0
    cached_splits: list[str] = field(default_factory=list)
    actors: int = 0  # encoder actors of the pipeline (0 when everything was cached)
    gpus_per_actor: float = 0.0
    interpolation: str = "bicubic"
    # Slide datasets: per grid seed, the slides (case_id, path, split, patient_id, target) and the
    # split's name (official or a CV fold); and the slides that failed, with the reason.
    cases: dict[int, tuple[list[dict[str, Any]], str]] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)
    coords_uri: str = ""  # slide datasets: where the tile coordinates of every slide are kept
    # The resolutions one decode fed together (extraction.shared); `seconds` is then the group's.
    shared_decode: list[int] = field(default_factory=list)


def cache_keys(job: ExtractionJob, weights_info: dict[str, str], fingerprint: str,
               preprocess_version: str) -> dict[str, CacheKey]:
    return {
        split: CacheKey(
            encoder=job.encoder, weights_kind=weights_info["kind"], weights_digest=weights_info["digest"],
            resolution=job.resolution, pooling=job.pooling, preprocess_version=preprocess_version,
            dataset=job.dataset, dataset_fingerprint=fingerprint, split=split, precision=job.precision,
            compiled=job.compile,
        )
        for split in SPLITS
    }


def describe(result: ExtractResult) -> dict[str, Any]:
    return {"job": asdict(result.job), "keys": {s: k.digest for s, k in result.keys.items()},
            "n_encoded": result.n_encoded, "seconds": round(result.seconds, 2),
            "cached_splits": result.cached_splits, "actors": result.actors,
            "gpus_per_actor": result.gpus_per_actor, "weights_source": result.weights_source,
            "weights_digest": result.weights_digest, "failed": result.failed,
            "shared_decode": result.shared_decode, "time": time.time()}


def extract_line(job: ExtractionJob, what: str, n: int, seconds: float, unit: str = "images") -> None:
    """`unit`: what `n` counts (images; volumes then slices; slides then tiles)."""
    if what == "cached":
        console.line(f"   {job.label}: all splits cached, nothing to encode")
    elif what == "start":
        console.line(f"   {job.label}: encoding {n} {unit} (pooling {job.pooling}, weights {job.weights})")
    else:
        rate = n / seconds if seconds > 0 else float("nan")
        console.line(f"   {job.label}: {n} {unit} in {seconds:.1f} s ({rate:.1f} {unit}/s, Ray start-up included)")
