"""What the analysis knows about a metric, in one table: which way is better, the verdict margin,
the axis label and unit, and whether it measures overlap (the companion that tells a degenerate
prediction apart).

Why one table: direction, margin and label used to live in three modules, so a new metric (a
dense protocol adds HD95, VOI, folding share) could be judged upside down or with a [0, 1] margin
on a millimetre scale. Add a metric here - a name, or a prefix for a family - and every part of
the analysis (orientation, margins, plots, tables, reference checks) follows.

Margins are in the metric's own units on its natural scale (``scale``: "fraction" metrics are
multiplied by 100 when a points file or table says ``unit=percent``). Why these values: 0.005 is
half a point of AUC/accuracy/Dice, below what a reader of the paper's tables calls a difference;
VOI (bits, log2) and surface distances (px or mm) live on other scales, where 0.05 bits and half a
pixel/mm are the smallest differences the paper's baselines are ranked by; a folding share of
0.001 (0.1% of voxels) is the resolution registration papers report it at.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class MetricInfo:
    higher: bool = True  # higher is better
    margin: float = 0.005  # verdict margin in the metric's units (fraction scale for "fraction")
    label: str = ""  # axis/table label; the name when empty
    unit: str = ""  # printed unit of the values ("" for fractions, "mm", "bits", ...)
    scale: str = "fraction"  # "fraction": the margin scales with unit=percent; "absolute": it does not
    overlap: bool = False  # an overlap score: ~0 means the prediction misses (or is empty)


_DIST = MetricInfo(higher=False, margin=0.5, unit="px or mm", scale="absolute")
METRICS: dict[str, MetricInfo] = {
    "auc": MetricInfo(label="AUC"), "acc": MetricInfo(label="accuracy"),
    "precision": MetricInfo(label="precision"), "recall": MetricInfo(label="recall"),
    "f1_macro": MetricInfo(label="F1 (macro)"), "f1_weighted": MetricInfo(label="F1 (weighted)"),
    "dice": MetricInfo(label="Dice", overlap=True), "iou": MetricInfo(label="IoU", overlap=True),
    "mdice": MetricInfo(label="mean Dice", overlap=True), "miou": MetricInfo(label="mIoU", overlap=True),
    "binary_iou": MetricInfo(label="binary IoU", overlap=True),
    "instrument_iou": MetricInfo(label="instrument IoU", overlap=True),
    "hd": MetricInfo(**{**_DIST.__dict__, "label": "HD"}), "hd95": MetricInfo(**{**_DIST.__dict__, "label": "HD95"}),
    "asd": MetricInfo(**{**_DIST.__dict__, "label": "ASD", "margin": 0.1}),
    "assd": MetricInfo(**{**_DIST.__dict__, "label": "ASSD", "margin": 0.1}),
    "tre": MetricInfo(higher=False, margin=0.1, label="TRE", unit="mm", scale="absolute"),
    "voi": MetricInfo(higher=False, margin=0.05, label="VOI", unit="bits", scale="absolute"),
    "voi_split": MetricInfo(higher=False, margin=0.05, label="VOI split", unit="bits", scale="absolute"),
    "voi_merge": MetricInfo(higher=False, margin=0.05, label="VOI merge", unit="bits", scale="absolute"),
    "arand": MetricInfo(higher=False, label="ARAND"),
    "cremi": MetricInfo(higher=False, margin=0.05, label="CREMI score", scale="absolute"),
    "folding": MetricInfo(higher=False, margin=0.001, label="folding share"),
    "folding_share": MetricInfo(higher=False, margin=0.001, label="folding share"),
    "loss": MetricInfo(higher=False, label="loss", scale="absolute"),
    "error": MetricInfo(higher=False), "ece": MetricInfo(higher=False, label="ECE"),
    "brier": MetricInfo(higher=False, label="Brier score"),
    "balanced_accuracy": MetricInfo(label="balanced accuracy"), "f1": MetricInfo(label="F1"),
    "auprc": MetricInfo(label="AUPRC"), "average_precision": MetricInfo(label="average precision"),
    "sensitivity": MetricInfo(label="sensitivity"), "specificity": MetricInfo(label="specificity"),
}
# other names tools give the same scores (names are read case-blind: AUROC, Accuracy): one entry each
METRICS |= {"accuracy": METRICS["acc"], "auroc": METRICS["auc"], "roc_auc": METRICS["auc"]}
# Families by name: the first matching prefix (or suffix) wins when the exact name is not listed.
PREFIXES: tuple[tuple[str, str], ...] = (("hd95", "hd95"), ("hd_", "hd"), ("assd", "assd"), ("asd", "asd"),
                                         ("voi_split", "voi_split"), ("voi_merge", "voi_merge"), ("voi", "voi"),
                                         ("arand", "arand"), ("folding", "folding"), ("dice", "dice"),
                                         ("iou", "iou"), ("tre", "tre"))
LOWER_SUFFIXES = ("_error", "_loss", "_distance")


def metric_info(metric: str) -> MetricInfo:
    label, m = str(metric), str(metric).lower()  # names are case-blind; labels keep the case
    if m in METRICS:
        return METRICS[m]
    for prefix, name in PREFIXES:
        if m.startswith(prefix):
            return MetricInfo(**{**METRICS[name].__dict__, "label": label})
    for name in sorted(METRICS, key=len, reverse=True):  # a qualified name: identity_hd95, val_dice
        if m.endswith("_" + name):
            return MetricInfo(**{**METRICS[name].__dict__, "label": label})
    if m.endswith(("_dice", "_iou")):
        return MetricInfo(label=label, overlap=True)
    if m.endswith(LOWER_SUFFIXES):
        return MetricInfo(higher=False, label=label, scale="absolute")
    return MetricInfo(label=label)


def higher_is_better(metric: str) -> bool:
    return metric_info(metric).higher


def lower_is_better_names() -> frozenset[str]:
    return frozenset(k for k, v in METRICS.items() if not v.higher)


def margin_for(metric: str, unit: str = "") -> float:
    """The verdict's equivalence margin for `metric` whose values are in `unit` ("percent" x100)."""
    info = metric_info(metric)
    return info.margin * (100.0 if unit == "percent" and info.scale == "fraction" else 1.0)


def metric_label(metric: str) -> str:
    return metric_info(metric).label or str(metric)


def axis_label(metric: str, unit: str = "") -> str:
    """Y-axis text: the label, the unit and which way is better, e.g. 'HD95 (mm) ↓ lower is better'."""
    info = metric_info(metric)
    u = "%" if unit == "percent" else (unit if unit not in ("", "fraction") else info.unit)
    arrow = "↑ higher is better" if info.higher else "↓ lower is better"
    return f"{metric_label(metric)}{f' ({u})' if u else ''}  {arrow}"


def is_overlap(metric: str) -> bool:
    return metric_info(metric).overlap
