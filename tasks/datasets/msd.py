"""Medical Segmentation Decathlon (MSD): ten 3D segmentation tasks, 5-fold CV on the training set.

Published layout (one directory per task; root = that directory or the directory holding it):

    Task09_Spleen/dataset.json      {"modality": {"0": "CT"}, "labels": {"0": "background", "1": "spleen"},
                                     "training": [{"image": "./imagesTr/spleen_2.nii.gz",
                                                   "label": "./labelsTr/spleen_2.nii.gz"}, ...], ...}
    Task09_Spleen/imagesTr/*.nii.gz  3D volumes; 4D (x, y, z, modality) for BrainTumour (4) and Prostate (2)
    Task09_Spleen/labelsTr/*.nii.gz  label maps on the image grid

The release tarballs carry macOS resource forks (`._spleen_2.nii.gz`): names starting with `._`
are ignored. Only `training` cases have labels; `imagesTs` is not used.

Geometry: volumes are brought to the closest canonical orientation (RAS, nibabel
`as_closest_canonical`) and handed to heads as (z, y, x): axial slices along the first axis, the
spacing per array axis in mm. The Sample keeps the file's own affine plus the reorientation, so a
prediction is written back on the file's grid (tasks/targets/mask3d.py).

Intensity for the encoder (part of the fingerprint): CT is windowed (`ct_window`, HU; an abdominal
soft-tissue window by default, a lung window for Task06) and MRI is scaled per volume and modality
between the `mri_percentiles` of its non-zero voxels (skull-stripped BraTS has a zero background).
Multi-modal volumes: each modality is a grey image of its own; the features are concatenated.

Protocol (the paper, after the medical SSL works): 5-fold cross-validation over patients; within a
fold, 80/20 train/val (`fold_val_fraction`); the grid seed is the fold (seed % cv_folds), so folds
re-encode nothing and a sweep over seeds 0-4 is the whole CV.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pandas as pd

from tasks.datasets.base import LayoutFile, Report, carve_val, fresh_root, make_index, register_dataset
from tasks.datasets.dense_base import DenseDataset
from tasks.dense import Sample
from tasks.errors import ConfigError, DatasetError

ABDOMEN_WINDOW = (-175.0, 250.0)  # SwinUNETR/UNETR's MSD CT preprocessing
LUNG_WINDOW = (-1000.0, 400.0)


# -- NIfTI in canonical orientation (shared with tasks/datasets/petct.py) -------------------------

def read_canonical(path: str | os.PathLike, what: str = "volume") -> tuple[np.ndarray, dict[str, Any]]:
    """A NIfTI volume as a float32 array (z, y, x[, m]) in the closest canonical (RAS) orientation,
    with its geometry: spacing (z, y, x) mm, the file's affine, and the orientation transform that
    takes a canonical (x, y, z) array back to the file's axes. DatasetError names the file."""
    import nibabel as nib

    path = str(path)
    try:
        img = nib.load(path)
        if len(img.shape) not in (3, 4):
            raise DatasetError(path, f"expected a 3D or 4D {what}, got shape {img.shape}")
        can = nib.as_closest_canonical(img)
        data = np.asarray(can.dataobj, dtype=np.float32)
    except DatasetError:
        raise
    except FileNotFoundError:
        raise DatasetError(path, f"{what} file is missing") from None
    except Exception as e:  # noqa: BLE001 - nibabel/gzip/zlib raise many types for a broken file
        raise DatasetError(path, f"cannot read NIfTI {what}: {type(e).__name__}: {e}") from e
    zooms = [float(z) for z in can.header.get_zooms()[:3]]
    back = nib.orientations.ornt_transform(nib.orientations.axcodes2ornt(("R", "A", "S")),
                                           nib.orientations.io_orientation(img.affine))
    arr = np.moveaxis(data, (0, 1, 2), (2, 1, 0)) if data.ndim == 3 else data.transpose(2, 1, 0, 3)
    return np.ascontiguousarray(arr), {"spacing": (zooms[2], zooms[1], zooms[0]),
                                       "affine": np.asarray(img.affine, dtype=np.float64),
                                       "canonical_affine": np.asarray(can.affine, dtype=np.float64),
                                       "to_file_ornt": back, "file_shape": tuple(int(s) for s in img.shape[:3])}


