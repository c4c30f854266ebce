"""CAMELYON16 and CAMELYON17: lymph-node whole slides, metastasis detection (slide level).

CAMELYON16 (the grand-challenge download):

    root/training/normal/normal_001.tif ...  (160 slides, label 0)
    root/training/tumor/tumor_001.tif ...    (111 slides, label 1)
    root/testing/images/test_001.tif ...     (130 slides)
    root/testing/reference.csv               no header: test_001,Tumor,Macro,Metastases / test_002,Normal,...

Official split: training -> train (val carved slide-wise by val_fraction, seed), testing -> test.
The paper's 5-fold CV on the training set: `dataset_options: {camelyon16: {cv_folds: 5}}` and grid
seeds 0-4 (one fold each; see `SlideDataset.cell_cases`).

CAMELYON17 (training part, the one with labels):

    root/training/center_0/patient_000_node_0.tif ... center_4/...  (5 centres, 5 nodes a patient)
    root/training/stage_labels.csv   patient,stage: patient_000.zip,pN0 / patient_000_node_0.tif,negative

Node labels negative / itc / micro / macro; ITC slides are removed (isolated tumour cells are
neither clearly negative nor metastases, as in the paper); positive = micro or macro. Split by
centre overlap with CAMELYON16 (Radboud = center_0, Utrecht = center_2): seen centres give train and
val (carved patient-wise), unseen centres (1, 3, 4) the test set, the paper's "Camelyon17 (Unseen)".
"""

from __future__ import annotations

import csv
import os
from pathlib import Path

import numpy as np
import pandas as pd

from tasks.datasets.base import LayoutFile, Report, carve_val, fresh_root, make_index, register_dataset
from tasks.datasets.slides import SlideDataset, synth_slide_size

C16_REF = "testing/reference.csv"
C16_DIRS = {"normal": "training/normal", "tumor": "training/tumor", "test": "testing/images"}
C17_LABELS = "training/stage_labels.csv"
C17_SEEN_CENTRES = (0, 2)  # the centres CAMELYON16 also came from
C17_NODE = {"negative": 0, "micro": 1, "macro": 1}  # "itc" is dropped


def _slide(path: Path, positive: bool, seed: int, image_size: int) -> None:
    from tasks.wsi.synth import synth_slide

    size, mpp = synth_slide_size(image_size)
    synth_slide(path, positive=positive, seed=seed, size=size, mpp=mpp)


