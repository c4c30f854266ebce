"""Encoder throughput by accelerator class: what `medscale plan` turns GFLOPs into device-hours with.

Two sources, and the plan says which one each figure came from:

- MEASURED: items/s of the embedding pipeline (decode included, steady state) for an (accelerator,
  encoder, resolution) someone ran. Add a row when you measure one (benchmarks/extract_throughput.py
  prints it); nothing else in medscale changes.
- otherwise ESTIMATED: GFLOPs per item (EncoderSpec.gflops) at `utilisation` of the class's peak
  dense bf16 tensor throughput (vendor data sheets, without sparsity). 35% is what a frozen ViT
  forward pass at batch 32-64 in bf16 typically sustains; decode and I/O are assumed to keep up
  (the pipeline benchmarks measure 0.85-0.93 of the bare encoder).
"""

from __future__ import annotations

from dataclasses import dataclass

from tasks.errors import ConfigError

DEFAULT_UTILISATION = 0.35


@dataclass(frozen=True)
class Accelerator:
    name: str
    peak_tflops: float  # dense bf16 tensor TFLOP/s (a CPU class: its effective rate, see below)
    memory_gb: float  # device memory one cell's GPU share is a fraction of
    utilisation: float = DEFAULT_UTILISATION
    note: str = ""

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
    Accelerator("cpu-2core", 0.159, 8.0, utilisation=1.0, note="2 CPU cores, effective rate from a measurement"),
]}

# (accelerator, encoder, resolution) -> items/s measured through the whole embedding pipeline.
MEASURED: dict[tuple[str, str, int], float] = {
    # benchmarks/extract_throughput.py on the 2-core machine (README, Benchmarks): steady state.
    ("cpu-2core", "dinov3_vits16", 224): 16.9,
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
    return acc.utilisation * acc.peak_tflops * 1e3 / max(gflops, 1e-12), "estimated"
