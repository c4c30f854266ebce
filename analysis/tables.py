"""The report's tables: results in the paper's style (best **bold**, second <u>underlined</u>),
the verdict table and the selected fits. Each returns (header, rows) for `Document.table`.

Ranking uses the values as displayed, so the bold cell is the one a reader sees as best, and ties
share a mark; lower-is-better metrics (HD95, VOI, ...) rank the other way.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from analysis.curves import curve_order
from analysis.document import Cell
from analysis.plots import metric_label
from analysis.points import higher_is_better, model_label
from analysis.study import Study
from analysis.verdict_model import CurveVerdict, Effect
from analysis.verdict_text import format_x

DIGITS = 4  # as in the paper's tables
MISSING = "–"
AXIS_UNITS = {"params": "", "resolution": " px", "gflops": " GF"}
VERDICT_HEADER = ["dataset", "protocol", "metric", "axis", "at", "n", "verdict", "reason", "P(monotone ↑)",
                  "P(best = largest)", "peak [95% CI]", "largest − best smaller [95% CI]",
                  "gain / doubling at top [95% CI]", "corrected p", "variance: cases / seeds"]


def rank_marks(means: pd.Series, higher: bool = True, digits: int = DIGITS) -> pd.Series:
    """'best', 'second' or '' per cell, on the values as displayed (ties share a mark)."""
    shown = means.round(digits)
    distinct = sorted(shown.dropna().unique(), reverse=higher)
    marks = pd.Series("", index=means.index)
    if distinct:
        marks[shown == distinct[0]] = "best"
    if len(distinct) > 1:
        marks[shown == distinct[1]] = "second"
    return marks


def _fmt_cell(mean: float, std: float, n: int) -> str:
    return f"{mean:.{DIGITS}f} ± {std:.{DIGITS}f}" if n >= 2 and std == std else f"{mean:.{DIGITS}f}"


def headline_table(sub: pd.DataFrame, several_kinds: bool) -> tuple[list[str], list[list]]:
    """One metric of one (dataset, protocol): rows encoder, columns resolution, mean ± std over seeds."""
    sub = sub.reset_index(drop=True)
    marks = rank_marks(sub["mean"], higher_is_better(str(sub["metric"].iloc[0])))
    resolutions = sorted(int(r) for r in sub["resolution"].unique())
    models = sub[["encoder", "weights", "params"]].drop_duplicates().sort_values(["params", "encoder", "weights"])
    header = ["encoder", "params (M)"] + [f"{r} px" if r > 0 else "n/s" for r in resolutions]
    rows = []
    for enc, w, p in models.itertuples(index=False):
        row: list = [model_label(enc, w, several_kinds), f"{p / 1e6:.1f}"]
        for r in resolutions:
            hit = sub.index[(sub["encoder"] == enc) & (sub["weights"] == w) & (sub["resolution"] == r)]
            if len(hit) == 0:
                row.append(Cell(MISSING))
                continue
            i = hit[0]
            row.append(Cell(_fmt_cell(sub.at[i, "mean"], sub.at[i, "std"], int(sub.at[i, "n"])), marks[i]))
        rows.append(row)
    return header, rows


def reference_table(ref: pd.DataFrame) -> tuple[list[str], list[list]]:
    """One published table: rows encoder, columns (dataset, metric) as printed, ± the paper's spread."""
    cols = list(dict.fromkeys(zip(ref["dataset"], ref["protocol"], ref["metric"], strict=True)))
    several_protocols = ref["protocol"].nunique() > 1
    header = ["encoder", "params (M)"] + [
        f"{d} {metric_label(m)}" + (f" ({p})" if several_protocols else "") + ("" if higher_is_better(m) else " ↓")
        for d, p, m in cols]
    encs = ref[["encoder", "params"]].drop_duplicates().sort_values("params")
    cells: dict[tuple, Cell] = {}
    for d, p, m in cols:
        sub = ref[(ref["dataset"] == d) & (ref["protocol"] == p) & (ref["metric"] == m)]
        decimals = max((len(t.split(".")[1]) if "." in t else 0) for t in sub["value_text"])
        marks = rank_marks(sub["value"], higher_is_better(m), decimals)
        for i, row in sub.iterrows():
            text = row["value_text"] or "NaN"
            if row["spread_text"]:
                text += f" ± {row['spread_text']}"
            cells[(d, p, m, row["encoder"])] = Cell(text, marks[i])
    rows = [[e, f"{p / 1e6:.1f}"] + [cells.get((d, pr, m, e), Cell(MISSING)) for d, pr, m in cols]
            for e, p in encs.itertuples(index=False)]
    return header, rows


