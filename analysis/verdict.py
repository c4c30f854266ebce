"""A verdict per scaling curve: does the metric keep improving with x, level off, peak, or fall?

Why these statistics: with 2-6 points a fitted form alone over-interprets noise, and trend tests
(Page, Jonckheere-Terpstra, Spearman) call an inverted U "increasing". So a verdict rests on
direct, paired comparisons between points and on a direct test of monotonicity, each with an
analytic p-value (`analysis.nulls`: a normal model of the points whose covariance comes from the
test cases and the seeds), and on one multiplicity correction across every curve of the study.

Quantities (y_1..y_n: point estimates in increasing x, oriented so that higher is better - HD95,
ASD, VOI, ARAND, folding share are negated first; m: the curve's margin, `metric_table`):
- G, total gain y_n - y_1;  R, rise y_j* - y_1 to the best smaller point j* = argmax(y_1..y_{n-1});
  D, y_n - y_j*;  d, top gain y_n - max(y_1..y_{n-1});  drop, the largest fall max_{i<j} (y_i - y_j).
- s, the fitted gain per doubling of x at the top: the least-squares slope of y on log2(x) over
  the top half of the points (at least 2); unlike one grid step, it does not depend on the spacing.
- p_iso: likelihood-ratio test of "non-decreasing in x" (chi-bar-square null, `nulls.isotonic_p`).
- One-sided contrast p-values p(c'y > 0) and 95% intervals c'y +- t sqrt(c' Sigma c).
- Reported, not used by the rules: d with its percentile interval and P(best = largest) (whether
  the largest x beats its nearest neighbours depends on how close the grid puts them), P(increasing),
  P(decreasing), the best tested x and its interval, a quadratic vertex between grid points.

A curve's CLAIM is the first shape its estimates show (orderings use the same list):
  peaks      an interior best: j* interior, R >= m and D <= -m;   p = max(p_iso, p(R > 0), p(D < 0))
  inverse    larger x is worse: G <= -m;                           p = p(G < 0)
  saturates  gains overall, G >= m, and s lies within +-m (its 95% CI; an ordering: |s| < m),
             i.e. another doubling of x gains less than the margin; p = p(G > 0)
  scales     gains overall, G >= m, and still gains at the top: s > 0 (an ordering: s >= m);
             p = max(p(G > 0), p(s > 0))
  mixed      a fall beyond the margin (drop >= m) without one of the shapes above; p = p_iso
Intersection-union p-values (the max) need no correction inside a claim. Every CI-backed curve
enters ONE family with the p-value of its claim (1 without a claim), corrected by
Benjamini-Hochberg at ``ALPHA`` (false discovery rate; `judge_curves(correction="holm")` holds the
family-wise rate instead). Then, first match wins:
 1. the companion metrics say the prediction is degenerate (Dice ~ 0, empty masks) -> ``degenerate``
    (set by `analysis.study`; never counted in the tally)
 2. fewer than 2 points                                                   -> ``noisy``
 3. with intervals: the claim's corrected p < ALPHA                       -> the claim
    every difference between two points has its 95% CI inside +-m        -> ``flat``
    otherwise: not shown after correction, or the CIs are too wide       -> ``noisy``
 4. without intervals (a published table, seeds that do not vary): an ORDERING of the point
    estimates - the claim, else ``flat`` when max - min < m, else ``mixed`` - shown as
    "order: <label>" and tallied apart: nothing here says the order would survive a new sample.
A 2-point curve is a comparison: only ``scales``, ``inverse``, ``flat`` (or ``noisy``) apply.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace

import numpy as np

from analysis.bootstrap import CurveReplicates
from analysis.fits import CurveFit, fit_curve
from analysis.forms import (
    DECREASING,
    INCREASING,
    PARAM_NAMES,
    dense_x,
    fit_forms,
    monotonicity,
    quadratic_peak,
)
from analysis.nulls import CORRECTIONS, contrast, holm, interval, isotonic_p, p_greater
from analysis.nulls import cone_projection as _cone_projection
from analysis.verdict_model import (
    CI_LEVEL,
    CORRECTION,
    MIN_EFFECT,
    MIN_POINTS,
    SHAPE_REPLICATES,
    VAR_SOURCES,
    VERDICTS,
    CurveVerdict,
    Effect,
)
from analysis.verdict_text import _decide, verdict_row

__all__ = ["holm", "analyse_curve", "judge_curves", "verdict_row", "monotone_distance", "top_slope_contrast", "VERDICTS"]


def monotone_distance(Y: np.ndarray, cov: np.ndarray) -> np.ndarray:
    """Squared Mahalanobis distance of each row of Y (R, n) to the non-decreasing cone (with a
    diagonal ``cov`` this is weighted isotonic regression's residual sum of squares)."""
    return _cone_projection(Y, cov)[0]


def top_slope_contrast(x: np.ndarray) -> np.ndarray:
    """c with c'y = least-squares slope of y on log2(x) over the top half of the points (>= 2)."""
    n = x.size
    k = max(2, (n + 1) // 2)
    u = np.log2(x[n - k:])
    den = float(np.sum((u - u.mean()) ** 2))
    if den <= 0:  # repeated x: no slope
        return np.full(n, np.nan)
    c = np.zeros(n)
    c[n - k:] = (u - u.mean()) / den
    return c


def _effect(c: np.ndarray, y: np.ndarray, parts, dfs, level: float) -> Effect:
    est = float(c @ y)
    if not parts:
        return Effect(est, est, est)
    v, df = contrast(c, parts, dfs)
    lo, hi = interval(est, v, df, level)
    return Effect(est, lo, hi, p_greater(est, v, df))


def _unit(n: int, i: int) -> np.ndarray:
    e = np.zeros(n)
    e[i] = 1.0
    return e


def _var_split(parts: Mapping[str, np.ndarray]) -> dict[str, float]:
    if not parts:
        return {}
    n = next(iter(parts.values())).shape[0]
    H = np.eye(n) - 1.0 / n
    tr = {k: max(float(np.trace(H @ p @ H)), 0.0) for k, p in parts.items()}
    tot = sum(tr.values())
    if tot <= 0:
        return {}
    # a source without a part contributes nothing (e.g. seeds of cells that ignore the seed)
    return {**{k: 0.0 for k in VAR_SOURCES}, **{k: v / tot for k, v in tr.items()}}


def analyse_curve(curve: CurveReplicates, *, level: float = CI_LEVEL,
                  min_effect: float = MIN_EFFECT, describe: bool = True) -> CurveVerdict:
    """Statistics, the claim and an uncorrected verdict for one curve (a family of one).

    ``describe=False`` skips what only the report reads (the fitted forms, the replicates' shape
    shares, the top gain's p, the isotonic test where the claim does not use it): the claim, its
    p-value and the verdict are the same, at a fraction of the time - for callers that judge many
    what-if versions of a curve (`analysis.adaptive.policy`)."""
    ok = np.flatnonzero(np.isfinite(curve.x) & np.isfinite(curve.estimate) & (curve.x > 0))
    c = curve.take(ok[np.argsort(curve.x[ok], kind="stable")])
    x, y = c.x, c.estimate
    reps = None if c.no_ci else c.replicates[np.isfinite(c.replicates).all(axis=1)]
    parts, dfs = c.noise() if reps is not None and reps.shape[0] >= 2 else ({}, {})
    if parts and not any((np.diag(p) > 0).any() for p in parts.values()):
        parts = {}  # no spread at all: the points are exact, like a table's
    if not parts:
        reps = None
        c = CurveReplicates(x, y, None, "none")
    se = c.se()
    fit = (fit_curve(x, y, se if reps is not None and (se > 0).all() else None) if describe
           else CurveFit(x, y, None, {}, None, x, ["not described"]))
    n = x.size
    v = CurveVerdict("noisy", "", reps is None, c.method, x, y, c.ci(level), fit, margin=min_effect,
                     var_split=_var_split(parts))
    if n < MIN_POINTS:
        return _decide(v, float("nan"))
    js = int(np.argmax(y[:-1]))
    m = min_effect
    v.gain_total = _effect(_unit(n, n - 1) - _unit(n, 0), y, parts, dfs, level)
    v.rise_to_best = _effect(_unit(n, js) - _unit(n, 0), y, parts, dfs, level)
    v.drop_after_best = _effect(_unit(n, n - 1) - _unit(n, js), y, parts, dfs, level)
    v.slope_top = _effect(top_slope_contrast(x), y, parts, dfs, level)
    v.max_drop = float(np.max(np.maximum.accumulate(y) - y))
    v.peak_x = float(x[np.argmax(y)])
    v.vertex_x = fit.fits["quadratic"].peak_x if "quadratic" in fit.fits else float("nan")
    d_est = float(y[-1] - y[:-1].max())
    # reported only (the top gain's p): what describe=False skips, with the isotonic test where
    # the claim does not read it - its Monte Carlo weights are the analysis' slowest part
    p_top = [_effect(_unit(n, n - 1) - _unit(n, j), y, parts, dfs, level).p_up for j in range(n - 1)] if describe else []
    if reps is not None:
        dr = reps[:, -1] - reps[:, :-1].max(axis=1)
        lo, hi = np.percentile(dr, [50 * (1 - level), 50 * (1 + level)])
        v.gain_top = Effect(d_est, float(lo), float(hi), _pmax(*p_top) if p_top else float("nan"))
        if describe:
            _replicate_shape(v, reps, se if (se > 0).all() else None, level)
        if n >= 3 and (describe or _shape(v, m) in ISO_CLAIMS):
            v.iso_stat, v.iso_p = isotonic_p(y, parts, dfs)
        pair = [_effect(_unit(n, j) - _unit(n, i), y, parts, dfs, level) for i in range(n) for j in range(i + 1, n)]
        v.flat_ok = all(e.classify(m) == "negligible" for e in pair)
    else:
        v.gain_top = Effect(d_est, d_est, d_est)
        v.flat_ok = float(np.ptp(y)) < m
    _claim(v, m)
    return _decide(v, v.p_claim)


def _pmax(*ps: float) -> float:
    """Intersection-union p-value: the largest; NaN (not testable) if any part is NaN."""
    return float("nan") if any(not np.isfinite(p) for p in ps) else float(max(ps))


def _shape(v: CurveVerdict, m: float) -> str:
    """The first shape the point estimates show ('' for none); the module docstring's list."""
    n, y = v.x.size, v.estimate
    G, R, D, s = v.gain_total, v.rise_to_best, v.drop_after_best, v.slope_top
    js = int(np.argmax(y[:-1]))
    if n >= 3 and 0 < js < n - 1 and R.estimate >= m and D.estimate <= -m:
        return "peaks"
    if G.estimate <= -m:
        return "inverse"
    if n >= 3 and G.estimate >= m and (s.classify(m) == "negligible" if not v.no_ci else abs(s.estimate) < m):
        return "saturates"
    if G.estimate >= m and (s.estimate > 0 if not v.no_ci else s.estimate >= m):
        return "scales"
    if n >= 3 and v.max_drop >= m:
        return "mixed"
    return ""


ISO_CLAIMS = ("peaks", "mixed")  # the claims whose p-value includes the isotonic test


def _claim(v: CurveVerdict, m: float) -> None:
    """The first shape the estimates show, and the p-value of claiming it (module docstring)."""
    G, R, D, s = v.gain_total, v.rise_to_best, v.drop_after_best, v.slope_top
    v.claim = _shape(v, m)
    p = {"peaks": _pmax(v.iso_p, R.p_up, 1 - D.p_up), "inverse": 1 - G.p_up, "saturates": G.p_up,
         "scales": _pmax(G.p_up, s.p_up), "mixed": v.iso_p}
    v.p_claim = p.get(v.claim, float("nan"))


def _replicate_shape(v: CurveVerdict, reps: np.ndarray, sigma, level: float) -> None:
    """Refit every form in every replicate: shape probabilities, peak CI, parameter CIs."""
    x = v.x
    q = [50 * (1 - level), 50 * (1 + level)]
    best = x[np.argmax(reps, axis=1)]
    v.p_best_largest = float(np.mean(best == x[-1]))
    v.peak_ci = (float(np.percentile(best, q[0], method="lower")), float(np.percentile(best, q[1], method="higher")))
    reps = reps[:SHAPE_REPLICATES]  # reported shape shares: 400 refits resolve them to +-0.025
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


def judge_curves(curves: Mapping | Sequence[CurveReplicates], *, level: float = CI_LEVEL,
                 min_effect: float | Mapping | Sequence[float] = MIN_EFFECT, correction: str = CORRECTION,
                 exclude: Mapping | Sequence[bool] | None = None, describe: bool = True) -> dict | list[CurveVerdict]:
    """Analyse many curves and decide each with its claim's p-value corrected across all of them
    (``describe=False``: verdicts only, without what only a report reads - `analyse_curve`).

    Accepts a mapping (key -> CurveReplicates; returns key -> CurveVerdict) or a sequence.
    ``min_effect``: one margin, or one per curve (mapping with the same keys, or a sequence):
    curves in different units need their own margins, yet belong in one family. The family is
    every CI-backed curve not in ``exclude`` (degenerate ones), one p-value each (1 without a
    claim); ``correction`` is "bh" (Benjamini-Hochberg, the default) or "holm".
    """
    keys = list(curves) if isinstance(curves, Mapping) else list(range(len(curves)))
    items = [curves[k] for k in keys]

    def per_curve(arg, default, what: str):
        if isinstance(arg, Mapping):
            return [arg[k] for k in keys]
        if isinstance(arg, Sequence):
            if len(arg) != len(keys):
                raise ValueError(f"{len(arg)} {what} for {len(keys)} curves")
            return list(arg)
        return [default if arg is None else arg] * len(keys)
    margins = [float(m) for m in per_curve(min_effect, MIN_EFFECT, "margins")]
    skip = [bool(e) for e in per_curve(exclude, False, "exclusion flags")]
    stats_ = [analyse_curve(c, level=level, min_effect=m, describe=describe) for c, m in zip(items, margins, strict=True)]
    fam = [not s.no_ci and not e and s.x.size >= MIN_POINTS for s, e in zip(stats_, skip, strict=True)]
    p = [(s.p_claim if np.isfinite(s.p_claim) else 1.0) if f else float("nan") for s, f in zip(stats_, fam, strict=True)]
    adj = CORRECTIONS[correction](p)
    out = [_decide(replace(s), float(a) if f else float("nan")) if f else s
           for s, a, f in zip(stats_, adj, fam, strict=True)]
    return dict(zip(keys, out, strict=True)) if isinstance(curves, Mapping) else out
