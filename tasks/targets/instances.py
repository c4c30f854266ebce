"""EM instance segmentation outputs: affinities, waterz agglomeration and evaluation (silenced),
and the `instances` target handler (per-case VOI/ARAND, the HDF5 segmentation, figures).

Metrics (docs/em.md), all lower-is-better, over voxels whose ground truth is not 0:
- voi_split = H(segmentation | ground truth), voi_merge = H(ground truth | segmentation), in bits
  (log2; waterz and scikit-image both use log2), voi = their sum;
- arand = 1 - F-score of the Rand split and merge scores (waterz's `evaluate`). scikit-image's
  `adapted_rand_error` counts voxel pairs without self-pairs; waterz counts them, so the two differ
  by about 1 / (mean segment size): 1e-4 on real volumes.

waterz's C++ code prints progress and metrics with std::cout: every call runs inside
`quiet_fds`, which points file descriptors 1 and 2 at /dev/null (os.dup2) and flushes the C
buffers before restoring them, so nothing reaches the console, a Ray log or a test's capfd.
"""

from __future__ import annotations

import contextlib
import ctypes
import io
import os
import sys
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from tasks.dense import Sample
from tasks.targets.base import register_target_handler

METRICS = ("voi_split", "voi_merge", "voi", "arand")
_LIBC = ctypes.CDLL(None)


# -- affinities ------------------------------------------------------------------------------------

def seg_to_affinities(labels: np.ndarray) -> np.ndarray:
    """Ground-truth nearest-neighbour affinities, bool (3, S, H, W): channel 0/1/2 links voxel
    (z, y, x) to (z-1, y, x) / (z, y-1, x) / (z, y, x-1) (waterz's convention); 1 where both voxels
    carry the same non-zero id. Edges leaving the volume are 0."""
    lab = np.asarray(labels)
    aff = np.zeros((3, *lab.shape), dtype=bool)
    fg = lab != 0
    aff[0, 1:] = (lab[1:] == lab[:-1]) & fg[1:]
    aff[1, :, 1:] = (lab[:, 1:] == lab[:, :-1]) & fg[:, 1:]
    aff[2, :, :, 1:] = (lab[:, :, 1:] == lab[:, :, :-1]) & fg[:, :, 1:]
    return aff


def as_uint32(ids: np.ndarray) -> np.ndarray:
    """Ids as uint32 (waterz's ground-truth type), relabelled consecutively (0 kept) if they do not fit."""
    ids = np.asarray(ids)
    if ids.size == 0 or int(ids.max()) < 2**32:
        return np.ascontiguousarray(ids, dtype=np.uint32)
    uniq, inv = np.unique(ids, return_inverse=True)
    offset = 0 if uniq[0] == 0 else 1
    return np.ascontiguousarray((inv + offset).reshape(ids.shape), dtype=np.uint32)


# -- waterz, silenced ------------------------------------------------------------------------------

@contextlib.contextmanager
def quiet_fds() -> Iterator[None]:
    """Send file descriptors 1 and 2 to /dev/null for the duration (C/C++ output included), and
    Python's sys.stdout/sys.stderr to a discarded buffer."""
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    saved = [os.dup(1), os.dup(2)]
    null = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(null, 1)
        os.dup2(null, 2)
        # waterz also prints from Python, and sys.stdout may not write to fd 1 (pytest, Jupyter).
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            yield
    finally:
        _LIBC.fflush(None)  # std::cout writes through C stdio: empty its buffer into /dev/null
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in (*saved, null):
            os.close(fd)


def agglomerate(affs: np.ndarray, thresholds: Sequence[float], scoring_function: str, discretize_queue: int,
                gt: np.ndarray | None = None, keep: bool = True) -> list[tuple[np.ndarray | None, dict | None]]:
    """waterz.agglomerate, silenced: [(segmentation uint64 (S, H, W) or None, metrics or None)] per
    threshold, ascending. waterz yields ONE array that it mutates for every threshold: each is
    copied (`keep`), or only the metrics kept (gt given, keep False)."""
    import waterz

    affs = np.ascontiguousarray(affs, dtype=np.float32)
    gt32 = None if gt is None else as_uint32(gt)
    out: list[tuple[np.ndarray | None, dict | None]] = []
    with quiet_fds():
        for item in waterz.agglomerate(affs, thresholds=sorted(float(t) for t in thresholds), gt=gt32,
                                       scoring_function=scoring_function, discretize_queue=int(discretize_queue)):
            seg, metrics = (item[0], dict(item[1])) if gt32 is not None else (item, None)
            out.append((seg.copy() if keep else None, metrics))
    return out


