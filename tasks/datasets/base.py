"""The dataset base class and the helpers every dataset family shares.

A dataset reads its files in the official on-disk layout (no conversion step, no copy) and gives
the orchestrator one table (`index()`), one decoder (`read_image`), one identity for the feature
cache (`fingerprint()`) and one validator (`check()`). Construction only stores arguments: Ray's
decode workers build a dataset per batch, so anything costly happens lazily and is cached.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from tasks.errors import ConfigError, DatasetError

SPLITS = ("train", "val", "test")
INDEX_COLUMNS = ("case_id", "path", "split", "patient_id", "target")
FINGERPRINT_VERSION = 1  # bump when what goes into a fingerprint changes


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a dataset on disk: the file at fault and what is wrong with it."""

    path: str
    message: str

    def __str__(self) -> str:
        return f"{self.path}: {self.message}"


class Report:
    """Where loaders send problems: raised at once by `index()`, collected by `check()`.

    One parsing code path serves both, so `check()` reports exactly what `index()` would refuse.
    """

    def __init__(self, collect: bool):
        self.collect = collect
        self.problems: list[Problem] = []

    def add(self, path: str | os.PathLike, message: str) -> None:
        if not self.collect:
            raise DatasetError(str(path), message)
        self.problems.append(Problem(str(path), message))


@dataclass(frozen=True)
class LayoutFile:
    """A label or split file of the official layout (relative to the root)."""

    name: str
    what: str  # shown in the "missing" message, e.g. "label CSV (from the NIH download)"
    required: bool = True
    split: bool = False  # a file that assigns cases to splits


DATASETS: dict[str, type[ImageDataset]] = {}


def register_dataset(cls: type[ImageDataset]) -> type[ImageDataset]:
    """Class decorator: the dataset is known to sweeps by `cls.name` (registered beside its class;
    `tasks.datasets` imports every dataset module)."""
    if not cls.name or cls.name in DATASETS:
        raise ValueError(f"dataset name {cls.name!r} is empty or registered twice")
    DATASETS[cls.name] = cls
    return cls


