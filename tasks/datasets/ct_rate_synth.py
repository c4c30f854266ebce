"""Synthetic CT-RATE: small NIfTI chest volumes in the published tree, with a learnable signal.

Realistic HU: air -1000 outside the body, lungs ~-850, soft tissue 0..80 (body 40, heart 60),
bone 700+ (spine). Spacing is anisotropic (0.7-0.8 mm in-plane, 1.5/3/5 mm between slices) and
stored in the affine; voxels are int16 raw values with the scaling in the metadata CSV only
(intercept -1024 or -1000, slope 1), as the release stores them. Each of the 18 findings adds a
soft blob of its own place and sign through the volume's middle slices, strong enough to survive
a random tiny ViT at 32 px and a mean over slices.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from tasks.datasets.base import fresh_root
from tasks.datasets.ct_rate_layout import LABEL_FILES, LABELS, META_FILES, volume_path

PREVALENCE = 0.3


def _volume(rng: np.random.Generator, size: int, depth: int, findings: np.ndarray) -> np.ndarray:
    c = (np.arange(size, dtype=np.float32) + 0.5) / size
    x, y = c[:, None], c[None, :]  # NIfTI order: (x, y, z)
    hu = np.full((size, size, depth), -1000.0, dtype=np.float32)
    body = ((x - 0.5) / 0.44) ** 2 + ((y - 0.52) / 0.34) ** 2 < 1
    lungs = sum((((x - 0.5 - s * 0.19) / 0.14) ** 2 + ((y - 0.48) / 0.24) ** 2 < 1) for s in (-1, 1)) > 0
    heart = ((x - 0.53) / 0.1) ** 2 + ((y - 0.58) / 0.1) ** 2 < 1
    spine = ((x - 0.5) / 0.05) ** 2 + ((y - 0.8) / 0.05) ** 2 < 1
    sl = np.where(body, 40.0, -1000.0)
    sl = np.where(lungs, -850.0, sl)
    sl = np.where(heart, 60.0, sl)
    sl = np.where(spine, 750.0, sl)
    for z in range(depth):
        hu[:, :, z] = sl + 15 * rng.standard_normal((size, size))
    mid = slice(depth // 4, depth - depth // 4)
    for k in np.flatnonzero(findings):
        ang = 2 * np.pi * k / len(LABELS)
        cx, cy = 0.5 + 0.28 * np.cos(ang), 0.52 + 0.22 * np.sin(ang)
        amp = 900.0 if k % 2 == 0 else -700.0
        hu[:, :, mid] += (amp * np.exp(-0.5 * ((x - cx) ** 2 + (y - cy) ** 2) / 0.09 ** 2))[..., None]
    return np.clip(hu, -1024, 3071)


def write_synthetic(root: str | os.PathLike, n: int, seed: int, image_size: int,
                    depth_range: tuple[int, int] = (6, 11)) -> Path:
    """`depth_range`: [low, high) slices per volume (tests: a few; benchmarks: real CT's hundreds)."""
    import nibabel as nib

    root = fresh_root(root)
    rng = np.random.default_rng(seed)
    labels = {s: ["VolumeName," + ",".join(LABELS)] for s in ("train", "valid")}
    meta_head = "VolumeName,Manufacturer,XYSpacing,ZSpacing,RescaleIntercept,RescaleSlope,Rows,Columns"
    metas = {s: [meta_head] for s in ("train", "valid")}
    Y = (rng.random((n, len(LABELS))) < PREVALENCE).astype(int)
    Y[np.arange(n) % len(LABELS), np.arange(n) % len(LABELS)] = 1  # every finding occurs
    p, i = 0, 0
    while i < n:
        p += 1
        split = "valid" if p % 10 in (3, 7, 9) else "train"  # ~30% of patients in valid
        for scan in "ab"[: min(n - i, 1 + int(rng.random() < 0.4))]:
            name = f"{split}_{p}_{scan}_1.nii.gz"
            depth = int(rng.integers(*depth_range))
            xy, zs = float(rng.uniform(0.7, 0.8)), float(rng.choice([1.5, 3.0, 5.0]))
            intercept = -1024.0 if rng.random() < 0.7 else -1000.0
            raw = np.rint(_volume(rng, image_size, depth, Y[i]) - intercept).astype(np.int16)
            path = volume_path(root, name)
            path.parent.mkdir(parents=True, exist_ok=True)
            nib.save(nib.Nifti1Image(raw, np.diag([xy, xy, zs, 1.0])), str(path))
            labels[split].append(name + "," + ",".join(str(v) for v in Y[i]))
            metas[split].append(f'{name},SYNTH,"[{xy:.4f}, {xy:.4f}]",{zs},{intercept:g},1,{image_size},{image_size}')
            i += 1
    for s in ("train", "valid"):
        for files, rows in ((LABEL_FILES, labels), (META_FILES, metas)):
            (root / files[s]).parent.mkdir(parents=True, exist_ok=True)
            (root / files[s]).write_text("\n".join(rows[s]) + "\n")
    return root