def rand_to_arand(rand_split: float, rand_merge: float) -> float:
    s, m = float(rand_split), float(rand_merge)
    return 1.0 - 2.0 * s * m / (s + m) if s + m > 0 else float("nan")


def evaluate(segmentation: np.ndarray, gt: np.ndarray) -> dict[str, float]:
    """VOI split/merge/sum (bits) and ARAND of a segmentation against ground truth (0 ignored),
    by waterz's evaluation."""
    import waterz

    seg = np.ascontiguousarray(segmentation, dtype=np.uint64)
    ref = np.ascontiguousarray(gt, dtype=np.uint64)
    if seg.shape != ref.shape:
        raise ValueError(f"segmentation shape {seg.shape} does not match the ground truth {ref.shape}")
    if not ref.any():
        return {k: float("nan") for k in METRICS}
    with quiet_fds():
        m = waterz.evaluate(seg, ref)
    split, merge = float(m["voi_split"]), float(m["voi_merge"])
    return {"voi_split": split, "voi_merge": merge, "voi": split + merge,
            "arand": rand_to_arand(m["rand_split"], m["rand_merge"])}


def waterz_metrics(metrics: dict) -> dict[str, float]:
    """waterz.agglomerate's metrics (V_Info_*, V_Rand_*) under our names."""
    split, merge = float(metrics["V_Info_split"]), float(metrics["V_Info_merge"])
    return {"voi_split": split, "voi_merge": merge, "voi": split + merge,
            "arand": rand_to_arand(metrics["V_Rand_split"], metrics["V_Rand_merge"])}


# -- a prediction with what its figures need -------------------------------------------------------

class InstancePrediction(np.ndarray):
    """A uint64 (S, H, W) segmentation that carries `extras` for the figures: `slice` (the slice
    shown), `affinities` (3, H, W) of that slice, `features_rgb` (h, w, 3) uint8 (first three PCA
    components of its features), `threshold`. It is an ndarray everywhere else; extras survive
    views, copies and pickling."""

    extras: dict[str, Any]

    def __new__(cls, segmentation: np.ndarray, extras: dict[str, Any] | None = None) -> InstancePrediction:
        obj = np.asarray(segmentation).view(cls)
        obj.extras = dict(extras or {})
        return obj

    def __array_finalize__(self, obj: Any) -> None:
        self.extras = getattr(obj, "extras", {})

    def __reduce__(self):
        fn, args, state = super().__reduce__()
        return fn, args, (state, self.extras)

    def __setstate__(self, state):
        base, self.extras = state
        super().__setstate__(base)


def pca_rgb(features: np.ndarray) -> np.ndarray:
    """(C, h, w) features -> uint8 (h, w, 3): the first three principal components as RGB, each
    stretched min-max (the paper's Figure 5 view)."""
    c, h, w = features.shape
    x = np.asarray(features, dtype=np.float64).reshape(c, h * w).T
    x = x - x.mean(axis=0)
    _, _, vt = np.linalg.svd(x, full_matrices=False)
    comps = x @ vt[:3].T
    if comps.shape[1] < 3:
        comps = np.pad(comps, ((0, 0), (0, 3 - comps.shape[1])))
    lo, hi = comps.min(axis=0), comps.max(axis=0)
    rgb = (comps - lo) / np.where(hi - lo > 1e-12, hi - lo, 1.0)
    return np.rint(rgb * 255).astype(np.uint8).reshape(h, w, 3)


def label_colors(ids: np.ndarray) -> np.ndarray:
    """uint8 (..., 3): a fixed pseudo-random colour per id, 0 black."""
    ids = np.asarray(ids, dtype=np.uint64)
    rgb = np.stack([(ids * np.uint64(p)) % np.uint64(200) + np.uint64(55) for p in (2654435761, 40503, 2246822519)],
                   axis=-1).astype(np.uint8)
    rgb[ids == 0] = 0
    return rgb


# -- the target handler ----------------------------------------------------------------------------

