"""What a dense cell does with 2D mask predictions (target kind `mask2d`): per-case metrics,
aggregate metrics, predicted masks as PNG at the image's size, best/worst overlays.

Predictions follow tasks.protocols.dense_base: int (H, W) label maps (multiclass; 0 = background,
value k = classes[k - 1]) or bool (C, H, W) masks (multilabel; channel k = classes[k]).

Per-case rows (one per case and class, plus one per group, e.g. EndoVis18's "instrument" = the
union of its instrument classes, declared by the dataset in `Sample.meta["groups"]`, plus one
`frame` row, class "challenge", holding the case's challenge IoU below in `iou`):
case_id, class, kind (class | group | frame), dice, iou, precision, recall, gt_pixels,
pred_pixels, height, width. Metrics are computed at the case's original size.

Empty convention: where a class is absent from both the ground truth and the prediction of a
case (empty union), dice, iou, precision and recall are NaN: the case says nothing about that
class and is left out of the class's mean (medpy's `dc` returns 0 there, scikit-learn's
`jaccard_score` 0 with a warning; every other case equals both exactly). Otherwise a zero
denominator gives 0 (a prediction on a case without the class: precision 0, recall 0; a missed
class: recall 0, precision 0), as scikit-learn's `zero_division=0`.

Aggregates (the runner adds `test_`): per class `dice_<class>` and `iou_<class>` = mean over cases
(NaN skipped); `mdice`, `miou`, `precision`, `recall` = means over classes of those class means;
per group `dice_<group>`, `iou_<group>` (EndoVis18's `iou_instrument` is Table 7's binary IoU);
`iou_challenge`: the EndoVis challenges' per-frame IoU as ISINet evaluates it (arXiv 2007.05533):
per case the mean IoU over the classes in its ground truth, then the mean over the cases that have
any (a case with an empty ground truth is left out; an empty prediction scores 0 on its classes).
Class names are lower-cased with runs of other characters as `_`.
"""

from __future__ import annotations

import io
import re
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from tasks.dense import Sample
from tasks.targets.base import register_target_handler

METRICS = ("dice", "iou", "precision", "recall")
ROW_COLUMNS = ("case_id", "class", "kind", *METRICS, "gt_pixels", "pred_pixels", "height", "width")
CHALLENGE = "challenge"  # the class name of each case's `frame` row (its challenge IoU)
OVERLAY_ALPHA = 0.5
FIGURE_MAX_SIDE = 512  # overlay panels are shrunk to this (a 1280x1024 frame x 3 panels stays small)


def slug(name: str) -> str:
    """A class name as part of a metric name: 'instrument-shaft' -> 'instrument_shaft'."""
    return re.sub(r"[^0-9a-zA-Z]+", "_", str(name)).strip("_").lower()


def overlap(pred: np.ndarray, gt: np.ndarray) -> dict[str, float]:
    """Dice, IoU, precision, recall of two boolean masks of one class (module doc: conventions)."""
    pred, gt = np.asarray(pred, dtype=bool), np.asarray(gt, dtype=bool)
    tp = int(np.count_nonzero(pred & gt))
    n_pred, n_gt = int(np.count_nonzero(pred)), int(np.count_nonzero(gt))
    fp, fn = n_pred - tp, n_gt - tp
    if n_pred == 0 and n_gt == 0:
        out = dict.fromkeys(METRICS, float("nan"))
    else:
        out = {"dice": 2 * tp / (2 * tp + fp + fn), "iou": tp / (tp + fp + fn),
               "precision": tp / n_pred if n_pred else 0.0, "recall": tp / n_gt if n_gt else 0.0}
    out.update(gt_pixels=float(n_gt), pred_pixels=float(n_pred))
    return out


def class_masks(labels: np.ndarray, n_classes: int) -> list[np.ndarray]:
    """Boolean masks per foreground class of a label map (multiclass) or a (C, H, W) mask stack."""
    labels = np.asarray(labels)
    if labels.ndim == 3:
        return [labels[k].astype(bool) for k in range(labels.shape[0])]
    return [labels == k for k in range(1, n_classes + 1)]


def _check_prediction(sample: Sample, prediction: np.ndarray, n_classes: int) -> None:
    size = tuple(sample.images.shape[2:4])
    if tuple(prediction.shape[-2:]) != size:
        raise ValueError(f"{sample.case_id}: prediction size {prediction.shape[-2:]} is not the image's {size}")
    if sample.target is not None and sample.target.ndim != prediction.ndim:
        raise ValueError(f"{sample.case_id}: prediction {prediction.shape} and target {sample.target.shape} "
                         "are not the same kind (label map vs multi-label masks)")
    if prediction.ndim == 3 and prediction.shape[0] != n_classes:
        raise ValueError(f"{sample.case_id}: {prediction.shape[0]} mask channels for {n_classes} classes")


