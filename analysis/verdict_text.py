"""A verdict in words and as a table row: the sentence each verdict prints, the effect sizes it
quotes, and `verdict_row` (the columns of curves.csv)."""

from __future__ import annotations

import numpy as np

from analysis.verdict_model import ALPHA, MIN_POINTS, VAR_SOURCES, CurveVerdict

SENTENCES = {
    "peaks": "rises to an interior best at x={x}, then falls",
    "inverse": "larger x is worse (smaller is better)",
    "saturates": "gains overall; another doubling of x gains less than the margin at the top",
    "scales": "gains overall and still gains at the top (fitted gain per doubling > 0)",
    "mixed": "falls by more than the margin somewhere, without a single interior best",
    "flat": "every change within +-{m:g}",
}


def _size(v: CurveVerdict, label: str) -> str:
    """The effect behind a label, in metric units and margins: '(G -0.035 = 7.0 margins)'."""
    m = v.margin

    def e(name: str, val: float) -> str:
        return f"{name} {val:+.4g} = {abs(val) / m:.1f} margins"
    if label == "peaks":
        return f" ({e('rise', v.rise_to_best.estimate)}, {e('then', v.drop_after_best.estimate)})"
    if label in ("scales", "inverse"):
        return f" ({e('total', v.gain_total.estimate)})"
    if label == "saturates":
        return f" ({e('total', v.gain_total.estimate)}; {e('per doubling at the top', v.slope_top.estimate)})"
    if label == "mixed":
        return f" (largest fall {v.max_drop:.4g} = {v.max_drop / m:.1f} margins)"
    return ""


def _decide(v: CurveVerdict, p_adj: float) -> CurveVerdict:
    """Apply the module's rules with the corrected p-value ``p_adj`` of the curve's claim."""
    v.p_adj = v.iso_p_adj = p_adj
    n, m = v.x.size, v.margin
    two = "2-point comparison: " if n == 2 else ""
    if n < MIN_POINTS:
        v.verdict, v.reason = "noisy", f"{n} point(s): nothing to compare"
        return v
    where = format_x(v.x[int(np.argmax(v.estimate[:-1]))]) if n >= 3 else ""
    if v.no_ci:
        label = v.claim or ("flat" if v.flat_ok else "mixed")
        v.verdict = label
        v.reason = two + SENTENCES[label].format(x=where, m=m) + _size(v, label) + " [ordering, no CI]"
        return v
    if v.claim and np.isfinite(p_adj) and p_adj < ALPHA:
        v.verdict = v.claim
        v.reason = two + SENTENCES[v.claim].format(x=where, m=m) + _size(v, v.claim) + f", corrected p {_p(p_adj)}"
    elif v.flat_ok:
        v.verdict, v.reason = "flat", two + SENTENCES["flat"].format(m=m) + " (95% CIs)"
    elif v.claim:
        v.verdict, v.reason = "noisy", f"{two}looks like '{v.claim}' but corrected p {_p(p_adj)} >= {ALPHA:g}"
    else:
        v.verdict, v.reason = "noisy", f"{two}CIs too wide to say (total gain {v.gain_total.classify(m)})"
    return v


def _p(p: float) -> str:
    return "nan" if not np.isfinite(p) else (f"{p:.1e}" if p < 0.001 else f"{p:.3f}")


def format_x(x: float) -> str:
    """An x-value for people: parameter counts as 85.6M, others as %g (224, 12.5)."""
    x = float(x)
    for scale, suffix in ((1e9, "B"), (1e6, "M")):
        if abs(x) >= scale:
            return f"{x / scale:.3g}{suffix}"
    return f"{x:g}"


ROW_COLUMNS = ["verdict", "kind", "label", "reason", "no_ci", "method", "n_points", "claim", "p_claim", "p_adj",
               "selected_form", "p_increasing", "p_decreasing", "p_best_largest", "peak_x", "peak_lo", "peak_hi",
               "vertex_x", "vertex_lo", "vertex_hi", "iso_stat", "iso_p", "max_drop",
               *[f"var_share_{k}" for k in VAR_SOURCES],
               *[f"{n}{s}" for n in ("gain_total", "gain_top", "rise_to_best", "drop_after_best", "slope_top")
                 for s in ("", "_lo", "_hi")]]


def verdict_row(v: CurveVerdict) -> dict:
    """The verdict as one flat row (for the report's verdict table and CSV)."""
    row = {"verdict": v.verdict, "kind": v.kind, "label": v.label, "reason": v.reason, "no_ci": v.no_ci,
           "method": v.method, "n_points": v.x.size, "claim": v.claim, "p_claim": v.p_claim, "p_adj": v.p_adj,
           "selected_form": v.fit.selected, "p_increasing": v.p_increasing, "p_decreasing": v.p_decreasing,
           "p_best_largest": v.p_best_largest, "peak_x": v.peak_x, "peak_lo": v.peak_ci[0], "peak_hi": v.peak_ci[1],
           "vertex_x": v.vertex_x, "vertex_lo": v.vertex_ci[0], "vertex_hi": v.vertex_ci[1],
           "iso_stat": v.iso_stat, "iso_p": v.iso_p, "max_drop": v.max_drop,
           **{f"var_share_{k}": v.var_split.get(k, float("nan")) for k in VAR_SOURCES},
           **{f"var_share_{k}": s for k, s in v.var_split.items() if k not in VAR_SOURCES}}
    for name in ("gain_total", "gain_top", "rise_to_best", "drop_after_best", "slope_top"):
        e = getattr(v, name)
        row |= {name: e.estimate, f"{name}_lo": e.lo, f"{name}_hi": e.hi}
    return row