class ImageDataset:
    """Base class of the 2D image datasets. Subclasses set the class attributes, `files`,
    `image_suffix`, and implement `_load`, `_image_dirs` and `synth`."""

    name: ClassVar[str] = ""
    task: ClassVar[str] = "binary"  # binary | multilabel | multiclass
    classes: ClassVar[tuple[str, ...]] = ()
    kind: ClassVar[str] = "image"  # image | volume | slide: what one index row is
    target_kind: ClassVar[str] = "labels"  # tasks.dense.TARGET_KINDS
    files: ClassVar[tuple[LayoutFile, ...]] = ()
    image_suffix: ClassVar[str] = ".png"
    carves_val: ClassVar[bool] = True  # False when the official split ships its own validation set

    def __init__(self, root: str | os.PathLike, val_fraction: float = 0.1, seed: int = 0):
        if not 0.0 <= float(val_fraction) < 1.0:
            raise ConfigError(f"val_fraction must be in [0, 1), got {val_fraction}")
        self.root = Path(root).expanduser().absolute()
        self.val_fraction = float(val_fraction)
        self.seed = int(seed)
        self._index: pd.DataFrame | None = None
        self._fingerprint: str | None = None

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.root)!r}, val_fraction={self.val_fraction}, seed={self.seed})"

    # -- what subclasses implement ------------------------------------------------------------------
    def _load(self, report: Report) -> pd.DataFrame | None:
        """Parse the label/split files into the index (any row order); None if it cannot."""
        raise NotImplementedError

    def _image_dirs(self) -> list[Path]:
        """Directories holding the images (for the fingerprint's listing)."""
        raise NotImplementedError

    @classmethod
    def synth(cls, root: str | os.PathLike, n: int = 240, seed: int = 0, image_size: int = 256) -> Path:
        """Write a synthetic dataset in the official layout, with a learnable label signal."""
        raise NotImplementedError

    # -- the contract -------------------------------------------------------------------------------
    def index(self) -> pd.DataFrame:
        """One row per case: case_id, path (absolute), split, patient_id, target (list[int])."""
        if self._index is None:
            df = self._load(Report(collect=False))
            assert df is not None  # a non-collecting report raises instead
            df = df.sort_values("case_id", kind="stable").reset_index(drop=True)
            self._validate_index(df)
            self._index = df
        return self._index

    def read_image(self, path: str | os.PathLike) -> np.ndarray:
        """Decode one image to uint8 (H, W) or (H, W, 3); DatasetError names an unreadable file."""
        if str(path).lower().endswith(".dcm"):
            return read_dicom(path)
        return read_raster(path)

    def read_images(self, paths: Sequence[str]) -> list[np.ndarray]:
        """Decode a batch (extraction's decode workers call this). A dataset whose items share a
        file (frames of a video) overrides it to open each file once per batch."""
        out = []
        for path in paths:
            try:
                out.append(self.read_image(path))
            except DatasetError:
                raise
            except Exception as e:  # a decoder's own error: name the file, keep the cause
                raise DatasetError(str(path), f"cannot decode image: {e}") from e
        return out

    def fingerprint(self) -> str:
        """sha256 of what defines the dataset's content: label/split files' bytes, the image
        listing (relative path, size) and the split parameters. Image bytes are not hashed (112k
        files would take minutes); sizes catch replaced or truncated files, and mtimes are left out
        because copying a dataset changes them without changing it."""
        if self._fingerprint is None:
            h = hashlib.sha256()
            h.update(json.dumps({"v": FINGERPRINT_VERSION, "name": self.name, "split": self._split_identity()}).encode())
            for f in self.files:
                p = self.root / f.name
                if not p.is_file():
                    if f.required:
                        raise DatasetError(str(p), f"missing {f.what}")
                    continue
                h.update(f"\nfile {f.name} {file_sha256(p)}".encode())
            for rel, size in self._image_listing():
                h.update(f"\nimg {rel} {size}".encode())
            self._fingerprint = h.hexdigest()
        return self._fingerprint

    def _split_identity(self) -> dict:
        """The split parameters that change what is cached (a split is part of a cache entry)."""
        return {"val_fraction": self.val_fraction, "seed": self.seed} if self.carves_val else {}

    def layout_problems(self) -> list[Problem]:
        """The fast check a sweep runs before starting anything: the root and the required layout
        files exist (nothing parsed, no image read). `check()` is the thorough one."""
        if not self.root.is_dir():
            return [Problem(str(self.root), f"dataset root of {self.name} does not exist (write a synthetic "
                                            f"one: medscale datasets synth {self.name} --root {self.root})")]
        return [Problem(str(self.root / f.name), f"missing {f.what}")
                for f in self.files if f.required and not (self.root / f.name).is_file()]

    def layout_notes(self) -> list[str]:
        """Facts about the layout found (e.g. which of two index files was read), for `check`."""
        return []

    def check(self, decode: bool = True) -> list[Problem]:
        """Validate the whole layout; return every problem found (empty list: all good).

        Label/split files are parsed fully; every indexed image must exist and (with `decode`)
        decode. Images are read on a few threads (PNG/JPEG decoders release the GIL)."""
        report = Report(collect=True)
        df = self._load(report)
        if df is None or df.empty:
            if df is not None:
                report.add(self.root, "no cases found in the label/split files")
            return report.problems
        for cid in df.loc[df["case_id"].duplicated(), "case_id"].unique():
            report.add(self.root, f"case {cid} is listed more than once")
        splits_of = df.groupby("patient_id")["split"].unique()
        for pid, splits in splits_of[splits_of.map(len) > 1].items():
            report.add(self.root, f"patient {pid} is in several splits ({', '.join(sorted(splits))}); "
                                  f"check the split files {self._split_files()}")
        for split in SPLITS:
            if not (df["split"] == split).any():
                report.add(self.root, f"the {split} split has no cases")
        paths = df["path"].drop_duplicates().tolist()
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        workers = max(1, min(8, cores))
        with ThreadPoolExecutor(workers) as pool:
            results = pool.map(lambda p: self._check_image(p, decode), paths)
            for problem in tqdm(results, total=len(paths), desc=f"check {self.name} images", unit="img"):
                if problem is not None:
                    report.add(problem.path, problem.message)
        return report.problems

    # -- shared machinery ---------------------------------------------------------------------------
    missing_item: ClassVar[str] = "image listed in the labels is missing"

    def _item_file(self, path: str) -> str:
        """The file an index path lives in (frames of a video share one)."""
        return path

    def _check_image(self, path: str, decode: bool) -> Problem | None:
        if not os.path.isfile(self._item_file(path)):
            return Problem(self._item_file(path), self.missing_item)
        if decode:
            try:
                self.read_image(path)
            except DatasetError as e:
                return Problem(e.path, e.problem)
        return None

    def _validate_index(self, df: pd.DataFrame) -> None:
        if tuple(df.columns) != INDEX_COLUMNS:
            raise AssertionError(f"{self.name} index columns {list(df.columns)} != {list(INDEX_COLUMNS)}")
        if df.empty:
            raise DatasetError(str(self.root), f"no cases found for {self.name}")
        dup = df["case_id"][df["case_id"].duplicated()]
        if len(dup):
            raise DatasetError(str(self.root), f"case {dup.iloc[0]} is listed more than once")
        splits_of = df.groupby("patient_id")["split"].nunique()
        if (splits_of > 1).any():
            pid = splits_of[splits_of > 1].index[0]
            raise DatasetError(str(self.root), f"patient {pid} is in more than one split; check the split "
                                               f"files {self._split_files()}")

    def _split_files(self) -> str:
        return ", ".join(f.name for f in self.files if f.split)

    def _file(self, name: str, report: Report) -> Path | None:
        """The path of a layout file, or None (reported) when it is missing."""
        p = self.root / name
        if p.is_file():
            return p
        spec = next((f for f in self.files if f.name == name), None)
        report.add(p, f"missing {spec.what if spec else 'file'}")
        return None

    def _read_csv(self, name: str, columns: Sequence[str], report: Report) -> pd.DataFrame | None:
        """A layout CSV as strings (no NaN guessing: empty cells stay ""), or None (reported) when
        it is missing, unparsable or lacks a required column."""
        path = self._file(name, report)
        if path is None:
            return None
        try:
            df = pd.read_csv(path, dtype=str, keep_default_na=False)
        except (ValueError, OSError, UnicodeDecodeError) as e:
            report.add(path, f"cannot parse the CSV: {e}")
            return None
        missing = [c for c in columns if c not in df.columns]
        if missing:
            report.add(path, f"missing column(s) {missing}; expected {','.join(columns)}")
            return None
        return df

    def _image_listing(self) -> list[tuple[str, int]]:
        out: list[tuple[str, int]] = []
        for d in self._image_dirs():
            rel = d.relative_to(self.root).as_posix()
            with os.scandir(d) as it:
                for e in it:
                    if e.name.endswith(self.image_suffix) and e.is_file():
                        out.append((f"{rel}/{e.name}", e.stat().st_size))
        return sorted(out)