def canonical_slices(path: str | os.PathLike) -> int:
    """Axial slices of a volume in canonical orientation, from its header only (no pixel read)."""
    import nibabel as nib

    path = str(path)
    try:
        img = nib.load(path)
    except FileNotFoundError:
        raise DatasetError(path, "volume file is missing") from None
    except Exception as e:  # noqa: BLE001
        raise DatasetError(path, f"cannot read NIfTI header: {type(e).__name__}: {e}") from e
    ornt = nib.orientations.io_orientation(img.affine)
    return int(img.shape[int(np.flatnonzero(ornt[:, 0] == 2)[0])])


def window_ct(hu: np.ndarray, lo: float, hi: float) -> np.ndarray:
    return np.clip(np.rint((hu - lo) * (255.0 / (hi - lo))), 0, 255).astype(np.uint8)


def scale_percentiles(x: np.ndarray, lo_pct: float, hi_pct: float) -> np.ndarray:
    """MRI (or PET) to uint8 between two percentiles of the non-zero voxels (all voxels when none)."""
    nz = x[x != 0]
    ref = nz if nz.size else x.ravel()
    lo, hi = np.percentile(ref, [lo_pct, hi_pct]) if ref.size else (0.0, 1.0)
    hi = hi if hi > lo else lo + 1.0
    return np.clip(np.rint((x - lo) * (255.0 / (hi - lo))), 0, 255).astype(np.uint8)


def to_label_map(arr: np.ndarray, n_classes: int, path: str) -> np.ndarray:
    lab = np.rint(arr).astype(np.int64)
    if lab.min() < 0 or lab.max() > n_classes:
        raise DatasetError(path, f"label values {sorted(np.unique(lab).tolist())[:8]} outside 0..{n_classes}")
    return lab


# -- synthetic volumes (shared with tasks/datasets/petct.py) --------------------------------------

def write_nifti(path: Path, data: np.ndarray, affine: np.ndarray) -> None:
    import nibabel as nib

    nib.save(nib.Nifti1Image(data, affine), str(path))


