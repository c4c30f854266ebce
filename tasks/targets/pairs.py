"""Registration geometry and metrics, shared by the registration head, its cell runner and tests.

Convention (tasks.protocols.dense_base.Registration): a displacement field `u` is float (ndim, *size)
in voxels of the fixed grid, components in array-axis order; the fixed-grid point x samples the
moving image at x + u[:, x]. Labels are warped with nearest-neighbour sampling (labels stay
labels; outside the moving image is background), images linearly (edge values outside).

Metrics per pair and per label, of the warped moving segmentation against the fixed one: Dice,
HD95 and ASD (medpy.metric.binary, with voxel spacing per array axis: pixels for CAMUS, mm for
ACDC). medpy raises on an empty mask: the distance is then NaN and counted (`n_nan_*`), never
dropped silently. The share of folding voxels is that of Jacobian determinant <= 0 of x -> x + u.
No Ray, no MLflow here.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from scipy import ndimage

METRICS = ("dice", "hd95", "asd")


def _coords(displacement: np.ndarray) -> np.ndarray:
    u = np.asarray(displacement, dtype=np.float64)
    grid = np.stack(np.meshgrid(*[np.arange(n, dtype=np.float64) for n in u.shape[1:]], indexing="ij"))
    return grid + u


def warp_labels(labels: np.ndarray, displacement: np.ndarray) -> np.ndarray:
    """Nearest-neighbour warp of a label map (*size) by a displacement (ndim, *size) on the same
    grid: the result holds only values of `labels` (0 where x + u falls outside)."""
    labels = np.asarray(labels)
    if displacement.shape[0] != labels.ndim or displacement.shape[1:] != labels.shape:
        raise ValueError(f"displacement {displacement.shape} does not fit labels {labels.shape}")
    # Round then index (not map_coordinates order=0 on floats): exact for any integer label dtype.
    idx = np.rint(_coords(displacement)).astype(np.int64)
    inside = np.ones(labels.shape, dtype=bool)
    for a, n in enumerate(labels.shape):
        inside &= (idx[a] >= 0) & (idx[a] < n)
        np.clip(idx[a], 0, n - 1, out=idx[a])
    out = labels[tuple(idx)]
    out[~inside] = 0
    return out


def warp_image(image: np.ndarray, displacement: np.ndarray) -> np.ndarray:
    """Linear warp of an image (*size) (float32 out); edge values continue outside the image."""
    image = np.asarray(image, dtype=np.float32)
    return ndimage.map_coordinates(image, _coords(displacement), order=1, mode="nearest").astype(np.float32)


def jacobian_determinant(displacement: np.ndarray) -> np.ndarray:
    """det(I + grad u) per voxel (central differences inside, one-sided at the border)."""
    u = np.asarray(displacement, dtype=np.float64)
    nd = u.shape[0]
    if nd not in (2, 3):
        raise ValueError(f"displacement must be (2, H, W) or (3, D, H, W), got {u.shape}")
    J = np.empty((nd, nd, *u.shape[1:]))
    for i in range(nd):
        grads = np.gradient(u[i]) if min(u.shape[1:]) > 1 else [np.zeros_like(u[i])] * nd
        for j in range(nd):
            J[i, j] = grads[j] + (1.0 if i == j else 0.0)
    if nd == 2:
        return J[0, 0] * J[1, 1] - J[0, 1] * J[1, 0]
    return (J[0, 0] * (J[1, 1] * J[2, 2] - J[1, 2] * J[2, 1])
            - J[0, 1] * (J[1, 0] * J[2, 2] - J[1, 2] * J[2, 0])
            + J[0, 2] * (J[1, 0] * J[2, 1] - J[1, 1] * J[2, 0]))


def folding_share(displacement: np.ndarray) -> float:
    """Share of voxels where the transform folds (Jacobian determinant <= 0)."""
    return float((jacobian_determinant(displacement) <= 0).mean())


def label_metrics(result: np.ndarray, reference: np.ndarray, spacing: Sequence[float]) -> dict[str, float]:
    """Dice, HD95, ASD of two boolean masks (medpy). A label absent from the reference gives NaN for
    all three (nothing to match); absent from the result gives Dice 0 and NaN distances."""
    from medpy.metric import binary

    result, reference = np.asarray(result, bool), np.asarray(reference, bool)
    if not reference.any():
        return {m: float("nan") for m in METRICS}
    out = {"dice": float(binary.dc(result, reference))}
    for name, fn in (("hd95", binary.hd95), ("asd", binary.asd)):
        try:
            out[name] = float(fn(result, reference, voxelspacing=tuple(float(s) for s in spacing)))
        except RuntimeError:  # medpy: "The first/second supplied array does not contain any binary object."
            out[name] = float("nan")
    return out


def pair_rows(pair_id: str, split: str, warped: np.ndarray, fixed: np.ndarray, classes: Sequence[str],
              spacing: Sequence[float], folding: float) -> list[dict[str, Any]]:
    """Rows of the per-case table for one pair: one per label (label k is classes[k - 1]), columns
    case_id (the pair), split, class, dice, hd95, asd, folding_share. `split` is "test" for the
    registered pair and "identity" for the same test pair unregistered (the reference every run
    carries); `medscale analyze` reads the "test" rows, as it reads any dense run's per_case table."""
    rows = []
    for k, name in enumerate(classes, start=1):
        m = label_metrics(warped == k, fixed == k, spacing)
        rows.append({"case_id": pair_id, "split": split, "class": name, **m, "folding_share": float(folding)})
    return rows


