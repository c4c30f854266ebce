"""Resizing decoded images on the encoder's device (docs/gpu.md, "Resizing on the device").

The decode workers hand over images as decoded, uint8 (C, H, W) with C = 1 for a grey source (a
chest film stays one channel: a third of the bytes) or 3; the encoder actor resizes them here, on
the GPU in production and on the CPU in tests, to the uint8 (B, 3, r, r) the encoder takes. On a
1024-px chest-film PNG this halves what a decode worker's core spends per image (the resize was
about 40% of it: benchmarks/decode_cpu.py), so one node's CPUs feed a fast GPU.

The arithmetic is torch's antialiased interpolation on float32, rounded back to uint8 like PIL's
output: PIL's and torch's antialiased bicubic use the same support-scaled kernel (a = -0.5) but
round differently, so pixels differ by at most a few levels and embeddings by far less than bf16
does (tests/test_device_resize.py states the tolerances measured).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from tasks.device_io import DeviceIO

# interpolation name (the encoder's Preprocessing) -> (torch mode, antialias). PIL antialiases
# bicubic and bilinear when shrinking; "nearest-exact" is PIL's pixel-centre nearest. Lanczos has
# no torch kernel.
MODES: dict[str, tuple[str, bool]] = {"bicubic": ("bicubic", True), "bilinear": ("bilinear", True),
                                      "nearest": ("nearest-exact", False)}


def as_chw(img: np.ndarray) -> np.ndarray:
    """A decoded image, uint8 (H, W), (H, W, 1), (H, W, 3) or (H, W, 4), as (C, H, W) with C = 1
    (grey, kept one channel) or 3 (alpha carries no anatomy and is dropped)."""
    img = np.asarray(img)
    if img.dtype != np.uint8:
        raise ValueError(f"expected a uint8 image, got {img.dtype}; datasets scale to uint8 when reading")
    if img.ndim == 2:
        return img[None]
    if img.ndim == 3 and img.shape[2] in (1, 3, 4):
        return np.ascontiguousarray(img[:, :, :3].transpose(2, 0, 1))
    raise ValueError(f"expected an (H, W) or (H, W, 3) image, got shape {img.shape}")


def resize_on_device(images: Sequence[np.ndarray] | np.ndarray, resolution: int, interpolation: str,
                     io: DeviceIO) -> torch.Tensor:
    """uint8 (C, H, W) images (C 1 or 3, any sizes) -> uint8 (B, 3, r, r) on `io.device`.

    Images of one shape are resized together (a batch of films of one size is one kernel call);
    others in their own groups, so no image is padded or distorted by its neighbours. An image
    already (3, r, r) is copied as it is (volumes and tiles are still resized by their workers)."""
    if interpolation not in MODES:
        raise ValueError(f"interpolation {interpolation!r} cannot run on the device; use one of {sorted(MODES)}")
    mode, antialias = MODES[interpolation]
    r = int(resolution)
    out = torch.empty((len(images), 3, r, r), dtype=torch.uint8, device=io.device)
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, img in enumerate(images):
        groups.setdefault(tuple(np.shape(img)), []).append(i)
    for shape, idx in groups.items():
        if len(shape) != 3 or shape[0] not in (1, 3):
            raise ValueError(f"expected uint8 (C, H, W) images with C 1 or 3, got shape {shape}")
        host = torch.from_numpy(np.stack([np.asarray(images[i], np.uint8) for i in idx]))
        x = io.upload(host)
        if shape[1:] != (r, r):
            y = F.interpolate(x.float(), size=(r, r), mode=mode, antialias=antialias,
                              **({"align_corners": False} if mode in ("bicubic", "bilinear") else {}))
            # Rounded back to uint8: what the encoder took from the CPU resize, so its input
            # contract (uint8, normalised on the device) and compiled shapes stay as they were.
            x = y.round_().clamp_(0, 255).to(torch.uint8)
        out[torch.as_tensor(idx, device=io.device)] = x.expand(-1, 3, -1, -1)
    return out
