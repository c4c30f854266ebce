"""The mask3d target handler: per-case metrics, the run's aggregate, NIfTI predictions, overlays.

Per case and foreground class (voxel-wise, on the case's original grid):
- dice: 2|P&G| / (|P| + |G|) (medpy `dc`); NaN when both are empty (the class is absent and
  correctly not predicted: no overlap to measure; left out of means, counted as `n_absent`);
- hd95 in mm: medpy `hd95(pred, gt, voxelspacing=spacing)` with the case's (z, y, x) spacing
  (anisotropic voxels count in millimetres). An empty prediction has no surface: hd95 is NaN and
  the row says `empty_prediction = 1`; the aggregate counts such rows (`n_empty_predictions`) and
  never drops them silently (the analysis treats them as the worst case). NaN too when the ground
  truth is empty but the prediction is not (no reference surface; `empty_target = 1`).
- precision TP/(TP+FP) (0 for an empty prediction of a present class), recall TP/(TP+FN) (NaN
  when the class is absent).

Predictions are written as NIfTI on the source file's own grid (the canonical (z, y, x) array is
turned back to the file's axes; the file's affine), so they open over the image in 3D Slicer or
ITK-SNAP. No Ray, no MLflow here.
"""

from __future__ import annotations

import gzip
import io
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from tasks.dense import Sample
from tasks.targets.base import register_target_handler

METRICS = ("dice", "hd95", "precision", "recall")


def binary_metrics(pred: np.ndarray, gt: np.ndarray, spacing: Sequence[float]) -> dict[str, float]:
    """Dice, HD95 (mm), precision, recall of one binary mask pair, with the empty-case rules above."""
    from medpy.metric.binary import hd95

    p, g = pred.astype(bool), gt.astype(bool)
    tp = float(np.count_nonzero(p & g))
    n_p, n_g = float(np.count_nonzero(p)), float(np.count_nonzero(g))
    dice = 2.0 * tp / (n_p + n_g) if n_p + n_g else float("nan")
    hd = float("nan")
    if n_p and n_g:
        hd = float(hd95(p, g, voxelspacing=tuple(float(s) for s in spacing)))
    return {"dice": dice, "hd95": hd, "precision": tp / n_p if n_p else (0.0 if n_g else float("nan")),
            "recall": tp / n_g if n_g else float("nan"), "empty_prediction": int(n_p == 0),
            "empty_target": int(n_g == 0), "n_pred": int(n_p), "n_target": int(n_g)}


def to_file_grid(prediction: np.ndarray, sample: Sample) -> np.ndarray:
    """A canonical (z, y, x) label map -> the source file's array axes (x', y', z')."""
    import nibabel as nib

    can = np.asarray(prediction).transpose(2, 1, 0)  # (x, y, z) in RAS
    ornt = sample.meta.get("to_file_ornt")
    return can if ornt is None else nib.orientations.apply_orientation(can, ornt)


def nifti_bytes(prediction: np.ndarray, sample: Sample) -> bytes:
    """The prediction as .nii.gz bytes on the image's affine (uint8 labels; spacing in the header)."""
    import nibabel as nib

    data = np.ascontiguousarray(to_file_grid(prediction, sample).astype(np.uint8))
    img = nib.Nifti1Image(data, sample.affine if sample.affine is not None else np.eye(4))
    img.header.set_xyzt_units("mm")
    return gzip.compress(img.to_bytes(), compresslevel=6)


@register_target_handler("mask3d")
class Mask3DHandler:
    def case_metrics(self, sample: Sample, prediction: np.ndarray, classes: Sequence[str]) -> list[dict[str, Any]]:
        if sample.target is None:
            raise ValueError(f"{sample.case_id}: no ground truth to score against")
        pred, gt = np.asarray(prediction), np.asarray(sample.target)
        if pred.shape != gt.shape:
            raise ValueError(f"{sample.case_id}: prediction {pred.shape} does not match the label volume {gt.shape}")
        rows = []
        for k, name in enumerate(classes, start=1):
            rows.append({"case_id": sample.case_id, "class": name,
                         **binary_metrics(pred == k, gt == k, sample.spacing)})
        return rows

    def aggregate(self, rows: Any, classes: Sequence[str]) -> dict[str, float]:
        """Per class: mean over cases of each metric (NaN entries left out of the mean, counted);
        `<metric>_mean`: the mean over classes (Tables 10-11's per-task Dice is dice_mean)."""
        df = pd.DataFrame(rows)
        out: dict[str, float] = {}
        for m in METRICS:
            per = []
            for c in classes:
                v = df.loc[df["class"] == c, m].astype(float)
                out[f"{m}_{c}"] = float(v.mean()) if v.notna().any() else float("nan")
                per.append(out[f"{m}_{c}"])
            fin = [x for x in per if np.isfinite(x)]
            out[f"{m}_mean"] = float(np.mean(fin)) if fin else float("nan")
        present = df["empty_target"] == 0
        out["n_empty_predictions"] = float(((df["empty_prediction"] == 1) & present).sum())
        out["n_absent"] = float(((df["empty_prediction"] == 1) & ~present).sum())
        out["n_cases"] = float(df["case_id"].nunique())
        return out

    def prediction_files(self, sample: Sample, prediction: np.ndarray) -> dict[str, bytes]:
        return {f"predictions/{sample.case_id}.nii.gz": nifti_bytes(prediction, sample)}

    def figures(self, cases: Sequence[tuple[Sample, np.ndarray, float]]) -> dict[str, bytes]:
        """One PNG per given case: the axial slice with the most ground truth, first modality in
        grey, ground truth in green, prediction in red (overlap yellow)."""
        from PIL import Image

        out = {}
        for sample, pred, score in cases:
            gt = sample.target if sample.target is not None else np.zeros_like(pred)
            z = int(np.argmax((gt > 0).reshape(gt.shape[0], -1).sum(1))) if gt.any() else gt.shape[0] // 2
            grey = sample.images[0, z]
            grey = grey if grey.ndim == 2 else grey[..., 0]
            rgb = np.repeat(grey[..., None], 3, axis=2).astype(np.float32) * 0.6
            rgb[..., 1] += 100 * (gt[z] > 0)
            rgb[..., 0] += 100 * (np.asarray(pred)[z] > 0)
            buf = io.BytesIO()
            Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8)).save(buf, format="PNG")
            out[f"figures/{sample.case_id}_dice{score:.3f}.png"] = buf.getvalue()
        return out
