"""EDD2020 (Endoscopy Disease Detection and Segmentation, Ali et al. 2020), segmentation part:
endoscopy frames with one binary mask per disease class; a pixel may carry several classes, so the
task is multilabel (one sigmoid per class).

Official layout (the EDD2020 release, e.g. EDD2020_release-I_2020-01-15/ as the root):

    root/originalImages/<stem>.jpg         RGB frames of varying sizes (e.g. EDD2020_ACB0001.jpg)
    root/masks/<stem>_<class>.tif          one binary mask per class present in the frame, class in
                                           BE, suspicious, HGD, cancer, polyp
    root/bbox/<stem>.txt, class_list.txt   detection labels (not used here)

Verified (public loaders of this release): the folder names, `<stem>_<class>.tif` naming with those
five class names, and that a class without a mask file is absent from the frame. From memory: mask
values are 0 / 255 (a mask is read as foreground >= 128, or > 0 where its maximum is 1; colour masks
take the channel maximum).

No official split, and the release names no patients: each frame is its own group. Sweeps use a
seeded 5-fold CV where the grid seed is the fold (`cell_splits`: seed s tests fold s mod 5, folds
drawn by the dataset's split seed; val = `val_fraction` of the other frames, default 10%, drawn by
split seed + s). `index()` alone gives fold 0's split.

Metrics (Table 8 of the paper): Dice per class and their mean (`mdice`), mIoU, precision, recall
(means over classes of the per-class means over frames; tasks/targets/mask2d.py).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
import pandas as pd

from tasks.datasets.base import (
    ImageDataset,
    Problem,
    Report,
    carve_val,
    fresh_root,
    make_index,
    read_raster,
    register_dataset,
)
from tasks.datasets.dense_base import DenseDataset, check_sample
from tasks.dense import Sample
from tasks.errors import DatasetError

CLASSES = ("BE", "suspicious", "HGD", "cancer", "polyp")
IMAGES, MASKS = "originalImages", "masks"
CV_FOLDS = 5
_MASK = re.compile(r"^(.+)_(" + "|".join(CLASSES) + r")\.tiff?$")


def read_mask(path: str | os.PathLike) -> np.ndarray:
    """A mask file -> bool (H, W); DatasetError names an unreadable file."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            im.load()
            arr = np.asarray(im)
    except FileNotFoundError:
        raise DatasetError(str(path), "mask file is missing") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise DatasetError(str(path), f"cannot decode mask: {e}") from e
    if arr.ndim == 3:
        arr = arr.max(axis=2)
    if arr.ndim != 2:
        raise DatasetError(str(path), f"expected a 2D mask, got shape {arr.shape}")
    arr = arr.astype(np.float64)
    return arr > 0 if arr.max(initial=0) <= 1 else arr >= 128


