"""Image preprocessing on CPU workers: decode result -> uint8 (3, r, r), for what is still resized
where it is decoded (CT slices, slide tiles, dense cases). 2D images of the pooled pipeline leave
their decode worker as decoded and are resized on the encoder's device (tasks/device_resize.py).

Normalisation (mean/std) is not done here: the encoder applies its own pretrained statistics, so the
cache stores what the encoder saw and the decode workers ship compact uint8 to the encoder actors.
Bump PREPROCESS_VERSION whenever the output of `prepare_image` or `device_resize` changes for the
same input: it is part of every feature-cache key.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

# 2: 2D images are resized on the encoder's device (tasks/device_resize.py: torch's antialiased
# interpolation, not PIL's; pixels differ by a few levels), so no entry of version 1 is reused.
PREPROCESS_VERSION = "2"
# Whole image resized to a square, no crop: a centre crop would cut lung apices and costophrenic
# angles off chest films, and the paper feeds square inputs (224..1024 px) to every encoder.
RESIZE_POLICY = "resize-full-image-to-square-no-crop"

_INTERPOLATION = {
    "bicubic": Image.Resampling.BICUBIC,
    "bilinear": Image.Resampling.BILINEAR,
    "nearest": Image.Resampling.NEAREST,
    "lanczos": Image.Resampling.LANCZOS,
}


def to_rgb_uint8(img: np.ndarray) -> np.ndarray:
    """(H, W), (H, W, 1), (H, W, 3) or (H, W, 4) uint8 -> (H, W, 3) uint8; grey is replicated."""
    if img.dtype != np.uint8:
        raise ValueError(f"expected a uint8 image, got {img.dtype}; datasets scale to uint8 when reading")
    if img.ndim == 2:
        return np.repeat(img[:, :, None], 3, axis=2)
    if img.ndim == 3 and img.shape[2] == 1:
        return np.repeat(img, 3, axis=2)
    if img.ndim == 3 and img.shape[2] in (3, 4):
        return img[:, :, :3]  # alpha carries no anatomy
    raise ValueError(f"expected an (H, W) or (H, W, 3) image, got shape {img.shape}")


def prepare_image(img: np.ndarray, resolution: int, interpolation: str = "bicubic") -> np.ndarray:
    """Resize a decoded image to (3, resolution, resolution) uint8, grey replicated to 3 channels."""
    if interpolation not in _INTERPOLATION:
        raise ValueError(f"unknown interpolation {interpolation!r}; use one of {sorted(_INTERPOLATION)}")
    img = np.asarray(img)
    if img.ndim == 3 and img.shape[2] == 1:
        img = img[:, :, 0]
    if img.ndim == 3 and img.shape[2] == 4:
        img = img[:, :, :3]
    to_rgb_uint8(img[:1, :1])  # validate dtype and shape before the (costly) resize
    if img.shape[:2] != (resolution, resolution):
        # Resize before replicating grey channels (3x less work); PIL antialiases when shrinking,
        # so a 1024 px film brought to 224 px does not alias.
        pil = Image.fromarray(img).resize((resolution, resolution), _INTERPOLATION[interpolation])
        img = np.asarray(pil)
    if img.ndim == 2:  # grey: one copy into (3, r, r), not a replicated (r, r, 3) then a transpose
        return np.ascontiguousarray(np.broadcast_to(img, (3, *img.shape)))
    return np.ascontiguousarray(to_rgb_uint8(img).transpose(2, 0, 1))
