"""Feature-extraction throughput: the whole Ray Data pipeline against the bare encoder forward.

Same machine, encoder, resolution, batch size and torch threads. The pipeline reads PNGs from disk,
decodes, resizes, encodes in an actor pool and writes Parquet into the cache; the bare baseline
runs the encoder alone on uint8 batches already in memory. Ray start-up is timed separately and
excluded.

Steady state: an extraction has a fixed start-up cost (planning the Ray Data job, starting the
actor, building the model) that a real dataset of 10^4-10^5 images amortises. It is measured by a
short extraction (`--warmup` images) and the full one; the steady-state rate is the marginal one,
(n - warmup) / (t_full - t_short). Both numbers and the start-up cost are printed. The last line is
`ratio=<steady-state pipeline img/s / bare img/s>` (target >= 0.85 for dinov3_vits16 at 224 px,
batch 32, on a 2-core machine).

    python benchmarks/extract_throughput.py [--encoder dinov3_vits16] [--resolution 224] [--n 384]
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


def bare_throughput(encoder: str, resolution: int, batch: int, n: int, threads: int) -> float:
    import numpy as np
    import torch

    from tasks.encoders import create_encoder

    torch.set_num_threads(threads)
    enc = create_encoder(encoder, weights="random")
    x = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (batch, 3, resolution, resolution),
                                                            dtype=np.uint8))
    enc.embed(x, pooling="cls+mean")  # warm-up: first-call allocations
    n_batches = max(1, n // batch)
    t0 = time.perf_counter()
    for _ in range(n_batches):
        enc.embed(x, pooling="cls+mean")
    return n_batches * batch / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--encoder", default="dinov3_vits16")
    ap.add_argument("--resolution", type=int, default=224)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--n", type=int, default=384, help="images to embed")
    ap.add_argument("--warmup", type=int, default=96, help="images of the short run that measures start-up")
    ap.add_argument("--image-size", type=int, default=512, help="side of the synthetic PNGs on disk")
    ap.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads (both sides)")
    args = ap.parse_args()

    from orchestrator import ray_backend
    from orchestrator.extraction.jobs import ExtractionJob
    from orchestrator.extraction.phase import extract_one
    from orchestrator.extraction.weights import DigestMemo, weights_info
    from orchestrator.grid.config import parse_config
    from orchestrator.store.cache import FeatureCache
    from tasks.datasets import dataset_class, get_dataset

    work = Path(tempfile.mkdtemp(prefix="medscale-bench-"))
    root = work / "nih14"
    t0 = time.perf_counter()
    dataset_class("nih14").synth(root, n=args.n, seed=0, image_size=args.image_size)
    print(f"wrote {args.n} synthetic {args.image_size}px PNGs in {time.perf_counter() - t0:.1f} s ({root})")

    bare = bare_throughput(args.encoder, args.resolution, args.batch_size, args.n, args.threads)
    print(f"bare encoder: {bare:.2f} img/s ({args.encoder}, {args.resolution}px, batch {args.batch_size}, "
          f"{args.threads} threads)")

    t0 = time.perf_counter()
    ray_backend.start("local", num_cpus=os.cpu_count())
    print(f"ray start: {time.perf_counter() - t0:.1f} s (excluded)")
    cfg = parse_config({
        "name": "bench", "data": {"nih14": str(root)}, "output": str(work / "out"),
        "grid": {"encoders": [args.encoder], "resolutions": [args.resolution], "datasets": ["nih14"],
                 "protocols": ["knn"]},
        "resources": {"extract_batch_size": args.batch_size, "torch_threads": args.threads},
    })
    ds = get_dataset("nih14", str(root))
    fingerprint = ds.fingerprint()
    memo = DigestMemo(work / "digests.json")
    weights_info(args.encoder, "random", memo)  # planning, not extraction: excluded like the cluster start
    job = ExtractionJob(args.encoder, "random", args.resolution, "cls+mean", "nih14", str(root))

    def extract(n: int, tag: str) -> tuple[int, float]:
        sub = ds.index().groupby("split", group_keys=False).head(max(1, n // 3)) if n < args.n else None
        view = _Subset(ds, sub) if sub is not None else ds
        t0 = time.perf_counter()
        result = extract_one(job, FeatureCache(str(work / f"cache-{tag}")), memo, cfg, 0.0, view, fingerprint)
        return result.n_encoded, time.perf_counter() - t0

    n_short, t_short = extract(args.warmup, "short")
    n_full, t_full = extract(args.n, "full")
    startup = t_short - n_short * (t_full - t_short) / max(n_full - n_short, 1)
    steady = (n_full - n_short) / (t_full - t_short)
    print(f"pipeline end to end: {n_full} images in {t_full:.1f} s = {n_full / t_full:.2f} img/s "
          "(read PNG, decode, resize, encode, write Parquet; actor start-up included)")
    print(f"pipeline start-up: {startup:.1f} s per extraction (from a {n_short}-image run in {t_short:.1f} s)")
    print(f"pipeline steady state: {steady:.2f} img/s")
    ray_backend.stop()
    print(f"ratio={steady / bare:.3f}")


class _Subset:
    """The dataset with its index cut to a few cases per split (the short, start-up-measuring run)."""

    def __init__(self, ds, index):
        self._ds, self._index = ds, index

    def index(self):
        return self._index

    def __getattr__(self, name):
        return getattr(self._ds, name)


if __name__ == "__main__":
    main()