def blob_volume(rng: np.random.Generator, shape: tuple[int, int, int], n_classes: int, modality: str,
                n_modalities: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """(label, image) arrays (x, y, z[, m]): an ellipsoid of class 1 (radius ~ a quarter of the
    plane, a few slices), class k nested inside class k-1, brighter per class, on noise. CT in HU;
    MRI in arbitrary units with modality m's contrast flipped for odd m (as T2 vs ADC)."""
    nx, ny, nz = shape
    x, y, z = np.meshgrid(np.arange(nx), np.arange(ny), np.arange(nz), indexing="ij")
    cx, cy = rng.uniform(0.35, 0.65, 2) * (nx, ny)
    cz = rng.uniform(0.3, 0.7) * nz
    r = rng.uniform(0.2, 0.3) * min(nx, ny)
    rz = max(1.5, 0.3 * nz)
    d = ((x - cx) / r) ** 2 + ((y - cy) / r) ** 2 + ((z - cz) / rz) ** 2
    label = np.zeros(shape, dtype=np.int64)
    for k in range(n_classes):
        label[d <= (1.0 - 0.3 * k) ** 2] = k + 1
    if modality == "CT":
        img = rng.normal(-60.0, 25.0, shape) + 90.0 * label
        return label, img.astype(np.float32)
    chans = []
    for m in range(n_modalities):
        base = rng.normal(100.0, 10.0, shape) + 60.0 * label * (1 if m % 2 == 0 else -1)
        chans.append(np.clip(base, 1.0, None))
    img = chans[0] if n_modalities == 1 else np.stack(chans, axis=-1)
    return label, img.astype(np.float32)


# -- the dataset ----------------------------------------------------------------------------------

class MSDDataset(DenseDataset):
    """One MSD task. Subclasses set name, task_dir, classes, n_modalities, modality ("CT" | "MRI")."""

    target_kind = "mask3d"
    task = "multiclass"
    kind = "volume"
    image_suffix = ".nii.gz"
    carves_val = False  # the split is per cell (cell_splits); the index's split is fold 0's
    task_dir: ClassVar[str] = ""
    modality: ClassVar[str] = "CT"
    default_window: ClassVar[tuple[float, float]] = ABDOMEN_WINDOW
    warmup_fraction: ClassVar[float] = 0.0  # the paper: cosine without warm-up on MSD

    def __init__(self, root: str | os.PathLike, val_fraction: float = 0.1, seed: int = 0,
                 ct_window: tuple[float, float] | None = None, mri_percentiles: tuple[float, float] = (0.5, 99.5),
                 cv_folds: int = 5, fold_val_fraction: float = 0.2):
        super().__init__(root, val_fraction, seed)
        if (self.root / self.task_dir).is_dir():  # the directory holding TaskNN_Name/ works too
            self.root = self.root / self.task_dir
        lo, hi = (float(v) for v in (ct_window or self.default_window))
        if not hi > lo:
            raise ConfigError(f"ct_window must be (low, high) with high > low, got {ct_window}")
        plo, phi = (float(v) for v in mri_percentiles)
        if not 0 <= plo < phi <= 100:
            raise ConfigError(f"mri_percentiles must be 0 <= low < high <= 100, got {mri_percentiles}")
        if not isinstance(cv_folds, int) or cv_folds < 2:
            raise ConfigError(f"cv_folds must be an integer >= 2, got {cv_folds!r}")
        if not 0 < float(fold_val_fraction) < 1:
            raise ConfigError(f"fold_val_fraction must be in (0, 1), got {fold_val_fraction}")
        self.ct_window, self.mri_percentiles = (lo, hi), (plo, phi)
        self.cv_folds, self.fold_val_fraction = cv_folds, float(fold_val_fraction)
        self.files = (LayoutFile("dataset.json", f"dataset.json of {self.task_dir} (from the MSD release)",
                                 split=True),)

    def intensity_identity(self) -> dict:
        if self.modality == "CT":
            return {"ct_window": list(self.ct_window)}
        return {"mri_percentiles": list(self.mri_percentiles), "nonzero": True}

    def fingerprint(self) -> str:
        # The intensity mapping and the CV scheme change features or splits: part of the identity.
        base = super().fingerprint()
        extra = json.dumps({**self.intensity_identity(), "folds": self.cv_folds,
                            "fold_val": self.fold_val_fraction}, sort_keys=True)
        return hashlib.sha256(f"{base} {extra}".encode()).hexdigest()

    def _image_dirs(self) -> list[Path]:
        return [d for d in (self.root / "imagesTr", self.root / "labelsTr") if d.is_dir()]

    def _image_listing(self) -> list[tuple[str, int]]:
        return [(rel, size) for rel, size in super()._image_listing() if not Path(rel).name.startswith("._")]

    # -- index ----------------------------------------------------------------------------------
    def _load(self, report: Report) -> pd.DataFrame | None:
        path = self._file("dataset.json", report)
        if path is None:
            return None
        try:
            meta = json.loads(path.read_text())
            training = meta["training"]
            labels, modality = meta["labels"], meta["modality"]
        except (ValueError, KeyError, TypeError) as e:
            report.add(path, f"cannot parse dataset.json (needs training, labels, modality): {e}")
            return None
        if len(labels) - 1 != len(self.classes):
            report.add(path, f"{len(labels) - 1} foreground labels {labels}, expected {len(self.classes)} "
                             f"({', '.join(self.classes)}) for {self.task_dir}")
        if len(modality) != self.n_modalities:
            report.add(path, f"{len(modality)} modalities {modality}, expected {self.n_modalities}")
        rows = []
        for i, item in enumerate(training):
            try:
                img, lab = (self.root / item[k].removeprefix("./") for k in ("image", "label"))
            except (KeyError, TypeError, AttributeError):
                report.add(path, f"training entry {i} needs 'image' and 'label' paths, got {item!r}")
                continue
            if img.name.startswith("._"):
                continue
            rows.append((img.name.removesuffix(".nii.gz"), str(img), str(lab)))
        if not rows:
            return make_index([], [], [], [], [])
        self._labels = {cid: lab for cid, _, lab in rows}
        cids = [r[0] for r in rows]
        splits, _ = self._splits(cids, fold=0)
        return make_index(cids, [r[1] for r in rows], [splits[c] for c in cids], cids, [[] for _ in cids])

    def label_path(self, case_id: str) -> str:
        if not hasattr(self, "_labels"):
            self.index()
        return self._labels[case_id]

    # -- splits ---------------------------------------------------------------------------------
    def _splits(self, case_ids: list[str], fold: int) -> tuple[dict[str, str], str]:
        """Patient-level K-fold (one case per patient in MSD): fold `fold` is test; the rest is
        split 80/20 train/val with a seed of its own per fold. Depends only on the set of cases."""
        pats = sorted(set(case_ids))
        order = np.random.default_rng(self.seed).permutation(len(pats))
        folds = np.array_split(np.asarray(pats, dtype=object)[order], self.cv_folds)
        test = set(folds[fold].tolist())
        rest = [p for p in pats if p not in test]
        val = carve_val(rest, self.fold_val_fraction, seed=self.seed * 1000 + fold + 1)
        split = {p: "test" if p in test else "val" if p in val else "train" for p in pats}
        return {c: split[c] for c in case_ids}, f"cv{self.cv_folds}-fold{fold}"

    def cell_splits(self, seed: int) -> tuple[dict[str, str], str]:
        """The grid seed is the fold: seed k tests on fold k % cv_folds."""
        cids = self.index()["case_id"].astype(str).tolist()
        return self._splits(cids, int(seed) % self.cv_folds)

    # -- samples --------------------------------------------------------------------------------
    def to_uint8(self, vol: np.ndarray) -> np.ndarray:
        if self.modality == "CT":
            return window_ct(vol, *self.ct_window)
        return scale_percentiles(vol, *self.mri_percentiles)

    def n_slices(self, case_id: str) -> int:
        return canonical_slices(self.row(case_id)["path"])

    def read_sample(self, case_id: str) -> Sample:
        path = str(self.row(case_id)["path"])
        vol, geo = read_canonical(path, "image")
        vol = vol[..., None] if vol.ndim == 3 else vol
        if vol.shape[-1] != self.n_modalities:
            raise DatasetError(path, f"{vol.shape[-1]} modalities, expected {self.n_modalities}")
        images = np.stack([self.to_uint8(vol[..., m]) for m in range(self.n_modalities)])
        lpath = self.label_path(case_id)
        lab, lgeo = read_canonical(lpath, "label volume")
        if lab.shape != images.shape[1:]:
            raise DatasetError(lpath, f"label volume shape {lab.shape} does not match the image {images.shape[1:]}")
        return Sample(case_id, images, to_label_map(lab, len(self.classes), lpath), spacing=geo["spacing"],
                      unit="mm", affine=geo["affine"],
                      meta={"path": path, "label_path": lpath, "to_file_ornt": geo["to_file_ornt"],
                            "canonical_affine": geo["canonical_affine"], "file_shape": geo["file_shape"]})

    def read_image(self, path: str | os.PathLike) -> np.ndarray:
        """The middle axial slice of the first modality (a preview; `check` reads whole samples)."""
        vol, _ = read_canonical(path, "image")
        vol = vol if vol.ndim == 3 else vol[..., 0]
        return self.to_uint8(vol[vol.shape[0] // 2])

    # -- synthetic data -------------------------------------------------------------------------
    @classmethod
    def synth(cls, root: str | os.PathLike, n: int = 12, seed: int = 0, image_size: int = 32,
              n_slices: int = 8) -> Path:
        """A small task in the MSD layout: anisotropic voxels, a non-canonical (LPS) affine, and
        per class a bright ellipsoid (one inside another for a second class) the encoder sees."""
        root = fresh_root(root)
        d = root / cls.task_dir
        (d / "imagesTr").mkdir(parents=True, exist_ok=True)
        (d / "labelsTr").mkdir(parents=True, exist_ok=True)
        rng = np.random.default_rng(seed)
        stem = cls.task_dir.split("_", 1)[1].lower()
        affine = np.diag([-0.8, -0.8, 2.5, 1.0])  # LPS-like, as DICOM-converted files often are
        affine[:3, 3] = (10.0, 20.0, -30.0)
        training = []
        for i in range(n):
            label, img = blob_volume(rng, (image_size, image_size, n_slices), len(cls.classes), cls.modality,
                                     cls.n_modalities)
            name = f"{stem}_{i + 1}.nii.gz"
            write_nifti(d / "imagesTr" / name, img, affine)
            write_nifti(d / "labelsTr" / name, label.astype(np.uint8), affine)
            training.append({"image": f"./imagesTr/{name}", "label": f"./labelsTr/{name}"})
        (d / "imagesTr" / f"._{stem}_1.nii.gz").write_bytes(b"\x00\x05\x16\x07 resource fork")
        modality = ({"0": "CT"} if cls.modality == "CT" else
                    {str(m): f"MRI{m}" for m in range(cls.n_modalities)})
        meta = {"name": cls.task_dir.split("_", 1)[1], "tensorImageSize": "4D" if cls.n_modalities > 1 else "3D",
                "modality": modality, "labels": {"0": "background", **{str(k + 1): c for k, c in enumerate(cls.classes)}},
                "numTraining": n, "numTest": 0, "training": training, "test": []}
        (d / "dataset.json").write_text(json.dumps(meta, indent=1))
        return root


def _msd(name: str, task_dir: str, classes: tuple[str, ...], modality: str = "CT", n_modalities: int = 1,
         window: tuple[float, float] = ABDOMEN_WINDOW) -> type[MSDDataset]:
    cls = type(task_dir, (MSDDataset,), {"name": name, "task_dir": task_dir, "classes": classes,
                                         "modality": modality, "n_modalities": n_modalities,
                                         "default_window": window, "__module__": __name__,
                                         "__doc__": f"MSD {task_dir} ({modality}): {', '.join(classes)}."})
    globals()[task_dir] = cls  # importable by its class path: Ray workers rebuild datasets that way
    return register_dataset(cls)


# Label names as in each task's dataset.json of the release.
MSDBrain = _msd("msd_brain", "Task01_BrainTumour", ("edema", "non-enhancing tumor", "enhancing tumour"), "MRI", 4)
MSDHeart = _msd("msd_heart", "Task02_Heart", ("left atrium",), "MRI")
MSDLiver = _msd("msd_liver", "Task03_Liver", ("liver", "cancer"))
MSDHippocampus = _msd("msd_hippocampus", "Task04_Hippocampus", ("Anterior", "Posterior"), "MRI")
MSDProstate = _msd("msd_prostate", "Task05_Prostate", ("PZ", "TZ"), "MRI", 2)
MSDLung = _msd("msd_lung", "Task06_Lung", ("cancer",), window=LUNG_WINDOW)
MSDPancreas = _msd("msd_pancreas", "Task07_Pancreas", ("pancreas", "cancer"))
MSDHepaticVessel = _msd("msd_hepatic_vessel", "Task08_HepaticVessel", ("Vessel", "Tumour"))
MSDSpleen = _msd("msd_spleen", "Task09_Spleen", ("spleen",))
MSDColon = _msd("msd_colon", "Task10_Colon", ("colon cancer primaries",))
MSD_DATASETS = (MSDBrain, MSDHeart, MSDLiver, MSDHippocampus, MSDProstate, MSDLung, MSDPancreas,
                MSDHepaticVessel, MSDSpleen, MSDColon)
