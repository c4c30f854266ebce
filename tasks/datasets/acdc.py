"""ACDC (Bernard et al., IEEE TMI 2018): cine cardiac MRI of 150 patients, ED and ES frames with RV (1),
myocardium (2) and LV cavity (3) labels. Registration pairs: per patient, moving = ED, fixed = ES.

Layout, read in place: `training/` (100 patients) and `testing/` (50) hold `patientNNN/Info.cfg`
(`ED: n`, `ES: n`, `Group`, `Height`, `NbFrame`, `Weight`) and `patientNNN_frameNN.nii.gz` with
`patientNNN_frameNN_gt.nii.gz`. Splits (the paper's 80/20/50 patients): `testing/` is test; val is
20% of `training/` stratified by `Group` (4 of each of the 5 groups on the full set), drawn with the
dataset seed (the release has no validation split).

Preprocessing (the paper's): resampled to `spacing` (z, y, x) = (3.15, 1.5, 1.5) mm (linear for
images, nearest for labels), cropped to `crop` (32, 128, 128) voxels centred on the ED myocardium
(one window for both frames of a patient, so identity is still identity), zero-padded where the
window leaves the volume, intensities linearly to [-1, 1] per frame (`Sample.raw`; `images` is the
same as uint8 for the encoder). Arrays are (z, y, x); `Sample.affine` maps NIfTI (x, y, z) voxel
indices of the cropped grid to the world, so predictions written as (x, y, z) open over the image.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import ClassVar

import numpy as np
import pandas as pd

from tasks.datasets.base import Problem, Report, fresh_root, make_index, register_dataset
from tasks.datasets.dense_base import DenseDataset
from tasks.dense import Pair, Sample
from tasks.errors import ConfigError, DatasetError

GROUPS = ("DCM", "HCM", "MINF", "NOR", "RV")
VAL_FRACTION = 0.2  # 20 of the 100 training patients (the paper's 80/20)
_CASE = re.compile(r"^(patient\d{3})_(ED|ES)$")


def read_nifti(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray, tuple[float, ...]]:
    """(data (x, y, z) float32, affine, zooms); DatasetError names an unreadable file."""
    import nibabel as nib

    if not os.path.isfile(path):
        raise DatasetError(str(path), "file is missing")
    try:
        img = nib.load(str(path))
        data = np.asarray(img.dataobj, dtype=np.float32)
    except Exception as e:  # noqa: BLE001 - nibabel raises several types for a corrupt file
        raise DatasetError(str(path), f"cannot read NIfTI: {type(e).__name__}: {e}") from e
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise DatasetError(str(path), f"expected a 3D volume, got shape {data.shape}")
    return data, img.affine, tuple(float(z) for z in img.header.get_zooms()[:3])


def read_info(path: Path) -> dict[str, str]:
    out = {}
    for line in path.read_text().splitlines():
        if ":" in line:
            k, v = line.split(":", 1)
            out[k.strip()] = v.strip()
    return out


@register_dataset
class ACDC(DenseDataset):
    name: ClassVar[str] = "acdc"
    task: ClassVar[str] = "registration"
    kind: ClassVar[str] = "volume"
    target_kind: ClassVar[str] = "pairs"
    classes: ClassVar[tuple[str, ...]] = ("RV", "myocardium", "LV")
    carves_val: ClassVar[bool] = False
    image_suffix: ClassVar[str] = ".nii.gz"
    missing_item = "image of a listed patient is missing"

    def __init__(self, root: str | os.PathLike, val_fraction: float = 0.1, seed: int = 0,
                 spacing: tuple[float, float, float] = (3.15, 1.5, 1.5), crop: tuple[int, int, int] = (32, 128, 128)):
        super().__init__(root, val_fraction, seed)
        self.spacing = tuple(float(s) for s in spacing)
        self.crop = tuple(int(c) for c in crop)
        if len(self.spacing) != 3 or len(self.crop) != 3 or min(self.spacing) <= 0 or min(self.crop) < 1:
            raise ConfigError(f"acdc: spacing and crop are positive (z, y, x) triples, got {spacing}, {crop}")
        self._windows: dict[str, np.ndarray] = {}

    def _split_identity(self) -> dict:
        return {"seed": self.seed, "val_fraction": VAL_FRACTION, "spacing": self.spacing, "crop": self.crop}

    def _image_dirs(self) -> list[Path]:
        return sorted(p for d in ("training", "testing") for p in (self.root / d).glob("patient*") if p.is_dir())

    def layout_problems(self) -> list[Problem]:
        problems = super().layout_problems()
        if not problems and not (self.root / "training").is_dir():
            problems.append(Problem(str(self.root / "training"), "missing ACDC training/ directory"))
        return problems

    def n_slices(self, case_id: str) -> int:
        return self.crop[0]

    # -- layout -------------------------------------------------------------------------------------
    def _load(self, report: Report) -> pd.DataFrame | None:
        if not (self.root / "training").is_dir():
            report.add(self.root / "training", "missing ACDC training/ directory (patientNNN folders)")
            return None
        rows, groups = [], {}
        for pdir in self._image_dirs():
            pid, where = pdir.name, pdir.parent.name
            cfg = pdir / "Info.cfg"
            if not cfg.is_file():
                report.add(cfg, "missing Info.cfg (ED and ES frame numbers)")
                continue
            info = read_info(cfg)
            try:
                frames = {k: int(info[k]) for k in ("ED", "ES")}
            except (KeyError, ValueError):
                report.add(cfg, f"needs integer 'ED:' and 'ES:' lines, got {info}")
                continue
            groups[pid] = (where, info.get("Group", ""))
            for inst, fr in frames.items():
                path = pdir / f"{pid}_frame{fr:02d}.nii.gz"
                rows.append([f"{pid}_{inst}", str(path), "test" if where == "testing" else "train", pid, [1, 1, 1]])
        val = self._val_patients({p: g for p, (w, g) in groups.items() if w == "training"})
        for r in rows:
            if r[3] in val:
                r[2] = "val"
        if not rows:
            return make_index([], [], [], [], [])
        return make_index(*zip(*rows, strict=True))

    def _val_patients(self, groups: dict[str, str]) -> set[str]:
        """round(20%) of the training patients (at least one of two or more), stratified by Group:
        patients shuffled within each group (dataset seed), then taken round-robin over groups."""
        rng = np.random.default_rng(self.seed)
        per = [[p for p in np.array(sorted(p for p, gg in groups.items() if gg == g))[rng.permutation(
            sum(1 for gg in groups.values() if gg == g))]] for g in sorted(set(groups.values()))]
        order = [q[i] for i in range(max(map(len, per), default=0)) for q in per if i < len(q)]
        k = max(1, round(VAL_FRACTION * len(order))) if len(order) >= 2 else 0
        return set(order[:k])

    # -- samples and pairs --------------------------------------------------------------------------
    def _window(self, pid: str, ed_gt: str) -> np.ndarray:
        """Start of the crop (z, y, x) in resampled voxels: centred on the ED myocardium."""
        if pid not in self._windows:
            gt, _, zooms = read_nifti(ed_gt)
            myo = np.argwhere(np.rint(gt) == 2)
            if len(myo) == 0:
                raise DatasetError(ed_gt, "no myocardium (label 2) to centre the crop on")
            centre = myo.mean(0)[::-1] * np.asarray(zooms[::-1]) / np.asarray(self.spacing)  # (z, y, x)
            self._windows[pid] = np.rint(centre - np.asarray(self.crop) / 2).astype(np.int64)
        return self._windows[pid]

    def _resample(self, data: np.ndarray, zooms: tuple[float, ...], start: np.ndarray, order: int) -> np.ndarray:
        """Resample (x, y, z) data to the (z, y, x) crop grid in one step (no full-size copy)."""
        from scipy import ndimage

        axes = [np.arange(c) + s for c, s in zip(self.crop, start, strict=True)]  # (z, y, x) new voxels
        grid = np.meshgrid(*axes, indexing="ij")
        coords = [grid[i] * self.spacing[i] / zooms[::-1][i] for i in range(3)]  # original (z, y, x) voxels
        vol = np.transpose(data, (2, 1, 0))
        return ndimage.map_coordinates(vol, coords, order=order, mode="constant", cval=np.nan if order else 0)

    def read_sample(self, case_id: str) -> Sample:
        m = _CASE.match(case_id)
        if not m:
            raise KeyError(f"{self.name}: no case {case_id!r}")
        pid = m.group(1)
        row = self.row(case_id)
        path = str(row["path"])
        gt_path = path.replace(".nii.gz", "_gt.nii.gz")
        ed_path = str(self.row(f"{pid}_ED")["path"])
        start = self._window(pid, ed_path.replace(".nii.gz", "_gt.nii.gz"))
        img, affine, zooms = read_nifti(path)
        gt, _, _ = read_nifti(gt_path)
        if gt.shape != img.shape:
            raise DatasetError(gt_path, f"label volume {gt.shape} does not match the image {img.shape}")
        labels = np.rint(gt).astype(np.int64)
        bad = sorted(set(np.unique(labels).tolist()) - {0, 1, 2, 3})
        if bad:
            raise DatasetError(gt_path, f"unexpected label values {bad}: ACDC labels are 0-3 (background, RV, "
                                        "myocardium, LV)")
        vol = self._resample(img, zooms, start, order=1)
        inside = np.isfinite(vol)
        lo, hi = (float(vol[inside].min()), float(vol[inside].max())) if inside.any() else (0.0, 1.0)
        raw = np.where(inside, (vol - lo) / max(hi - lo, 1e-12) * 2 - 1, -1.0).astype(np.float32)
        target = self._resample(labels.astype(np.float32), zooms, start, order=0).astype(np.int64)
        # NIfTI (x, y, z) index of the crop -> original voxel -> world.
        scale = np.diag([*(self.spacing[::-1][i] / zooms[i] for i in range(3)), 1.0])
        shift = np.eye(4)
        shift[:3, 3] = start[::-1]
        uint8 = np.clip(np.rint((raw + 1) * 127.5), 0, 255).astype(np.uint8)
        return Sample(case_id, uint8[None], target, spacing=self.spacing, unit="mm",
                      affine=affine @ scale @ shift, raw=raw,
                      meta={"path": path, "label_path": gt_path, "original_shape": list(img.shape),
                            "original_zooms": list(zooms)})

    def pairs(self, split: str | None = None) -> list[Pair]:
        idx = self.index()
        sub = idx if split is None else idx[idx["split"] == split]
        ids = set(sub["case_id"])
        return [Pair(pid, fixed=f"{pid}_ES", moving=f"{pid}_ED", split=s)
                for pid, s in sorted(set(zip(sub["patient_id"], sub["split"], strict=True)))
                if f"{pid}_ES" in ids and f"{pid}_ED" in ids]

    # -- synthetic data -----------------------------------------------------------------------------
    @classmethod
    def synth(cls, root: str | os.PathLike, n: int = 10, seed: int = 0, image_size: int = 48,
              n_test: int = 2, slices: int = 8) -> Path:
        """`n` patients (`n_test` of them under testing/) in the ACDC layout, (x, y, z) volumes of
        image_size^2 x `slices` at (2.0, 2.0, 6.0) mm. ED is drawn (LV cavity in a myocardial
        ring, RV crescent beside it, textured background); ES = ED warped by a known in-plane
        contraction (`tasks.targets.pairs.contraction_field`), saved as `synth_truth/<patient>.npy`
        ((z, y, x) components and order, original grid)."""
        import nibabel as nib

        from tasks.targets.pairs import contraction_field, warp_image, warp_labels

        root = fresh_root(root)
        (root / "synth_truth").mkdir()
        rng = np.random.default_rng(seed)
        zooms = (2.0, 2.0, 6.0)
        affine = np.diag([*zooms, 1.0])
        for i in range(n):
            pid = f"patient{i + 1:03d}"
            pdir = root / ("testing" if i >= n - n_test else "training") / pid
            pdir.mkdir(parents=True)
            ed, lab, centre = _draw_heart3d(slices, image_size, rng)
            u = contraction_field(ed.shape, centre, float(rng.uniform(0.25, 0.4)), 0.3 * image_size, axes=(1, 2))
            es, es_lab = warp_image(ed, u), warp_labels(lab, u)
            ed_f, es_f = 1, int(rng.integers(8, 14))
            (pdir / "Info.cfg").write_text(f"ED: {ed_f}\nES: {es_f}\nGroup: {GROUPS[i % 5]}\nHeight: 170.0\n"
                                           f"NbFrame: 30\nWeight: 70.0\n")
            for fr, img, gt in ((ed_f, ed, lab), (es_f, es, es_lab)):
                to_xyz = (2, 1, 0)
                nib.save(nib.Nifti1Image(np.transpose(img, to_xyz).astype(np.int16), affine),
                         str(pdir / f"{pid}_frame{fr:02d}.nii.gz"))
                nib.save(nib.Nifti1Image(np.transpose(gt, to_xyz).astype(np.uint8), affine),
                         str(pdir / f"{pid}_frame{fr:02d}_gt.nii.gz"))
            np.save(root / "synth_truth" / f"{pid}.npy", u)
        return root


def _draw_heart3d(s: int, size: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, tuple]:
    """(z, y, x) image (MRI-like intensities), labels (1 RV, 2 MYO, 3 LV) and the LV centre."""
    from scipy import ndimage

    zz, yy, xx = np.mgrid[:s, :size, :size].astype(np.float64)
    cy, cx = size * rng.uniform(0.45, 0.55), size * rng.uniform(0.5, 0.58)
    taper = 1.0 - 0.5 * np.abs(zz - s / 2) / s  # smaller towards apex and base
    r = np.hypot(yy - cy, xx - cx) / (0.13 * size * taper)
    lab = np.zeros((s, size, size), np.int64)
    lab[r < 1.5] = 2
    lab[r < 1.0] = 3
    rv = (np.hypot((yy - cy) / 1.3, xx - (cx - 0.27 * size)) < 0.14 * size * taper) & (lab == 0)
    lab[rv] = 1
    tex = ndimage.gaussian_filter(rng.random((s, size, size)), (0.5, 1.5, 1.5))
    img = 150 + 200 * tex + 60 * np.sin(yy / 4.0) * np.cos(xx / 6.0)
    img[lab == 2] -= 100
    img[(lab == 1) | (lab == 3)] += 250
    return np.clip(ndimage.gaussian_filter(img, (0.3, 0.7, 0.7)), 0, None), lab, (s / 2, cy, cx)
