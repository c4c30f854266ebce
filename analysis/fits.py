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

FORMS = ("flat", "loglinear", "saturating", "quadratic", "broken")
PARAM_NAMES = {"flat": ("a",), "loglinear": ("a", "b"), "saturating": ("y_inf", "A", "alpha"),
               "quadratic": ("a", "b", "c"), "broken": ("a", "b1", "b2", "u_break")}
N_PARAMS = {f: len(p) for f, p in PARAM_NAMES.items()}
BROKEN_MIN_POINTS = 8
ALPHA_RANGE = (0.02, 40.0)  # bounds on alpha * u_max: from nearly log-linear to a step after x_min
N_THETA_GRID = 160
BREAK_SMOOTHNESS = 0.05
DENSE_GRID = 257
INCREASING, DECREASING, CONSTANT, NONMONOTONE = 1, -1, 0, 2
MONOTONE_NAMES = {INCREASING: "increasing", DECREASING: "decreasing", CONSTANT: "constant",
                  NONMONOTONE: "non-monotone"}


def _design(form: str, u: np.ndarray, theta, umax: float) -> np.ndarray:
    """Design matrices (m, n, p) of the linear part of ``form``, one per nonlinear value in theta."""
    t = np.atleast_1d(np.asarray(theta, float))[:, None]
    uu = np.broadcast_to(u[None, :], (t.shape[0], u.size))
    one = np.ones_like(uu)
    if form == "flat":
        cols = [one]
    elif form == "loglinear":
        cols = [one, uu]
    elif form == "quadratic":
        cols = [one, uu, uu * uu]
    elif form == "saturating":
        cols = [one, -np.exp(-t * uu)]
    else:
        s = BREAK_SMOOTHNESS * max(umax, 1e-12)
        cols = [one, uu, s * np.logaddexp(0.0, (uu - t) / s)]
    return np.stack(cols, axis=-1)


