"""Shared base of the whole-slide datasets (camelyon16, camelyon17, bcnb).

The index has one row per slide (case_id = slide name, path = slide file) and `kind = "slide"`:
the orchestrator tiles a slide (`tasks.wsi.tiling.tile_slide`), reads tiles lazily
(`read_tiles`) and embeds them into one feature bag per slide, which the `abmil` protocol takes.
A slide is never decoded whole, so `read_image` refuses; `check()` opens every slide instead.

Tiling parameters are dataset options (`dataset_options: {camelyon16: {target_mpp: 0.5}}` in a
sweep config) and part of the fingerprint. The split is not: bags are cached for all slides once,
and each cell assigns its slides to train/val/test, so folds and seeds share one embedding pass.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import ClassVar

import numpy as np
import pandas as pd

from tasks.datasets.base import ImageDataset, Problem, carve_val
from tasks.errors import ConfigError, DatasetError
from tasks.wsi.tiling import TILING_VERSION, TilingParams


class SlideDataset(ImageDataset):
    """Base class: slide-level labels, ABMIL on tile-feature bags."""

    kind = "slide"
    image_suffix = ".tif"

    default_cv_folds: ClassVar[int] = 0  # 0: the official split
    cv_val_fraction: ClassVar[float | None] = None  # val share of a CV fold's non-test part (None: val_fraction)

    def __init__(self, root: str | os.PathLike, val_fraction: float = 0.1, seed: int = 0, tile_size: int = 224,
                 target_mpp: float | None = None, target_mag: float | None = None, min_tissue: float = 0.5,
                 cv_folds: int | None = None):
        super().__init__(root, val_fraction, seed)
        self.tiling = TilingParams(tile_size=tile_size, target_mpp=target_mpp, target_mag=target_mag,
                                   min_tissue=min_tissue).validate()
        self.cv_folds = self.default_cv_folds if cv_folds is None else int(cv_folds)
        if self.cv_folds == 1 or self.cv_folds < 0:
            raise ConfigError(f"cv_folds must be 0 (the official split) or >= 2, got {cv_folds!r}")

    def _cv_pool(self, index: pd.DataFrame) -> pd.Series:
        """Rows cross-validation draws its folds from: the official training set (train + val)."""
        return index["split"].isin(["train", "val"])

    def cell_cases(self, seed: int) -> tuple[pd.DataFrame, str]:
        """The index with the split a cell of grid seed `seed` uses, and its name. Official split:
        the index as is. With `cv_folds` k: fold (seed mod k) of a patient-grouped k-fold over the
        CV pool, stratified on the first label and drawn by the dataset's split seed, is the test
        set; val is carved patient-wise from the other folds; rows outside the pool are left out.
        Seeds 0..k-1 thus run the k folds, each model seeded by its own seed."""
        index = self.index()
        if not self.cv_folds:
            return index, "official"
        from sklearn.model_selection import StratifiedGroupKFold

        pool = index[self._cv_pool(index)].reset_index(drop=True)
        k = self.cv_folds
        if pool["patient_id"].nunique() < k:
            raise ConfigError(f"{self.root}: {pool['patient_id'].nunique()} patients cannot make {k} CV folds")
        y = np.array([t[0] for t in pool["target"]])
        folds = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=self.seed)
        rest, test = list(folds.split(np.zeros(len(pool)), y, groups=pool["patient_id"]))[seed % k]
        frac = self.val_fraction if self.cv_val_fraction is None else self.cv_val_fraction
        val = carve_val(pool["patient_id"].iloc[rest], frac, self.seed + seed)
        split = np.where(pool.index.isin(test), "test", np.where(pool["patient_id"].isin(val), "val", "train"))
        return pool.assign(split=split), f"cv fold {seed % k + 1}/{k}"

    def _split_identity(self) -> dict:
        return {}  # bags do not depend on the split (see the module doc)

    def fingerprint(self) -> str:
        base = super().fingerprint()
        return hashlib.sha256(f"{base} tiling={json.dumps(self.tiling.key(), sort_keys=True)} v{TILING_VERSION}".encode()).hexdigest()

    def read_image(self, path: str | os.PathLike) -> np.ndarray:
        raise DatasetError(str(path), f"{self.name} is a whole-slide dataset: a slide is not read as one "
                                      "image; tile it with tasks.wsi.tiling.tile_slide and read tiles with "
                                      "tasks.wsi.tiling.read_tiles")

    def _check_image(self, path: str, decode: bool) -> Problem | None:
        if not os.path.isfile(path):
            return Problem(path, "slide listed in the labels is missing")
        if decode:  # open the slide and read its smallest level: catches unreadable and truncated files
            from tasks.wsi.tiling import open_slide

            try:
                slide = open_slide(path)
                try:
                    level = slide.level_count - 1
                    slide.read_region((0, 0), level, slide.level_dimensions[level])
                finally:
                    slide.close()
            except DatasetError as e:
                return Problem(e.path, e.problem)
            except Exception as e:  # noqa: BLE001 - OpenSlide raises OpenSlideError on a bad read
                return Problem(path, f"cannot read the slide: {type(e).__name__}: {e}")
        return None


def synth_slide_size(image_size: int) -> tuple[tuple[int, int], float]:
    """(width, height) and mpp of a synthetic slide for `image_size`: 8 x 6 image sizes, and an mpp
    that keeps the slide ~2 mm wide, so tissue islands are tissue-sized for the debris filter."""
    w, h = 8 * image_size, 6 * image_size
    return (w, h), 2048.0 / w
