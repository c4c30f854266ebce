"""A verdict per scaling curve: does the metric keep improving with x, level off, peak, or fall?

Why these statistics: with 3-6 points a fitted form alone over-interprets noise, and trend tests
(Page, Jonckheere-Terpstra, Spearman) call an inverted U "increasing". So the verdict rests on
direct, paired comparisons between points (bootstrap CIs that keep the shared-test-set
correlation) and on a direct test of monotonicity; the refitted forms supply the probabilities
that describe the shape and a between-grid estimate of the peak.

Quantities (y_1..y_n: point estimates in increasing x; j*: the best of the smaller x, argmax of
y_1..y_{n-1}; every CI is the percentile interval at ``CI_LEVEL`` of the same quantity computed in
each bootstrap replicate; a curve without replicates is "no CI" and its CI is the estimate itself):

- G, total gain: y_n - y_1.
- d, top gain: y_n - max(y_1..y_{n-1}), the max re-taken in each replicate (the CI is therefore
  conservative for "the largest x is best").
- R, rise to the best smaller: y_{j*} - y_1;  D, drop after it: y_n - y_{j*} (j* fixed).
- drop: the largest decrease between any two points in x order, max_{i<j} (y_i - y_j).
- p_iso: isotonic likelihood-ratio test of H0 "the means are non-decreasing in x": statistic
  T = sum_j w_j (y_j - iso_j)^2, iso the weighted isotonic (non-decreasing) regression,
  w_j = 1/se_j^2 from the replicates; null distribution: T of the replicate deviations recentred
  on equal means (the least favourable null), which keeps the correlation between points;
  p = (1 + #{T* >= T}) / (1 + R). Holm-adjusted across all curves judged together. (A metric
  using the full covariance of the points held its level worse with few seeds: its estimate is
  too rough; the diagonal one stayed near 5% in simulation.)
- Reported, not used by the rules: P(increasing) and P(decreasing), the share of replicates whose
  AICc-selected form is monotone over [x_min, x_max] (with < 4 points, whose points are);
  P(best = largest), the share whose largest-x point is the best; per-form parameter CIs and how
  often each form is selected.
- Peak: ``peak_x`` is the tested x with the best mean and ``peak_ci`` the ``CI_LEVEL`` percentile
  interval (on the tested grid) of the best tested x per replicate: model-free. ``vertex_x``/``vertex_ci``
  place it between grid points: the maximum of the quadratic in u on [x_min, x_max] (its vertex
  when interior), refitted per replicate, once >= 5 points allow the quadratic. The vertex CI
  ignores misspecification (a curve that is not quadratic in u can put a precise vertex beside
  the true peak), which is why the model-free interval is the one quoted with ``peaks``.

Curves must be oriented so that higher is better (negate HD95, ASD, VOI, ARAND, losses first).
An effect E with CI [lo, hi] is, with margin m = ``MIN_EFFECT`` (metric units; 0.005 suits AUC,
accuracy, F1, Dice on [0, 1] - pass ``min_effect`` for other scales):
  negligible if -m < lo and hi < m; else up if lo > 0; else down if hi < 0; else unclear.
A curve whose replicates have no spread at all is treated like one without a CI.

Rules, first match wins:
 1. fewer than ``MIN_POINTS`` points                                   -> ``noisy``
 2. non-monotone: drop >= m and (p_iso Holm-adjusted < ``ALPHA``, or no CI):
    a. j* is interior (1 < j* < n), R up and D down                    -> ``peaks``
    b. G down and R not up                                             -> ``inverse``
    c. otherwise (a dip, a zigzag)                                     -> ``noisy``
 3. otherwise (consistent with non-decreasing):
    a. G up and d up                                                   -> ``scales``
    b. G up and d negligible                                           -> ``saturates``
    c. G negligible and d negligible                                   -> ``flat``
    d. otherwise: the CIs are too wide to say                          -> ``noisy``
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace

import numpy as np
from scipy.optimize import nnls

from analysis.bootstrap import CurveReplicates
from analysis.fits import (
    DECREASING,
    INCREASING,
    PARAM_NAMES,
    CurveFit,
    dense_x,
    fit_curve,
    fit_forms,
    monotonicity,
    quadratic_peak,
)

ALPHA = 0.05
CI_LEVEL = 0.95
MIN_EFFECT = 0.005
MIN_POINTS = 3
VERDICTS = ("scales", "saturates", "peaks", "inverse", "flat", "noisy")


@dataclass(frozen=True)
class Effect:
    """A difference between curve points with its CI (lo == hi == estimate when there is no CI)."""

    estimate: float
    lo: float
    hi: float

    def classify(self, margin: float) -> str:
        if -margin < self.lo and self.hi < margin:
            return "negligible"
        if self.lo > 0:
            return "up"
        if self.hi < 0:
            return "down"
        return "unclear"


@dataclass
class CurveVerdict:
    """Everything said about one curve; ``verdict``/``reason`` follow the module's rules."""

    verdict: str
    reason: str
    no_ci: bool
    method: str  # how the replicates were made: "cases+seeds", "seeds", "seeds-parametric", "none"
    x: np.ndarray
    estimate: np.ndarray
    ci: tuple[np.ndarray, np.ndarray]
    fit: CurveFit
    gain_total: Effect
    gain_top: Effect
    rise_to_best: Effect
    drop_after_best: Effect
    max_drop: float
    p_increasing: float = float("nan")
    p_decreasing: float = float("nan")
    p_best_largest: float = float("nan")
    peak_x: float = float("nan")
    peak_ci: tuple[float, float] = (float("nan"), float("nan"))
    vertex_x: float = float("nan")
    vertex_ci: tuple[float, float] = (float("nan"), float("nan"))
    form_share: dict[str, float] = field(default_factory=dict)
    param_ci: dict[str, dict[str, tuple[float, float]]] = field(default_factory=dict)
    iso_stat: float = float("nan")
    iso_p: float = float("nan")
    iso_p_adj: float = float("nan")