@register_dataset
class EDD2020(DenseDataset):
    """EDD2020 disease segmentation: 5 classes, multilabel masks, seeded 5-fold CV."""

    name = "edd2020"
    task = "multilabel"
    target_kind = "mask2d"
    classes = CLASSES
    image_suffix = ".jpg"

    def _image_dirs(self) -> list[Path]:
        return [d for d in (self.root / IMAGES,) if d.is_dir()]

    def _image_listing(self) -> list[tuple[str, int]]:
        out = super()._image_listing()
        d = self.root / MASKS
        if d.is_dir():
            out += sorted((f"{MASKS}/{e.name}", e.stat().st_size) for e in os.scandir(d)
                          if e.is_file() and _MASK.match(e.name))
        return sorted(out)

    def _masks_of(self) -> dict[str, dict[str, Path]]:
        d = self.root / MASKS
        out: dict[str, dict[str, Path]] = {}
        if d.is_dir():
            for f in sorted(os.listdir(d)):
                m = _MASK.match(f)
                if m and not f.startswith("._"):
                    out.setdefault(m.group(1), {})[m.group(2)] = d / f
        return out

    def _load(self, report: Report) -> pd.DataFrame | None:
        img_dir, mask_dir = self.root / IMAGES, self.root / MASKS
        if not img_dir.is_dir():
            report.add(img_dir, "missing originalImages folder (the EDD2020 frames)")
            return None
        if not mask_dir.is_dir():
            report.add(mask_dir, "missing masks folder (<stem>_<class>.tif per class)")
            return None
        stems = sorted(f[:-4] for f in os.listdir(img_dir) if f.lower().endswith(".jpg") and not f.startswith("._"))
        masks = self._masks_of()
        for f in sorted(os.listdir(mask_dir)):
            if f.startswith("._") or f.startswith("."):
                continue
            m = _MASK.match(f)
            if m is None:
                report.add(mask_dir / f, f"not a <stem>_<class>.tif mask (class one of {', '.join(CLASSES)})")
            elif m.group(1) not in set(stems):
                report.add(mask_dir / f, f"mask has no image {IMAGES}/{m.group(1)}.jpg")
        if not stems:
            report.add(img_dir, "no .jpg frames")
            return None
        split = self._fold_split(stems, 0)
        targets = [[int(c in masks.get(s, {})) for c in CLASSES] for s in stems]
        return make_index(stems, [str(img_dir / f"{s}.jpg") for s in stems], [split[s] for s in stems], stems, targets)

    def _fold_split(self, stems: list[str], seed: int) -> dict[str, str]:
        """Fold (seed mod 5) of a 5-fold split of the frames (drawn by the dataset's split seed) is
        test; val is carved from the rest by split seed + seed."""
        from sklearn.model_selection import KFold

        stems = sorted(stems)
        if len(stems) < CV_FOLDS:
            raise DatasetError(str(self.root / IMAGES), f"{len(stems)} frames cannot make {CV_FOLDS} CV folds")
        folds = list(KFold(CV_FOLDS, shuffle=True, random_state=self.seed).split(np.zeros(len(stems))))
        rest, test = folds[seed % CV_FOLDS]
        val = carve_val([stems[i] for i in rest], self.val_fraction, self.seed + seed)
        test_set = {stems[i] for i in test}
        return {s: "test" if s in test_set else "val" if s in val else "train" for s in stems}

    def cell_splits(self, seed: int) -> tuple[dict[str, str], str]:
        ids = self.index()["case_id"].astype(str).tolist()
        return self._fold_split(ids, seed), f"cv fold {seed % CV_FOLDS + 1}/{CV_FOLDS}"

    def read_sample(self, case_id: str) -> Sample:
        return self._sample(case_id, str(self.row(case_id)["path"]))

    def _check_image(self, path: str, decode: bool) -> Problem | None:
        """Decode the frame and its masks by path, not through index() (see EndoVis18)."""
        problem = ImageDataset._check_image(self, path, decode=False)
        if problem is not None or not decode:
            return problem
        try:
            check_sample(self._sample(Path(path).stem, path), self.target_kind)
        except DatasetError as e:
            return Problem(e.path, e.problem)
        return None

    def _sample(self, case_id: str, path: str) -> Sample:
        img = read_raster(path, "RGB")
        h, w = img.shape[:2]
        target = np.zeros((len(CLASSES), h, w), dtype=bool)
        for k, p in enumerate(self.root / MASKS / f"{case_id}_{c}.tif" for c in CLASSES):
            if not p.is_file():
                p = p.with_suffix(".tiff")
                if not p.is_file():
                    continue  # no mask file: the class is absent from this frame
            m = read_mask(p)
            if m.shape != (h, w):
                raise DatasetError(str(p), f"mask size {m.shape[1]}x{m.shape[0]} does not match image size {w}x{h} "
                                           "(W x H)")
            target[k] = m
        return Sample(case_id=case_id, images=img[None, None], target=target,
                      meta={"path": path, "label_path": str(self.root / MASKS / f"{case_id}_*.tif"),
                            "stem": case_id, "classes": list(CLASSES)})

    # -- synthetic data -----------------------------------------------------------------------------
    @classmethod
    def synth(cls, root: str | os.PathLike, n: int = 60, seed: int = 0, image_size: int = 128) -> Path:
        """n frames of varying sizes (around image_size, not square) with overlapping lesions:
        a BE region (a broad band of pale mucosa), HGD inside it (dotted texture, so HGD pixels
        are also BE), a polyp (a round bright dome), a cancer patch (dark, rough) and a suspicious
        patch (striped). Classes are absent from some frames (no mask file), as in the release."""
        from PIL import Image

        root = fresh_root(root)
        (root / IMAGES).mkdir()
        (root / MASKS).mkdir()
        (root / "bbox").mkdir()
        (root / "class_list.txt").write_text("\n".join(CLASSES) + "\n")
        rng = np.random.default_rng(seed)
        for i in range(n):
            stem = f"EDD2020_SYN{i + 1:04d}"
            h = int(image_size * rng.uniform(0.8, 1.0)) // 2 * 2
            w = int(image_size * rng.uniform(1.0, 1.25)) // 2 * 2
            yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
            img = np.empty((h, w, 3), dtype=np.float32)
            img[:] = (190, 110, 100)
            img += 10 * rng.standard_normal((h, w, 1)) + 5 * rng.standard_normal((h, w, 3))
            masks = {c: np.zeros((h, w), dtype=bool) for c in CLASSES}
            s = image_size / 128.0
            if rng.random() < 0.7:  # BE: a band, HGD dots inside part of it
                c0, width = rng.uniform(0.3, 0.7) * w, rng.uniform(20, 32) * s
                be = np.abs(xx - c0 - 0.3 * (yy - h / 2)) < width / 2
                img[be] = (225, 160, 140) + 5 * rng.standard_normal((int(be.sum()), 3))
                masks["BE"] = be
                if rng.random() < 0.6:
                    cy = rng.uniform(0.3, 0.7) * h
                    hgd = be & (np.abs(yy - cy) < 14 * s)
                    dots = ((yy.astype(int) // 3 + xx.astype(int) // 3) % 2 == 0)
                    img[hgd & dots] = (120, 60, 90)
                    masks["HGD"] = hgd
            for c, colour, p in (("polyp", (240, 200, 190), 0.6), ("cancer", (90, 40, 40), 0.4),
                                 ("suspicious", (160, 90, 150), 0.4)):
                if rng.random() >= p:
                    continue
                cy, cx, r = rng.uniform(0.25, 0.75) * h, rng.uniform(0.2, 0.8) * w, rng.uniform(9, 15) * s
                blob = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
                shade = (1.0 - 0.3 * ((yy - cy) ** 2 + (xx - cx) ** 2) / (r * r))[..., None] if c == "polyp" else 1.0
                patch = np.broadcast_to(np.asarray(colour, dtype=np.float32), img.shape) * shade
                if c == "suspicious":
                    patch = patch * (0.8 + 0.2 * ((yy.astype(int) // 2) % 2))[..., None]
                img[blob] = patch[blob] + 6 * rng.standard_normal((int(blob.sum()), 3))
                masks[c] = blob
            Image.fromarray(np.clip(np.rint(img), 0, 255).astype(np.uint8)).save(root / IMAGES / f"{stem}.jpg",
                                                                                 quality=95)
            boxes = []
            for c, m in masks.items():
                if m.any():
                    Image.fromarray(np.where(m, 255, 0).astype(np.uint8)).save(root / MASKS / f"{stem}_{c}.tif")
                    ys, xs = np.nonzero(m)
                    boxes.append(f"{xs.min()} {ys.min()} {xs.max()} {ys.max()} {c}")
            (root / "bbox" / f"{stem}.txt").write_text("\n".join(boxes) + ("\n" if boxes else ""))
        return root
