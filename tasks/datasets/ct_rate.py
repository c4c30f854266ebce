"""CT-RATE (non-contrast chest CT volumes), 18 abnormalities, multilabel, the official split.

Published layout (huggingface.co/datasets/ibrahimhamamci/CT-RATE; root = the clone):

    root/dataset/train/train_<p>/train_<p>_<scan>/train_<p>_<scan>_<rec>.nii.gz   (valid/ alike)
    root/dataset/multi_abnormality_labels/train_predicted_labels.csv   VolumeName,<18 labels, 0/1>
    root/dataset/multi_abnormality_labels/valid_predicted_labels.csv
    root/dataset/metadata/train_metadata.csv, validation_metadata.csv
        VolumeName,...,XYSpacing,ZSpacing,RescaleIntercept,RescaleSlope,...

The released NIfTI files store raw scanner values without a scaling in their header; HU =
raw * RescaleSlope + RescaleIntercept from the metadata CSV (as CT-CLIP's preprocessing does).
Rows of the index are VOLUMES (case_id = VolumeName without .nii.gz); patient_id is `train_<p>` /
`valid_<p>` (a patient has several scans and reconstructions, all in one split). The official
`valid` set is our test set (as in the literature); val is carved from train patient-wise.

Extraction (`kind = "volume"`): every axial slice is embedded (the paper uses every slice) and the
volume's embedding is the mean of its slice embeddings (`slice_pooling="max"` is the option);
`read_slices` reads slices lazily through nibabel's `dataobj`, never the whole volume.

HU window: default [-1000, 1000], CT-CLIP's clip range: the 18 labels mix lung findings (emphysema,
opacity, nodules: -1000..-300 HU) with mediastinal and vascular ones (effusion, cardiomegaly,
calcification: 0..1000 HU); a lung or a soft-tissue window alone would erase half of them.
"""

from __future__ import annotations

import hashlib
import os
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from tasks.datasets.base import ImageDataset, LayoutFile, Report, carve_val, make_index, register_dataset
from tasks.datasets.ct_rate_layout import LABEL_FILES, LABELS, META_FILES, D, volume_path
from tasks.errors import ConfigError, DatasetError

META_COLUMNS = ("VolumeName", "XYSpacing", "ZSpacing", "RescaleIntercept", "RescaleSlope")
POOLINGS = ("mean", "max")


def window(hu: np.ndarray, lo: float, hi: float) -> np.ndarray:
    return np.clip(np.rint((hu - lo) * (255.0 / (hi - lo))), 0, 255).astype(np.uint8)


def window_lut(dtype: np.dtype, slope: float, intercept: float, lo: float, hi: float) -> np.ndarray | None:
    """uint8 lookup table over every value of a <=16-bit integer dtype, indexed by the value's
    bits read as unsigned (`raw.view(uint)`), or None for other dtypes. Each entry is computed
    with the float32 arithmetic of the per-slice path (float32(raw) * slope + intercept, then
    `window`), elementwise, so a lookup gives the same bytes in one pass instead of seven float
    passes over the slice."""
    dtype = np.dtype(dtype)
    if dtype.kind not in "iu" or dtype.itemsize > 2:
        return None
    bits = np.arange(2 ** (8 * dtype.itemsize), dtype=np.int64).astype(f"u{dtype.itemsize}")
    raw = bits.view(dtype.newbyteorder("=")).astype(np.float32)
    return window(raw * slope + intercept, lo, hi)


@contextmanager
def _nifti_errors(path: str) -> Iterator[None]:
    """A volume file's read errors as a DatasetError naming the file (the readers share it)."""
    try:
        yield
    except DatasetError:
        raise
    except FileNotFoundError:
        raise DatasetError(path, "volume file is missing") from None
    except Exception as e:  # noqa: BLE001 - nibabel/gzip/zlib raise many types for a broken file
        raise DatasetError(path, f"cannot read NIfTI: {type(e).__name__}: {e}") from e


def iter_slices(path: str, slope: float, intercept: float, lo: float, hi: float,
                slab: int = 8) -> Iterator[tuple[int, np.ndarray]]:
    """(z, uint8 slice (rows = y)) for every axial slice, in order, reading the file forward ONCE:
    a .nii.gz is decompressed a single time whatever its depth (reading a few slices per call
    decompresses the file from its start up to them on every call). Memory: `slab` raw slices.
    The same pixels as `read_slices` (tested)."""
    import nibabel as nib

    try:  # the header: the same errors as `n_slices`, which the per-slice pipeline named
        img = nib.load(path, keep_file_open=True)
    except FileNotFoundError:
        raise DatasetError(path, "volume file is missing") from None
    except Exception as e:  # noqa: BLE001
        raise DatasetError(path, f"cannot read NIfTI header: {type(e).__name__}: {e}") from e
    if len(img.shape) != 3 or min(img.shape) < 1:
        raise DatasetError(path, f"expected a 3D volume, got shape {img.shape}")
    with _nifti_errors(path):
        # Unscaled integer data (CT-RATE's: its scaling lives in the metadata CSV) takes the lookup
        # table; a header scl_slope/scl_inter makes nibabel return floats, which take the float path.
        lut: np.ndarray | None = None
        for z0, raw in _slabs(path, img, slab):
            if raw.dtype.kind in "iu" and raw.dtype.itemsize <= 2:
                raw = raw.astype(raw.dtype.newbyteorder("="), copy=False)
                if lut is None:
                    lut = window_lut(raw.dtype, slope, intercept, lo, hi)
                out = lut[raw.view(f"u{raw.dtype.itemsize}")]
            else:
                out = window(raw.astype(np.float32) * slope + intercept, lo, hi)
            for k in range(len(out)):
                yield z0 + k, out[k]


