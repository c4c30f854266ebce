"""Everything one analysis says, computed once: aggregated cells with bootstrap intervals, curves,
verdicts, and the flat tables written as `verdicts.csv` and `fits.csv`.

Which metrics get curves: every performance metric of a reference set (its tables are the point),
the headline ones (`points.plotted_metrics`) of a sweep or points file, which log a dozen
near-duplicates (precision == precision_macro on multilabel sets) that would only widen the Holm
family. Interval columns of the aggregate (`ci_lo`, `ci_hi`) are replaced by the bootstrap's
percentile intervals where there are replicates; `ci_method` says which.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from analysis.curves import GROUP_KEY, Curve, CurveKey, Group, cell_intervals, group_curves, judge, make_group
from analysis.fits import fit_rows
from analysis.points import aggregate, is_performance_metric, metric_order, plotted_metrics
from analysis.verdict import CurveVerdict, verdict_row

KEY_COLUMNS = ["dataset", "protocol", "metric", "weights", "axis", "fixed"]


@dataclass
class Study:
    points: pd.DataFrame
    agg: pd.DataFrame
    groups: list[Group]
    curves: list[Curve]
    verdicts: dict[CurveKey, CurveVerdict]
    n_boot: int
    reference: bool

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


def build_study(df: pd.DataFrame, *, predictions: dict[str, pd.DataFrame] | None = None, n_boot: int = 1000,
                seed: int = 0, reference: bool = False) -> Study:
    """Aggregate `df`, make each group's replicates, slice curves and judge them all at once."""
    d = df.copy()
    d["weights"] = d["weights"].fillna("").astype(str) if "weights" in d.columns else ""
    agg = aggregate(d)
    agg["ci_method"] = np.where(agg["n"] >= 2, "t over seeds", "none")
    wanted = judged_metrics(agg[agg["metric"].map(is_performance_metric)], every_metric=reference)
    groups: list[Group] = []
    by_group = dict(iter(d.groupby(GROUP_KEY, sort=False)))
    for key, cells in agg.groupby(GROUP_KEY, sort=True):
        ds, proto, metric, _ = map(str, key)
        if metric not in wanted.get((ds, proto), []):
            continue
        pts = by_group[key]
        g = make_group(cells, pts, predictions=predictions, task=_first(pts, "task"), n_boot=n_boot, seed=seed,
                       unit=_first(pts, "unit"))
        groups.append(g)
        if g.replicates is not None:
            lo, hi = cell_intervals(g)
            g.cells["ci_lo"], g.cells["ci_hi"] = lo, hi  # curves and plots read them from here
            agg.loc[cells.index, "ci_lo"], agg.loc[cells.index, "ci_hi"] = lo, hi
            agg.loc[cells.index, "ci_method"] = "bootstrap " + g.method
    curves = [c for g in groups for c in group_curves(g)]
    return Study(d, agg, groups, curves, judge(curves), n_boot, reference)


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
