"""BCNB (Early Breast Cancer Core-Needle Biopsy WSI, Xu et al. 2021): 1058 patients, one biopsy
slide each, clinical labels.

Official layout (the BCNB download):

    root/WSIs/1.jpg ... 1058.jpg           one slide a patient, named by Patient ID (JPEG, not pyramidal)
    root/patient-clinical-data.csv         the release's patient-clinical-data.xlsx saved as CSV, columns
        Patient ID, Age(years), Tumour Size(cm), Tumour Type, ER, PR, HER2, HER2 Expression,
        Histological grading, Surgical, Ki67, Molecular subtype, Number of lymph node metastases,
        ALN status
        (the .xlsx is read directly when the CSV is absent and openpyxl is installed)

Tasks (multilabel, one column each, as the paper's five binary BCNB tasks): ALN status N0 vs N+
("N+(1-2)" or "N+(>2)"), and ER, PR, HER2, Ki67 "Positive" vs "Negative". Sweeps use the paper's
5-fold CV at 7:1:2 (`cell_cases`: grid seeds 0-4 are the five folds); `index()` alone gives one
seeded 7:1:2 patient split. JPEG slides open through
OpenSlide's ImageSlide (single level, no mpp): tile them at native resolution.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd

from tasks.datasets.base import LayoutFile, Report, fresh_root, make_index, register_dataset
from tasks.datasets.slides import SlideDataset, synth_slide_size

CSV, XLSX, WSIS = "patient-clinical-data.csv", "patient-clinical-data.xlsx", "WSIs"
COLUMNS = ("Patient ID", "Age(years)", "Tumour Size(cm)", "Tumour Type", "ER", "PR", "HER2", "HER2 Expression",
           "Histological grading", "Surgical", "Ki67", "Molecular subtype", "Number of lymph node metastases",
           "ALN status")
ALN = {"N0": 0, "N+(1-2)": 1, "N+(>2)": 1}
POSNEG = {"Positive": 1, "Negative": 0}
MARKERS = ("ER", "PR", "HER2", "Ki67")


@register_dataset
class BCNB(SlideDataset):
    """BCNB, multilabel (ALN N+, ER, PR, HER2, Ki67), seeded 7:1:2 patient split."""

    name = "bcnb"
    task = "multilabel"
    classes = ("ALN N+", "ER", "PR", "HER2", "Ki67")
    files = (LayoutFile(CSV, "clinical CSV patient-clinical-data.csv (the BCNB patient-clinical-data.xlsx "
                             "saved as CSV)"),)
    image_suffix = ".jpg"
    default_cv_folds = 5  # the paper's 5-fold CV at 7:1:2: a fold's test is 2/10, val 1/8 of the rest
    cv_val_fraction = 0.125

    def _cv_pool(self, index: pd.DataFrame) -> pd.Series:
        return pd.Series(True, index=index.index)  # no official split: every patient

    def _image_dirs(self) -> list[Path]:
        d = self.root / WSIS
        return [d] if d.is_dir() else []

    def fingerprint(self) -> str:
        if not (self.root / CSV).is_file() and (self.root / XLSX).is_file():
            # Only the workbook: hash it instead (on this instance; the class keeps the CSV layout).
            self.files = (LayoutFile(XLSX, "clinical workbook patient-clinical-data.xlsx"),)
        return super().fingerprint()

    def _read(self, report: Report) -> pd.DataFrame | None:
        if (self.root / CSV).is_file() or not (self.root / XLSX).is_file():
            path = self._file(CSV, report)
            if path is None:
                return None
            try:
                return pd.read_csv(path, dtype=str, keep_default_na=False)
            except (ValueError, OSError, UnicodeDecodeError) as e:
                report.add(path, f"cannot parse the CSV: {e}")
                return None
        try:
            return pd.read_excel(self.root / XLSX, dtype=str).fillna("")
        except ImportError:
            report.add(self.root / XLSX, f"reading the workbook needs openpyxl; install it or save it as {CSV}")
        except (ValueError, OSError) as e:
            report.add(self.root / XLSX, f"cannot read the workbook: {e}")
        return None

    def _load(self, report: Report) -> pd.DataFrame | None:
        df = self._read(report)
        if df is None:
            return None
        src = self.root / (CSV if (self.root / CSV).is_file() else XLSX)
        need = ["Patient ID", "ALN status", *MARKERS]
        missing = [c for c in need if c not in df.columns]
        if missing:
            report.add(src, f"missing column(s) {missing}; expected the BCNB clinical columns {', '.join(COLUMNS)}")
            return None
        ids, targets = [], []
        for line, row in enumerate(df[need].itertuples(index=False), 2):
            pid, aln, *marks = (str(v).strip() for v in row)
            pid = pid.removesuffix(".0")  # Excel stores the ID as a number
            if not pid or aln not in ALN or any(m not in POSNEG for m in marks):
                report.add(src, f"line {line}: patient {pid!r}: ALN status {aln!r} or a marker in "
                                f"{dict(zip(MARKERS, marks, strict=True))} is not one of {list(ALN)} / Positive, Negative")
                continue
            ids.append(pid)
            targets.append([ALN[aln], *(POSNEG[m] for m in marks)])
        order = sorted(range(len(ids)), key=lambda i: (len(ids[i]), ids[i]))
        perm = np.random.default_rng(self.seed).permutation(len(order))
        n_tr, n_va = round(0.7 * len(order)), round(0.1 * len(order))
        split = {}
        for rank, k in enumerate(perm):
            split[order[k]] = "train" if rank < n_tr else "val" if rank < n_tr + n_va else "test"
        return make_index(ids, [str(self.root / WSIS / f"{p}.jpg") for p in ids], [split[i] for i in range(len(ids))],
                          ids, targets)

    @classmethod
    def synth(cls, root: str | os.PathLike, n: int = 30, seed: int = 0, image_size: int = 256) -> Path:
        """n patients; JPEG slides, with the tumour texture in ALN N+ slides (the learnable task);
        markers drawn at random (every class has positives)."""
        from PIL import Image

        from tasks.wsi.synth import render

        root = fresh_root(root)
        (root / WSIS).mkdir()
        rng = np.random.default_rng(seed)
        size, _ = synth_slide_size(image_size)
        aln = rng.permutation(np.arange(n) % 3)  # N0, N+(1-2), N+(>2) in equal shares
        lines = [",".join(f'"{c}"' if "," in c else c for c in COLUMNS)]
        for i in range(n):
            pid = str(i + 1)
            rgb, _, _ = render(size, positive=bool(aln[i]), seed=seed * 100003 + i)
            Image.fromarray(rgb).save(root / WSIS / f"{pid}.jpg", quality=90)
            marks = ["Positive" if rng.random() < 0.5 else "Negative" for _ in MARKERS]
            status = ("N0", "N+(1-2)", "N+(>2)")[aln[i]]
            lines.append(f"{pid},{rng.integers(30, 80)},{rng.uniform(1, 5):.1f},Invasive ductal carcinomas,"
                         f"{marks[0]},{marks[1]},{marks[2]},2+,2,Yes,{marks[3]},Luminal B,{[0, 2, 4][aln[i]]},{status}")
        (root / CSV).write_text("\n".join(lines) + "\n")
        return root
