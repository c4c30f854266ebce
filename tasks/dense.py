"""The dense contract: what a dense dataset hands a dense head, and how features reach it.

One design for every dense task of the study (2D/3D/PET segmentation, EM affinities,
registration); docs/dense.md explains it. No Ray, no MLflow here.

- A **target kind** says what a dataset's ground truth is: `labels` (one vector per case, the
  classification datasets), `mask2d` (a label map per image), `mask3d` (a label map per volume),
  `instances` (an instance-id volume, EM) or `pairs` (fixed/moving images with segmentations,
  registration).
- A **head family** says what a protocol consumes: `feature` (pooled vectors, scikit-learn
  contract), `bag` (bags of tile vectors), `dense` (patch-token maps, torch decoders trained
  against masks) or `training_free` (dense maps, nothing trained: registration).
- A `Sample` is one case of a dense dataset at its original geometry: the images the encoder sees
  (every slice, every modality) and the target with its spacing and affine.
- A `FeatureSource` gives a head the patch-token maps of cases: from the cache (memory-mapped
  fp16, one file per case) or online (the frozen encoder runs beside the head). Heads see the same
  interface either way; `choose_source` is the stated rule that picks one per extraction.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch
import torch.nn.functional as F

TARGET_KINDS = ("labels", "mask2d", "mask3d", "instances", "pairs")
FAMILIES = ("feature", "bag", "dense", "training_free")
SOURCES = ("cached", "online")
FEATURE_DTYPE = np.float16  # cached maps; online maps are computed in the encoder's precision


@dataclass
class Sample:
    """One case of a dense dataset, at its original geometry.

    images: uint8 (M, S, H, W) or (M, S, H, W, 3): M modalities (1 unless a multi-modal volume;
        each modality is encoded as its own grey image and the features concatenated on channels),
        S slices along the first spatial axis (1 for a 2D image). This is what the encoder sees,
        slice by slice, after `tasks.preprocess.prepare_image` brings each slice to r x r.
    target: the ground truth, or None where a split has none:
        mask2d  -> int (H, W) label map (0 background), or bool (C, H, W) for multi-label masks
                   (a pixel may carry several classes: EDD2020);
        mask3d  -> int (S, H, W) label map;
        instances -> uint64 (S, H, W) instance ids (0 = background / ignored).
    spacing: physical size of one target voxel per array axis ((y, x) for 2D, (z, y, x) for
        volumes), in `unit`; pixels (1.0) where the format has none.
    affine: the source file's 4x4 voxel-to-world matrix (NIfTI), for writing predictions that open
        over the image in a viewer; None for 2D rasters.
    raw: optional unnormalised image (e.g. float intensities) a head may need besides `images`.
    """

    case_id: str
    images: np.ndarray
    target: np.ndarray | None = None
    spacing: tuple[float, ...] = (1.0, 1.0)
    unit: str = "px"
    affine: np.ndarray | None = None
    raw: np.ndarray | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def n_slices(self) -> int:
        return int(self.images.shape[1])

    @property
    def n_modalities(self) -> int:
        return int(self.images.shape[0])

    @property
    def size(self) -> tuple[int, ...]:
        """Spatial size of the target grid: (H, W) for 2D, (S, H, W) for volumes."""
        h, w = self.images.shape[2:4]
        return (h, w) if self.n_slices == 1 and self.target is not None and self.target.ndim == 2 \
            else (self.n_slices, h, w)


@dataclass(frozen=True)
class Pair:
    """A registration pair: two cases of the same dataset (their features are those of the cases)."""

    pair_id: str
    fixed: str
    moving: str
    split: str


@runtime_checkable
class FeatureSource(Protocol):
    """Patch-token maps of a set of cases, cached or online; the only way dense heads see features.

    features(case_id) -> (S, C, h, w): S slices, C = modalities x layers x encoder width channels
    (concatenated in that order), h = w = resolution / patch size. float16 memory-mapped from the
    cache, or float32 computed online. `sample(case_id)` gives the case's `Sample`."""

    kind: str  # "cached" | "online"
    channels: int
    grid: int  # h = w of the patch grid
    layers: tuple[int, ...]

    def case_ids(self, split: str | None = None) -> list[str]: ...

    def features(self, case_id: str) -> np.ndarray: ...

    def sample(self, case_id: str) -> Sample: ...


@dataclass(frozen=True)
class SourceChoice:
    kind: str  # cached | online
    reason: str
    planned_bytes: int


def planned_bytes(n_slices: int, grid: int, channels: int) -> int:
    """Bytes of a dense cache entry: fp16 (S, C, h, w) per case, summed over slices."""
    return int(n_slices) * grid * grid * int(channels) * np.dtype(FEATURE_DTYPE).itemsize


def choose_source(n_slices: int, grid: int, channels: int, budget_gb: float, augment: bool) -> SourceChoice:
    """The rule that picks a feature source per extraction (recorded on every run).

    Cached when the planned entry fits the budget and training needs no geometric augmentation
    (an augmented crop must pass through the encoder: flipping a ViT map only approximates flipping
    the image); online otherwise."""
    b = planned_bytes(n_slices, grid, channels)
    budget = float(budget_gb) * 1e9
    if augment:
        return SourceChoice("online", "the head trains with geometric augmentation, which must pass "
                            "through the encoder", b)
    if b > budget:
        return SourceChoice("online", f"planned dense cache {b / 1e9:.2f} GB > resources.dense_cache_max_gb "
                            f"{budget_gb:g} GB", b)
    return SourceChoice("cached", f"planned dense cache {b / 1e9:.3f} GB <= resources.dense_cache_max_gb "
                        f"{budget_gb:g} GB and no geometric augmentation", b)


# -- geometry helpers shared by the dense heads --------------------------------------------------

def upsample_logits(logits: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """(B, C, h, w) -> (B, C, H, W) bilinear, or (B, C, d, h, w) -> (B, C, D, H, W) trilinear: the
    paper's dynamic upsampling of logits to each case's original size (never square unless the
    image is)."""
    size = tuple(int(s) for s in size)
    mode = "bilinear" if logits.ndim == 4 else "trilinear"
    if tuple(logits.shape[2:]) == size:
        return logits
    return F.interpolate(logits, size=size, mode=mode, align_corners=False)


def as_tensor_features(x: np.ndarray, device: torch.device | str = "cpu") -> torch.Tensor:
    """A feature array (memory-mapped fp16 or float32) as a float32 tensor on `device`; copies once
    (a memory map is read-only, and torch must not alias it)."""
    return torch.from_numpy(np.array(x, dtype=np.float32, copy=True)).to(device)


