"""The scaling forms (flat, log-linear, saturating, quadratic, broken power law) fitted to many
replicates at once: design matrices, AICc, monotonicity and peaks of fitted curves. `analysis.fits`
selects among them for one curve."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

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