def _theta_grid(form: str, u: np.ndarray) -> np.ndarray:
    umax = max(float(u.max()), 1e-12)
    if form == "saturating":
        return np.geomspace(ALPHA_RANGE[0] / umax, ALPHA_RANGE[1] / umax, N_THETA_GRID)
    uu = np.unique(u)  # a break with >= 2 distinct x on each side
    return np.linspace(uu[min(1, uu.size - 1)], uu[max(-2, -uu.size)], N_THETA_GRID // 2)


def _full_params(form: str, beta: np.ndarray, theta: np.ndarray) -> np.ndarray:
    if form == "saturating":
        return np.column_stack([beta, theta])
    if form == "broken":
        return np.column_stack([beta[:, :2], beta[:, 1] + beta[:, 2], theta])
    return beta


def predict_form(form: str, params: np.ndarray, u: np.ndarray, umax: float = 1.0) -> np.ndarray:
    """Predictions (R, m) of ``form`` with parameter rows ``params`` (R, k) at u (m,)."""
    p = np.atleast_2d(np.asarray(params, float))
    u = np.asarray(u, float)[None, :]
    c = [p[:, i:i + 1] for i in range(p.shape[1])]
    if form == "flat":
        return np.repeat(c[0], u.shape[1], axis=1)
    if form == "loglinear":
        return c[0] + c[1] * u
    if form == "quadratic":
        return c[0] + c[1] * u + c[2] * u * u
    if form == "saturating":
        return c[0] - c[1] * np.exp(-c[2] * u)
    s = BREAK_SMOOTHNESS * max(umax, 1e-12)
    return c[0] + c[1] * u + (c[2] - c[1]) * s * np.logaddexp(0.0, (u - c[3]) / s)


def n_estimated(k: int, known_sigma: bool) -> int:
    """K of the AICc: the form's parameters, plus the noise variance when it is estimated."""
    return k if known_sigma else k + 1


def aicc(rss: np.ndarray, n: int, k: int, known_sigma: bool) -> np.ndarray:
    """Small-sample AIC of a form with k curve parameters; ``rss`` is chi^2 when the variances are known."""
    k = n_estimated(k, known_sigma)
    pen = 2 * k + 2 * k * (k + 1) / (n - k - 1)
    if known_sigma:
        return rss + pen
    return n * np.log(np.maximum(rss, 1e-300) / n) + pen


@dataclass
class BatchFit:
    """One form fitted to R curves sharing x: parameter rows, (weighted) RSS and AICc per curve."""

    form: str
    params: np.ndarray
    rss: np.ndarray
    aicc: np.ndarray
    x_min: float
    u_max: float

    def predict(self, x: np.ndarray) -> np.ndarray:
        return predict_form(self.form, self.params, np.log(np.asarray(x, float) / self.x_min), self.u_max)


def eligible(form: str, n: int, n_unique: int, known_sigma: bool = True) -> bool:
    """A form is fitted only when AICc is finite (K <= n - 2) and its parameters are identifiable."""
    k = N_PARAMS[form]
    if form == "broken" and n_unique < BROKEN_MIN_POINTS:
        return False
    return n_estimated(k, known_sigma) <= n - 2 and k <= n_unique


def _solve(X: np.ndarray, Y: np.ndarray, sw: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Weighted least squares of every row of Y on X; pinv tolerates rank deficiency."""
    X = X[0] if X.ndim == 3 else X
    beta = (Y * sw) @ np.linalg.pinv(X * sw[:, None]).T
    r = (Y - beta @ X.T) * sw
    return beta, np.einsum("rn,rn->r", r, r)


def _fit_theta_form(form, u, Y, sw, umax):
    """Profile the scalar nonlinear parameter on a grid, then one parabolic refinement per row."""
    grid = _theta_grid(form, u)
    Xg = _design(form, u, grid, umax) * sw[None, :, None]  # (G, n, p)
    Yw = Y * sw
    pinv = np.linalg.pinv(Xg)  # (G, p, n)
    # RSS of the projection: |Yw|^2 - |Q' Yw|^2 with Q an orthonormal basis of each design (matmul,
    # not einsum: BLAS-batched, ~20x faster for 1000 replicates x 160 grid values)
    betas = np.swapaxes(pinv @ Yw.T, 1, 2)  # (G, R, p)
    fitted = Xg @ np.swapaxes(betas, 1, 2)  # (G, n, R)
    res = Yw.T[None] - fitted
    rss = (res * res).sum(axis=1)  # (G, R)
    g = np.nanargmin(np.where(np.isfinite(rss), rss, np.inf), axis=0)
    rows = np.arange(Y.shape[0])
    theta = grid[g].copy()
    if grid.size >= 3:
        gi = np.clip(g, 1, grid.size - 2)
        r0, rm, rp = rss[gi, rows], rss[gi - 1, rows], rss[gi + 1, rows]
        den = rm - 2 * r0 + rp
        off = np.where((den > 0) & (g == gi), 0.5 * (rm - rp) / np.where(den > 0, den, 1), 0.0)
        off = np.clip(off, -1, 1)
        scale = np.log(grid) if form == "saturating" else grid
        t_ref = np.interp(np.where(g == gi, gi + off, g), np.arange(grid.size), scale)
        theta = np.exp(t_ref) if form == "saturating" else t_ref
    Xs = _design(form, u, theta, umax) * sw[None, :, None]  # (R, n, p)
    beta = np.einsum("rpn,rn->rp", np.linalg.pinv(Xs), Y * sw)
    res = Y * sw - np.einsum("rnp,rp->rn", Xs, beta)
    rss_ref = np.einsum("rn,rn->r", res, res)
    keep_grid = ~(rss_ref <= rss[g, rows])
    if keep_grid.any():
        theta[keep_grid] = grid[g[keep_grid]]
        beta[keep_grid] = betas[g[keep_grid], rows[keep_grid]]
        rss_ref[keep_grid] = rss[g[keep_grid], rows[keep_grid]]
    return _full_params(form, beta, theta), rss_ref


def _fit_one(form, u, Y, sw, umax, known):
    if form in ("saturating", "broken"):
        params, rss = _fit_theta_form(form, u, Y, sw, umax)
    else:
        params, rss = _solve(_design(form, u, 0.0, umax), Y, sw)
    if not known:  # an exact fit must not make ln(RSS) -inf
        rss = np.maximum(rss, u.size * (1e-9 * (np.abs(Y).max(axis=1) + 1e-12)) ** 2)
    return params.astype(float), rss.astype(float)


def fit_forms(x, Y, sigma=None, forms=FORMS, x_min: float | None = None) -> dict[str, BatchFit]:
    """Fit every eligible form to each row of Y (R, n) at x (n,); rows with NaN give NaN fits.

    ``sigma`` (n,) are per-point standard errors; all rows share them (bootstrap replicates of
    one curve). Only eligible forms appear in the result.
    """
    x = np.asarray(x, float)
    Y = np.atleast_2d(np.asarray(Y, float))
    n = x.size
    if n == 0:
        return {}
    x_min = float(x.min()) if x_min is None else x_min
    u = np.log(x / x_min)
    umax = float(u.max()) if n else 0.0
    known = sigma is not None
    sw = 1.0 / np.asarray(sigma, float) if known else np.ones(n)
    bad = ~np.isfinite(Y).all(axis=1)
    Yc = np.where(bad[:, None], 0.0, Y)
    out = {}
    for form in forms:
        if not eligible(form, n, np.unique(x).size, known):
            continue
        params, rss = _fit_one(form, u, Yc, sw, umax, known)
        params[bad], rss[bad] = np.nan, np.nan
        out[form] = BatchFit(form, params, rss, aicc(rss, n, N_PARAMS[form], known), x_min, umax)
    return out


def dense_x(x_min: float, x_max: float, m: int = DENSE_GRID) -> np.ndarray:
    return x_min * np.exp(np.linspace(0.0, np.log(x_max / x_min), m))


def monotonicity(pred: np.ndarray) -> np.ndarray:
    """Code per row of predictions on an increasing x grid: INCREASING, DECREASING, CONSTANT, ..."""
    d = np.diff(pred, axis=1)
    tol = 1e-9 * (1.0 + np.nanmax(np.abs(pred), axis=1, initial=0.0))[:, None]
    total = pred[:, -1] - pred[:, 0]
    inc = (d >= -tol).all(axis=1) & (total > tol[:, 0])
    dec = (d <= tol).all(axis=1) & (total < -tol[:, 0])
    const = (np.abs(d) <= tol).all(axis=1)
    return np.select([inc, dec, const], [INCREASING, DECREASING, CONSTANT], NONMONOTONE)


def peak_of(pred: np.ndarray, xs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """x of the maximum of each row of ``pred`` (R, m) on grid ``xs``, and whether it is interior.

    A peak counts as interior only if it beats both ends by more than rounding, so plateaus of
    monotone forms resolve to the better end (x_max on ties) rather than to a spurious middle.
    """
    tol = 1e-9 * (1.0 + np.nanmax(np.abs(pred), axis=1, initial=0.0))
    top = pred.max(axis=1)
    interior = top - np.maximum(pred[:, 0], pred[:, -1]) > tol
    end = np.where(pred[:, -1] >= pred[:, 0] - tol, xs[-1], xs[0])
    return np.where(interior, xs[np.argmax(pred, axis=1)], end), interior


def quadratic_peak(params: np.ndarray, x_min: float, x_max: float) -> np.ndarray:
    """x of the maximum of a + b u + c u^2 on [x_min, x_max] per parameter row: the vertex when
    c < 0 and it lies inside, otherwise the better end (x_max on ties)."""
    p = np.atleast_2d(params)
    b, c = p[:, 1], p[:, 2]
    umax = np.log(x_max / x_min)
    with np.errstate(divide="ignore", invalid="ignore"):
        uv = np.where(c < 0, -b / (2 * c), np.nan)
    inside = (uv > 0) & (uv < umax)
    end = np.where(b * umax + c * umax**2 >= 0, x_max, x_min)
    return np.where(inside, x_min * np.exp(np.where(inside, uv, 0.0)), end)


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