@register_target_handler("instances")
class InstanceHandler:
    """Per-case VOI split/merge/sum and ARAND (waterz), the segmentation as HDF5 with the raw's
    resolution, a montage of one slice and the features' PCA view."""

    def case_metrics(self, sample: Sample, prediction: np.ndarray, classes: Sequence[str]) -> list[dict[str, Any]]:
        if sample.target is None:
            raise ValueError(f"{sample.case_id}: no ground truth to evaluate against")
        seg = np.asarray(prediction)
        m = evaluate(seg, sample.target)
        # voi first: runners that rank cases by their first metric rank them by the sum.
        row: dict[str, Any] = {"case_id": sample.case_id, "class": classes[0] if classes else "neuron",
                               **{k: m[k] for k in ("voi", "voi_split", "voi_merge", "arand")}}
        row["n_segments"] = int(len(np.unique(seg)))
        return [row]

    def aggregate(self, rows: Any, classes: Sequence[str]) -> dict[str, float]:
        import pandas as pd

        df = pd.DataFrame(rows)
        return {m: float(df[m].mean()) for m in METRICS if m in df and df[m].notna().any()}

    def prediction_files(self, sample: Sample, prediction: np.ndarray) -> dict[str, bytes]:
        import h5py

        seg = np.ascontiguousarray(prediction, dtype=np.uint64)
        buf = io.BytesIO()
        with h5py.File(buf, "w") as f:
            d = f.create_dataset("volumes/labels/neuron_ids", data=seg, compression="gzip", compression_opts=4)
            d.attrs["resolution"] = np.asarray(sample.spacing, dtype=np.float64)
            d.attrs["unit"] = sample.unit
            f.attrs["case_id"] = sample.case_id
            for k in ("path", "volume"):
                if k in sample.meta:
                    f.attrs[k] = str(sample.meta[k])
            if "z_range" in sample.meta:
                f.attrs["z_range"] = np.asarray(sample.meta["z_range"], dtype=np.int64)
            extras = getattr(prediction, "extras", {})
            if "threshold" in extras:
                f.attrs["threshold"] = float(extras["threshold"])
        return {f"{sample.case_id}_segmentation.h5": buf.getvalue()}

    def figures(self, cases: Sequence[tuple[Sample, np.ndarray, float]]) -> dict[str, bytes]:
        out: dict[str, bytes] = {}
        for sample, pred, _score in cases:
            out.update(case_figures(sample, pred))
        return out


def case_figures(sample: Sample, pred: np.ndarray) -> dict[str, bytes]:
    """`<case>_montage.png` (raw, ground truth, affinities, segmentation of one slice) and
    `<case>_features_pca.png` (raw and the features' first three PCA components as RGB)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    extras = getattr(pred, "extras", {})
    seg = np.asarray(pred)
    z = int(extras.get("slice", seg.shape[0] // 2))
    raw = sample.images[0, z]
    panels: list[tuple[str, np.ndarray | None]] = [("raw", raw)]
    if sample.target is not None:
        panels.append(("ground truth", label_colors(sample.target[z])))
    aff = extras.get("affinities")
    panels.append(("affinities (z, y, x as RGB)",
                   None if aff is None else np.moveaxis(np.clip(np.asarray(aff, np.float32), 0, 1), 0, -1)))
    panels.append((f"segmentation (threshold {extras['threshold']:g})" if "threshold" in extras else "segmentation",
                   label_colors(seg[z])))
    files = {f"{sample.case_id}_montage.png": _png(Figure, FigureCanvasAgg, panels, f"{sample.case_id}, slice {z}")}
    rgb = extras.get("features_rgb")
    if rgb is not None:
        files[f"{sample.case_id}_features_pca.png"] = _png(
            Figure, FigureCanvasAgg, [("raw", raw), (f"features: PCA 1-3 as RGB ({rgb.shape[0]}x{rgb.shape[1]})", rgb)],
            f"{sample.case_id}, slice {z}")
    return files


def _png(Figure, Canvas, panels: list[tuple[str, np.ndarray | None]], title: str) -> bytes:
    fig = Figure(figsize=(3.2 * len(panels), 3.6), dpi=110)
    Canvas(fig)
    h, w = panels[0][1].shape[:2]
    for i, (name, img) in enumerate(panels):
        ax = fig.add_subplot(1, len(panels), i + 1)
        if img is None:
            ax.text(0.5, 0.5, "not available", ha="center", va="center", transform=ax.transAxes)
        else:
            ax.imshow(img, cmap="gray" if img.ndim == 2 else None, interpolation="nearest",
                      extent=(0, w, h, 0), vmin=0, vmax=255 if img.dtype == np.uint8 else 1)
        ax.set_title(name, fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()