# -- helpers ----------------------------------------------------------------------------------------

def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def carve_val(patients: Iterable[str], val_fraction: float, seed: int) -> set[str]:
    """Patients moved from train to val: round(val_fraction * n) of them (at least one when the
    fraction is > 0 and two patients exist), drawn by `seed` from the sorted patient list, so the
    result depends only on (set of patients, fraction, seed), not on file order."""
    pats = sorted(set(patients))
    if val_fraction <= 0 or len(pats) < 2:
        return set()
    k = min(len(pats) - 1, max(1, round(val_fraction * len(pats))))
    order = np.random.default_rng(seed).permutation(len(pats))
    return {pats[i] for i in order[:k]}


def make_index(case_ids: Sequence[str], paths: Sequence[str], splits: Sequence[str],
               patient_ids: Sequence[str], targets: Sequence[list[int]]) -> pd.DataFrame:
    return pd.DataFrame({"case_id": list(case_ids), "path": list(paths), "split": list(splits),
                         "patient_id": list(patient_ids), "target": list(targets)},
                        columns=list(INDEX_COLUMNS))


def read_raster(path: str | os.PathLike, mode: str = "L", libpng: bool = True) -> np.ndarray:
    """PNG/JPEG -> uint8 (H, W) for mode "L", (H, W, 3) for "RGB".

    Colour types other than the one asked for are converted (a few NIH-14 films are stored RGBA:
    their pixels are grey, so L loses nothing); 16-bit greyscale is scaled by 1/257 to 8 bits.
    `libpng`: plain 8-bit PNGs through tasks.datasets.png (the same pixels, less CPU); False: PIL
    for every file (the decoder before it, which benchmarks/decode_cpu.py compares against)."""
    from PIL import Image

    from tasks.datasets.png import decode_png

    fast = decode_png(path, mode) if libpng else None
    if fast is not None:
        return fast
    try:
        with Image.open(path) as im:
            im.load()  # decode now, inside the try: a truncated file fails here, not later
            if im.mode in ("I;16", "I;16B", "I;16L", "I") and mode == "L":
                arr = np.asarray(im, dtype=np.float64) / 257.0
                return np.clip(np.rint(arr), 0, 255).astype(np.uint8)
            if im.mode != mode:
                im = im.convert(mode)
            return np.asarray(im, dtype=np.uint8).copy()
    except FileNotFoundError:
        raise DatasetError(str(path), "image file is missing") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise DatasetError(str(path), f"cannot decode image: {e}") from e


