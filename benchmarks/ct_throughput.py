"""CT slice-pipeline throughput and memory: Ray Data (volume, z) items against the bare encoder.

The pipeline (what a CT-RATE extraction runs): volume rows -> one decode task per volume, which
reads its .nii.gz forward once and emits batches of HU-windowed, resized slices as they come (Ray
Data fuses it into the encoder actor on CPU) -> encoder actor pool -> slice embeddings as Parquet -> pooled to one row per volume. The
bare baseline embeds the same slices, already decoded and resized in memory, with the encoder
alone, before and after the pipeline runs (averaged). Same machine, encoder, resolution, batch
size and torch threads; Ray start-up excluded.

Steady state as in extract_throughput.py (the pipeline is called as extract_one calls it): a short run (`--short` volumes) measures the fixed
start-up cost, the full run (`--volumes`) the rest; the rate is the marginal one. Peak RSS is the
peak, sampled every 0.5 s, of the summed RSS of this process and every process under it (the
local Ray cluster: raylet, decode workers, encoder actors), for each of the two runs, after an
unmeasured warm-up run (shared object-store pages count once per process that maps them); it should
not grow with the number of volumes (target <= 10%). Last line: `ratio=<pipeline / bare slices/s>`
(target >= 0.85 for dinov3_vits16 at 224 px).

    python benchmarks/ct_throughput.py [--encoder dinov3_vits16] [--resolution 224] [--volumes 8]
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

from benchmarks.common import PeakRSS, bare_rate  # noqa: E402


def all_slices(ds, index, resolution: int):
    import numpy as np

    from tasks.datasets.ct_rate import n_slices, read_slices
    from tasks.preprocess import prepare_image

    out = []
    for r in index.itertuples():
        slope, intercept = ds.scaling(r.case_id)
        out += [prepare_image(s, resolution) for s in
                read_slices(r.path, list(range(n_slices(r.path))), slope, intercept, *ds.hu_window)]
    return np.stack(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--encoder", default="dinov3_vits16")
    ap.add_argument("--resolution", type=int, default=224)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--volumes", type=int, default=8, help="volumes of the full run")
    ap.add_argument("--short", type=int, default=2, help="volumes of the short run (start-up, RSS)")
    ap.add_argument("--depth", type=int, default=48, help="slices per synthetic volume")
    ap.add_argument("--image-size", type=int, default=512, help="in-plane side of the synthetic volumes")
    ap.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads (both sides)")
    args = ap.parse_args()

    import pyarrow.fs as pafs

    from orchestrator import ray_backend
    from orchestrator.extraction.images import index_rows, pool_volumes
    from orchestrator.extraction.jobs import ExtractionJob
    from orchestrator.extraction.weights import DigestMemo, weights_info
    from tasks.datasets import get_dataset
    from tasks.datasets.ct_rate_synth import write_synthetic

    work = Path(tempfile.mkdtemp(prefix="medscale-ctbench-"))
    root = work / "ct_rate"
    t0 = time.perf_counter()
    write_synthetic(root, max(args.volumes, 6), 0, args.image_size, depth_range=(args.depth, args.depth + 1))
    ds = get_dataset("ct_rate", str(root))
    print(f"wrote {max(args.volumes, 6)} synthetic {args.image_size}px x {args.depth}-slice NIfTI volumes in "
          f"{time.perf_counter() - t0:.1f} s ({root})")

    def subset(k: int):
        return ds.index().iloc[:k]

    full = subset(args.volumes)
    pixels = all_slices(ds, full, args.resolution)
    def bare(when: str) -> float:
        return bare_rate(when, args.encoder, pixels, args.batch_size, args.threads, "slices",
                         f"the {len(pixels)} slices of {len(full)} volumes")

    bare_before = bare("before")

    t0 = time.perf_counter()
    ray_backend.start("local", num_cpus=os.cpu_count())
    print(f"ray start: {time.perf_counter() - t0:.1f} s (excluded)")
    memo = DigestMemo(work / "digests.json")
    job = ExtractionJob(args.encoder, "random", args.resolution, "cls+mean", "ct_rate", str(root))
    fs = pafs.LocalFileSystem()

    info = weights_info(args.encoder, "random", memo)

    def extract(index, tag: str) -> tuple[int, float, int]:
        # The pipeline as extract_one runs it for a volume dataset (slice rows, Ray Data, pooling),
        # called directly so a run may hold any number of volumes, whatever their splits.
        from orchestrator.extraction import pipelines
        splits = sorted(set(index["split"]))
        rows = [ds.slice_rows(r) for r in index_rows(index, splits, str(ds.root), ds.name)]
        out = str(work / f"out-{tag}")
        with PeakRSS() as rss:
            t0 = time.perf_counter()
            pipelines.run_slice_pipeline(
                rows, job, interpolation=info.get("interpolation", "bicubic"), expected_digest=info["digest"],
                out_dir=f"{out}/slices", filesystem=fs, batch_size=args.batch_size, actors=1,
                gpus_per_actor=0.0, torch_threads=args.threads)
            pool_volumes(fs, f"{out}/slices", out, splits, ds.slice_pooling)
            dt = time.perf_counter() - t0
        return sum(ds_slices(ds, index)), dt, rss.peak

    short = subset(args.short)
    # Warm-up run (not measured): Ray starts its worker processes lazily, so the first extraction
    # would count their start as if it grew with the volumes; RSS is compared between warm runs.
    extract(short, "warmup")
    n_short, t_short, rss_short = extract(short, "short")
    n_full, t_full, rss_full = extract(full, "full")
    steady = (n_full - n_short) / (t_full - t_short)
    startup = t_short - n_short / steady
    print(f"pipeline end to end: {n_full} slices of {len(full)} volumes in {t_full:.1f} s = "
          f"{n_full / t_full:.2f} slices/s (one-pass volume reads, window, resize, encode, pool, Parquet)")
    print(f"pipeline start-up: {startup:.1f} s per extraction (from {n_short} slices of {len(short)} volumes "
          f"in {t_short:.1f} s)")
    print(f"pipeline steady state: {steady:.2f} slices/s")
    print(f"peak RSS (driver + Ray processes): {rss_short / 2**20:.0f} MiB for {len(short)} volumes, "
          f"{rss_full / 2**20:.0f} MiB for {len(full)} volumes ({100 * (rss_full / rss_short - 1):+.1f}%)")
    ray_backend.stop()
    base = (bare_before + bare("after")) / 2
    print(f"ratio={steady / base:.3f}")


def ds_slices(ds, index) -> list[int]:
    from tasks.datasets.ct_rate import n_slices

    return [n_slices(p) for p in index["path"]]


if __name__ == "__main__":
    main()