def pair_mean(rows: list[dict[str, Any]], metric: str) -> float:
    """A pair's mean of `metric` over its labels (NaN skipped; NaN when every label is NaN)."""
    v = [r[metric] for r in rows if np.isfinite(r[metric])]
    return float(np.mean(v)) if v else float("nan")


def aggregate(table: Any, classes: Sequence[str]) -> dict[str, float]:
    """Run metrics from the per-case table, per split prefix (`test_`, `identity_`): for each metric,
    per label the mean over pairs (NaN skipped), then the mean over labels (`test_dice`; the dense
    handlers' aggregate, which `medscale analyze` recomputes on resampled pairs), per label
    (`test_dice_LV`), `test_folding_share` (mean share of folding voxels over pairs), NaN counts
    (`test_n_nan_hd95`: label-pair values that were NaN: an empty warped label) and `test_n_pairs`."""
    out: dict[str, float] = {}
    for split, df in table.groupby("split"):
        for m in METRICS:
            per = {c: df.loc[df["class"] == c, m] for c in classes}
            means = {c: float(v.mean()) if v.notna().any() else float("nan") for c, v in per.items()}
            finite = [v for v in means.values() if np.isfinite(v)]
            out[f"{split}_{m}"] = float(np.mean(finite)) if finite else float("nan")
            out.update({f"{split}_{m}_{c}": v for c, v in means.items()})
            out[f"{split}_n_nan_{m}"] = float(df[m].isna().sum())
        out[f"{split}_folding_share"] = float(df.groupby("case_id")["folding_share"].first().mean())
        out[f"{split}_n_pairs"] = float(df["case_id"].nunique())
    return out


def contraction_field(shape: Sequence[int], centre: Sequence[float], amplitude: float, sigma: float,
                      axes: Sequence[int] | None = None) -> np.ndarray:
    """A smooth, fold-free synthetic deformation (for `synth` datasets): u(x) = amplitude * (x - c) *
    exp(-|x - c|^2 / (2 sigma^2)) on the listed axes (all by default), 0 on the others. With
    ES(x) = ED(x + u(x)) and amplitude > 0, structures near c shrink: a systolic contraction."""
    grid = np.stack(np.meshgrid(*[np.arange(n, dtype=np.float64) for n in shape], indexing="ij"))
    d = grid - np.asarray(centre, dtype=np.float64).reshape(-1, *([1] * len(shape)))
    g = np.exp(-(d ** 2).sum(0) / (2 * sigma ** 2))
    u = amplitude * d * g
    for a in range(len(shape)):
        if axes is not None and a not in axes:
            u[a] = 0
    return u.astype(np.float32)