def holm(pvalues: Sequence[float]) -> np.ndarray:
    """Holm step-down adjusted p-values, in input order; NaN entries stay NaN and are not counted."""
    p = np.asarray(pvalues, float)
    out = np.full(p.shape, np.nan)
    ok = np.flatnonzero(np.isfinite(p))
    order = ok[np.argsort(p[ok], kind="stable")]
    m = order.size
    adj = np.minimum(1.0, np.maximum.accumulate((m - np.arange(m)) * p[order]))
    out[order] = adj
    return out


def _cone_basis(n: int) -> np.ndarray:
    """Columns spanning the non-decreasing cone with non-negative coefficients: +1, -1, steps."""
    steps = (np.arange(n)[:, None] >= np.arange(1, n)[None, :]).astype(float)
    return np.column_stack([np.ones(n), -np.ones(n), steps])


def monotone_distance(Y: np.ndarray, cov: np.ndarray) -> np.ndarray:
    """Squared Mahalanobis distance of each row of Y (R, n) to the non-decreasing cone.

    This is the likelihood-ratio statistic (Gaussian, covariance ``cov``) of "non-decreasing"
    against unrestricted means, by non-negative least squares on the cone's generators; with a
    diagonal ``cov`` (what ``isotonic_test`` uses) it is weighted isotonic regression (PAVA).
    """
    Y = np.atleast_2d(np.asarray(Y, float))
    W = np.linalg.inv(np.linalg.cholesky(cov))  # ||W r||^2 = r' cov^-1 r
    B = W @ _cone_basis(Y.shape[1])
    return np.array([nnls(B, W @ y)[1] ** 2 for y in Y])


def isotonic_test(curve: CurveReplicates) -> tuple[float, float]:
    """Likelihood-ratio test of "non-decreasing in x" with a bootstrap null; (T, p), NaN without CI.

    Null: the replicate deviations recentred on equal means, the least favourable configuration
    of the null (the statistic is invariant to a common shift, so recentring suffices). The metric
    is diagonal (weighted PAVA); ``monotone_distance`` also takes a full covariance.
    """
    if curve.no_ci:
        return float("nan"), float("nan")
    reps = curve.replicates[np.isfinite(curve.replicates).all(axis=1)]
    if reps.shape[0] < 2:
        return float("nan"), float("nan")
    var = np.var(reps, axis=0, ddof=1)
    if not (var > 0).any():
        return float("nan"), float("nan")
    cov = np.diag(np.maximum(var, 1e-6 * var[var > 0].mean()))  # a point without spread stays finite
    t = float(monotone_distance(curve.estimate[None], cov)[0])
    t0 = monotone_distance(reps - reps.mean(axis=0), cov)
    return t, float((1 + np.sum(t0 >= t * (1 - 1e-9))) / (1 + t0.size))


def _effect(est: float, reps: np.ndarray | None, level: float) -> Effect:
    if reps is None:
        return Effect(float(est), float(est), float(est))
    q = 50 * (1 - level)
    lo, hi = np.nanpercentile(reps, [q, 100 - q])
    return Effect(float(est), float(lo), float(hi))


