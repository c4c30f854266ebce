"""Whole-slide pipeline throughput and memory: Ray Data tile bags against the bare encoder.

The pipeline (what a CAMELYON/BCNB extraction runs): slide rows -> `flat_map` to tile coordinates
(tissue mask on a low pyramid level, tiled here since each run gets a fresh coordinate store) ->
batches of tiles -> lazy tile reads through OpenSlide on CPU workers -> encoder actor pool -> one
Parquet bag directory per slide. The bare baseline embeds the same tiles, already read and resized
in memory, with the encoder alone, before and after the pipeline runs (averaged). Same machine,
encoder, resolution, batch size, torch threads; Ray start-up excluded.

Steady state as in ct_throughput.py: the small case (1 slide) measures the fixed start-up cost,
the large case (4 slides of 4x the area, 16x the tiles) the rest; the rate is the marginal one.
Peak RSS: the peak, sampled every 0.5 s, of the summed RSS of this process and every process under
it (the local Ray cluster), for each case, after an unmeasured warm-up on four copies of the small
slide (which starts the worker processes the large case needs); target <= 10% growth from small
to large. Last line: `ratio=<pipeline / bare tiles/s>` (target >= 0.85 for dinov3_vits16
at 224 px).

    python benchmarks/wsi_throughput.py [--encoder dinov3_vits16] [--resolution 224] [--side 3072]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

from benchmarks.common import PeakRSS, bare_rate  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--encoder", default="dinov3_vits16")
    ap.add_argument("--resolution", type=int, default=224, help="encoder input (tiles are 224 px, resized)")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--side", type=int, default=3072, help="width of the small slide (height 3/4 of it)")
    ap.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads (both sides)")
    args = ap.parse_args()

    import numpy as np
    import pyarrow.fs as pafs

    from orchestrator import ray_backend
    from orchestrator.extraction.jobs import ExtractionJob
    from orchestrator.extraction.slides import finish_bags
    from orchestrator.extraction.weights import DigestMemo, weights_info
    from tasks.preprocess import prepare_image
    from tasks.wsi.synth import synth_slide
    from tasks.wsi.tiling import TilingParams, read_coordinate_tiles, tile_slide

    work = Path(tempfile.mkdtemp(prefix="medscale-wsibench-"))
    w, h = args.side, args.side * 3 // 4
    t0 = time.perf_counter()
    small = [synth_slide(work / "small_0.tif", positive=True, seed=0, size=(w, h), mpp=0.5).path]
    large = [synth_slide(work / f"large_{i}.tif", positive=bool(i % 2), seed=1 + i, size=(2 * w, 2 * h), mpp=0.5).path
             for i in range(4)]
    print(f"wrote 1 synthetic slide of {w}x{h} px and 4 of {2 * w}x{2 * h} px in {time.perf_counter() - t0:.1f} s "
          f"({work})")

    params = TilingParams()
    coords = {p: tile_slide(p, params) for p in large}
    pixels = np.stack([prepare_image(t, args.resolution) for p in large for t in read_coordinate_tiles(p, coords[p])])

    def bare(when: str) -> float:
        return bare_rate(when, args.encoder, pixels, args.batch_size, args.threads, "tiles",
                         f"the {len(pixels)} tiles of the 4 large slides")

    bare_before = bare("before")

    t0 = time.perf_counter()
    ray_backend.start("local", num_cpus=os.cpu_count())
    print(f"ray start: {time.perf_counter() - t0:.1f} s (excluded)")
    info = weights_info(args.encoder, "random", DigestMemo(work / "digests.json"))
    job = ExtractionJob(args.encoder, "random", args.resolution, "cls+mean", "camelyon16", str(work))
    fs = pafs.LocalFileSystem()

    def extract(slides: list[Path], tag: str) -> tuple[int, float, int]:
        from orchestrator.extraction import pipelines
        rows = [{"case_id": f"{p.stem}-{i}", "path": str(p)} for i, p in enumerate(slides)]
        out = str(work / f"bags-{tag}")
        with PeakRSS() as rss:
            t0 = time.perf_counter()
            pipelines.run_slide_pipeline(
                rows, job, tiling=json.dumps(params.key()), coords_uri=str(work / f"coords-{tag}"),
                interpolation=info.get("interpolation", "bicubic"), expected_digest=info["digest"], out_dir=out,
                filesystem=fs, batch_size=args.batch_size, actors=1, gpus_per_actor=0.0, torch_threads=args.threads)
            n_tiles, failed = finish_bags(fs, out)
            dt = time.perf_counter() - t0
        assert not failed, failed
        return sum(n_tiles.values()), dt, rss.peak

    # Warm-up (not measured): Ray starts its workers lazily, as many as the work has parallel
    # tasks; four copies of the small slide start the workers the large case uses, so RSS is
    # compared between warm runs with the same processes, and its growth is what the data costs.
    extract(small * 4, "warmup")
    n_small, t_small, rss_small = extract(small, "small")
    n_large, t_large, rss_large = extract(large, "large")
    steady = (n_large - n_small) / (t_large - t_small)
    print(f"pipeline end to end: {n_large} tiles of 4 slides in {t_large:.1f} s = {n_large / t_large:.2f} tiles/s "
          "(tissue mask, coordinates, lazy OpenSlide reads, resize, encode, Parquet bags)")
    print(f"pipeline start-up: {t_small - n_small / steady:.1f} s per extraction ({n_small} tiles of 1 slide "
          f"in {t_small:.1f} s)")
    print(f"pipeline steady state: {steady:.2f} tiles/s")
    print(f"peak RSS (driver + Ray processes): {rss_small / 2**20:.0f} MiB for 1 slide ({n_small} tiles), "
          f"{rss_large / 2**20:.0f} MiB for 4 slides of 4x the area ({n_large} tiles) "
          f"({100 * (rss_large / rss_small - 1):+.1f}%)")
    ray_backend.stop()
    base = (bare_before + bare("after")) / 2
    print(f"ratio={steady / base:.3f}")


if __name__ == "__main__":
    main()