def fmt_x(axis: str, x: float) -> str:
    if not math.isfinite(x):
        return "–"
    return (f"{x:.3g}" if axis == "gflops" else format_x(x)) + AXIS_UNITS.get(axis, "")


def fmt_p(p: float) -> str:
    if not math.isfinite(p):
        return "–"
    return f"{p:.1e}" if p < 0.001 else f"{p:.3f}"


def fmt_effect(e: Effect, no_ci: bool) -> str:
    if not math.isfinite(e.estimate):
        return "–"
    if no_ci:
        return f"{e.estimate:+.4g} (no CI)"
    return f"{e.estimate:+.4g} [{e.lo:+.4g}, {e.hi:+.4g}]"


def _peak(axis: str, v: CurveVerdict) -> str:
    if v.no_ci or not math.isfinite(v.peak_ci[0]):
        return fmt_x(axis, v.peak_x)
    return f"{fmt_x(axis, v.peak_x)} [{fmt_x(axis, v.peak_ci[0])}, {fmt_x(axis, v.peak_ci[1])}]"


def verdict_table(study: Study) -> tuple[list[str], list[list]]:
    rows = []
    for c in sorted(study.curves, key=curve_order):
        v = study.verdicts[c.key]
        metric = metric_label(c.key.metric) + (" ↓" if c.sign < 0 else "")
        rows.append([c.key.dataset, c.key.protocol, metric, c.key.axis, c.key.fixed, str(v.x.size),
                     Cell(v.label, css=f"v-{v.verdict}"), v.reason,
                     "–" if math.isnan(v.p_increasing) else f"{v.p_increasing:.2f}",
                     "–" if math.isnan(v.p_best_largest) else f"{v.p_best_largest:.2f}",
                     _peak(c.key.axis, v), fmt_effect(v.gain_top, v.no_ci), fmt_effect(v.slope_top, v.no_ci),
                     fmt_p(v.p_adj), variance_split(v.var_split)])
    return VERDICT_HEADER, rows


def variance_split(split: dict[str, float]) -> str:
    """'72% / 28%' (cases / seeds) and any other source after them; '–' without intervals."""
    if not split:
        return "–"
    known = [f"{100 * split.get(k, 0.0):.0f}%" for k in ("cases", "seeds")]
    other = [f"{k} {100 * v:.0f}%" for k, v in split.items() if k not in ("cases", "seeds")]
    return " / ".join(known) + (f" ({', '.join(other)})" if other else "")


def fits_table(study: Study, min_points: int = 4) -> tuple[list[str], list[list]]:
    """The AICc-selected form of every curve with >= `min_points` points (3 points admit only flat)."""
    header = ["curve", "n", "selected form", "Akaike weight", "parameters", "LOXO RMSE", "leave-largest-out error"]
    rows = []
    for c in sorted(study.curves, key=curve_order):
        fit = study.verdicts[c.key].fit
        best = fit.best
        if best is None or fit.x.size < min_points:
            continue
        params = ", ".join(f"{k}={v:.4g}" for k, v in best.params.items())
        rows.append([c.key.label(), str(fit.x.size), best.form, f"{best.weight:.2f}", params,
                     _num(best.loxo_rmse), _num(best.lolo_error)])
    return header, rows


def _num(x: float) -> str:
    return "–" if not np.isfinite(x) else f"{x:.3g}"
