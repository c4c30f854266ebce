"""A decode worker's CPU time per 1024-px grey PNG: today's path against the one that feeds a
device-side resize (tasks/device_resize.py).

- old: PIL decode + resize to `--resolution` on the CPU + grey replicated to 3 channels, as the
  decode workers did it (read_raster with PIL, tasks.preprocess.prepare_image);
- new (PIL): decode only with PIL, to the uint8 (1, H, W) the actor now takes (device_resize.as_chw);
- new: decode only as the decode workers now do it (read_raster: libpng for plain 8-bit PNGs).

Synthetic films (smooth field + noise, ~600 kB PNGs, the size of NIH-14's) are written with PIL in
a temporary directory. CPU time is `time.process_time` of this process on one thread (the decoders are
single-threaded: what one decode worker's core pays). The paths alternate over `--rounds` so drift in a
shared machine's load hits both alike; each path's figure is the median over rounds.

    python benchmarks/decode_cpu.py [--n 24] [--rounds 5] [--resolution 224]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def write_films(d: str, n: int, size: int = 1024, seed: int = 0) -> list[str]:
    from PIL import Image

    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        low = rng.normal(size=(16, 16))
        field = Image.fromarray(((low - low.min()) / np.ptp(low) * 200).astype(np.uint8))
        img = np.asarray(field.resize((size, size), Image.BICUBIC), float) + rng.normal(0, 4, (size, size)) + 20
        p = os.path.join(d, f"film{i:03d}.png")
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(p)
        paths.append(p)
    return paths


def cpu_ms(fn: Callable[[str], object], paths: list[str]) -> float:
    t = time.process_time()
    for p in paths:
        fn(p)
    return (time.process_time() - t) / len(paths) * 1e3


def main(argv: list[str] | None = None) -> dict[str, float]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=24)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--resolution", type=int, default=224)
    args = ap.parse_args(argv)
    from tasks.datasets.base import read_raster
    from tasks.device_resize import as_chw
    from tasks.preprocess import prepare_image

    paths_fns = {"old": lambda p: prepare_image(read_raster(p, libpng=False), args.resolution, "bicubic"),
                 "new_pil": lambda p: as_chw(read_raster(p, libpng=False)),
                 "new": lambda p: as_chw(read_raster(p))}
    with tempfile.TemporaryDirectory(prefix="decode-cpu-") as d:
        paths = write_films(d, args.n)
        kb = np.mean([os.path.getsize(p) for p in paths]) / 1e3
        for fn in paths_fns.values():  # warm: imports, first-call costs
            fn(paths[0])
        times: dict[str, list[float]] = {k: [] for k in paths_fns}
        for _ in range(args.rounds):
            for k, fn in paths_fns.items():
                times[k].append(cpu_ms(fn, paths))
    res = {k: statistics.median(v) for k, v in times.items()}
    res["ratio"] = res["new"] / res["old"]
    res["ratio_pil"] = res["new_pil"] / res["old"]
    print(f"{args.n} grey 1024x1024 PNGs ({kb:.0f} kB each), {args.rounds} rounds, CPU ms per image (median)")
    print(f"  old: decode + resize to {args.resolution} px on the CPU  {res['old']:.2f}  "
          f"(rounds: {', '.join(f'{t:.2f}' for t in times['old'])})")
    print(f"  new (PIL): decode only (1, H, W) uint8   {res['new_pil']:.2f}  "
          f"(rounds: {', '.join(f'{t:.2f}' for t in times['new_pil'])})")
    print(f"  new: decode only, libpng (1, H, W) uint8 {res['new']:.2f}  "
          f"(rounds: {', '.join(f'{t:.2f}' for t in times['new'])})")
    print(f"  new / old = {res['ratio']:.3f}  ({(1 - res['ratio']) * 100:.0f}% less CPU per image); "
          f"new (PIL) / old = {res['ratio_pil']:.3f}")
    return res


if __name__ == "__main__":
    main()