def analyse_curve(curve: CurveReplicates, *, level: float = CI_LEVEL,
                  min_effect: float = MIN_EFFECT) -> CurveVerdict:
    """Statistics and a verdict for one curve (Holm over a single curve is the raw p-value)."""
    ok = np.isfinite(curve.x) & np.isfinite(curve.estimate) & (curve.x > 0)
    order = np.argsort(curve.x[ok], kind="stable")
    x, y = curve.x[ok][order], curve.estimate[ok][order]
    reps = None if curve.no_ci else curve.replicates[:, ok][:, order]
    if reps is not None:
        reps = reps[np.isfinite(reps).all(axis=1)]
        if reps.shape[0] < 2:
            reps = None
    if reps is not None and not (np.var(reps, axis=0) > 0).any():
        reps = None  # no spread at all: the points are taken as exact, like a table's
    c = CurveReplicates(x, y, reps, curve.method if reps is not None else "none")
    se = c.se()
    sigma = se if reps is not None and (se > 0).all() else None
    fit = fit_curve(x, y, sigma)
    n = x.size
    nan_e = Effect(float("nan"), float("nan"), float("nan"))
    if n < 2:
        v = CurveVerdict("noisy", "", c.no_ci, c.method, x, y, c.ci(level), fit, nan_e, nan_e, nan_e, nan_e,
                         float("nan"))
        return _decide(v, v.iso_p, min_effect)
    js = int(np.argmax(y[:-1]))
    r = reps
    v = CurveVerdict(
        "noisy", "", c.no_ci, c.method, x, y, c.ci(level), fit,
        gain_total=_effect(y[-1] - y[0], None if r is None else r[:, -1] - r[:, 0], level),
        gain_top=_effect(y[-1] - y[:-1].max(), None if r is None else r[:, -1] - r[:, :-1].max(axis=1), level),
        rise_to_best=_effect(y[js] - y[0], None if r is None else r[:, js] - r[:, 0], level),
        drop_after_best=_effect(y[-1] - y[js], None if r is None else r[:, -1] - r[:, js], level),
        max_drop=float(np.max(np.maximum.accumulate(y) - y)),
        peak_x=float(x[np.argmax(y)]),
        vertex_x=fit.fits["quadratic"].peak_x if "quadratic" in fit.fits else float("nan"),
    )
    if r is not None:
        _replicate_shape(v, r, sigma, level)
        v.iso_stat, v.iso_p = isotonic_test(c)
    return _decide(v, v.iso_p, min_effect)


def _replicate_shape(v: CurveVerdict, reps: np.ndarray, sigma, level: float) -> None:
    """Refit every form in every replicate: shape probabilities, peak CI, parameter CIs."""
    x = v.x
    q = [50 * (1 - level), 50 * (1 + level)]
    best = x[np.argmax(reps, axis=1)]
    v.p_best_largest = float(np.mean(best == x[-1]))
    v.peak_ci = (float(np.percentile(best, q[0], method="lower")), float(np.percentile(best, q[1], method="higher")))
    batch = fit_forms(x, reps, sigma)
    for f, b in batch.items():
        v.param_ci[f] = {p: tuple(map(float, np.nanpercentile(b.params[:, i], q)))
                         for i, p in enumerate(PARAM_NAMES[f])}
    if set(batch) <= {"flat"}:  # < 4 points: no shape to fit, read monotonicity off the points
        step = np.diff(reps, axis=1)
        v.p_increasing = float(np.mean((step >= 0).all(axis=1) & (reps[:, -1] > reps[:, 0])))
        v.p_decreasing = float(np.mean((step <= 0).all(axis=1) & (reps[:, -1] < reps[:, 0])))
        v.form_share = {f: 1.0 for f in batch}
        return
    forms = list(batch)
    sel = np.argmin(np.stack([batch[f].aicc for f in forms]), axis=0)
    v.form_share = {f: float(np.mean(sel == i)) for i, f in enumerate(forms)}
    dx = dense_x(x[0], x[-1])
    pred = np.zeros((reps.shape[0], dx.size))
    for i, f in enumerate(forms):
        pred[sel == i] = batch[f].predict(dx)[sel == i]
    mono = monotonicity(pred)
    v.p_increasing, v.p_decreasing = float(np.mean(mono == INCREASING)), float(np.mean(mono == DECREASING))
    if "quadratic" in batch:
        vertex = quadratic_peak(batch["quadratic"].params, x[0], x[-1])
        v.vertex_ci = tuple(map(float, np.percentile(vertex, q)))