def case_score(rows: Sequence[dict[str, Any]] | pd.DataFrame) -> float:
    """One number per case for choosing figures: the mean Dice over its class rows (NaN skipped;
    NaN when no class is present in either mask)."""
    df = pd.DataFrame(list(rows)) if not isinstance(rows, pd.DataFrame) else rows
    d = df.loc[df["kind"] == "class", "dice"].to_numpy(dtype=float)
    return float(np.nanmean(d)) if np.isfinite(d).any() else float("nan")


def palette(n_values: int, colors: dict[int, Sequence[int]] | None = None) -> list[int]:
    """A 256-entry PNG palette: the dataset's label colours where given, else distinct hues."""
    import colorsys

    pal = np.zeros((256, 3), dtype=np.uint8)
    for k in range(1, 256):
        r, g, b = colorsys.hsv_to_rgb((k * 0.61803) % 1.0, 0.85, 1.0)
        pal[k] = (int(r * 255), int(g * 255), int(b * 255))
    for k, c in (colors or {}).items():
        if 0 <= int(k) < 256:
            pal[int(k)] = np.asarray(c, dtype=np.uint8)[:3]
    return pal.reshape(-1).tolist()


def png_bytes(arr: np.ndarray, pal: list[int] | None = None) -> bytes:
    from PIL import Image

    im = Image.fromarray(np.ascontiguousarray(arr))
    if pal is not None:
        im = im.convert("P") if im.mode != "P" else im
        im.putpalette(pal)
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def prediction_name(sample: Sample) -> str:
    """The prediction's file name without suffix: the image's stem, under the folder the dataset
    names in `meta["pred_dir"]` where stems repeat (EndoVis18: seq_2/frame000)."""
    stem = str(sample.meta.get("stem") or sample.case_id)
    d = str(sample.meta.get("pred_dir") or "")
    return f"{d}/{stem}" if d else stem


