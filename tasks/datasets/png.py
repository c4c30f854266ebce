"""PNG decoding through libpng (torchvision.io), the cheapest correct decoder in the environment.

Decoding a 1024-px grey film with torchvision's libpng binding costs ~13% less CPU than PIL's
decoder (benchmarks/decode_cpu.py), and once resizing moved to the encoder's device the decode is
the whole of a decode worker's per-image work. Pixels are the same bytes (PNG is lossless); only
files whose stored form is already what the caller asks for are taken this way (8-bit grey for
"L", 8-bit RGB for "RGB"). Anything else (16-bit, palette, alpha, a grey file asked for as RGB,
a truncated file) returns None and goes through PIL, whose conversions and error messages the
datasets rely on (tasks.datasets.base.read_raster).
"""

from __future__ import annotations

import os

import numpy as np

_CHANNELS = {"L": 1, "RGB": 3}


def decode_png(path: str | os.PathLike, mode: str) -> np.ndarray | None:
    """uint8 (H, W) for "L" or (H, W, 3) for "RGB", or None when PIL should decode it."""
    if mode not in _CHANNELS or not str(path).lower().endswith(".png"):
        return None
    try:
        from torchvision.io import ImageReadMode, read_file
        from torchvision.io import decode_png as tv_decode

        t = tv_decode(read_file(str(path)), ImageReadMode.UNCHANGED)
    except Exception:  # noqa: BLE001 - no torchvision, a truncated or odd file: PIL decides
        return None
    if t.dtype.itemsize != 1 or t.ndim != 3 or t.shape[0] != _CHANNELS[mode]:
        return None
    arr = t.numpy()  # (C, H, W), shares the tensor's memory
    return arr[0] if mode == "L" else arr.transpose(1, 2, 0)