def format_x(x: float) -> str:
    """An x-value for people: parameter counts as 85.6M, others as %g (224, 12.5)."""
    x = float(x)
    for scale, suffix in ((1e9, "B"), (1e6, "M")):
        if abs(x) >= scale:
            return f"{x / scale:.3g}{suffix}"
    return f"{x:g}"


def _decide(v: CurveVerdict, p_adj: float, m: float) -> CurveVerdict:
    """Apply the module's rules (see the docstring) with the Holm-adjusted p-value ``p_adj``."""
    v.iso_p_adj = p_adj
    n = v.x.size
    if n < MIN_POINTS:
        v.verdict, v.reason = "noisy", f"{n} point(s): fewer than {MIN_POINTS}"
        return v
    G, d = v.gain_total.classify(m), v.gain_top.classify(m)
    R, D = v.rise_to_best.classify(m), v.drop_after_best.classify(m)
    js = int(np.argmax(v.estimate[:-1]))
    significant = v.no_ci or (np.isfinite(p_adj) and p_adj < ALPHA)
    if v.max_drop >= m and significant:
        if 0 < js < n - 1 and R == "up" and D == "down":
            v.verdict, v.reason = "peaks", f"rises to x={format_x(v.x[js])}, then falls"
        elif G == "down" and R != "up":
            v.verdict, v.reason = "inverse", "larger x is worse"
        else:
            v.verdict, v.reason = "noisy", f"non-monotone without a clear single peak (G {G}, R {R}, D {D})"
    elif G == "up" and d == "up":
        v.verdict, v.reason = "scales", "the largest x beats every smaller one"
    elif G == "up" and d == "negligible":
        v.verdict, v.reason = "saturates", f"gains overall, top gain within +-{m:g}"
    elif G == "negligible" and d == "negligible":
        v.verdict, v.reason = "flat", f"all changes within +-{m:g}"
    else:
        v.verdict, v.reason = "noisy", f"CI too wide to say (total gain {G}, top gain {d})"
    if v.no_ci:
        v.reason += " [no CI]"
    return v


def judge_curves(curves: Mapping | Sequence[CurveReplicates], *, level: float = CI_LEVEL,
                 min_effect: float | Mapping | Sequence[float] = MIN_EFFECT) -> dict | list[CurveVerdict]:
    """Analyse many curves and decide each with Holm-adjusted isotonic p-values across all of them.

    Accepts a mapping (key -> CurveReplicates; returns key -> CurveVerdict) or a sequence.
    ``min_effect`` is one margin for every curve, or one per curve (a mapping with the same keys,
    or a sequence in the same order): curves in different units (AUC, Dice in %, HD95 in mm)
    need their own margins, yet belong in one Holm family.
    """
    keys = list(curves) if isinstance(curves, Mapping) else list(range(len(curves)))
    items = [curves[k] for k in keys]
    if isinstance(min_effect, Mapping):
        margins = [float(min_effect[k]) for k in keys]
    elif isinstance(min_effect, Sequence):
        if len(min_effect) != len(keys):
            raise ValueError(f"{len(min_effect)} margins for {len(keys)} curves")
        margins = [float(m) for m in min_effect]
    else:
        margins = [float(min_effect)] * len(keys)
    stats = [analyse_curve(c, level=level, min_effect=m) for c, m in zip(items, margins, strict=True)]
    adj = holm([s.iso_p for s in stats])
    out = [_decide(replace(s), float(a), m) for s, a, m in zip(stats, adj, margins, strict=True)]
    return dict(zip(keys, out, strict=True)) if isinstance(curves, Mapping) else out


def verdict_row(v: CurveVerdict) -> dict:
    """The verdict as one flat row (for the report's verdict table and CSV)."""
    row = {"verdict": v.verdict, "reason": v.reason, "no_ci": v.no_ci, "method": v.method, "n_points": v.x.size,
           "selected_form": v.fit.selected, "p_increasing": v.p_increasing, "p_decreasing": v.p_decreasing,
           "p_best_largest": v.p_best_largest, "peak_x": v.peak_x, "peak_lo": v.peak_ci[0], "peak_hi": v.peak_ci[1],
           "vertex_x": v.vertex_x, "vertex_lo": v.vertex_ci[0], "vertex_hi": v.vertex_ci[1],
           "iso_p": v.iso_p, "iso_p_holm": v.iso_p_adj, "max_drop": v.max_drop}
    for name in ("gain_total", "gain_top", "rise_to_best", "drop_after_best"):
        e = getattr(v, name)
        row |= {name: e.estimate, f"{name}_lo": e.lo, f"{name}_hi": e.hi}
    return row
