"""Base class of the dense datasets (2D/3D segmentation, EM instances, registration pairs).

A dense dataset is an `ImageDataset` (same index, fingerprint, check and synth machinery) whose
ground truth is not a label vector: it declares `target_kind` (tasks.dense.TARGET_KINDS) and gives
each case as a `tasks.dense.Sample` (images the encoder sees + target with its geometry).

The index keeps the common columns; `target` holds the case's class presence (multi-hot over
`classes`: which foreground classes its mask contains), which stratified subsets and summaries
use. `path` is the case's image file (a volume, a 2D image, a frame of a pair).

Subclasses implement `_load`, `_image_dirs`, `synth` (as every dataset) and `read_sample`; pair
datasets also `pairs`. `read_sample` raises `DatasetError` naming the file at fault, so one bad
case fails alone.
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np

from tasks.datasets.base import ImageDataset, Problem
from tasks.dense import Pair, Sample
from tasks.errors import DatasetError


class DenseDataset(ImageDataset):
    target_kind: ClassVar[str] = "mask2d"
    task: ClassVar[str] = "multiclass"  # multiclass: one label per pixel; multilabel: several
    n_modalities: ClassVar[int] = 1  # grey images per case that the encoder sees (4 for BraTS)
    # Label names in order: label map value k is classes[k - 1] (0 = background) for multiclass,
    # channel k is classes[k] for multilabel masks.
    classes: ClassVar[tuple[str, ...]] = ()

    def read_sample(self, case_id: str) -> Sample:
        raise NotImplementedError

    def n_slices(self, case_id: str) -> int:
        """Slices the encoder sees for a case (planning, pipelines): 1 for 2D images; volume
        datasets override it with a header read (no pixels)."""
        return 1

    def cell_splits(self, seed: int) -> tuple[dict[str, str], str]:
        """(case_id -> train | val | test, scheme name) of a grid cell with this seed. Default: the
        index's split ("official"). Datasets without an official split override it with a seeded
        K-fold CV where the seed is the fold (as CAMELYON16's cv_folds): splits are per cell, so
        folds never re-encode anything."""
        idx = self.index()
        return dict(zip(idx["case_id"].astype(str), idx["split"].astype(str), strict=True)), "official"

    def pairs(self, split: str | None = None) -> list[Pair]:
        """Registration pairs (target_kind 'pairs' only)."""
        raise NotImplementedError(f"{self.name} has no registration pairs")

    def row(self, case_id: str):
        idx = self.index()
        hit = idx[idx["case_id"] == case_id]
        if hit.empty:
            raise KeyError(f"{self.name}: no case {case_id!r}")
        return hit.iloc[0]

    def _check_image(self, path: str, decode: bool) -> Problem | None:
        """`check` decodes whole samples (image and mask together), so a mask that does not match
        its image is named as well as an unreadable file."""
        problem = super()._check_image(path, decode=False)
        if problem is not None or not decode:
            return problem
        try:
            idx = self.index()
        except DatasetError:  # the layout itself is broken: check() reports that from _load
            return None
        case_ids = idx.loc[idx["path"] == path, "case_id"].tolist()
        try:
            for cid in case_ids:
                check_sample(self.read_sample(cid), self.target_kind)
        except DatasetError as e:
            return Problem(e.path, e.problem)
        return None


def check_sample(s: Sample, target_kind: str) -> None:
    """DatasetError unless the sample's arrays agree with each other and with its target kind."""
    where = s.meta.get("path", s.case_id)
    if s.images.dtype != np.uint8 or s.images.ndim not in (4, 5):
        raise DatasetError(where, f"images must be uint8 (M, S, H, W[, 3]), got {s.images.shape} {s.images.dtype}")
    if s.target is None:
        return
    size = s.images.shape[2:4]
    t = s.target
    if target_kind == "mask2d":
        if t.shape[-2:] != size or t.ndim not in (2, 3):
            raise DatasetError(s.meta.get("label_path", where),
                               f"mask size {t.shape[-2:][::-1]} does not match image size {size[::-1]} (W x H)")
    elif target_kind in ("mask3d", "instances"):
        if t.shape != (s.n_slices, *size):
            raise DatasetError(s.meta.get("label_path", where),
                               f"label volume shape {t.shape} does not match the image {(s.n_slices, *size)}")