@register_dataset
class Camelyon16(SlideDataset):
    """CAMELYON16, binary (tumour slide), official train/test split."""

    name = "camelyon16"
    task = "binary"
    classes = ("Tumor",)
    files = (LayoutFile(C16_REF, "test reference CSV testing/reference.csv (from the CAMELYON16 download)",
                        split=True),)

    def _image_dirs(self) -> list[Path]:
        return [self.root / d for d in C16_DIRS.values() if (self.root / d).is_dir()]

    def _load(self, report: Report) -> pd.DataFrame | None:
        rows: list[tuple[str, str, str, int]] = []  # case, path, split, target
        for kind, label in (("normal", 0), ("tumor", 1)):
            d = self.root / C16_DIRS[kind]
            if not d.is_dir():
                report.add(d, f"missing training/{kind} directory of the CAMELYON16 layout")
                return None
            rows += [(p.stem, str(p), "train", label) for p in sorted(d.glob("*.tif"))]
        ref = self._file(C16_REF, report)
        if ref is None:
            return None
        test_dir = self.root / C16_DIRS["test"]
        with open(ref, newline="") as f:
            for line, rec in enumerate(csv.reader(f), 1):
                if not rec or (line == 1 and not rec[0].lower().startswith("test_")):
                    continue  # blank line, or a header some copies add
                name, label = rec[0].strip().removesuffix(".tif").lower(), (rec[1].strip() if len(rec) > 1 else "")
                if label.lower() not in ("tumor", "normal"):
                    report.add(ref, f"line {line}: {name}: label {label!r} is neither Tumor nor Normal")
                    continue
                rows.append((name, str(test_dir / f"{name}.tif"), "test", int(label.lower() == "tumor")))
        train = [r[0] for r in rows if r[1] and r[2] == "train"]
        val = carve_val(train, self.val_fraction, self.seed)
        rows = [(c, p, "val" if c in val else s, t) for c, p, s, t in rows]
        return make_index([r[0] for r in rows], [r[1] for r in rows], [r[2] for r in rows],
                          [r[0] for r in rows], [[r[3]] for r in rows])

    @classmethod
    def synth(cls, root: str | os.PathLike, n: int = 24, seed: int = 0, image_size: int = 256) -> Path:
        """n slides: 2/3 training (40% tumour), 1/3 testing with reference.csv; tumour texture in
        positive slides only."""
        root = fresh_root(root)
        rng = np.random.default_rng(seed)
        n_test = max(2, n // 3)
        n_tumor = max(1, round(0.4 * (n - n_test)))
        n_normal = n - n_test - n_tumor
        test_pos = np.zeros(n_test, bool)
        test_pos[rng.permutation(n_test)[: max(1, n_test // 2)]] = True
        k = 0
        for kind, count in (("normal", n_normal), ("tumor", n_tumor)):
            for i in range(count):
                _slide(root / C16_DIRS[kind] / f"{kind}_{i + 1:03d}.tif", kind == "tumor", seed * 100003 + k,
                       image_size)
                k += 1
        ref = []
        for i in range(n_test):
            _slide(root / C16_DIRS["test"] / f"test_{i + 1:03d}.tif", bool(test_pos[i]), seed * 100003 + k, image_size)
            k += 1
            ref.append(f"test_{i + 1:03d},Tumor,Macro,Metastases" if test_pos[i] else f"test_{i + 1:03d},Normal,,")
        (root / C16_REF).write_text("\n".join(ref) + "\n")
        return root


@register_dataset
class Camelyon17(SlideDataset):
    """CAMELYON17 (labelled training centres), binary (metastasis in the node), ITC removed;
    seen centres train/val, unseen centres test."""

    name = "camelyon17"
    task = "binary"
    classes = ("Metastasis",)
    files = (LayoutFile(C17_LABELS, "stage labels CSV training/stage_labels.csv (from the CAMELYON17 "
                                    "download)"),)

    def _image_dirs(self) -> list[Path]:
        t = self.root / "training"
        return sorted(p for p in t.glob("center_*") if p.is_dir()) if t.is_dir() else []

    def _load(self, report: Report) -> pd.DataFrame | None:
        df = self._read_csv(C17_LABELS, ("patient", "stage"), report)
        if df is None:
            return None
        path = self.root / C17_LABELS
        centre_of = {p.name: int(p.parent.name.split("_")[1]) for d in self._image_dirs() for p in d.glob("*.tif")}
        rows: list[tuple[str, str, str, int]] = []  # slide, patient, centre dir, target
        for line, (name, stage) in enumerate(zip(df["patient"], df["stage"], strict=True), 2):
            name, stage = name.strip(), stage.strip().lower()
            if not name.endswith(".tif"):
                continue  # patient rows (patient_000.zip,pN1) carry the pN stage, not a slide label
            if stage == "itc":
                continue
            if stage not in C17_NODE:
                report.add(path, f"line {line}: {name}: stage {stage!r} is not negative/itc/micro/macro")
                continue
            if name not in centre_of:
                report.add(self.root / "training", f"{name} (in {C17_LABELS}) is in no training/center_N folder")
                continue
            rows.append((name.removesuffix(".tif"), name.split("_node")[0], f"center_{centre_of[name]}",
                         C17_NODE[stage]))
        seen = [r[1] for r in rows if int(r[2].split("_")[1]) in C17_SEEN_CENTRES]
        val = carve_val(seen, self.val_fraction, self.seed)
        split = ["val" if r[1] in val else "train" if r[1] in seen else "test" for r in rows]
        return make_index([r[0] for r in rows], [str(self.root / "training" / r[2] / f"{r[0]}.tif") for r in rows],
                          split, [r[1] for r in rows], [[r[3]] for r in rows])

    @classmethod
    def synth(cls, root: str | os.PathLike, n: int = 30, seed: int = 0, image_size: int = 256) -> Path:
        """n labelled (non-ITC) slides plus a few ITC slides, 5 nodes a patient, patients spread over
        the 5 centres (seen and unseen)."""
        root = fresh_root(root)
        rng = np.random.default_rng(seed)
        n_itc = 5 - n % 5 if n % 5 else 5
        total = n + n_itc
        stages = np.array(["negative"] * (total - n_itc))
        stages[rng.permutation(len(stages))[: max(2, len(stages) * 2 // 5)]] = "macro"
        stages[(stages == "macro") & (rng.random(len(stages)) < 0.3)] = "micro"
        stages = list(stages) + ["itc"] * n_itc
        order = rng.permutation(total)
        lines = ["patient,stage"]
        for p in range(total // 5):
            centre = p % 5
            nodes = [stages[order[5 * p + j]] for j in range(5)]
            pn = "pN0" if all(s == "negative" for s in nodes) else "pN0(i+)" if all(
                s in ("negative", "itc") for s in nodes) else "pN1"
            lines.append(f"patient_{p:03d}.zip,{pn}")
            for j, stage in enumerate(nodes):
                name = f"patient_{p:03d}_node_{j}.tif"
                lines.append(f"{name},{stage}")
                _slide(root / "training" / f"center_{centre}" / name, stage in ("micro", "macro"),
                       seed * 100003 + 5 * p + j, image_size)
        (root / C17_LABELS).write_text("\n".join(lines) + "\n")
        return root
