"""FDG-PET/CT lesion segmentation: AutoPET-II (`autopet2`) and HECKTOR 2022 (`hecktor22`).

Published layouts (root = the directory shown):

    autopet2:  root/FDG-PET-CT-Lesions/PETCT_<id>/<study>/{CTres,SUV,SEG}.nii.gz
               CTres: CT resampled to the PET grid (HU); SUV: PET in SUV; SEG: lesions 0/1.
               (CT.nii.gz and PET.nii.gz, the unresampled originals, are not used.)
    hecktor22: root/imagesTr/<Centre>-<NNN>__CT.nii.gz, <Centre>-<NNN>__PT.nii.gz,
               root/labelsTr/<Centre>-<NNN>.nii.gz  (0 background, 1 GTVp, 2 GTVn; CT grid)

Input modality is an option, `modality: ct | pet | ct+pet` (Table 14 reports CT and PET apart):
part of the fingerprint, so of every cache key and run record. ct+pet gives two grey images per
slice, encoded separately, features concatenated (as MSD's multi-modal MRI). HECKTOR's PET is on
its own (coarser) grid: it is resampled linearly onto the CT/label grid (the challenge's
registration step; the files are already co-registered in world space).

Intensity (uint8 for the encoder): CT windowed to `ct_window` HU (soft tissue by default), PET
SUV clipped to [0, suv_max] (lesion uptake is a few SUV; 10 keeps its contrast).

Split: 80/20 train/test over patients, seeded by the dataset seed (`split_seed` of the sweep; the
paper states 80/20 but not the draw); val is carved from train patient-wise with `val_fraction`.
The grid seed then varies the head only. Volumes are canonical (RAS), as MSD's.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import ClassVar

import numpy as np
import pandas as pd

from tasks.datasets.base import Problem, Report, carve_val, fresh_root, make_index, register_dataset
from tasks.datasets.dense_base import DenseDataset
from tasks.datasets.msd import (
    blob_volume,
    canonical_slices,
    read_canonical,
    to_label_map,
    window_ct,
    write_nifti,
)
from tasks.dense import Sample
from tasks.errors import ConfigError, DatasetError

MODALITIES = ("ct", "pet", "ct+pet")


class PETCTDataset(DenseDataset):
    target_kind = "mask3d"
    task = "multiclass"
    kind = "volume"
    image_suffix = ".nii.gz"
    warmup_fraction: ClassVar[float] = 0.05  # the paper: linear warm-up, then cosine, on PET/CT
    test_fraction: ClassVar[float] = 0.2

    def __init__(self, root: str | os.PathLike, val_fraction: float = 0.1, seed: int = 0,
                 modality: str = "ct+pet", ct_window: tuple[float, float] = (-160.0, 240.0),
                 suv_max: float = 10.0):
        super().__init__(root, val_fraction, seed)
        if modality not in MODALITIES:
            raise ConfigError(f"modality must be one of {', '.join(MODALITIES)}, got {modality!r}")
        lo, hi = (float(v) for v in ct_window)
        if not hi > lo:
            raise ConfigError(f"ct_window must be (low, high) with high > low, got {ct_window}")
        if not float(suv_max) > 0:
            raise ConfigError(f"suv_max must be > 0, got {suv_max}")
        self.modality, self.ct_window, self.suv_max = modality, (lo, hi), float(suv_max)
        self.n_modalities = 2 if modality == "ct+pet" else 1  # instance value: OnlineFeatures reads it

    def fingerprint(self) -> str:
        base = super().fingerprint()
        return hashlib.sha256(f"{base} modality={self.modality} ct={self.ct_window} suv={self.suv_max} "
                              f"test={self.test_fraction}".encode()).hexdigest()

    # -- what each layout says ------------------------------------------------------------------
    def _cases(self, report: Report) -> list[tuple[str, str, dict[str, str]]]:
        """(case_id, patient_id, {ct, pet, seg: path})."""
        raise NotImplementedError

    def _load(self, report: Report) -> pd.DataFrame | None:
        cases = self._cases(report)
        if not cases:
            report.add(self.root, f"no cases found in the {self.name} layout")
            return None
        self._paths = {cid: paths for cid, _, paths in cases}
        pats = sorted({p for _, p, _ in cases})
        order = np.random.default_rng(self.seed).permutation(len(pats))
        n_test = max(1, round(self.test_fraction * len(pats)))
        test = {pats[i] for i in order[:n_test]}
        val = carve_val([p for p in pats if p not in test], self.val_fraction, self.seed)
        split = {p: "test" if p in test else "val" if p in val else "train" for p in pats}
        return make_index([c for c, _, _ in cases], [p["seg"] for _, _, p in cases],
                          [split[p] for _, p, _ in cases], [p for _, p, _ in cases], [[] for _ in cases])

    layout_dirs: ClassVar[tuple[str, ...]] = ()

    def layout_problems(self) -> list[Problem]:
        """The fast pre-sweep check: the root and the layout's directories exist."""
        return super().layout_problems() or [Problem(str(self.root / d), f"missing {d}/ of the {self.name} layout")
                                             for d in self.layout_dirs if not (self.root / d).is_dir()]

    def paths(self, case_id: str) -> dict[str, str]:
        if not hasattr(self, "_paths"):
            self.index()
        return self._paths[case_id]

    def n_slices(self, case_id: str) -> int:
        return canonical_slices(self.paths(case_id)["seg"])

    def read_sample(self, case_id: str) -> Sample:
        import nibabel as nib
        from nibabel.processing import resample_from_to

        p = self.paths(case_id)
        lab, geo = read_canonical(p["seg"], "label volume")
        grid = nib.as_closest_canonical(nib.load(p["seg"]))
        images = []
        for mod in ("ct", "pet"):
            if mod not in self.modality:
                continue
            vol, g = read_canonical(p[mod], f"{mod.upper()} volume")
            if vol.shape != lab.shape or not np.allclose(g["canonical_affine"], geo["canonical_affine"], atol=1e-3):
                try:  # a different grid (HECKTOR's PET): resample onto the label grid in world space
                    src = nib.as_closest_canonical(nib.load(p[mod]))
                    res = resample_from_to(src, (grid.shape[:3], grid.affine), order=1)
                    vol = np.ascontiguousarray(np.asarray(res.dataobj, dtype=np.float32).transpose(2, 1, 0))
                except Exception as e:  # noqa: BLE001
                    raise DatasetError(p[mod], f"cannot resample onto the label grid: {e}") from e
            images.append(window_ct(vol, *self.ct_window) if mod == "ct" else
                          np.clip(np.rint(vol * (255.0 / self.suv_max)), 0, 255).astype(np.uint8))
        return Sample(case_id, np.stack(images), to_label_map(lab, len(self.classes), p["seg"]),
                      spacing=geo["spacing"], unit="mm", affine=geo["affine"],
                      meta={"path": p["seg"], "label_path": p["seg"], "to_file_ornt": geo["to_file_ornt"],
                            "canonical_affine": geo["canonical_affine"], "file_shape": geo["file_shape"],
                            "modality": self.modality})

    def read_image(self, path: str | os.PathLike) -> np.ndarray:
        """The middle axial slice of the label volume (a preview; `check` reads whole samples)."""
        vol, _ = read_canonical(path, "label volume")
        return (vol[vol.shape[0] // 2] > 0).astype(np.uint8) * 255

    @staticmethod
    def _pet_ct(rng: np.random.Generator, shape: tuple[int, int, int], n_classes: int) -> tuple[np.ndarray, ...]:
        """(label, CT HU, PET SUV): lesions bright in both (hot and dense), learnable from either."""
        label, ct = blob_volume(rng, shape, n_classes, "CT")
        suv = np.clip(rng.normal(1.0, 0.3, shape) + 5.0 * (label > 0) + 2.0 * (label > 1), 0, None)
        return label, ct, suv.astype(np.float32)


@register_dataset
class AutoPET2(PETCTDataset):
    name = "autopet2"
    classes = ("lesion",)
    ROOT: ClassVar[str] = "FDG-PET-CT-Lesions"
    layout_dirs = (ROOT,)

    def _image_dirs(self) -> list[Path]:
        return sorted(p for p in (self.root / self.ROOT).glob("PETCT_*/*") if p.is_dir())

    def _cases(self, report: Report) -> list[tuple[str, str, dict[str, str]]]:
        base = self.root / self.ROOT
        if not base.is_dir():
            report.add(base, "missing FDG-PET-CT-Lesions/ (the AutoPET-II NIfTI release)")
            return []
        out = []
        for study in self._image_dirs():
            if study.name.startswith("._"):
                continue
            paths = {"ct": study / "CTres.nii.gz", "pet": study / "SUV.nii.gz", "seg": study / "SEG.nii.gz"}
            missing = [p.name for p in paths.values() if not p.is_file()]
            if missing:
                report.add(study, f"study lacks {', '.join(missing)}")
                continue
            out.append((f"{study.parent.name}__{study.name}", study.parent.name, {k: str(v) for k, v in paths.items()}))
        return out

    @classmethod
    def synth(cls, root: str | os.PathLike, n: int = 12, seed: int = 0, image_size: int = 32,
              n_slices: int = 8) -> Path:
        root = fresh_root(root)
        rng = np.random.default_rng(seed)
        affine = np.diag([2.0, 2.0, 3.0, 1.0])
        for i in range(n):
            study = Path(root) / cls.ROOT / f"PETCT_{i:010x}" / f"0{i % 9 + 1}-0{i % 7 + 1}-2002-NA-PET-CT"
            study.mkdir(parents=True, exist_ok=True)
            label, ct, suv = cls._pet_ct(rng, (image_size, image_size, n_slices), 1)
            write_nifti(study / "CTres.nii.gz", ct, affine)
            write_nifti(study / "SUV.nii.gz", suv, affine)
            write_nifti(study / "SEG.nii.gz", label.astype(np.uint8), affine)
        return root


@register_dataset
class HECKTOR22(PETCTDataset):
    name = "hecktor22"
    classes = ("GTVp", "GTVn")
    layout_dirs = ("imagesTr", "labelsTr")

    def _image_dirs(self) -> list[Path]:
        return [d for d in (self.root / "imagesTr", self.root / "labelsTr") if d.is_dir()]

    def _cases(self, report: Report) -> list[tuple[str, str, dict[str, str]]]:
        labels = self.root / "labelsTr"
        if not labels.is_dir():
            report.add(labels, "missing labelsTr/ (the HECKTOR 2022 training release)")
            return []
        out = []
        for lab in sorted(labels.glob("*.nii.gz")):
            if lab.name.startswith("._"):
                continue
            cid = lab.name.removesuffix(".nii.gz")
            paths = {"ct": self.root / "imagesTr" / f"{cid}__CT.nii.gz",
                     "pet": self.root / "imagesTr" / f"{cid}__PT.nii.gz", "seg": lab}
            missing = [p.name for k, p in paths.items() if k != "seg" and not p.is_file()]
            if missing:
                report.add(lab, f"case {cid} lacks {', '.join(missing)} in imagesTr/")
                continue
            out.append((cid, cid, {k: str(v) for k, v in paths.items()}))
        return out

    @classmethod
    def synth(cls, root: str | os.PathLike, n: int = 12, seed: int = 0, image_size: int = 32,
              n_slices: int = 8) -> Path:
        """CT and labels on one grid; PET on a coarser grid (half the in-plane voxels), as released."""
        from scipy.ndimage import zoom

        root = fresh_root(root)
        rng = np.random.default_rng(seed)
        (Path(root) / "imagesTr").mkdir(parents=True, exist_ok=True)
        (Path(root) / "labelsTr").mkdir(parents=True, exist_ok=True)
        ct_aff = np.diag([1.0, 1.0, 3.0, 1.0])
        pt_aff = np.diag([2.0, 2.0, 3.0, 1.0])
        pt_aff[:3, 3] = (0.5, 0.5, 0.0)  # voxel centres of the 2 mm grid over the 1 mm one
        centres = ("CHUM", "CHUP", "HGJ", "MDA")
        for i in range(n):
            cid = f"{centres[i % len(centres)]}-{i:03d}"
            label, ct, suv = cls._pet_ct(rng, (image_size, image_size, n_slices), 2)
            write_nifti(Path(root) / "imagesTr" / f"{cid}__CT.nii.gz", ct, ct_aff)
            write_nifti(Path(root) / "imagesTr" / f"{cid}__PT.nii.gz",
                        zoom(suv, (0.5, 0.5, 1.0), order=1).astype(np.float32), pt_aff)
            write_nifti(Path(root) / "labelsTr" / f"{cid}.nii.gz", label.astype(np.uint8), ct_aff)
        return root
