"""Encoder throughput by accelerator class: what `medscale plan` turns GFLOPs into device-hours with.

Two sources, and the plan says which one each figure came from:

- MEASURED: items/s of the embedding pipeline (decode included, steady state) for an (accelerator,
  encoder, resolution) someone ran. Add a row when you measure one (benchmarks/extract_throughput.py
  prints it); nothing else in medscale changes.
- otherwise ESTIMATED: GFLOPs per item (EncoderSpec.gflops) at a utilisation of the class's peak
  dense bf16 tensor throughput (vendor data sheets, without sparsity) that grows with the work per
  image: `utilisation(gflops)` = a + b ln(gflops), fitted on the measured H200 actor rows below
  (small ViTs at 224 px keep an H200 at ~14% of its peak even compiled, ViT-L at ~36%).

A GPU row's rate is then bounded by what feeds and drains it (`bounded_rate`): decoding on the
node's CPUs (ms per 1024-px PNG per core, measured; decode only, the resize runs on the GPU) and,
for dense maps, the disk writing them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from tasks.errors import ConfigError

DEFAULT_UTILISATION = 0.35  # a flat figure, kept for classes that set their own
H200_PEAK_TFLOPS = 989.0

# benchmarks/gpu_extract.py on one H200 (benchmarks/results/h200*.txt): the extraction actor
# (EncoderUDF: pinned copies, bf16 weights, torch.compile), decoded batches in host memory, so
# decode is NOT included (the plan bounds it separately). (encoder, px) -> (img/s, GFLOPs/img).
H200_ACTOR: dict[tuple[str, int], tuple[float, float]] = {
    ("dinov3_vits16", 224): (15050.0, 9.396), ("dinov3_vits16", 512): (2767.0, 63.82),
    ("dinov3_vits16", 1024): (547.1, 486.6), ("dinov3_vitb16", 224): (8151.0, 35.86),
    ("dinov3_vitb16", 512): (1325.0, 215.0), ("dinov3_vitb16", 1024): (247.0, 1321.0),
    ("dinov3_vitl16", 224): (2837.0, 125.7), ("dinov3_vitl16", 512): (490.1, 727.2),
    ("dinov3_vitl16", 1024): (88.77, 4137.0),
}
# Measured by the H200 run of issue 24 (FrozenEncoder eager, bf16 weights, batch 64-512; not
# compiled, so a compiled actor does better): families the runs above did not cover.
H200_EAGER_ISSUE24: dict[tuple[str, int], float] = {
    ("dinov3_vithp16", 224): 883.0, ("dinov3_vit7b16", 224): 162.0,
    ("dinov3_convnext_base", 224): 5656.0, ("dinov3_convnext_base", 512): 1129.0,
}


def fit_utilisation(rows: dict[tuple[str, int], tuple[float, float]], peak_tflops: float) -> tuple[float, float]:
    """(a, b) of utilisation = a + b ln(GFLOPs/img), least squares over measured (img/s, GFLOPs) rows."""
    g = np.array([gf for _, gf in rows.values()])
    u = np.array([r * gf / 1e3 / peak_tflops for r, gf in rows.values()])
    b, a = np.polyfit(np.log(g), u, 1)
    return float(a), float(b)


UTIL_FIT = fit_utilisation(H200_ACTOR, H200_PEAK_TFLOPS)
UTIL_RANGE = (0.05, 0.60)  # clipped: below, launch-bound toys; above, more than any row measured


def utilisation(gflops: float) -> float:
    a, b = UTIL_FIT
    return min(max(a + b * math.log(max(gflops, 1e-3)), UTIL_RANGE[0]), UTIL_RANGE[1])


# What feeds and drains a GPU node. The decode workers only decode: the actor resizes on its
# device (tasks/device_resize.py), so a 1024-px chest-film PNG costs a core the same at every
# resolution. Issue 24 measured decode + CPU resize at 8.2 ms per core to 224 px (10.9 to 512);
# benchmarks/decode_cpu.py measured the decode-only path (libpng) at 0.554 of decode + resize to
# 224 px (median of three runs, 0.549-0.565; docs/gpu.md): 8.2 x 0.554 = 4.5 ms. The H200 node's disk
# wrote fp16 .npy maps at 1.3 GB/s.
DECODE_MS = 4.5


@dataclass(frozen=True)
class Accelerator:
    name: str
    peak_tflops: float  # dense bf16 tensor TFLOP/s (a CPU class: its effective rate, see below)
    memory_gb: float  # device memory one cell's GPU share is a fraction of
    utilisation: float | None = None  # None: utilisation(gflops), fitted on measured rows
    note: str = ""
    node_cpus: int = 16  # decode workers beside one GPU
    disk_gb_s: float = 1.3  # where dense maps are written

    @property
    def gpu(self) -> bool:
        return not self.name.startswith("cpu")


ACCELERATORS: dict[str, Accelerator] = {a.name: a for a in [
    Accelerator("H100", 989.0, 80.0, note="H100 SXM5 80 GB"),
    Accelerator("H200", 989.0, 141.0, note="H200 SXM 141 GB"),
    Accelerator("A100", 312.0, 80.0, note="A100 SXM 80 GB"),
    Accelerator("L4", 121.0, 24.0),
    Accelerator("T4", 65.0, 16.0, note="fp16 tensor cores (no bf16)"),
    # The 2-core development machine the demo runs on: the effective rate of the measured ViT-S/16
    # at 224 px (16.9 img/s x 9.4 GFLOPs), used at face value for other encoders and resolutions.
    Accelerator("cpu-2core", 0.159, 8.0, utilisation=1.0, note="2 CPU cores, effective rate from a measurement",
                node_cpus=2),
]}

# (accelerator, encoder, resolution) -> items/s measured through the whole embedding pipeline.
MEASURED: dict[tuple[str, str, int], float] = {
    # benchmarks/extract_throughput.py on the 2-core machine (README, Benchmarks): steady state.
    ("cpu-2core", "dinov3_vits16", 224): 16.9,
    # H200: the encoder actor, decode not included (bounded apart, `bounds`); see H200_ACTOR.
    **{("H200", e, r): v for (e, r), (v, _) in H200_ACTOR.items()},
    **{("H200", e, r): v for (e, r), v in H200_EAGER_ISSUE24.items()},
}


def get_accelerator(name: str) -> Accelerator:
    try:
        return ACCELERATORS[name]
    except KeyError:
        raise ConfigError(f"unknown accelerator class {name!r}; known: {', '.join(ACCELERATORS)}") from None


def items_per_second(accelerator: str, encoder: str, resolution: int, gflops: float) -> tuple[float, str]:
    """(items/s, "measured" | "estimated") of one encoder at one resolution on one class."""
    acc = get_accelerator(accelerator)
    measured = MEASURED.get((acc.name, encoder, int(resolution)))
    if measured is not None:
        return measured, "measured"
    util = acc.utilisation if acc.utilisation is not None else utilisation(gflops)
    return util * acc.peak_tflops * 1e3 / max(gflops, 1e-12), "estimated"


def decode_rate(accelerator: str, resolution: int) -> float:
    """Images/s the node's CPUs decode (1024-px PNG sources) for an actor that resizes them to
    `resolution` on its device: the same at every resolution (the argument says which row asks)."""
    return get_accelerator(accelerator).node_cpus * 1000.0 / DECODE_MS


def bounded_rate(accelerator: str, gpu_rate: float, resolution: int, bytes_per_item: float | None,
                 decode: bool = True, decode_shared_by: int = 1) -> tuple[float, str]:
    """(items/s, what bounds it: gpu | decode | disk). CPU classes are measured whole: gpu.
    `decode_shared_by`: the extractions one decode feeds (extraction/shared.py), each paying 1/n."""
    acc = get_accelerator(accelerator)
    if not acc.gpu:
        return gpu_rate, "gpu"
    options = [(gpu_rate, "gpu")]
    if decode:
        options.append((decode_rate(accelerator, resolution) * max(1, decode_shared_by), "decode"))
    if bytes_per_item:
        options.append((acc.disk_gb_s * 1e9 / bytes_per_item, "disk"))
    return min(options)
