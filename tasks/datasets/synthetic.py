"""Synthetic chest films for tests and benchmarks: a chest-like background plus findings.

The label signal has to show through a frozen, randomly initialised tiny ViT at 32-48 px (where
an image is 2x2 or 3x3 patches and mean pooling mixes the patches). So a finding is a large, soft
change of brightness (sigma ~5% of the image side) at a place and sign of its own (opacities
bright, air dark), strong against the background's variation; the background keeps per-image
jitter (pose, lung size, exposure, noise) so the task is not trivial.

Limit: a random-init DINOv3 ViT is close to a bag of LayerNormed patch projections (layer scale
starts at 1e-5), so once a finding spans whole patches (224 px) mean pooling keeps its brightness
but barely its place, and NIH-14's 14 places blur together (AUC ~0.6 there; RSNA's one class ~0.9).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Finding:
    """A soft Gaussian change of brightness. Coordinates are fractions of the image side."""

    spots: tuple[tuple[float, float], ...]  # centres (x, y); several for a bilateral finding
    sigma: tuple[float, float]  # (sx, sy)
    amp: float  # added brightness (background lung ~0.3, soft tissue ~0.6, on a 0..1 scale)


def grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    c = (np.arange(size, dtype=np.float32) + 0.5) / size
    return c[None, None, :], c[None, :, None]  # x (1, 1, S), y (1, S, 1)


def _ellipse(x: np.ndarray, y: np.ndarray, cx: np.ndarray, cy: np.ndarray, ax: np.ndarray,
             ay: np.ndarray, soft: float) -> np.ndarray:
    """Soft ellipse mask in [0, 1] (per-image parameters are (m, 1, 1) arrays)."""
    r = np.sqrt(((x - cx) / ax) ** 2 + ((y - cy) / ay) ** 2)
    return 1.0 / (1.0 + np.exp((r - 1.0) / soft))


def _col(rng: np.random.Generator, m: int, mean: float, sd: float) -> np.ndarray:
    return (mean + sd * rng.standard_normal(m)).astype(np.float32)[:, None, None]


def chest_batch(rng: np.random.Generator, m: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    """m chest-like backgrounds (m, S, S) float32 in ~[0, 1], and each image's (dx, dy) pose shift
    (findings move with the patient)."""
    x, y = grid(size)
    dx, dy = _col(rng, m, 0.0, 0.015), _col(rng, m, 0.0, 0.015)
    body = _ellipse(x, y, 0.5 + dx, 0.56 + dy, _col(rng, m, 0.45, 0.015), np.float32(0.62), 0.05)
    img = 0.10 + 0.52 * body
    sep, lung_cy = _col(rng, m, 0.18, 0.01), 0.47 + dy
    ax, ay = _col(rng, m, 0.13, 0.008), _col(rng, m, 0.27, 0.012)
    for side in (-1.0, 1.0):
        img = img - 0.32 * _ellipse(x, y, 0.5 + dx + side * sep, lung_cy, ax, ay, 0.08)
    img = img + 0.14 * _ellipse(x, y, 0.53 + dx, 0.63 + dy, _col(rng, m, 0.09, 0.006), np.float32(0.11), 0.15)
    contrast = rng.uniform(0.9, 1.1, m).astype(np.float32)[:, None, None]
    img = (img - 0.4) * contrast + 0.4 + _col(rng, m, 0.0, 0.025)
    img = img + 0.03 * rng.standard_normal(img.shape, dtype=np.float32)
    return img, np.concatenate([dx, dy], axis=1)[:, :, 0]


def add_finding(img: np.ndarray, mask: np.ndarray, shift: np.ndarray, f: Finding,
                rng: np.random.Generator) -> None:
    """Add finding `f` in place to the images where `mask` is True (position and strength jitter)."""
    idx = np.flatnonzero(mask)
    if len(idx) == 0:
        return
    size = img.shape[-1]
    x, y = grid(size)
    k = len(idx)
    amp = (f.amp * rng.uniform(0.8, 1.2, k)).astype(np.float32)[:, None, None]
    for cx, cy in f.spots:
        jx = (cx + shift[idx, 0] + 0.012 * rng.standard_normal(k)).astype(np.float32)[:, None, None]
        jy = (cy + shift[idx, 1] + 0.012 * rng.standard_normal(k)).astype(np.float32)[:, None, None]
        img[idx] += amp * np.exp(-0.5 * (((x - jx) / f.sigma[0]) ** 2 + ((y - jy) / f.sigma[1]) ** 2))


def add_blob(img: np.ndarray, i: int, cx: float, cy: float, sx: float, sy: float, amp: float) -> None:
    """One soft blob on image i (per-image findings such as RSNA's opacities)."""
    x, y = grid(img.shape[-1])
    img[i] += amp * np.exp(-0.5 * (((x[0] - cx) / sx) ** 2 + ((y[0] - cy) / sy) ** 2))


def to_uint8(img: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(img * 255.0), 0, 255).astype(np.uint8)


def chunks(n: int, size: int) -> list[tuple[int, int]]:
    """Batches of images that keep each float32 batch near 16 MB (512 px: 16 images)."""
    step = max(1, (1 << 22) // (size * size))
    return [(s, min(n, s + step)) for s in range(0, n, step)]
