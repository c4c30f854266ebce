"""Scaling-curve forms fitted to 3-8 points, selected by AICc.

Why this shape: a scaling study has few x-values (S/B/L, or six resolutions), so every form is
small, linear once at most one scalar is fixed, and fitted by weighted least squares. The two
nonlinear forms are profiled over that scalar on a grid (then polished with a bounded scalar
minimiser), which never fails to converge and vectorises over thousands of bootstrap replicates.

With u = ln(x / x_min):

- ``flat``        a
- ``loglinear``   a + b u
- ``saturating``  y_inf - A exp(-alpha u) = y_inf - A (x / x_min)^-alpha, alpha > 0 (a power law
  approaching y_inf; A < 0 gives a decreasing one)
- ``quadratic``   a + b u + c u^2 (an interior peak when c < 0 and the vertex lies inside the range)
- ``broken``      a + b1 u + (b2 - b1) s softplus((u - u_break) / s): a smoothly broken power law in
  the log-linear regime (slope b1, then b2), s = ``BREAK_SMOOTHNESS`` * u_max; fitted only with
  >= ``BROKEN_MIN_POINTS`` distinct x (a full BNSL break is not identifiable from fewer).

AICc, and which forms a curve of n points admits: the criterion is -2 ln L + 2K + 2K(K+1)/(n-K-1)
with K the number of ESTIMATED parameters, and a form is fitted only when K <= n - 2, which keeps
the correction finite and positive.
- With per-point standard errors ``sigma`` (a bootstrap's), the variances are taken as known: the
  fit is weighted by 1/sigma^2, -2 ln L = chi^2 (up to a constant) and K = k, the curve's own
  parameters. 3 points fit only ``flat``; 4 add ``loglinear``; 5 add ``saturating`` and ``quadratic``.
- Without them (a published table), the noise variance is estimated from the residuals too:
  -2 ln L = n ln(RSS/n) and K = k + 1. 3 points then admit no form at all, 4 only ``flat``,
  5 add ``loglinear``, 6 add ``saturating`` and ``quadratic``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy.optimize import minimize_scalar

from analysis.forms import (
    BROKEN_MIN_POINTS,
    FORMS,
    MONOTONE_NAMES,
    N_PARAMS,
    PARAM_NAMES,
    BatchFit,
    _design,
    _fit_one,
    _full_params,
    _solve,
    _theta_grid,
    aicc,
    dense_x,
    fit_forms,
    monotonicity,
    peak_of,
    predict_form,
    quadratic_peak,
)


@dataclass
class FitResult:
    """One form fitted to one curve, with its selection and extrapolation diagnostics."""

    form: str
    params: dict[str, float]
    k: int
    rss: float
    aicc: float
    delta_aicc: float
    weight: float
    loxo_rmse: float  # leave-one-x-out: RMS of held-out prediction errors
    lolo_error: float  # leave-largest-out: prediction minus observation at the largest x
    monotone: str
    peak_x: float  # argmax of the fitted curve within [x_min, x_max]; NaN for flat
    interior_peak: bool
    batch: BatchFit = field(repr=False)

    def predict(self, x) -> np.ndarray:
        return self.batch.predict(np.atleast_1d(np.asarray(x, float)))[0]


@dataclass
class CurveFit:
    """All eligible forms fitted to one curve; ``selected`` is the AICc choice (None if none fit)."""

    x: np.ndarray
    y: np.ndarray
    sigma: np.ndarray | None
    fits: dict[str, FitResult]
    selected: str | None
    grid_x: np.ndarray
    notes: list[str]

    @property
    def best(self) -> FitResult | None:
        return self.fits.get(self.selected) if self.selected else None

    def predict(self, x, form: str | None = None) -> np.ndarray:
        f = self.fits[form or self.selected]
        return f.predict(x)

    def grid_y(self, form: str | None = None) -> np.ndarray:
        return self.predict(self.grid_x, form)

    @property
    def peak_x(self) -> float:
        """x of the best value: the selected form's argmax, or the best point when nothing fits."""
        b = self.best
        if b is not None and b.form != "flat":
            return b.peak_x
        return float(self.x[np.argmax(self.y)]) if self.y.size else float("nan")

    @property
    def interior_peak(self) -> bool:
        return bool(self.best is not None and self.best.interior_peak)


def _clean(x, y, sigma, notes):
    x, y = np.asarray(x, float).ravel(), np.asarray(y, float).ravel()
    s = None if sigma is None else np.asarray(sigma, float).ravel()
    ok = np.isfinite(x) & np.isfinite(y) & (x > 0)
    if (~ok).any():
        notes.append(f"dropped {int((~ok).sum())} point(s) with non-finite values or x <= 0")
    x, y = x[ok], y[ok]
    if s is not None:
        s = s[ok]
        good = np.isfinite(s) & (s > 0)
        if not good.any():
            notes.append("sigma unusable (non-finite or <= 0): fitted unweighted")
            s = None
        elif not good.all():
            notes.append("some sigma unusable: replaced by the median of the others")
            s = np.where(good, s, np.median(s[good]))
    order = np.argsort(x, kind="stable")
    return x[order], y[order], (None if s is None else s[order])