def read_dicom(path: str | os.PathLike) -> np.ndarray:
    """DICOM -> uint8 (H, W), as a viewer would show it.

    - RescaleSlope/Intercept applied first (modality values).
    - 8-bit data without a rescale (every RSNA file) is kept as stored: scaling it again would
      change its contrast image by image (MGCA stretches by 255/max; we keep the distributed pixels).
    - Deeper data: the file's own VOI window when it has one (what the modality chose to display),
      else the image's min/max, since a 12/16-bit range has no fixed mapping to 8 bits.
    - MONOCHROME1 (high = dark) is inverted so bone is bright in every image."""
    import pydicom

    try:
        ds = pydicom.dcmread(path)
        arr = ds.pixel_array
    except FileNotFoundError:
        raise DatasetError(str(path), "image file is missing") from None
    except Exception as e:  # noqa: BLE001 - pydicom raises many types for a corrupt file
        raise DatasetError(str(path), f"cannot read DICOM: {type(e).__name__}: {e}") from e
    if int(getattr(ds, "SamplesPerPixel", 1)) != 1 or arr.ndim != 2:
        raise DatasetError(str(path), f"expected one greyscale frame, got pixel array {arr.shape}")
    slope, intercept = float(getattr(ds, "RescaleSlope", 1) or 1), float(getattr(ds, "RescaleIntercept", 0) or 0)
    if arr.dtype == np.uint8 and slope == 1 and intercept == 0:
        out = arr
    else:
        x = arr.astype(np.float64) * slope + intercept
        lo, hi = float(x.min()), float(x.max())
        center, width = getattr(ds, "WindowCenter", None), getattr(ds, "WindowWidth", None)
        if center is not None and width is not None:
            c = float(center[0] if isinstance(center, pydicom.multival.MultiValue) else center)
            w = float(width[0] if isinstance(width, pydicom.multival.MultiValue) else width)
            lo, hi = c - w / 2, c + w / 2
        out = np.clip(np.rint((x - lo) / max(hi - lo, 1e-12) * 255.0), 0, 255).astype(np.uint8)
    if str(getattr(ds, "PhotometricInterpretation", "MONOCHROME2")) == "MONOCHROME1":
        out = 255 - out
    return np.ascontiguousarray(out, dtype=np.uint8)


def fresh_root(root: str | os.PathLike) -> Path:
    """The directory a synthetic dataset goes into: new or empty, so nothing of an earlier dataset
    (or a real one) is mixed in or overwritten."""
    p = Path(root).expanduser().absolute()
    if p.exists() and (not p.is_dir() or any(p.iterdir())):
        raise ConfigError(f"{p}: not an empty directory; synth writes a new dataset into a new or empty one")
    p.mkdir(parents=True, exist_ok=True)
    return p
