"""Kvasir-Capsule (video capsule endoscopy frames), 11-class multiclass, the official 2-fold split.

Official layout (the OSF release plus the GitHub repo simula/kvasir-capsule):

    root/labelled_images/<class folder>/<video id>_<frame>.jpg   e.g. "Blood - fresh/", "Ulcer/"
    root/metadata.csv            filename;video_id;frame_number;finding_category;finding_class;x1;...;y4
                                 (semicolon-separated; optional here: only hashed into the
                                 fingerprint, since labels and split come from the split files)
    root/official_splits/split_0.csv, split_1.csv    filename,label

The split files spell labels differently from the folders ("Reduced Mucosal View" vs "Reduced
mucosal view"), so labels are matched case-insensitively. We keep the paper's 11 classes with at
least 50 samples (Ampulla of Vater, Blood - hematin and Polyp are dropped); split_0 is train,
split_1 test (the repo's first fold), and val is carved from split_0 video-wise (a video is one
patient's examination, so patient_id = video id: neighbouring frames never straddle splits).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd

from tasks.datasets.base import (
    ImageDataset,
    LayoutFile,
    Report,
    carve_val,
    fresh_root,
    make_index,
    read_raster,
    register_dataset,
)

IMAGES, METADATA = "labelled_images", "metadata.csv"
SPLIT_FILES = {"train": "official_splits/split_0.csv", "test": "official_splits/split_1.csv"}
# (class name in the paper, folder name of the release)
CLASS_FOLDERS = (
    ("Angiectasia", "Angiectasia"), ("Fresh blood", "Blood - fresh"), ("Erosion", "Erosion"),
    ("Erythema", "Erythema"), ("Foreign body", "Foreign body"), ("Ileocecal valve", "Ileocecal valve"),
    ("Lymphangiectasia", "Lymphangiectasia"), ("Normal clean mucosa", "Normal clean mucosa"),
    ("Pylorus", "Pylorus"), ("Reduced mucosal view", "Reduced mucosal view"), ("Ulcer", "Ulcer"),
)
DROPPED = ("ampulla of vater", "blood - hematin", "polyp")  # < 50 samples in the release
_CLASS_OF = {folder.lower(): i for i, (_, folder) in enumerate(CLASS_FOLDERS)}


def class_index(label: str) -> int | None:
    """Class of a split-file label or folder name; None for a dropped class; KeyError if unknown."""
    key = " ".join(label.strip().lower().split())
    if key in DROPPED:
        return None
    return _CLASS_OF[key]


@register_dataset
class KvasirCapsule(ImageDataset):
    name = "kvasir_capsule"
    task = "multiclass"
    classes = tuple(c for c, _ in CLASS_FOLDERS)
    files = (
        LayoutFile(SPLIT_FILES["train"], "official split file split_0.csv (from github.com/simula/kvasir-capsule)",
                   split=True),
        LayoutFile(SPLIT_FILES["test"], "official split file split_1.csv (from github.com/simula/kvasir-capsule)",
                   split=True),
        LayoutFile(METADATA, "metadata.csv (from the OSF release)", required=False),
    )
    image_suffix = ".jpg"

    def _image_dirs(self) -> list[Path]:
        d = self.root / IMAGES
        return sorted(p for p in d.iterdir() if p.is_dir()) if d.is_dir() else []

    def _folders(self) -> dict[int, Path]:
        """Class index -> its folder under labelled_images (matched case-insensitively)."""
        out: dict[int, Path] = {}
        for d in self._image_dirs():
            try:
                k = class_index(d.name)
            except KeyError:
                continue
            if k is not None:
                out[k] = d
        return out

    def read_image(self, path: str | os.PathLike) -> np.ndarray:
        return read_raster(path, mode="RGB")  # capsule frames are colour: keep it

    def _load(self, report: Report) -> pd.DataFrame | None:
        folders = self._folders()
        if not (self.root / IMAGES).is_dir():
            report.add(self.root / IMAGES, "missing image folder labelled_images/ (from the OSF release)")
            return None
        rows: dict[str, tuple[str, int]] = {}  # filename -> (split, class)
        ok = True
        for split, name in SPLIT_FILES.items():
            path = self._file(name, report)
            if path is None:
                ok = False
                continue
            try:
                df = pd.read_csv(path, dtype=str, keep_default_na=False)
            except (ValueError, OSError, UnicodeDecodeError) as e:
                report.add(path, f"cannot parse the CSV: {e}")
                ok = False
                continue
            if list(df.columns[:2]) != ["filename", "label"]:
                report.add(path, f"expected columns filename,label; got {','.join(df.columns)}")
                ok = False
                continue
            for line, (fn, label) in enumerate(zip(df["filename"], df["label"], strict=True), 2):
                try:
                    k = class_index(label)
                except KeyError:
                    report.add(path, f"line {line}: {fn}: unknown label {label!r}")
                    continue
                if k is None:
                    continue
                if fn in rows:
                    report.add(path, f"line {line}: {fn} is listed in more than one split file")
                    continue
                rows[fn] = (split, k)
        if not ok:
            return None
        for k in sorted({k for _, k in rows.values()} - set(folders)):
            report.add(self.root / IMAGES, f"missing class folder {CLASS_FOLDERS[k][1]!r}")
        names = sorted(rows)
        videos = [fn.split("_")[0] for fn in names]
        train_videos = {v for v, fn in zip(videos, names, strict=True) if rows[fn][0] == "train"}
        val = carve_val(train_videos, self.val_fraction, self.seed)
        splits = ["val" if v in val and rows[fn][0] == "train" else rows[fn][0]
                  for v, fn in zip(videos, names, strict=True)]
        cls_dir = {k: str(d) for k, d in folders.items()}
        paths = [os.path.join(cls_dir.get(rows[fn][1], str(self.root / IMAGES / CLASS_FOLDERS[rows[fn][1]][1])), fn)
                 for fn in names]
        targets = [[int(j == rows[fn][1]) for j in range(len(CLASS_FOLDERS))] for fn in names]
        return make_index([fn.removesuffix(".jpg") for fn in names], paths, splits, videos, targets)

    @classmethod
    def synth(cls, root: str | os.PathLike, n: int = 240, seed: int = 0, image_size: int = 256) -> Path:
        """n RGB frames of a capsule-like view (dark vignette, pink mucosa); each class adds its own
        strong colour cast and a soft blob at a place of its own (learnable at 32 px by a random
        tiny ViT). Videos alternate between split_0 and split_1; one dropped class (Polyp) is
        listed too, as in the release, and must be ignored."""
        from PIL import Image

        root = fresh_root(root)
        rng = np.random.default_rng(seed)
        n_videos = max(6, n // 10)
        vids = [rng.bytes(8).hex() for _ in range(n_videos)]
        for _, folder in CLASS_FOLDERS:
            (root / IMAGES / folder).mkdir(parents=True)
        (root / IMAGES / "Polyp").mkdir()
        (root / "official_splits").mkdir()
        c = (np.arange(image_size, dtype=np.float32) + 0.5) / image_size
        x, y = c[None, :], c[:, None]
        vignette = np.clip(1.3 - 1.6 * np.hypot(x - 0.5, y - 0.5), 0, 1)[..., None]
        tints = np.array([np.cos(np.linspace(0, 2 * np.pi, 11, endpoint=False) + ph) for ph in (0, 2.1, 4.2)]).T
        lines = {s: ["filename,label"] for s in ("train", "test")}
        meta = ["filename;video_id;frame_number;finding_category;finding_class;x1;y1;x2;y2;x3;y3;x4;y4"]
        for i in range(n + 1):  # the extra frame is a Polyp (dropped class)
            k = i % 11 if i < n else -1
            v = (i // 11) % n_videos  # each video shows every class, so both folds hold all 11
            fn = f"{vids[v]}_{1000 + i}.jpg"
            base = np.array([0.75, 0.45, 0.35]) + 0.05 * rng.standard_normal(3)
            img = np.broadcast_to(base, (image_size, image_size, 3)).copy()
            if k >= 0:
                img += 0.22 * tints[k]
                ang = 2 * np.pi * k / 11
                cx, cy = 0.5 + 0.25 * np.cos(ang), 0.5 + 0.25 * np.sin(ang)
                img += 0.3 * np.exp(-0.5 * (((x - cx) ** 2 + (y - cy) ** 2) / 0.12 ** 2))[..., None]
            img = img * vignette + 0.03 * rng.standard_normal(img.shape)
            px = np.clip(np.rint(img * 255), 0, 255).astype(np.uint8)
            folder = CLASS_FOLDERS[k][1] if k >= 0 else "Polyp"
            Image.fromarray(px, "RGB").save(root / IMAGES / folder / fn, quality=92)
            split = "train" if v % 2 == 0 else "test"
            # The split files use the release's capitalisation, which differs from the folders'.
            lines[split].append(f"{fn},{folder.title() if k >= 0 else 'Polyp'}")
            meta.append(f"{fn};{vids[v]};{1000 + i};Luminal;{folder};;;;;;;;")
        for split, name in SPLIT_FILES.items():
            (root / name).write_text("\n".join(lines[split]) + "\n")
        (root / METADATA).write_text("\n".join(meta) + "\n")
        return root
