"""Everything one analysis says, computed once: aggregated cells with bootstrap intervals, curves,
verdicts, and the flat tables written as `verdicts.csv` and `fits.csv`.

Which metrics get curves: every performance metric of a reference set or a points file (someone
chose them), the headline ones (`points.plotted_metrics`) of an MLflow sweep, which logs a dozen
near-duplicates (precision == precision_macro on multilabel sets) that would only widen the
family; `left_out` names every metric without curves and why, for the report.

Degenerate predictions: a cell whose overlap companion (Dice, IoU; `metric_table.is_overlap`) is
below ``DEGENERATE_OVERLAP`` (1% of a perfect overlap), or whose `empty*` share is >= 0.5, predicts
(almost) nothing; a distance or precision curve through such a cell measures the emptiness, not
the encoder. Such curves are `degenerate`, outside the family and the tally; an overlap curve is
degenerate when every one of its cells is. Interval columns of the aggregate (`ci_lo`, `ci_hi`) are replaced by the bootstrap's
percentile intervals where there are replicates; `ci_method` says which.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from analysis.curves import GROUP_KEY, Curve, CurveKey, Group, cell_intervals, group_curves, judge, make_group
from analysis.families import with_family
from analysis.fits import fit_rows
from analysis.metric_table import is_overlap
from analysis.points import aggregate, is_performance_metric, metric_order, plotted_metrics
from analysis.verdict_model import CurveVerdict
from analysis.verdict_text import ROW_COLUMNS, verdict_row

KEY_COLUMNS = ["dataset", "protocol", "metric", "weights", "axis", "fixed"]
CELL_COLUMNS = ["dataset", "protocol", "encoder", "weights", "resolution"]
DEGENERATE_OVERLAP = 0.01  # fraction of a perfect overlap (x100 for unit=percent)
EMPTY_SHARE = 0.5


@dataclass
class Study:
    points: pd.DataFrame
    agg: pd.DataFrame
    groups: list[Group]
    curves: list[Curve]
    verdicts: dict[CurveKey, CurveVerdict]
    n_boot: int
    reference: bool
    left_out: dict[str, str] = field(default_factory=dict)  # "dataset / protocol / metric" -> why no curves
    correction: str = "bh"

    def curve(self, key: CurveKey) -> Curve:
        return next(c for c in self.curves if c.key == key)


def judged_metrics(agg: pd.DataFrame, every_metric: bool) -> dict[tuple[str, str], list[str]]:
    """Metrics that get curves, per (dataset, protocol)."""
    out = {}
    for (ds, proto), g in agg.groupby(["dataset", "protocol"], sort=True):
        metrics = g["metric"].unique()
        out[(str(ds), str(proto))] = metric_order(metrics) if every_metric else plotted_metrics(metrics)
    return out


def _first(pts: pd.DataFrame, col: str) -> str:
    if col not in pts.columns:
        return ""
    vals = [str(v) for v in pts[col].dropna().unique() if str(v) not in ("", "nan")]
    return vals[0] if vals else ""


def degenerate_cells(agg: pd.DataFrame, units: dict[tuple[str, str, str], str]) -> set[tuple]:
    """Cells (CELL_COLUMNS values) whose overlap companion is ~0 or whose predictions are empty."""
    out = set()
    for _, r in agg.iterrows():
        metric, value = str(r["metric"]), float(r["mean"])
        unit = units.get((str(r["dataset"]), str(r["protocol"]), metric), "")
        if is_overlap(metric):
            bad = value < DEGENERATE_OVERLAP * (100.0 if unit == "percent" else 1.0)
        elif "empty" in metric and 0.0 <= value <= 1.0:
            bad = value >= EMPTY_SHARE
        else:
            continue
        if bad:
            out.add(tuple(r[c] for c in CELL_COLUMNS))
    return out


def build_study(df: pd.DataFrame, *, predictions: dict[str, pd.DataFrame] | None = None, n_boot: int = 1000,
                seed: int = 0, reference: bool = False, every_metric: bool | None = None,
                correction: str = "bh", describe: bool = True) -> Study:
    """Aggregate `df`, make each group's replicates, slice curves and judge them all at once
    (``describe=False``: verdicts without fitted forms, for callers that only read verdicts)."""
    d = df.copy()
    d["weights"] = d["weights"].fillna("").astype(str) if "weights" in d.columns else ""
    agg = with_family(aggregate(d), d)  # curves per family; the matched-compute table
    agg["ci_method"] = np.where(agg["n"] >= 2, "t over seeds", "none")
    perf = agg[agg["metric"].map(is_performance_metric)]
    every = reference if every_metric is None else every_metric
    wanted = judged_metrics(perf, every_metric=every)
    by_group = dict(iter(d.groupby(GROUP_KEY, sort=False)))
    units = {(str(k[0]), str(k[1]), str(k[2])): _first(p, "unit") for k, p in by_group.items()}
    bad_cells = degenerate_cells(agg, units)
    left_out: dict[str, str] = {}
    groups: list[Group] = []
    for key, cells in agg.groupby(GROUP_KEY, sort=True):
        ds, proto, metric, _ = map(str, key)
        name = f"{ds} / {proto} / {metric}"
        if not is_performance_metric(metric):
            left_out[name] = "bookkeeping (time, counts), not a result"
            continue
        if metric not in wanted.get((ds, proto), []):
            left_out[name] = ("not a headline metric: of MLflow runs only those are judged, since a sweep logs "
                              "near-duplicates that would only widen the family")
            continue
        pts = by_group[key]
        g = make_group(cells, pts, predictions=predictions, task=_first(pts, "task"), n_boot=n_boot, seed=seed,
                       unit=_first(pts, "unit"))
        flags = np.array([tuple(r[c] for c in CELL_COLUMNS) in bad_cells for _, r in g.cells.iterrows()])
        g.degenerate = flags if not is_overlap(metric) else np.full(flags.shape, bool(flags.all()))
        groups.append(g)
        if g.replicates is not None:
            lo, hi = cell_intervals(g)
            g.cells["ci_lo"], g.cells["ci_hi"] = lo, hi  # curves and plots read them from here
            agg.loc[cells.index, "ci_lo"], agg.loc[cells.index, "ci_hi"] = lo, hi
            agg.loc[cells.index, "ci_method"] = "bootstrap " + g.method if g.method != "printed-sd" else \
                "printed SD / sqrt(n)"
    curves = [c for g in groups for c in group_curves(g)]
    judged = {f"{c.key.dataset} / {c.key.protocol} / {c.key.metric}" for c in curves}
    for g in groups:
        r = g.cells.iloc[0]
        name = f"{r['dataset']} / {r['protocol']} / {r['metric']}"
        if name not in judged:
            left_out[name] = "no curve: fewer than two encoders at one resolution and no encoder at two resolutions"
    return Study(d, agg, groups, curves, judge(curves, correction, describe), n_boot, reference, left_out, correction)


def verdict_frame(study: Study) -> pd.DataFrame:
    """One row per curve (verdicts.csv): its key, margin, orientation and `verdict_row`.

    Effects (gain_total, gain_top = largest - best smaller, ...) are in the curve's orientation:
    for a lower-is-better metric (sign -1) a positive gain is a decrease of the metric.
    """
    rows = []
    for c in study.curves:
        v = study.verdicts[c.key]
        rows.append({**dict(zip(KEY_COLUMNS, (c.key.dataset, c.key.protocol, c.key.metric, c.key.weights,
                                              c.key.axis, c.key.fixed), strict=True)),
                     "sign": c.sign, "margin": c.margin, "unit": c.unit,
                     "x": " ".join(f"{x:g}" for x in c.x), **verdict_row(v)})
    if not rows:  # a study without curves still writes a readable CSV
        return pd.DataFrame(columns=[*KEY_COLUMNS, "sign", "margin", "unit", "x", *ROW_COLUMNS])
    return pd.DataFrame(rows)


def fits_frame(study: Study) -> pd.DataFrame:
    """`fits.fit_rows` of every curve with a fit (fits.csv), keyed like verdicts.csv.

    Fits are of the oriented values (sign * metric): undo with ``sign`` to get metric units.
    """
    rows = []
    for c in study.curves:
        key = dict(zip(KEY_COLUMNS, (c.key.dataset, c.key.protocol, c.key.metric, c.key.weights, c.key.axis,
                                     c.key.fixed), strict=True))
        for r in fit_rows(study.verdicts[c.key].fit):
            rows.append({**key, "sign": c.sign, **r})
    cols = KEY_COLUMNS + ["sign", "form", "selected", "k", "n", "aicc", "delta_aicc", "akaike_weight",
                          "loxo_rmse", "lolo_error", "monotone", "peak_x"]
    out = pd.DataFrame(rows)
    if out.empty:
        return pd.DataFrame(columns=cols)
    params = sorted(c for c in out.columns if c.startswith("param_"))
    return out[cols + params]
