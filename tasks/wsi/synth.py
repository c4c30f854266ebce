"""Synthetic whole-slide images: pyramidal tiled TIFFs that OpenSlide opens as `generic-tiff`.

A slide is white glass with a few elliptical tissue islands of pink stroma (flat colour with sparse
small dark-pink dots). Positive slides add a "tumour" patch inside the tissue: dense, dark purple
nuclei-like dots, a texture even a random-init tiny ViT separates from stroma at 224 px. Flat colour
and sparse structure keep the zlib-compressed files small (a 4096 x 3072 slide is ~1-2 MB).

Why these TIFF settings (docs/libraries.md, "Whole-slide images"): tiled + zlib (JPEG needs imagecodecs),
resolution in pixels per centimetre (OpenSlide derives `openslide.mpp-x/y` from it) and
`subfiletype=1` on every reduced level (without it OpenSlide sees one level).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

BACKGROUND = (242, 242, 240)
STROMA = (232, 176, 206)
STROMA_DOT = (200, 120, 170)
NUCLEUS = (80, 40, 120)


@dataclass
class SynthSlide:
    """What was written, for tests: the file and the level-0 ground truth masks."""

    path: Path
    tissue: np.ndarray  # bool (H, W) at level 0
    tumour: np.ndarray  # bool (H, W) at level 0 (all False for a negative slide)
    mpp: float | None


def _ellipse(h: int, w: int, cy: float, cx: float, ry: float, rx: float) -> np.ndarray:
    yy, xx = np.ogrid[:h, :w]
    return ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1.0


def _dots(rng: np.random.Generator, region: np.ndarray, density: float, radius: int) -> np.ndarray:
    """Disks of `radius` px at random centres inside `region` (density: centres per pixel).

    Stamped by index arithmetic on the drawn centres only: a dilation of the whole slide costs
    seconds at 4096 x 3072, this costs milliseconds."""
    ys, xs = np.nonzero(region)
    k = rng.binomial(len(ys), density) if len(ys) else 0
    pick = rng.choice(len(ys), size=k, replace=False) if k else np.zeros(0, np.int64)
    oy, ox = np.mgrid[-radius:radius + 1, -radius:radius + 1]
    disk = (oy ** 2 + ox ** 2) <= radius ** 2
    yy = np.clip(ys[pick][:, None] + oy[disk][None, :], 0, region.shape[0] - 1)
    xx = np.clip(xs[pick][:, None] + ox[disk][None, :], 0, region.shape[1] - 1)
    out = np.zeros_like(region)
    out[yy.ravel(), xx.ravel()] = True
    return out & region


def render(size: tuple[int, int], positive: bool, seed: int, n_islands: int = 2,
           tissue: bool = True) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(rgb uint8 (H, W, 3), tissue mask, tumour mask) at level 0. `size` is (width, height)."""
    w, h = size
    rng = np.random.default_rng(seed)
    rgb = np.empty((h, w, 3), np.uint8)
    rgb[:] = BACKGROUND
    tis = np.zeros((h, w), bool)
    tum = np.zeros((h, w), bool)
    if tissue:
        # Islands in a row, kept 5% away from the edges so every tissue pixel can be tiled.
        for k in range(n_islands):
            cx = w * (k + 0.5) / n_islands + rng.uniform(-0.03, 0.03) * w
            cy = h * rng.uniform(0.45, 0.55)
            rx = w / n_islands * rng.uniform(0.33, 0.42)
            ry = h * rng.uniform(0.30, 0.40)
            tis |= _ellipse(h, w, cy, cx, ry, rx)
        rgb[tis] = STROMA
        rgb[_dots(rng, tis, 0.0004, 2)] = STROMA_DOT
        if positive:
            # The tumour: a blob centred in the first island, about a quarter of its area.
            ys, xs = np.nonzero(tis[:, : w // n_islands])
            cy, cx = ys.mean(), xs.mean()
            tum = _ellipse(h, w, cy, cx, 0.45 * (ys.max() - ys.min()) / 2, 0.45 * (xs.max() - xs.min()) / 2) & tis
            rgb[_dots(rng, tum, 0.02, 4)] = NUCLEUS
    return rgb, tis, tum


def _downsample(rgb: np.ndarray, f: int) -> np.ndarray:
    """The mean of each f x f block, rounded half to even. Summed as f*f strided slices into an
    integer accumulator: exact, and ~10x faster than a float mean over a 5-D reshaped view (which
    took most of a synthetic slide's time)."""
    h, w = rgb.shape[0] // f * f, rgb.shape[1] // f * f
    acc = np.zeros((h // f, w // f, rgb.shape[2]), np.uint16 if f * f * 255 < 2 ** 16 else np.uint32)
    for i in range(f):
        for j in range(f):
            acc += rgb[i:h:f, j:w:f]
    return np.rint(acc / (f * f)).astype(np.uint8)


def write_pyramid(path: str | os.PathLike, rgb: np.ndarray, mpp: float | None = 0.5,
                  downsamples: tuple[int, ...] = (1, 4, 16), tile: int = 256) -> Path:
    """Write `rgb` as a tiled pyramidal TIFF (one page per level, reduced pages subfiletype=1)."""
    import tifffile

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tifffile.TiffWriter(path) as tif:
        for i, f in enumerate(downsamples):
            level = rgb if f == 1 else _downsample(rgb, f)
            kw: dict = {}
            if mpp is not None:
                px_per_cm = 1e4 / (mpp * f)
                kw = {"resolution": (px_per_cm, px_per_cm), "resolutionunit": "CENTIMETER"}
            tif.write(level, tile=(tile, tile), compression="zlib", compressionargs={"level": 1}, photometric="rgb",
                      subfiletype=1 if i else 0, metadata=None, **kw)
    return path


def synth_slide(path: str | os.PathLike, positive: bool = False, seed: int = 0,
                size: tuple[int, int] = (4096, 3072), mpp: float | None = 0.5,
                tissue: bool = True, downsamples: tuple[int, ...] = (1, 4, 16)) -> SynthSlide:
    """Render and write one synthetic slide; returns its ground truth."""
    rgb, tis, tum = render(size, positive, seed, tissue=tissue)
    p = write_pyramid(path, rgb, mpp=mpp, downsamples=downsamples)
    return SynthSlide(p, tis, tum, mpp)