@register_target_handler("mask2d")
class Mask2DHandler:
    """The mask2d TargetHandler (tasks.dense.TargetHandler); module doc: rows, conventions, names."""

    def case_metrics(self, sample: Sample, prediction: np.ndarray, classes: Sequence[str]) -> list[dict[str, Any]]:
        if sample.target is None:
            raise ValueError(f"{sample.case_id}: no ground truth to score against")
        prediction = np.asarray(prediction)
        _check_prediction(sample, prediction, len(classes))
        h, w = prediction.shape[-2:]
        preds, gts = class_masks(prediction, len(classes)), class_masks(sample.target, len(classes))
        rows = [{"case_id": sample.case_id, "class": name, "kind": "class", **overlap(p, g), "height": h, "width": w}
                for name, p, g in zip(classes, preds, gts, strict=True)]
        if prediction.ndim == 2:  # groups of label values (a union of classes as one binary mask)
            for group, values in (sample.meta.get("groups") or {}).items():
                vals = list(values)
                rows.append({"case_id": sample.case_id, "class": group, "kind": "group",
                             **overlap(np.isin(prediction, vals), np.isin(sample.target, vals)),
                             "height": h, "width": w})
        # The frame's challenge IoU as its own row, so `medscale analyze` resamples it over cases
        # like any other metric (analysis.casemetrics reads `iou` of class "challenge").
        per_class = rows[:len(classes)]
        in_gt = [r["iou"] for r in per_class if r["gt_pixels"] > 0]
        nan = float("nan")
        rows.append({"case_id": sample.case_id, "class": CHALLENGE, "kind": "frame", "dice": nan,
                     "iou": float(np.mean(in_gt)) if in_gt else nan, "precision": nan, "recall": nan,
                     "gt_pixels": sum(r["gt_pixels"] for r in per_class),
                     "pred_pixels": sum(r["pred_pixels"] for r in per_class), "height": h, "width": w})
        return [{c: r[c] for c in ROW_COLUMNS} for r in rows]

    def aggregate(self, rows: Any, classes: Sequence[str]) -> dict[str, float]:
        df = rows if isinstance(rows, pd.DataFrame) else pd.DataFrame(list(rows), columns=list(ROW_COLUMNS))
        out: dict[str, float] = {}
        per_class: dict[str, list[float]] = {m: [] for m in METRICS}
        for name in classes:
            sub = df[(df["kind"] == "class") & (df["class"] == name)]
            for m in METRICS:
                v = sub[m].to_numpy(dtype=float)
                mean = float(np.nanmean(v)) if np.isfinite(v).any() else float("nan")
                if m in ("dice", "iou"):
                    out[f"{m}_{slug(name)}"] = mean
                if np.isfinite(mean):
                    per_class[m].append(mean)
        for m, key in (("dice", "mdice"), ("iou", "miou"), ("precision", "precision"), ("recall", "recall")):
            out[key] = float(np.mean(per_class[m])) if per_class[m] else float("nan")
        for group in df.loc[df["kind"] == "group", "class"].unique():
            sub = df[(df["kind"] == "group") & (df["class"] == group)]
            for m in ("dice", "iou"):
                v = sub[m].to_numpy(dtype=float)
                out[f"{m}_{slug(group)}"] = float(np.nanmean(v)) if np.isfinite(v).any() else float("nan")
        frame = df.loc[df["kind"] == "frame", "iou"].to_numpy(dtype=float)
        out[f"iou_{CHALLENGE}"] = float(np.nanmean(frame)) if np.isfinite(frame).any() else float("nan")
        out["n_cases"] = float(df["case_id"].nunique())
        return out

    def prediction_files(self, sample: Sample, prediction: np.ndarray) -> dict[str, bytes]:
        """Multiclass: one palette PNG per case whose pixel values are the label values (0 =
        background) and whose palette shows the dataset's colours. Multilabel: one greyscale PNG
        per class, `<stem>_<class>.png`, 255 where the class is predicted (EDD2020's own
        `<stem>_<class>` mask naming). Paths are relative to the cell's prediction folder."""
        prediction = np.asarray(prediction)
        name = prediction_name(sample)
        if prediction.ndim == 2:
            if prediction.min(initial=0) < 0 or prediction.max(initial=0) > 255:
                raise ValueError(f"{sample.case_id}: label values outside 0..255 cannot be a PNG")
            pal = palette(256, sample.meta.get("colors"))
            return {f"{name}.png": png_bytes(prediction.astype(np.uint8), pal)}
        classes = sample.meta.get("classes") or [str(k) for k in range(prediction.shape[0])]
        return {f"{name}_{c}.png": png_bytes(np.where(prediction[k], 255, 0).astype(np.uint8))
                for k, c in enumerate(classes)}

    def figures(self, cases: Sequence[tuple[Sample, np.ndarray, float]]) -> dict[str, bytes]:
        """Overlays (image | ground truth | prediction) of the best and the worst case by score
        (e.g. `case_score`); cases with a NaN score are not chosen."""
        scored = [c for c in cases if np.isfinite(c[2])]
        if not scored:
            return {}
        best, worst = max(scored, key=lambda c: c[2]), min(scored, key=lambda c: c[2])
        out = {}
        for tag, (sample, pred, _score) in (("best", best), ("worst", worst)):
            name = prediction_name(sample).replace("/", "_")
            out[f"{tag}_{name}.png"] = png_bytes(overlay(sample, np.asarray(pred)))
        return out


def _colour_layer(labels: np.ndarray, colors: dict[int, Sequence[int]] | None) -> tuple[np.ndarray, np.ndarray]:
    """(RGB float (H, W, 3), alpha mask (H, W)) painting each class in its colour."""
    pal = np.asarray(palette(256, colors), dtype=np.float32).reshape(256, 3)
    if labels.ndim == 2:
        return pal[labels.astype(np.int64).clip(0, 255)], labels > 0
    rgb = np.zeros((*labels.shape[1:], 3), dtype=np.float32)
    for k in range(labels.shape[0]):  # multilabel: later classes paint over earlier ones
        rgb[labels[k].astype(bool)] = pal[k + 1]
    return rgb, labels.any(axis=0)


def overlay(sample: Sample, prediction: np.ndarray) -> np.ndarray:
    """uint8 (H', W'*3, 3): the image, the ground truth over it, the prediction over it."""
    from PIL import Image

    img = sample.images[0, 0]
    img = np.repeat(img[..., None], 3, axis=2) if img.ndim == 2 else img[..., :3]
    base = img.astype(np.float32)
    colors = sample.meta.get("colors")
    panels = [img]
    for labels in (sample.target if sample.target is not None else np.zeros_like(prediction), prediction):
        rgb, alpha = _colour_layer(np.asarray(labels), colors)
        a = OVERLAY_ALPHA * alpha[..., None]
        panels.append(np.clip(base * (1 - a) + rgb * a, 0, 255).astype(np.uint8))
    strip = np.concatenate(panels, axis=1)
    h, w = img.shape[:2]
    scale = min(1.0, FIGURE_MAX_SIDE / max(h, w))
    if scale < 1.0:
        strip = np.asarray(Image.fromarray(strip).resize((int(w * scale) * 3, max(1, int(h * scale))),
                                                         Image.Resampling.BILINEAR))
    return strip
