"""EM neuron segmentation volumes (target kind `instances`): CREMI and AC3/AC4, in their layouts.

Cases are slabs (z-ranges) of volumes; every slice of a slab is encoded on its own, and the head
predicts nearest-neighbour affinities at voxel resolution (tasks/protocols/em_affinity.py).

Layouts (root = the directory holding the files; the first present alternative is used):

- `cremi` (cremi.org, 2016 challenge): `sample_{A,B,C}_20160501.hdf` with `volumes/raw` (uint8,
  z,y,x), `volumes/labels/neuron_ids` (uint64) and a `resolution` attribute (40, 4, 4 nm). In these
  files id 0 is a neuron and uint64(-1) means "no label"; as CREMI's own evaluation does, ids are
  shifted by one, so "no label" becomes 0 (ignored) and every neuron is >= 1. Else the cropped
  1024 x 1024 volumes many affinity papers use: `cremi{A,B,C}_inputs_interp.h5` and
  `cremi{A,B,C}_labels.h5` (dataset `main`, 0 = background as their users evaluate them).
  `cremi` trains one head on A, B and C together; `cremi_a`, `cremi_b`, `cremi_c` one per sample
  (the paper's Table 12 columns).
- `ac3ac4` (Kasthuri et al. 2015, mouse cortex): `AC3_inputs.h5`, `AC3_labels.h5`, `AC4_inputs.h5`,
  `AC4_labels.h5` (dataset `main`); AC4 may instead come as SNEMI3D's `train-input.tif` /
  `train-labels.tif` (SNEMI3D's training volume is AC4). 0 = background (membrane).

Splits, per volume. The paper (dinov3-medical-benchmark, arXiv 2509.06467, section 4 and the EM
datasets) trains on the first 100 sections of each CREMI sample and tests on the remaining 25, and
trains on the first 80 sections of AC4 and tests on the first 100 of AC3: the protocol of the
affinity works it compares with. Those works select on a held-out slab: Pixel-Embedded Affinity
(Huang et al., AAAI 2022, github.com/weih527/Pixel-Embedded-Affinity, `train_split: 80`,
`test_split: 20` on AC4) validates on the last 20 sections of AC4. For CREMI they validate on the
test slab itself; we never select on test, so the last 20 of the 100 training sections validate:

    cremi  sample X:  X_train z 0-80,  X_val z 80-100,  X_test z 100-125
    ac3ac4:           AC4_train z 0-80, AC4_val z 80-100, AC3_test z 0-100

`check` names every problem: missing files, unreadable files, missing HDF5 datasets, raw and
label volumes of different shapes, volumes too short for the split.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
import pandas as pd

from tasks.datasets.base import Problem, Report, fresh_root, make_index, register_dataset
from tasks.datasets.dense_base import DenseDataset
from tasks.dense import Sample
from tasks.errors import ConfigError, DatasetError


@dataclass(frozen=True)
class Volume:
    """One raw + label volume pair as stored. `key` None: a multi-page TIFF (one page a slice)."""

    name: str
    raw: str
    raw_key: str | None
    labels: str
    labels_key: str | None
    # "uint64max": CREMI's own files (id 0 is a neuron, uint64(-1) no label: ids + 1, wrapping);
    # "zero": 0 is background already.
    background: str = "zero"


@dataclass(frozen=True)
class Slab:
    case_id: str
    volume: str
    z0: int
    z1: int
    split: str


class EMVolumes(DenseDataset):
    """Base of the EM datasets: subclasses list the alternatives per volume and the slabs."""

    kind: ClassVar[str] = "volume"
    target_kind: ClassVar[str] = "instances"
    task: ClassVar[str] = "instances"
    classes: ClassVar[tuple[str, ...]] = ("neuron",)
    carves_val: ClassVar[bool] = False  # the split is the literature's fixed z-ranges
    image_suffix: ClassVar[str] = ".h5"
    resolution: ClassVar[tuple[float, float, float]] = (1.0, 1.0, 1.0)  # nm (z, y, x) if the file has none
    volumes: ClassVar[dict[str, tuple[Volume, ...]]] = {}  # name -> alternatives, preferred first
    slabs: ClassVar[tuple[Slab, ...]] = ()

    # -- layout ------------------------------------------------------------------------------------
    def _chosen(self) -> dict[str, Volume]:
        """The first alternative of each volume whose raw file exists (else the preferred one, which
        `_load` reports as missing)."""
        return {name: next((v for v in alts if (self.root / v.raw).is_file()), alts[0])
                for name, alts in self.volumes.items()}

    def _missing(self, name: str, vol: Volume, role: str) -> str:
        other = " or ".join(f"{a.raw} + {a.labels}" for a in self.volumes[name] if a != vol)
        return f"missing {name} {role} volume" + (f" (or give {other})" if other else "")

    def layout_problems(self) -> list[Problem]:
        """Fast: the root and every volume file of the layout found exist (nothing opened)."""
        problems = super().layout_problems()
        if problems:
            return problems
        return [Problem(str(self.root / rel), self._missing(name, vol, role)) for name, vol in self._chosen().items()
                for role, rel in _files(vol) if not (self.root / rel).is_file()]

    def layout_notes(self) -> list[str]:
        return [f"{name}: {vol.raw}" + (f" + {vol.labels}" if vol.labels != vol.raw else "")
                for name, vol in self._chosen().items()]

    def _load(self, report: Report) -> pd.DataFrame | None:
        self._vols = self._chosen()
        ok = True
        for name, vol in self._vols.items():
            shapes = {}
            missing = set()
            for role, rel in _files(vol):
                if not (self.root / rel).is_file():
                    report.add(self.root / rel, self._missing(name, vol, role))
                    missing.add(rel)
            ok = ok and not missing
            for role, rel, key in (("raw", vol.raw, vol.raw_key), ("labels", vol.labels, vol.labels_key)):
                path = self.root / rel
                if rel in missing:
                    continue
                try:
                    shapes[role] = volume_shape(path, key)
                except DatasetError as e:
                    report.add(e.path, e.problem)
                    ok = False
            if len(shapes) < 2:
                continue
            if shapes["raw"] != shapes["labels"]:
                report.add(self.root / vol.labels, f"label volume shape {shapes['labels']} does not match the "
                                                    f"raw volume {vol.raw} {shapes['raw']}")
                ok = False
            need = max(s.z1 for s in self.slabs if s.volume == name)
            if shapes["raw"][0] < need:
                report.add(self.root / vol.raw, f"{name} has {shapes['raw'][0]} slices; the split needs {need} "
                           f"({', '.join(f'{s.case_id} z {s.z0}-{s.z1}' for s in self.slabs if s.volume == name)})")
                ok = False
        if not ok:
            return None
        rows = [(s.case_id, str(self.root / self._vols[s.volume].raw), s.split, s.case_id, [1]) for s in self.slabs]
        return make_index(*zip(*rows, strict=True))

    def _image_dirs(self) -> list[Path]:
        return [self.root]

    def _image_listing(self) -> list[tuple[str, int]]:
        """The volume files in use (relative path, size): which layout was read is part of the
        fingerprint, and GB-sized HDF5 files are not hashed."""
        vols = self._chosen()
        files = sorted({f for v in vols.values() for f in (v.raw, v.labels)})
        return [(f, (self.root / f).stat().st_size if (self.root / f).is_file() else -1) for f in files]

    def _slab(self, case_id: str) -> Slab:
        for s in self.slabs:
            if s.case_id == case_id:
                return s
        raise KeyError(f"{self.name}: no case {case_id!r}; cases: {', '.join(s.case_id for s in self.slabs)}")

    def n_slices(self, case_id: str) -> int:
        s = self._slab(case_id)
        return s.z1 - s.z0

    # -- reading -----------------------------------------------------------------------------------
    def read_sample(self, case_id: str) -> Sample:
        self.index()  # resolves the layout (and raises on a broken one)
        s = self._slab(case_id)
        vol = self._vols[s.volume]
        raw_path, lab_path = self.root / vol.raw, self.root / vol.labels
        raw, attrs = read_volume(raw_path, vol.raw_key, s.z0, s.z1)
        labels, _ = read_volume(lab_path, vol.labels_key, s.z0, s.z1)
        if raw.shape != labels.shape:
            raise DatasetError(str(lab_path), f"label slab shape {labels.shape} does not match the raw {raw.shape}")
        spacing = tuple(float(r) for r in attrs.get("resolution", self.resolution))
        if len(spacing) != 3:
            raise DatasetError(str(raw_path), f"resolution attribute must have 3 values (z, y, x), got {spacing}")
        return Sample(case_id=case_id, images=to_uint8(raw, raw_path)[None], target=as_ids(labels, vol.background, lab_path),
                      spacing=spacing, unit="nm",
                      meta={"path": str(raw_path), "label_path": str(lab_path), "volume": s.volume,
                            "z_range": (s.z0, s.z1)})

    # -- synthetic data ----------------------------------------------------------------------------
    @classmethod
    def synth(cls, root: str | os.PathLike, n: int = 0, seed: int = 0, image_size: int = 64,
              layout: str = "official") -> Path:
        """Volumes of the official depths (so the literature's split applies) at `image_size`
        px a side; `n` is unused (the depths are fixed). Neurons are Voronoi cells whose seeds drift
        from slice to slice, with dark membranes: a segmenter can find them. `layout`: "official" or
        the alternative ("cropped" CREMI h5 files, "snemi3d" TIFFs for AC4)."""
        layouts = ("official", cls.alt_layout)
        if layout not in layouts:
            raise ConfigError(f"{cls.name}.synth: layout must be one of {layouts}, got {layout!r}")
        root = fresh_root(root)
        rng = np.random.default_rng(seed)
        for name, alts in cls.volumes.items():
            vol = alts[0] if layout == "official" or len(alts) == 1 else alts[1]
            depth = max(s.z1 for s in cls.slabs if s.volume == name)
            raw, labels = synth_volume(rng, depth, image_size)
            if vol.background == "uint64max":  # CREMI: no label = uint64(-1); ids - 1 (0 is a neuron)
                labels = labels - np.uint64(1)
            write_volume(root / vol.raw, vol.raw_key, raw, cls.resolution)
            write_volume(root / vol.labels, vol.labels_key, labels, cls.resolution)
        return root

    alt_layout: ClassVar[str] = ""


def _files(vol: Volume) -> list[tuple[str, str]]:
    """(role, file) of a volume pair; one entry when raw and labels share a file (CREMI's)."""
    if vol.raw == vol.labels:
        return [("raw and labels", vol.raw)]
    return [("raw", vol.raw), ("labels", vol.labels)]


def _cremi_volumes(samples: str) -> dict[str, tuple[Volume, ...]]:
    return {x: (Volume(x, f"sample_{x}_20160501.hdf", "volumes/raw", f"sample_{x}_20160501.hdf",
                       "volumes/labels/neuron_ids", "uint64max"),
                Volume(x, f"cremi{x}_inputs_interp.h5", "main", f"cremi{x}_labels.h5", "main"))
            for x in samples}


def _cremi_slabs(samples: str) -> tuple[Slab, ...]:
    return tuple(Slab(f"{x}_{split}", x, z0, z1, split) for x in samples
                 for split, z0, z1 in (("train", 0, 80), ("val", 80, 100), ("test", 100, 125)))


@register_dataset
class CREMI(EMVolumes):
    name = "cremi"
    resolution = (40.0, 4.0, 4.0)
    volumes = _cremi_volumes("ABC")
    slabs = _cremi_slabs("ABC")
    alt_layout = "cropped"


@register_dataset
class CREMIA(CREMI):
    name = "cremi_a"
    volumes = _cremi_volumes("A")
    slabs = _cremi_slabs("A")


@register_dataset
class CREMIB(CREMI):
    name = "cremi_b"
    volumes = _cremi_volumes("B")
    slabs = _cremi_slabs("B")


@register_dataset
class CREMIC(CREMI):
    name = "cremi_c"
    volumes = _cremi_volumes("C")
    slabs = _cremi_slabs("C")


@register_dataset
class AC3AC4(EMVolumes):
    name = "ac3ac4"
    resolution = (29.0, 3.0, 3.0)  # the paper's 3 x 3 x 29 nm
    volumes = {"AC4": (Volume("AC4", "AC4_inputs.h5", "main", "AC4_labels.h5", "main"),
                       Volume("AC4", "train-input.tif", None, "train-labels.tif", None)),
               "AC3": (Volume("AC3", "AC3_inputs.h5", "main", "AC3_labels.h5", "main"),)}
    slabs = (Slab("AC4_train", "AC4", 0, 80, "train"), Slab("AC4_val", "AC4", 80, 100, "val"),
             Slab("AC3_test", "AC3", 0, 100, "test"))
    alt_layout = "snemi3d"


# -- file access -----------------------------------------------------------------------------------

def volume_shape(path: Path, key: str | None) -> tuple[int, ...]:
    """Shape of a stored volume from its header; DatasetError names what is wrong."""
    try:
        if key is None:
            import tifffile

            with tifffile.TiffFile(path) as tif:
                shape = tuple(tif.series[0].shape)
        else:
            import h5py

            with h5py.File(path, "r") as f:
                if key not in f:
                    raise DatasetError(str(path), f"no dataset '{key}' in the file (found: {_h5_names(f)})")
                shape = tuple(f[key].shape)
    except DatasetError:
        raise
    except Exception as e:  # noqa: BLE001 - h5py/tifffile raise OSError, ValueError, KeyError, ...
        raise DatasetError(str(path), f"cannot read the volume: {type(e).__name__}: {e}") from e
    if len(shape) != 3:
        raise DatasetError(str(path), f"expected a (z, y, x) volume{f' in {key!r}' if key else ''}, got shape {shape}")
    return shape


def read_volume(path: Path, key: str | None, z0: int, z1: int) -> tuple[np.ndarray, dict]:
    """Slices z0:z1 of a stored volume, and the dataset's attributes (resolution, ...)."""
    try:
        if key is None:
            import tifffile

            with tifffile.TiffFile(path) as tif:
                return np.asarray(tif.asarray(key=range(z0, z1))).reshape(z1 - z0, *tif.series[0].shape[1:]), {}
        import h5py

        with h5py.File(path, "r") as f:
            if key not in f:
                raise DatasetError(str(path), f"no dataset '{key}' in the file (found: {_h5_names(f)})")
            return np.asarray(f[key][z0:z1]), dict(f[key].attrs)
    except DatasetError:
        raise
    except Exception as e:  # noqa: BLE001
        raise DatasetError(str(path), f"cannot read slices {z0}-{z1}: {type(e).__name__}: {e}") from e


def _h5_names(f) -> str:
    names: list[str] = []
    f.visit(lambda n: names.append(n) if hasattr(f[n], "shape") else None)
    return ", ".join(names) or "nothing"


def to_uint8(raw: np.ndarray, path: Path) -> np.ndarray:
    """EM raw data is 8-bit; anything else is stretched min-max over the slab (stated, not guessed)."""
    if raw.dtype == np.uint8:
        return np.ascontiguousarray(raw)
    if not np.issubdtype(raw.dtype, np.number):
        raise DatasetError(str(path), f"raw volume has dtype {raw.dtype}, not a number")
    x = raw.astype(np.float64)
    lo, hi = float(x.min()), float(x.max())
    return np.clip(np.rint((x - lo) / max(hi - lo, 1e-12) * 255), 0, 255).astype(np.uint8)


def as_ids(labels: np.ndarray, background: str, path: Path) -> np.ndarray:
    """Stored neuron ids -> uint64 with 0 = background (ignored by the metrics)."""
    if not np.issubdtype(labels.dtype, np.integer):
        raise DatasetError(str(path), f"label volume has dtype {labels.dtype}; neuron ids must be integers")
    if np.issubdtype(labels.dtype, np.signedinteger) and labels.size and labels.min() < 0:
        raise DatasetError(str(path), f"label volume has negative ids (min {labels.min()})")
    ids = labels.astype(np.uint64)
    if background == "uint64max":
        ids += np.uint64(1)  # CREMI's convention: uint64(-1) wraps to 0, neuron 0 becomes 1
    return ids


def write_volume(path: Path, key: str | None, data: np.ndarray, resolution: tuple[float, ...]) -> None:
    if key is None:
        import tifffile

        tifffile.imwrite(path, data)
        return
    import h5py

    with h5py.File(path, "a") as f:
        f.create_dataset(key, data=data, compression="gzip", compression_opts=1)
        f[key].attrs["resolution"] = np.asarray(resolution, dtype=np.float64)


def synth_volume(rng: np.random.Generator, depth: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    """(raw uint8, labels uint64 with 0 = membrane) of `depth` slices of size x size: Voronoi cells
    (about 9 a slice) whose seeds drift by a random walk across z, dark 2-3 px membranes between
    them, cell-specific brightness, texture noise."""
    n_cells = 9
    seeds = rng.uniform(0, size, (n_cells, 2))
    step = rng.normal(0, size / 160, (n_cells, 2))
    brightness = rng.uniform(140, 220, n_cells)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    raw = np.empty((depth, size, size), np.uint8)
    labels = np.empty((depth, size, size), np.uint64)
    half = max(1.0, size / 64)  # membrane half-width in px
    for z in range(depth):
        d = np.sqrt((yy[None] - seeds[:, 0, None, None]) ** 2 + (xx[None] - seeds[:, 1, None, None]) ** 2)
        order = np.argsort(d, axis=0)
        near = np.take_along_axis(d, order[:2], axis=0)
        cell = order[0]
        membrane = (near[1] - near[0]) < 2 * half
        img = brightness[cell] + rng.normal(0, 12, (size, size))
        img[membrane] = 45 + rng.normal(0, 10, int(membrane.sum()))
        raw[z] = np.clip(np.rint(img), 0, 255).astype(np.uint8)
        labels[z] = np.where(membrane, 0, cell + 1).astype(np.uint64)
        # Drift: seeds wander, so neurons are consistent across z but move; they bounce off the
        # borders and repel each other when close (two coinciding seeds would make one cell all
        # membrane).
        diff = seeds[:, None] - seeds[None]
        dist = np.sqrt((diff ** 2).sum(-1)) + np.eye(n_cells) * size
        push = (diff / dist[..., None] * np.clip(size / 5 - dist, 0, None)[..., None]).sum(1)
        step = 0.8 * step + rng.normal(0, size / 200, step.shape) + 0.05 * push
        seeds = seeds + step
        out = (seeds < 0) | (seeds > size - 1)
        seeds = np.clip(np.where(seeds < 0, -seeds, np.where(seeds > size - 1, 2 * (size - 1) - seeds, seeds)), 0, size - 1)
        step[out] *= -1
    return raw, labels
