"""Orchestration overhead of a sweep: a 64-cell heads-only grid on cached features.

The cache is filled first with realistic features (n cases x 768 dims, the width of ViT-S with
CLS + mean pooling, a class signal planted) under exactly the keys the sweep computes, so the
timed sweep only schedules heads: Ray Tune trials, result files, MLflow runs. Cluster start and
the cache fill are excluded.

    efficiency = (sum of cell compute seconds / concurrent cell slots) / sweep wall seconds

Prints the overhead per cell in seconds and, last, `ratio=<efficiency>` (target >= 0.8).

    python benchmarks/sweep_overhead.py [--n 20000] [--dim 768]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

ENCODER = "test_vit_tiny16"
RESOLUTIONS = [32, 48, 64, 80]
SEEDS = [0, 1, 2, 3]


def plant_features(cfg, dim: int) -> None:
    """Write cache entries for every (resolution, dataset) the grid needs, as extraction would."""
    import numpy as np
    import pyarrow.parquet as pq

    from orchestrator.extraction.images import embeddings_table
    from orchestrator.extraction.jobs import ExtractionJob, cache_keys
    from orchestrator.extraction.weights import DigestMemo, weights_info
    from orchestrator.store.cache import FeatureCache
    from tasks.datasets import get_dataset
    from tasks.preprocess import PREPROCESS_VERSION

    cache = FeatureCache(str(cfg.output_path / "cache"))
    memo = DigestMemo(cfg.output_path / "weights_digests.json")
    info = weights_info(ENCODER, "random", memo)
    rng = np.random.default_rng(0)
    for name in cfg.grid.datasets:
        ds = get_dataset(name, str(cfg.data_root(name)))
        index, fingerprint = ds.index(), ds.fingerprint()
        Y = np.stack(index["target"].to_numpy()).astype(np.float32)
        direction = rng.normal(size=(Y.shape[1], dim)).astype(np.float32)
        for res in cfg.grid.resolutions:
            X = rng.normal(size=(len(index), dim)).astype(np.float32) + 0.5 * Y @ direction
            job = ExtractionJob(ENCODER, "random", res, "cls+mean", name, str(cfg.data_root(name)))
            for split, key in cache_keys(job, info, fingerprint, PREPROCESS_VERSION).items():
                rows = (index["split"] == split).to_numpy()
                sub = index[rows]
                batch = {"case_id": sub["case_id"].tolist(), "split": sub["split"].tolist(),
                         "patient_id": sub["patient_id"].tolist(), "target": sub["target"].tolist()}
                staged = cache.scratch_dir()
                pq.write_table(embeddings_table(batch, X[rows]), f"{staged}/part-0.parquet")
                cache.commit(key, staged, {"n_rows": int(rows.sum()), "planted": True})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=20000, help="cases per dataset")
    ap.add_argument("--dim", type=int, default=768, help="feature width")
    args = ap.parse_args()

    from orchestrator import ray_backend
    from orchestrator.grid.config import parse_config
    from orchestrator.sweep.driver import run_sweep
    from tasks.datasets import dataset_class

    work = Path(tempfile.mkdtemp(prefix="medscale-overhead-"))
    roots = {"nih14": work / "nih14", "rsna_pneumonia": work / "rsna"}
    t0 = time.perf_counter()
    for name, root in roots.items():
        dataset_class(name).synth(root, n=args.n, seed=0, image_size=16)
    print(f"wrote 2 x {args.n} synthetic cases in {time.perf_counter() - t0:.1f} s")
    cfg = parse_config({
        "name": "overhead", "output": str(work / "out"), "data": {k: str(v) for k, v in roots.items()},
        "grid": {"encoders": [ENCODER], "resolutions": RESOLUTIONS, "datasets": list(roots),
                 "protocols": ["linear_probe", "knn"], "seeds": SEEDS},
    })
    assert cfg.n_cells() == 64
    t0 = time.perf_counter()
    resources = ray_backend.start("local", num_cpus=os.cpu_count())
    print(f"ray start: {time.perf_counter() - t0:.1f} s (excluded)")
    t0 = time.perf_counter()
    plant_features(cfg, args.dim)
    print(f"cache filled with {args.n} x {args.dim} features per (dataset, resolution) in "
          f"{time.perf_counter() - t0:.1f} s (excluded)")

    t0 = time.perf_counter()
    outcome = run_sweep(cfg)
    wall = time.perf_counter() - t0
    assert outcome.n_encoded == 0, "the timed sweep must run heads only"
    finished = [m for c, m in outcome.metrics.items() if outcome.cells[c] == "FINISHED"]
    compute = sum(m["compute_s"] for m in finished)
    slots = resources["CPU"] // cfg.resources.cell_cpus
    ideal = compute / slots
    print(f"{len(finished)}/64 cells finished; cell compute {compute:.1f} s over {slots:.0f} slots "
          f"= {ideal:.1f} s ideal; sweep wall {wall:.1f} s")
    print(f"overhead per cell: {(wall - ideal) * slots / max(len(finished), 1):.3f} s")
    ray_backend.stop()
    print(f"ratio={ideal / wall:.3f}")


if __name__ == "__main__":
    main()