def _slabs(path: str, img: Any, slab: int) -> Iterator[tuple[int, np.ndarray]]:
    """(z0, (k, Y, X) raw slices z0..z0+k) of a 3D NIfTI, in order. An unscaled .nii.gz is inflated
    by zlib in 1 MiB reads (gzip.GzipFile's 8 KiB reads cost half as much again as the inflating);
    anything else goes through nibabel's proxy, with its file kept open so it is read forward once."""
    proxy, (nx, ny, depth) = img.dataobj, img.shape
    dtype = np.dtype(img.get_data_dtype())
    plain = (path.endswith(".gz") and getattr(proxy, "order", "F") == "F" and float(proxy.slope) == 1.0
             and float(proxy.inter) == 0.0 and dtype.kind in "iuf")
    if not plain:
        for z0 in range(0, depth, slab):
            raw = np.asarray(proxy[:, :, z0:min(z0 + slab, depth)])
            yield z0, np.moveaxis(raw, 2, 0).swapaxes(1, 2)  # (k, Y, X), a view
        return
    per_slice = nx * ny * dtype.itemsize
    skip, z0, buf, pending = int(proxy.offset), 0, bytearray(), b""
    inflate = zlib.decompressobj(31)  # wbits 31: a gzip stream; its trailer's CRC is checked
    with open(path, "rb") as f:
        while z0 < depth:
            if not pending:
                pending = f.read(1 << 20)
                if not pending:
                    break
            buf += inflate.decompress(pending, 1 << 24)  # bounded output: a zero run inflates 1000x
            pending = inflate.unconsumed_tail
            if inflate.eof:  # a multi-member gzip file continues with the next member
                pending, inflate = inflate.unused_data + pending, zlib.decompressobj(31)
                if not pending.strip(b"\0"):
                    pending = b""
            if skip:
                cut = min(skip, len(buf))
                del buf[:cut]
                skip -= cut
            k = min(len(buf) // per_slice, depth - z0)
            if k >= slab or (k and z0 + k == depth):
                raw = np.frombuffer(bytes(buf[:k * per_slice]), dtype=dtype).reshape(k, ny, nx)
                del buf[:k * per_slice]
                yield z0, raw
                z0 += k
    if z0 < depth:
        raise DatasetError(path, f"cannot read NIfTI: truncated, the data ends after {z0} of {depth} slices")


def read_slices(path: str, zs: list[int], slope: float, intercept: float, lo: float, hi: float) -> list[np.ndarray]:
    """Axial slices z of a NIfTI volume as uint8 (rows = y), windowed to [lo, hi] HU. Reads only
    those slices: `dataobj` is a lazy proxy; the file stays open across the (sorted) reads so a
    .nii.gz is decompressed once, forward, not once per slice. For every slice in order, use
    `iter_slices` (one pass, slabs of slices)."""
    import nibabel as nib

    with _nifti_errors(path):
        img = nib.load(path, keep_file_open=True)
        if len(img.shape) != 3:
            raise DatasetError(path, f"expected a 3D volume, got shape {img.shape}")
        out = {}
        for z in sorted(set(zs)):
            raw = np.asarray(img.dataobj[:, :, z], dtype=np.float32)
            out[z] = window(raw.T * slope + intercept, lo, hi)
        return [out[z] for z in zs]


def n_slices(path: str) -> int:
    """Axial slices of a volume, from its header only (no pixel is read)."""
    import nibabel as nib

    try:
        shape = nib.load(path).shape
    except FileNotFoundError:
        raise DatasetError(path, "volume file is missing") from None
    except Exception as e:  # noqa: BLE001
        raise DatasetError(path, f"cannot read NIfTI header: {type(e).__name__}: {e}") from e
    if len(shape) != 3 or min(shape) < 1:
        raise DatasetError(path, f"expected a 3D volume, got shape {shape}")
    return int(shape[2])


@register_dataset
class CTRATE(ImageDataset):
    name = "ct_rate"
    task = "multilabel"
    kind = "volume"  # index rows are volumes; extraction embeds their slices and pools them
    classes = LABELS
    files = (*(LayoutFile(f, f"label CSV {Path(f).name} (from the CT-RATE release)", split=True)
               for f in LABEL_FILES.values()),
             *(LayoutFile(f, f"metadata CSV {Path(f).name} (from the CT-RATE release)") for f in META_FILES.values()))
    image_suffix = ".nii.gz"

    def __init__(self, root: str | os.PathLike, val_fraction: float = 0.1, seed: int = 0,
                 hu_window: tuple[float, float] = (-1000.0, 1000.0), slice_pooling: str = "mean"):
        super().__init__(root, val_fraction, seed)
        lo, hi = (float(v) for v in hu_window)
        if not hi > lo:
            raise ConfigError(f"hu_window must be (low, high) with high > low, got {hu_window}")
        if slice_pooling not in POOLINGS:
            raise ConfigError(f"slice_pooling must be one of {POOLINGS}, got {slice_pooling!r}")
        self.hu_window, self.slice_pooling = (lo, hi), slice_pooling
        self._scaling: dict[str, tuple[float, float]] | None = None

    def fingerprint(self) -> str:
        # Window and pooling change the features, so they are part of the dataset's identity.
        base = super().fingerprint()
        return hashlib.sha256(f"{base} hu={self.hu_window} pool={self.slice_pooling}".encode()).hexdigest()

    def _image_dirs(self) -> list[Path]:
        return sorted(p for s in ("train", "valid") for p in (self.root / D / s).glob("*/*") if p.is_dir())

    def scaling(self, case_id: str) -> tuple[float, float]:
        """(RescaleSlope, RescaleIntercept) of a volume, from the metadata CSV."""
        if self._scaling is None:
            self.index()
        assert self._scaling is not None
        return self._scaling[case_id]

    def slice_rows(self, row: dict) -> dict:
        """What the slice pipeline needs per volume besides the index row (read on the driver)."""
        slope, intercept = self.scaling(row["case_id"])
        return {**row, "slope": slope, "intercept": intercept, "lo": self.hu_window[0], "hi": self.hu_window[1]}

    def read_image(self, path: str | os.PathLike) -> np.ndarray:
        """The middle axial slice, windowed (a preview, and what `check` decodes); extraction
        reads every slice through `read_slices`."""
        path = str(path)
        cid = os.path.basename(path).removesuffix(".nii.gz")
        slope, intercept = self.scaling(cid) if self._scaling and cid in self._scaling else (1.0, 0.0)
        return read_slices(path, [n_slices(path) // 2], slope, intercept, *self.hu_window)[0]

    def _load(self, report: Report) -> pd.DataFrame | None:
        frames = {s: self._read_csv(f, ("VolumeName", *LABELS), report) for s, f in LABEL_FILES.items()}
        metas = {s: self._read_csv(f, META_COLUMNS, report) for s, f in META_FILES.items()}
        if any(v is None for v in (*frames.values(), *metas.values())):
            return None
        scaling: dict[str, tuple[float, float]] = {}
        for s, meta in metas.items():
            for line, r in enumerate(meta.itertuples(index=False), 2):
                try:
                    scaling[r.VolumeName.removesuffix(".nii.gz")] = (float(r.RescaleSlope), float(r.RescaleIntercept))
                except ValueError:
                    report.add(self.root / META_FILES[s], f"line {line}: {r.VolumeName}: bad RescaleSlope/Intercept")
        ids, paths, splits, pids, targets = [], [], [], [], []
        for s, df in frames.items():
            path = self.root / LABEL_FILES[s]
            for line, r in enumerate(df.itertuples(index=False), 2):
                name = str(r[0])
                vals = [str(v).strip() for v in r[1:1 + len(LABELS)]]
                parts = name.removesuffix(".nii.gz").split("_")
                if len(parts) != 4 or parts[0] != s or not name.endswith(".nii.gz"):
                    report.add(path, f"line {line}: {name!r} is not a {s} volume name")
                    continue
                if any(v not in ("0", "1") for v in vals):
                    report.add(path, f"line {line}: {name}: labels must be 0/1, got {vals}")
                    continue
                cid = name.removesuffix(".nii.gz")
                if cid not in scaling:
                    report.add(self.root / META_FILES[s], f"{name} has no row (RescaleSlope/Intercept)")
                    continue
                ids.append(cid)
                paths.append(str(volume_path(self.root, name)))
                splits.append("train" if s == "train" else "test")
                pids.append(f"{s}_{parts[1]}")
                targets.append([int(v) for v in vals])
        val = carve_val([p for p, sp in zip(pids, splits, strict=True) if sp == "train"], self.val_fraction, self.seed)
        splits = ["val" if p in val else sp for p, sp in zip(pids, splits, strict=True)]
        self._scaling = scaling
        return make_index(ids, paths, splits, pids, targets)

    @classmethod
    def synth(cls, root: str | os.PathLike, n: int = 60, seed: int = 0, image_size: int = 64) -> Path:
        from tasks.datasets.ct_rate_synth import write_synthetic

        return write_synthetic(root, n, seed, image_size)
