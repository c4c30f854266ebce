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

import numpy as np

from tasks.datasets.base import ImageDataset, Problem
from tasks.errors import DatasetError
from tasks.wsi.tiling import TilingParams


class SlideDataset(ImageDataset):
    """Base class: slide-level labels, ABMIL on tile-feature bags."""

    kind = "slide"
    protocols = ("abmil",)
    image_suffix = ".tif"

    def __init__(self, root: str | os.PathLike, val_fraction: float = 0.1, seed: int = 0, tile_size: int = 224,
                 target_mpp: float | None = None, target_mag: float | None = None, min_tissue: float = 0.5):
        super().__init__(root, val_fraction, seed)
        self.tiling = TilingParams(tile_size=tile_size, target_mpp=target_mpp, target_mag=target_mag,
                                   min_tissue=min_tissue).validate()

    def _split_identity(self) -> dict:
        return {}  # bags do not depend on the split (see the module doc)

    def fingerprint(self) -> str:
        base = super().fingerprint()
        return hashlib.sha256(f"{base} tiling={json.dumps(self.tiling.key(), sort_keys=True)}".encode()).hexdigest()

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
