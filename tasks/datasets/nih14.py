"""NIH ChestX-ray14 (Wang et al. 2017): 112,120 frontal films of 30,805 patients, 14 findings.

Official layout (the NIH download, untarred in one directory):

    root/Data_Entry_2017.csv   Image Index,Finding Labels,Follow-up #,Patient ID,...
    root/train_val_list.txt    one image file name per line (official, patient-wise)
    root/test_list.txt
    root/images/00000001_000.png ...  (or the Kaggle copy's root/images_001/images/...)

"Finding Labels" is '|'-joined or "No Finding". Test = test_list.txt; validation is carved
patient-wise from train_val_list.txt (val_fraction, seed), since the release has no validation list.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

import tasks.datasets.synthetic as syn
from tasks.datasets.base import (
    ImageDataset,
    LayoutFile,
    Problem,
    Report,
    carve_val,
    fresh_root,
    make_index,
    register_dataset,
)
from tasks.errors import DatasetError

CSV = "Data_Entry_2017.csv"
# NIH's own download folder ships the 2020 update of the index under this name (same columns);
# it is preferred when both are present, and which one was read is part of the fingerprint.
CSV_2020 = "Data_Entry_2017_v2020.csv"
TRAIN_VAL, TEST = "train_val_list.txt", "test_list.txt"
NO_FINDING = "No Finding"
# The 2017 file's header; its bracketed names hold commas, so the two size columns split in two
# (pandas shows "OriginalImage[Width", "Height]", ...), and every line ends with a comma.
HEADER = ("Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,View Position,"
          "OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y],")
CLASSES = ("Atelectasis", "Cardiomegaly", "Effusion", "Infiltration", "Mass", "Nodule", "Pneumonia",
           "Pneumothorax", "Consolidation", "Edema", "Emphysema", "Fibrosis", "Pleural_Thickening", "Hernia")

F = syn.Finding
# Synthetic findings: roughly where each one shows on a film, one place per class (image left =
# patient right). Positions differ modulo half and third of the side, so the classes stay apart
# when a 32 or 48 px input is cut into 2x2 or 3x3 patches and the patches are averaged.
FINDINGS = {
    "Atelectasis": F(((0.31, 0.69),), (0.07, 0.04), 0.30),
    "Cardiomegaly": F(((0.55, 0.63),), (0.11, 0.08), 0.22),
    "Effusion": F(((0.74, 0.76),), (0.09, 0.045), 0.35),
    "Infiltration": F(((0.71, 0.46),), (0.055, 0.055), 0.28),
    "Mass": F(((0.33, 0.40),), (0.05, 0.05), 0.35),
    "Nodule": F(((0.62, 0.29),), (0.035, 0.035), 0.45),
    "Pneumonia": F(((0.25, 0.54),), (0.06, 0.06), 0.28),
    "Pneumothorax": F(((0.79, 0.25),), (0.05, 0.07), -0.30),
    "Consolidation": F(((0.63, 0.60),), (0.05, 0.05), 0.32),
    "Edema": F(((0.41, 0.49), (0.59, 0.49)), (0.04, 0.05), 0.24),
    "Emphysema": F(((0.35, 0.25), (0.66, 0.22)), (0.05, 0.04), -0.22),
    "Fibrosis": F(((0.21, 0.29),), (0.045, 0.045), 0.32),
    "Pleural_Thickening": F(((0.16, 0.47),), (0.025, 0.09), 0.38),
    "Hernia": F(((0.49, 0.80),), (0.06, 0.04), 0.38),
}
PREVALENCE = (0.28, 0.24, 0.3, 0.32, 0.24, 0.26, 0.24, 0.24, 0.24, 0.22, 0.22, 0.22, 0.24, 0.22)


@register_dataset
class NIH14(ImageDataset):
    """NIH ChestX-ray14, multi-label (14 findings), official patient-wise split."""

    name = "nih14"
    task = "multilabel"
    classes = CLASSES
    files = (
        LayoutFile(CSV, "label CSV Data_Entry_2017.csv or Data_Entry_2017_v2020.csv (from the NIH "
                   "ChestX-ray14 download)", required=False),
        LayoutFile(CSV_2020, "label CSV Data_Entry_2017_v2020.csv (NIH's 2020 update)", required=False),
        LayoutFile(TRAIN_VAL, "official split list train_val_list.txt", split=True),
        LayoutFile(TEST, "official split list test_list.txt", split=True),
    )
    image_suffix = ".png"

    def _image_dirs(self) -> list[Path]:
        dirs = [self.root / "images"] + sorted(self.root.glob("images_*/images"))
        return [d for d in dirs if d.is_dir()]

    def _image_paths(self, names: list[str]) -> list[str]:
        dirs = self._image_dirs()
        default = self.root / "images"
        if dirs == [default] or not dirs:
            return [str(default / n) for n in names]
        where: dict[str, Path] = {}  # Kaggle layout: images spread over images_001..012
        for d in dirs:
            with os.scandir(d) as it:
                where.update((e.name, d) for e in it)
        return [str(where.get(n, default) / n) for n in names]

    def _read_list(self, name: str, report: Report) -> dict[str, int] | None:
        path = self._file(name, report)
        if path is None:
            return None
        out: dict[str, int] = {}
        for i, line in enumerate(path.read_text().splitlines(), 1):
            img = line.strip()
            if not img:
                continue
            if img in out:
                report.add(path, f"line {i}: {img} is listed twice")
            out.setdefault(img, i)
        return out

    @property
    def label_csv(self) -> str:
        """The index file read: the 2020 update when present, else the original."""
        return CSV_2020 if (self.root / CSV_2020).is_file() else CSV

    def _split_identity(self) -> dict:
        return {**super()._split_identity(), "labels": self.label_csv}

    def fingerprint(self) -> str:
        path = self.root / self.label_csv
        if not path.is_file():  # neither index file: name the one a user most likely lacks
            raise DatasetError(str(path), f"missing label CSV {CSV} or {CSV_2020} (from the NIH ChestX-ray14 download)")
        return super().fingerprint()

    def layout_problems(self) -> list[Problem]:
        problems = super().layout_problems()
        if self.root.is_dir() and not (self.root / self.label_csv).is_file():
            problems.append(Problem(str(self.root / CSV), f"missing label CSV {CSV} or {CSV_2020}"))
        return problems

    def layout_notes(self) -> list[str]:
        return [f"labels read from {self.label_csv}"]

    def _read_labels(self, report: Report) -> dict[str, tuple[str, list[int]]] | None:
        """The index CSV -> {image name: (patient id, multi-hot)}; bad rows reported, dropped."""
        path = self._file(self.label_csv, report)
        if path is None:
            return None
        try:
            df = pd.read_csv(path, dtype=str, keep_default_na=False, skipinitialspace=True)
        except (ValueError, OSError, UnicodeDecodeError) as e:
            report.add(path, f"cannot parse the CSV: {e}")
            return None
        need = ["Image Index", "Finding Labels", "Patient ID"]
        missing = [c for c in need if c not in df.columns]
        if missing:
            report.add(path, f"missing column(s) {missing}; expected the header {HEADER.rstrip(',')!r}")
            return None
        col = {c: i for i, c in enumerate(self.classes)}
        out: dict[str, tuple[str, list[int]]] = {}
        for line, (img, labels, pid) in enumerate(zip(df["Image Index"], df["Finding Labels"],
                                                      df["Patient ID"], strict=True), 2):
            img, pid = img.strip(), pid.strip()
            if not img.endswith(".png") or not pid.isdigit():
                report.add(path, f"line {line}: malformed row (Image Index {img!r}, Patient ID {pid!r})")
                continue
            if img in out:
                report.add(path, f"line {line}: {img} appears more than once")
                continue
            names = [t.strip() for t in labels.split("|")]
            unknown = [t for t in names if t not in col and t != NO_FINDING]
            if unknown or not labels.strip():
                report.add(path, f"line {line}: {img}: unknown label(s) {unknown or [labels]}; known: "
                           f"{', '.join(self.classes)} or {NO_FINDING!r}")
                continue
            target = [0] * len(self.classes)
            for t in names:
                if t != NO_FINDING:
                    target[col[t]] = 1
            out[img] = (str(int(pid)), target)
        return out

    def _load(self, report: Report) -> pd.DataFrame | None:
        labels = self._read_labels(report)
        lists = {s: self._read_list(f, report) for s, f in (("train_val", TRAIN_VAL), ("test", TEST))}
        if labels is None or lists["train_val"] is None or lists["test"] is None:
            return None
        split_of: dict[str, str] = {}
        for key, fname in (("train_val", TRAIN_VAL), ("test", TEST)):
            for img, line in lists[key].items():
                if img not in labels:
                    report.add(self.root / fname, f"line {line}: {img} is not in {self.label_csv}")
                elif img in split_of:
                    report.add(self.root / fname, f"line {line}: {img} is also in {TRAIN_VAL}")
                else:
                    split_of[img] = key
        val = carve_val((labels[i][0] for i, s in split_of.items() if s == "train_val"),
                        self.val_fraction, self.seed)
        names = sorted(split_of)
        splits = [("val" if labels[i][0] in val else "train") if split_of[i] == "train_val" else "test"
                  for i in names]
        return make_index([n.removesuffix(".png") for n in names], self._image_paths(names), splits,
                          [labels[i][0] for i in names], [labels[i][1] for i in names])

    @classmethod
    def synth(cls, root: str | os.PathLike, n: int = 240, seed: int = 0, image_size: int = 256) -> Path:
        """n films of ~n/2.4 patients (1-5 follow-ups each), 20% of patients in test_list.txt."""
        root = fresh_root(root)
        (root / "images").mkdir()
        rng = np.random.default_rng(seed)
        sizes: list[int] = []
        while sum(sizes) < n:
            sizes.append(int(rng.choice([1, 2, 3, 4, 5], p=[0.35, 0.25, 0.2, 0.12, 0.08])))
        sizes[-1] -= sum(sizes) - n
        pids = np.repeat(np.arange(1, len(sizes) + 1), sizes)
        follow = np.concatenate([np.arange(k) for k in sizes])
        names = [f"{p:08d}_{f:03d}.png" for p, f in zip(pids, follow, strict=True)]
        n_test = max(1, round(0.2 * len(sizes))) if len(sizes) > 1 else 0
        test_pats = set((rng.permutation(len(sizes))[:n_test] + 1).tolist())
        Y = rng.random((n, len(CLASSES))) < np.asarray(PREVALENCE)
        for start, stop in syn.chunks(n, image_size):
            img, shift = syn.chest_batch(rng, stop - start, image_size)
            for c, cname in enumerate(CLASSES):
                syn.add_finding(img, Y[start:stop, c], shift, FINDINGS[cname], rng)
            for k, px in enumerate(syn.to_uint8(img)):
                Image.fromarray(px, mode="L").save(root / "images" / names[start + k], compress_level=1)
        spacing = round(0.143 * 1024 / image_size, 3)
        rows = [HEADER]
        for i, name in enumerate(names):
            found = "|".join(sorted(c for c, y in zip(CLASSES, Y[i], strict=True) if y)) or NO_FINDING
            rows.append(f"{name},{found},{follow[i]},{pids[i]},{int(rng.integers(18, 90))},"
                        f"{'MF'[int(rng.integers(2))]},{('PA', 'AP')[int(rng.random() < 0.4)]},"
                        f"{image_size},{image_size},{spacing},{spacing},")
        (root / CSV).write_text("\n".join(rows) + "\n")
        (root / TRAIN_VAL).write_text("".join(f"{m}\n" for m, p in zip(names, pids, strict=True)
                                              if int(p) not in test_pats))
        (root / TEST).write_text("".join(f"{m}\n" for m, p in zip(names, pids, strict=True) if int(p) in test_pats))
        return root
