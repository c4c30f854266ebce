"""3D segmentation: slice encoding inside the seg3d pipeline against the bare encoder, and memory.

The pipeline is what a seg3d cell runs to score a volume (`tasks.protocols.seg3d_group.
predict_group`): NIfTI read in canonical orientation and windowed -> MONAI sliding windows of
`crop_slices` whole slices (overlap 0.25 along z) -> each window's slices resized to the encoder's
input and encoded -> the head. The head here is a 1x1x1 convolution, so what is measured is the
encoding path, not a decoder. Throughput counts the slices ENCODED (windows overlap along z; a
slice two windows share is encoded once and its maps carried over, so encoded = distinct slices). The bare baseline
encodes the same slices (every distinct slice of every volume), already decoded and resized in
memory, with `FrozenEncoder.dense` in batches of the same size, before and after the pipeline
(averaged). Same machine, encoder, resolution and torch threads.

Peak RSS (this process, sampled every 0.5 s) of a run over `--short` volumes against one over
`--volumes` volumes, after an unmeasured warm-up: a volume's features never exist whole and one
volume is held at a time, so it should not grow with the number of volumes (target <= +10%).
Last line: `ratio=<pipeline / bare encoded slices/s>` (target >= 0.85).

    python benchmarks/seg3d_throughput.py [--encoder dinov3_vits16] [--resolution 224] [--volumes 8]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("TQDM_DISABLE", "1")

from benchmarks.common import PeakRSS  # noqa: E402


class Counting:
    """Wraps an OnlineFeatures source, counting the slices it encodes."""

    def __init__(self, source):
        self.source, self.slices = source, 0

    def __getattr__(self, name):
        return getattr(self.source, name)

    def encode(self, images):
        self.slices += images.shape[0] * images.shape[1]
        return self.source.encode(images)


def bare(encoder, pixels, batch: int) -> float:
    import torch

    x = torch.from_numpy(pixels)
    encoder.dense(x[:batch])  # warm-up
    t0 = time.perf_counter()
    for s in range(0, len(x), batch):
        encoder.dense(x[s:s + batch])
    return len(x) / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--encoder", default="dinov3_vits16")
    ap.add_argument("--resolution", type=int, default=224)
    ap.add_argument("--volumes", type=int, default=8)
    ap.add_argument("--short", type=int, default=2)
    ap.add_argument("--depth", type=int, default=48, help="slices per synthetic volume")
    ap.add_argument("--image-size", type=int, default=256, help="in-plane side of the synthetic volumes")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    args = ap.parse_args()

    import numpy as np
    import torch

    from tasks.datasets import dataset_class, get_dataset
    from tasks.encoders import create_encoder
    from tasks.features import OnlineFeatures, prepare_slices
    from tasks.protocols import create_protocol
    from tasks.protocols.seg3d_group import predict_group

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="seg3d-bench-") as tmp:
        dataset_class("msd_spleen").synth(Path(tmp) / "d", n=args.volumes, image_size=args.image_size,
                                          n_slices=args.depth)
        ds = get_dataset("msd_spleen", Path(tmp) / "d")
        cids = list(ds.index()["case_id"])
        enc = create_encoder(args.encoder, weights="random")
        head = create_protocol("seg3d_decoder", layers=None)
        src = Counting(OnlineFeatures(enc, ds, args.resolution, None, batch_size=16))
        head.net_ = torch.nn.Conv3d(src.channels, len(ds.classes) + 1, 1).to(enc.device)
        head.device_ = str(enc.device)
        # Every distinct slice of every volume (as ct_throughput does): a baseline about as long as
        # the pipeline's run, so both are sustained rates; a few seconds of bare encoding on a
        # shared VM is a burst rate, not the one the pipeline is held to.
        pixels = np.concatenate([prepare_slices(ds.read_sample(c).images, args.resolution, enc.interpolation)[0]
                                 for c in cids])
        what = f"{len(pixels)} slices, {args.encoder} @ {args.resolution}px, batch 16, {args.threads} threads"
        before = bare(enc, pixels, 16)
        print(f"bare encoder (before): {before:.2f} slices/s on {what}")

        def run(ids):
            src.slices = 0
            t0 = time.perf_counter()
            with PeakRSS() as rss:
                for c in ids:
                    predict_group([head], src, c)
            return src.slices, time.perf_counter() - t0, rss.peak

        run(cids[:1])  # warm-up (imports, first allocations)
        n_s, t_s, rss_s = run(cids[:args.short])
        n_f, t_f, rss_f = run(cids)
        after = bare(enc, pixels, 16)
        print(f"bare encoder (after): {after:.2f} slices/s")
        b = (before + after) / 2
        rate = n_f / t_f
        distinct = len(cids) * args.depth / t_f
        print(f"pipeline: {n_f} slices encoded for {len(cids)} volumes x {args.depth} slices in {t_f:.1f} s: "
              f"{rate:.2f} encoded slices/s ({distinct:.2f} distinct slices/s; {n_s} in {t_s:.1f} s for {args.short})")
        print(f"peak RSS: {args.short} volumes {rss_s / 2**20:.0f} MiB, {len(cids)} volumes {rss_f / 2**20:.0f} MiB "
              f"({100 * (rss_f / rss_s - 1):+.1f}%)")
        print(f"ratio={rate / b:.3f}")


if __name__ == "__main__":
    main()
