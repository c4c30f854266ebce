"""Parameters and inference GFLOPs computed from the architecture, never typed in.

The model is built on the meta device (shapes only: no memory, no weights, no network), parameters
are counted by `numel`, and one forward of a single meta image to the default pooled embedding runs
under `torch.utils.flop_counter.FlopCounterMode`. On meta tensors the counter sees scaled-dot-product
attention; on real CPU tensors it counts SDPA as 0 (docs/encoders.md), which would undercount ViTs at
high resolution by half. Matmul FLOPs count 2 per multiply-add; norms, softmax and activations are
not counted (< 1% for these models). Results are memoised per (encoder, resolution) in the process.
"""

from __future__ import annotations

import functools
from typing import Any, Protocol

import torch
from torch.utils.flop_counter import FlopCounterMode

from tasks.errors import ConfigError


class Architecture(Protocol):
    """What counting needs of an encoder spec (tasks.encoders.spec.Architecture is one): a
    structural type, since the spec's `params` and `gflops` call into this module."""

    name: str
    unavailable: str | None
    patch_size: int
    default_pooling: str
    ops: Any
    build: Any  # () -> the architecture, random init


def _check_buildable(spec: Architecture) -> None:
    if spec.unavailable:
        raise ConfigError(f"{spec.name} is not available: {spec.unavailable}")


@functools.lru_cache(maxsize=64)
def meta_model(spec: Architecture) -> torch.nn.Module:
    """The architecture on the meta device, eval mode (shared by the counters: build once)."""
    _check_buildable(spec)
    with torch.device("meta"):
        model = spec.build()
    return model.eval().requires_grad_(False)


@functools.lru_cache(maxsize=256)
def count_params(spec: Architecture) -> int:
    return int(sum(p.numel() for p in meta_model(spec).parameters()))


@functools.lru_cache(maxsize=1024)
def count_gflops(spec: Architecture, resolution: int) -> float:
    """GFLOPs of one image at `resolution` px through the default pooled embedding."""
    if resolution <= 0 or resolution % spec.patch_size:
        raise ConfigError(f"{spec.name}: GFLOPs asked at {resolution} px, not a multiple of {spec.patch_size}")
    model = meta_model(spec)
    x = torch.empty(1, 3, resolution, resolution, device="meta")
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        tokens = spec.ops.tokens(model, x)
        if spec.default_pooling == "head":
            spec.ops.head(model, tokens)
    return counter.get_total_flops() / 1e9
