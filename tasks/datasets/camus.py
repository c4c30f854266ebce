"""CAMUS (Leclerc et al., IEEE TMI 2019): 2D apical echocardiography, 2CH and 4CH views at end-diastole
(ED) and end-systole (ES), with LV endocardium (1), myocardium (2) and left atrium (3) labels.
Registration pairs: per patient and view, moving = ED, fixed = ES (the paper's Figure 8 overlays the
warped ED myocardium on the ES ground truth), images resampled to `image_size` (128) squared.

Both releases, read in place (SimpleITK reads MetaImage and NIfTI, with the same array order, so
the two releases give identical orientations):
- 2023 NIfTI release: `database_nifti/patientNNNN/patientNNNN_{2CH,4CH}_{ED,ES}(_gt).nii.gz` and
  `database_split/subgroup_{training,validation,testing}.txt` (one patient id per line): the
  official 400/50/50 patients = 800/100/100 pairs of the paper. Split source: those files.
- legacy challenge release: `training/patientNNNN/patientNNNN_{2CH,4CH}_{ED,ES}(_gt).mhd` + `.raw`
  (`testing/` has no ED/ES ground truth and is not used). It ships no split: the `database_split`
  files are used when placed beside `training/`, otherwise patients are split 80/10/10 by a
  permutation seeded with the dataset seed.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import ClassVar

import numpy as np
import pandas as pd

from tasks.datasets.base import LayoutFile, Problem, Report, fresh_root, make_index, register_dataset
from tasks.datasets.dense_base import DenseDataset
from tasks.dense import Pair, Sample
from tasks.errors import ConfigError, DatasetError

VIEWS = ("2CH", "4CH")
INSTANTS = ("ED", "ES")
SPLIT_FILES = {"train": "database_split/subgroup_training.txt", "val": "database_split/subgroup_validation.txt",
               "test": "database_split/subgroup_testing.txt"}
_CASE = re.compile(r"^(patient\d{4})_(2CH|4CH)_(ED|ES)$")


def read_itk(path: str | os.PathLike) -> np.ndarray:
    """A 2D MetaImage/NIfTI as an (H, W) array (SimpleITK order); DatasetError names the file."""
    import SimpleITK as sitk

    if not os.path.isfile(path):
        raise DatasetError(str(path), "file is missing")
    try:
        arr = sitk.GetArrayFromImage(sitk.ReadImage(str(path)))
    except RuntimeError as e:
        raise DatasetError(str(path), f"cannot read image: {str(e).strip().splitlines()[-1]}") from e
    arr = np.squeeze(arr)
    if arr.ndim != 2:
        raise DatasetError(str(path), f"expected a 2D image, got shape {arr.shape}")
    return arr


def resize2d(arr: np.ndarray, size: int, labels: bool) -> np.ndarray:
    """Resample to size x size: bilinear for images (uint8 out), nearest for label maps."""
    from PIL import Image

    if labels:
        return np.asarray(Image.fromarray(arr.astype(np.int32)).resize((size, size), Image.NEAREST)).astype(np.int64)
    if arr.dtype != np.uint8:  # 8-bit in both releases; anything else is stretched to 8 bits
        lo, hi = float(arr.min()), float(arr.max())
        arr = np.clip((arr.astype(np.float64) - lo) / max(hi - lo, 1e-12) * 255.0, 0, 255).astype(np.uint8)
    return np.asarray(Image.fromarray(arr).resize((size, size), Image.BILINEAR), dtype=np.uint8)


@register_dataset
class CAMUS(DenseDataset):
    name: ClassVar[str] = "camus"
    task: ClassVar[str] = "registration"
    kind: ClassVar[str] = "image"
    target_kind: ClassVar[str] = "pairs"
    classes: ClassVar[tuple[str, ...]] = ("LV", "myocardium", "LA")
    carves_val: ClassVar[bool] = False
    missing_item = "image of a listed patient is missing"

    def __init__(self, root: str | os.PathLike, val_fraction: float = 0.1, seed: int = 0, image_size: int = 128):
        super().__init__(root, val_fraction, seed)
        self.image_size = int(image_size)
        if self.image_size < 8:
            raise ConfigError(f"camus: image_size must be >= 8 pixels, got {image_size}")
        self.release = "nifti" if (self.root / "database_nifti").is_dir() else "legacy"
        self.image_dir = self.root / ("database_nifti" if self.release == "nifti" else "training")
        self.ext = ".nii.gz" if self.release == "nifti" else ".mhd"
        self.image_suffix = (self.ext, ".raw")  # type: ignore[assignment]  # str.endswith takes a tuple
        self.files = tuple(LayoutFile(f, f"{s} split file (database_split of the CAMUS NIfTI release)",
                                      required=self.release == "nifti", split=True) for s, f in SPLIT_FILES.items())

    def _split_identity(self) -> dict:
        return {"image_size": self.image_size, "release": self.release,
                **({} if self._has_split_files() else {"seed": self.seed, "scheme": "80/10/10"})}

    def _has_split_files(self) -> bool:
        return all((self.root / f).is_file() for f in SPLIT_FILES.values())

    def layout_problems(self) -> list[Problem]:
        problems = super().layout_problems()
        if not problems and not self.image_dir.is_dir():
            problems.append(Problem(str(self.root), "no CAMUS layout here: expected database_nifti/ (NIfTI "
                                                    "release) or training/ (legacy release)"))
        return problems

    def layout_notes(self) -> list[str]:
        split = "database_split/ files" if self._has_split_files() else f"seeded 80/10/10 (seed {self.seed})"
        return [f"{self.release} release ({self.image_dir.name}/), split: {split}, images resampled to "
                f"{self.image_size}x{self.image_size}"]

    def _image_dirs(self) -> list[Path]:
        return sorted(p for p in self.image_dir.glob("patient*") if p.is_dir())

    # -- layout -------------------------------------------------------------------------------------
    def _patient_splits(self, patients: list[str], report: Report) -> dict[str, str]:
        if self.release == "nifti" or self._has_split_files():
            out: dict[str, str] = {}
            for split, name in SPLIT_FILES.items():
                path = self._file(name, report)
                if path is None:
                    continue
                for pid in path.read_text(encoding="utf-8-sig").split():
                    if pid in out:
                        report.add(path, f"patient {pid} is also listed in the {out[pid]} split")
                    out[pid] = split
            return out
        order = np.random.default_rng(self.seed).permutation(len(patients))
        n_test = max(1, round(0.1 * len(patients))) if len(patients) >= 3 else 0
        n_val = max(1, round(0.1 * len(patients))) if len(patients) >= 3 else 0
        split = {}
        for rank, i in enumerate(order):
            split[patients[i]] = "test" if rank < n_test else "val" if rank < n_test + n_val else "train"
        return split

    def _load(self, report: Report) -> pd.DataFrame | None:
        if not self.image_dir.is_dir():
            report.add(self.root, "no CAMUS layout here: expected database_nifti/ (NIfTI release) or training/ "
                                  "(legacy release)")
            return None
        patients = [p.name for p in self._image_dirs()]
        splits = self._patient_splits(patients, report)
        rows = []
        for pid in patients:
            if pid not in splits:
                continue  # a patient of no split (e.g. outside the official lists) is not used
            for view in VIEWS:
                for inst in INSTANTS:
                    path = self.image_dir / pid / f"{pid}_{view}_{inst}{self.ext}"
                    rows.append((f"{pid}_{view}_{inst}", str(path), splits[pid], pid, [1, 1, 1]))
        for pid in sorted(set(splits) - set(patients)):
            report.add(self.image_dir / pid, f"patient listed in the {splits[pid]} split has no directory")
        if not rows:
            return make_index([], [], [], [], [])
        return make_index(*zip(*rows, strict=True))

    # -- samples and pairs --------------------------------------------------------------------------
    def read_sample(self, case_id: str) -> Sample:
        if not _CASE.match(case_id):
            raise KeyError(f"{self.name}: no case {case_id!r}")
        row = self.row(case_id)
        path = str(row["path"])
        gt_path = path[: -len(self.ext)] + "_gt" + self.ext
        img, gt = read_itk(path), read_itk(gt_path)
        if gt.shape != img.shape:
            raise DatasetError(gt_path, f"label size {gt.shape[::-1]} does not match image size {img.shape[::-1]} (W x H)")
        bad = sorted(set(np.unique(gt).tolist()) - {0, 1, 2, 3})
        if bad:
            raise DatasetError(gt_path, f"unexpected label values {bad}: CAMUS labels are 0-3 "
                                        "(background, LV endocardium, myocardium, left atrium)")
        s = self.image_size
        return Sample(case_id, resize2d(img, s, labels=False)[None, None], resize2d(gt, s, labels=True),
                      spacing=(1.0, 1.0), unit="px",
                      meta={"path": path, "label_path": gt_path, "original_size": list(img.shape)})

    def pairs(self, split: str | None = None) -> list[Pair]:
        idx = self.index()
        ids = set(idx["case_id"] if split is None else idx.loc[idx["split"] == split, "case_id"])
        sp = dict(zip(idx["case_id"], idx["split"], strict=True))
        out = []
        for cid in sorted(ids):
            pid, view, inst = _CASE.match(cid).groups()  # type: ignore[union-attr]
            es = f"{pid}_{view}_ES"
            if inst == "ED" and es in ids:
                out.append(Pair(f"{pid}_{view}", fixed=es, moving=cid, split=sp[cid]))
        return out

    # -- synthetic data -----------------------------------------------------------------------------
    @classmethod
    def synth(cls, root: str | os.PathLike, n: int = 10, seed: int = 0, image_size: int = 96,
              release: str = "nifti") -> Path:
        """`n` patients x 2 views in the `release` layout ('nifti' with split files, or 'legacy'). ED
        frames are drawn (cone, speckle, dark LV cavity in a bright myocardium, LA below); ES = ED
        warped by a known smooth contraction about the LV centre (`tasks.targets.pairs.
        contraction_field`), saved as `synth_truth/<patient>_<view>.npy` (voxels, ES grid)."""
        import SimpleITK as sitk

        from tasks.targets.pairs import contraction_field, warp_image, warp_labels

        if release not in ("nifti", "legacy"):
            raise ValueError(f"release must be 'nifti' or 'legacy', got {release!r}")
        root = fresh_root(root)
        rng = np.random.default_rng(seed)
        base = root / ("database_nifti" if release == "nifti" else "training")
        ext = ".nii.gz" if release == "nifti" else ".mhd"
        (root / "synth_truth").mkdir()
        h, w = image_size + 8, image_size  # not square: the loader resamples to image_size squared
        pids = [f"patient{i + 1:04d}" for i in range(n)]
        for pid in pids:
            (base / pid).mkdir(parents=True)
            for view in VIEWS:
                ed, lab, centre = _draw_heart(h, w, rng)
                u = contraction_field((h, w), centre, float(rng.uniform(0.25, 0.4)), 0.3 * w)
                es, es_lab = warp_image(ed, u), warp_labels(lab, u)
                for inst, img, gt in (("ED", ed, lab), ("ES", es, es_lab)):
                    sitk.WriteImage(sitk.GetImageFromArray(np.clip(img, 0, 255).astype(np.uint8)),
                                    str(base / pid / f"{pid}_{view}_{inst}{ext}"))
                    sitk.WriteImage(sitk.GetImageFromArray(gt.astype(np.uint8)),
                                    str(base / pid / f"{pid}_{view}_{inst}_gt{ext}"))
                np.save(root / "synth_truth" / f"{pid}_{view}.npy", u)
        if release == "nifti":
            (root / "database_split").mkdir()
            n_test = n_val = max(1, n // 10)
            parts = {"test": pids[:n_test], "val": pids[n_test:n_test + n_val], "train": pids[n_test + n_val:]}
            for split, name in SPLIT_FILES.items():
                (root / name).write_text("".join(f"{p}\n" for p in parts[split]))
        return root


def _draw_heart(h: int, w: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, tuple[float, float]]:
    """An apical-view-like frame: float image (H, W) in [0, 255], labels, and the LV centre."""
    from scipy import ndimage

    yy, xx = np.mgrid[:h, :w].astype(np.float64)
    cy, cx = h * rng.uniform(0.38, 0.45), w * rng.uniform(0.45, 0.55)
    ry, rx = h * 0.2, w * 0.11
    r = np.hypot((yy - cy) / ry, (xx - cx) / rx)
    lab = np.zeros((h, w), np.int64)
    lab[r < 1.45] = 2
    lab[r < 1.0] = 1
    la = np.hypot((yy - (cy + ry * 1.75)) / (0.35 * ry), (xx - cx) / (1.0 * rx)) < 1.0
    lab[la & (lab == 0)] = 3
    cone = (np.abs(xx - w / 2) < (yy + 4) * 0.7) & (yy < h - 2)
    speckle = ndimage.gaussian_filter(rng.random((h, w)), 1.2)
    img = 60 + 90 * speckle + 40 * np.sin(yy / 5.0) * np.cos(xx / 7.0)
    img[lab == 2] += 90
    img[(lab == 1) | (lab == 3)] -= 50
    img = ndimage.gaussian_filter(img, 0.8) * cone
    return np.clip(img, 0, 255), lab * cone, (cy, cx)