def _heldout(form, x, y, s, train, x_min):
    """Errors at the held-out x of ``form`` fitted to the rest (it only needs to be determined)."""
    n_unique = np.unique(x[train]).size
    if N_PARAMS[form] > n_unique or (form == "broken" and n_unique < BROKEN_MIN_POINTS):
        return None
    u = np.log(x / x_min)
    sw = np.ones(x.size) if s is None else 1.0 / s
    umax = float(u[train].max())
    p, _ = _fit_one(form, u[train], y[None, train], sw[train], umax, s is not None)
    return predict_form(form, p, u[~train], umax)[0] - y[~train]


def _polish(b: BatchFit, x, y, s):
    """Refine the nonlinear scalar with a bounded 1-D minimiser around the grid optimum."""
    u = np.log(x / b.x_min)
    sw = np.ones(x.size) if s is None else 1.0 / s
    i = 2 if b.form == "saturating" else 3
    t0 = b.params[0, i]
    grid = _theta_grid(b.form, u)
    j = int(np.argmin(np.abs(grid - t0)))
    lo, hi = grid[max(j - 1, 0)], grid[min(j + 1, grid.size - 1)]
    if not hi > lo:
        return
    tr = np.log if b.form == "saturating" else (lambda v: v)
    inv = np.exp if b.form == "saturating" else (lambda v: v)

    def rss(t):
        return float(_solve(_design(b.form, u, inv(t), b.u_max), y[None], sw)[1][0])
    res = minimize_scalar(rss, bounds=(tr(lo), tr(hi)), method="bounded", options={"xatol": 1e-6})
    if res.fun < b.rss[0]:
        beta, r = _solve(_design(b.form, u, inv(res.x), b.u_max), y[None], sw)
        b.params = _full_params(b.form, beta, np.array([inv(res.x)]))
        b.rss = r if s is not None else np.maximum(r, x.size * (1e-9 * (np.abs(y).max() + 1e-12)) ** 2)
        b.aicc = aicc(b.rss, x.size, N_PARAMS[b.form], s is not None)


def fit_curve(x, y, sigma=None, forms=FORMS, grid_size: int = 100) -> CurveFit:
    """Fit every eligible form, select by AICc, and report extrapolation errors and the peak.

    Never raises on degenerate input: NaN points are dropped, unusable sigma ignored, and with
    fewer than 3 points no form is fitted (``selected`` is None; ``notes`` says why).
    """
    notes: list[str] = []
    x, y, s = _clean(x, y, sigma, notes)
    n = x.size
    grid_x = dense_x(x[0], x[-1], grid_size) if n else np.array([])
    if n < 3:
        notes.append(f"{n} point(s): too few for AICc with K <= n - 2")
        return CurveFit(x, y, s, {}, None, grid_x, notes)
    batch = fit_forms(x, y, s, forms)
    if not batch:
        notes.append(f"{n} points without standard errors: too few for AICc with K = k + 1 <= n - 2")
        return CurveFit(x, y, s, {}, None, grid_x, notes)
    for b in batch.values():
        if b.form in ("saturating", "broken"):
            _polish(b, x, y, s)
    a = {f: float(b.aicc[0]) for f, b in batch.items()}
    amin = min(a.values())
    w = {f: np.exp(-0.5 * (v - amin)) for f, v in a.items()}
    wsum = sum(w.values())
    dx = dense_x(x[0], x[-1])
    largest = x == x[-1]
    fits = {}
    for f, b in batch.items():
        loxo = [_heldout(f, x, y, s, x != xv, x[0]) for xv in np.unique(x)]
        errs = None if any(e is None for e in loxo) else np.concatenate(loxo)
        lolo = _heldout(f, x, y, s, ~largest, x[0]) if (~largest).any() else None
        pred = b.predict(dx)
        pk, interior = peak_of(pred, dx)
        peak = float(pk[0]) if f != "flat" else float("nan")
        if f == "quadratic":
            peak = float(quadratic_peak(b.params, x[0], x[-1])[0])
        fits[f] = FitResult(
            f, dict(zip(PARAM_NAMES[f], map(float, b.params[0]), strict=True)), N_PARAMS[f], float(b.rss[0]), a[f],
            a[f] - amin, float(w[f] / wsum), float(np.sqrt(np.mean(errs**2))) if errs is not None else np.nan,
            float(np.mean(lolo)) if lolo is not None else np.nan, MONOTONE_NAMES[int(monotonicity(pred)[0])],
            peak, bool(interior[0]), b)
    selected = min(a, key=a.get)
    if np.ptp(y) == 0:
        notes.append("constant y")
    return CurveFit(x, y, s, fits, selected, grid_x, notes)


def fit_rows(cf: CurveFit) -> list[dict]:
    """One flat row per fitted form (for fits.csv): selection, diagnostics and parameters."""
    return [{"form": f.form, "selected": f.form == cf.selected, "k": f.k, "n": cf.x.size, "aicc": f.aicc,
             "delta_aicc": f.delta_aicc, "akaike_weight": f.weight, "loxo_rmse": f.loxo_rmse,
             "lolo_error": f.lolo_error, "monotone": f.monotone, "peak_x": f.peak_x,
             **{f"param_{k}": v for k, v in f.params.items()}} for f in cf.fits.values()]
