"""Analytic p-values for the verdicts, resolved far below any multiplicity threshold, and the
corrections that run across a study.

Why analytic: a bootstrap p-value cannot go below 1/(R + 1); with R = 1000 and ~240 curves in
one family, no curve could ever pass a corrected 5% level, so the peaks and inverse curves a
study exists to find would never be reported. Here every test reads a normal model of the point
estimates - covariance Sigma = sum of the parts of `CurveReplicates.noise` (test cases, seeds) -
and its tail is computed, not counted.

- A contrast c'y (a difference of points, a slope) has variance v = c' Sigma c and, when part of
  Sigma is estimated from few seeds, Satterthwaite degrees of freedom
  nu = v^2 / sum_s (c' Sigma_s c)^2 / nu_s (a part from thousands of cases counts as known,
  nu_s = inf). One-sided p = P(t_nu > c'y / sqrt(v)); intervals are c'y +- t_nu sqrt(v).
- Monotonicity: the likelihood-ratio statistic of H0 "the means are non-decreasing in x" is
  T = min over non-decreasing m of (y - m)' Sigma^-1 (y - m). At the least favourable null (equal
  means) T follows a chi-bar-square law: P(T >= t) = sum_d w_d P(chi2_{n-d} >= t), with w_d the
  probability that the projection of N(0, Sigma) onto the cone has d distinct levels
  (Robertson, Wright & Dykstra, Order Restricted Statistical Inference, 1988; Silvapulle & Sen,
  Constrained Statistical Inference, 2005). The weights are estimated once per curve from
  ``N_WEIGHT_DRAWS`` Gaussian draws (fixed seed, so a report is reproducible); the tail itself is
  exact, so p-values of 1e-12 are resolved. When Sigma carries a seed part with finite df, each
  chi-square term becomes (n-d) F_{n-d, nu} with the Satterthwaite nu of the trace (the E-bar-square
  form for an estimated scale), which keeps the level with 3-5 seeds.
- Projection: exact, by enumerating the cone's faces (blocks of equal consecutive levels:
  2^(n-1) of them, vectorised over draws) up to ``MAX_FACE_POINTS`` points; beyond, non-negative
  least squares on the cone's generators, one draw at a time.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from functools import lru_cache

import numpy as np
from scipy import stats
from scipy.optimize import nnls

N_WEIGHT_DRAWS = 2000
MAX_FACE_POINTS = 9
WEIGHT_SEED = 20250906


# -- contrasts --------------------------------------------------------------------------------------
def contrast(c: np.ndarray, parts: Mapping[str, np.ndarray], dfs: Mapping[str, float]) -> tuple[float, float]:
    """(variance, Satterthwaite df) of c'y for the covariance parts."""
    vs = {k: float(c @ p @ c) for k, p in parts.items()}
    v = sum(vs.values())
    den = sum(vi**2 / dfs.get(k, np.inf) for k, vi in vs.items() if np.isfinite(dfs.get(k, np.inf)))
    return v, (v**2 / den if den > 0 else np.inf)


def p_greater(est: float, var: float, df: float) -> float:
    """One-sided p of H0 "the contrast is <= 0" against "> 0"."""
    if not (np.isfinite(est) and np.isfinite(var)):
        return float("nan")
    if var <= 0:
        return 0.0 if est > 0 else 1.0
    z = est / np.sqrt(var)
    return float(stats.norm.sf(z) if not np.isfinite(df) else stats.t.sf(z, df))


def interval(est: float, var: float, df: float, level: float) -> tuple[float, float]:
    if not (np.isfinite(est) and np.isfinite(var)):
        return float("nan"), float("nan")
    q = stats.norm.isf((1 - level) / 2) if not np.isfinite(df) else stats.t.isf((1 - level) / 2, df)
    h = q * np.sqrt(max(var, 0.0))
    return float(est - h), float(est + h)


# -- monotone cone ----------------------------------------------------------------------------------
@lru_cache(maxsize=16)
def _faces(n: int) -> list[np.ndarray]:
    """Block-membership matrices (n, k) of every partition of 0..n-1 into consecutive blocks."""
    out = []
    for cuts in itertools.product((0, 1), repeat=n - 1):
        labels = np.concatenate([[0], np.cumsum(cuts)])
        out.append((labels[:, None] == np.arange(labels[-1] + 1)[None, :]).astype(float))
    return out


def _regularised(cov: np.ndarray) -> np.ndarray:
    cov = np.asarray(cov, float)
    d = np.diag(cov)
    scale = float(d[d > 0].mean()) if (d > 0).any() else 1.0
    return cov + 1e-9 * scale * np.eye(cov.shape[0])


def cone_projection(Y: np.ndarray, cov: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Distance (Sigma^-1 metric) of each row of Y (R, n) to the non-decreasing cone, and the
    number of distinct levels of its projection."""
    Y = np.atleast_2d(np.asarray(Y, float))
    n = Y.shape[1]
    W = np.linalg.inv(_regularised(cov))
    W = 0.5 * (W + W.T)
    if n <= MAX_FACE_POINTS:
        best = np.full(Y.shape[0], np.inf)
        levels = np.ones(Y.shape[0], int)
        for B in _faces(n):
            P = np.linalg.solve(B.T @ W @ B, B.T @ W)  # (k, n): weighted block means
            beta = Y @ P.T
            ok = (np.diff(beta, axis=1) >= -1e-12 * (1 + np.abs(beta[:, 1:]))).all(axis=1)
            r = Y - beta @ B.T
            dist = ((r @ W) * r).sum(axis=1)
            better = ok & (dist < best)
            best[better], levels[better] = dist[better], B.shape[1]
        return np.maximum(best, 0.0), levels
    L = np.linalg.cholesky(W)  # ||L' r||^2 = r' W r
    steps = (np.arange(n)[:, None] >= np.arange(1, n)[None, :]).astype(float)
    G = L.T @ np.column_stack([np.ones(n), -np.ones(n), steps])
    dist, levels = np.empty(Y.shape[0]), np.empty(Y.shape[0], int)
    for i, y in enumerate(Y):
        coef, res = nnls(G, L.T @ y)
        dist[i], levels[i] = res**2, 1 + int((coef[2:] > 1e-10 * (1 + np.abs(coef).max())).sum())
    return dist, levels


def level_weights(cov: np.ndarray, draws: int = N_WEIGHT_DRAWS, seed: int = WEIGHT_SEED) -> np.ndarray:
    """Chi-bar-square weights w_1..w_n (index d - 1) for N(0, cov) and the non-decreasing cone;
    half a pseudo-count per level keeps a rare level from being estimated as impossible."""
    n = cov.shape[0]
    rng = np.random.default_rng(seed)
    C = np.linalg.cholesky(_regularised(cov))
    _, levels = cone_projection(rng.standard_normal((draws, n)) @ C.T, cov)
    counts = np.bincount(levels - 1, minlength=n).astype(float) + 0.5
    return counts / counts.sum()


def isotonic_p(y: np.ndarray, parts: Mapping[str, np.ndarray], dfs: Mapping[str, float]) -> tuple[float, float]:
    """(T, p) of the likelihood-ratio test of "non-decreasing in x"; NaN without a usable covariance."""
    y = np.asarray(y, float)
    if not parts or y.size < 3 or not np.isfinite(y).all():
        return float("nan"), float("nan")
    cov = sum(parts.values())
    if not np.isfinite(cov).all() or not (np.diag(cov) > 0).any():
        return float("nan"), float("nan")
    t = float(cone_projection(y[None], cov)[0][0])
    w = level_weights(cov)
    n = y.size
    H = np.eye(n) - 1.0 / n  # the trace of the centred parts gives one df for the whole shape
    tr = {k: float(np.trace(H @ p @ H)) for k, p in parts.items()}
    den = sum(v**2 / dfs.get(k, np.inf) for k, v in tr.items() if np.isfinite(dfs.get(k, np.inf)))
    nu = sum(tr.values()) ** 2 / den if den > 0 else np.inf
    p = 0.0
    for d in range(1, n):  # d = n: the projection is y itself, T = 0
        k = n - d
        tail = stats.chi2.sf(t, k) if not np.isfinite(nu) else stats.f.sf(t / k, k, nu)
        p += w[d - 1] * tail
    return t, float(min(1.0, p))


# -- multiplicity ---------------------------------------------------------------------------------------
def holm(pvalues: Sequence[float]) -> np.ndarray:
    """Holm step-down adjusted p-values, in input order; NaN entries stay NaN and are not counted."""
    p = np.asarray(pvalues, float)
    out = np.full(p.shape, np.nan)
    ok = np.flatnonzero(np.isfinite(p))
    order = ok[np.argsort(p[ok], kind="stable")]
    m = order.size
    out[order] = np.minimum(1.0, np.maximum.accumulate((m - np.arange(m)) * p[order]))
    return out


def bh(pvalues: Sequence[float]) -> np.ndarray:
    """Benjamini-Hochberg adjusted p-values (q-values), in input order; NaN entries stay NaN."""
    p = np.asarray(pvalues, float)
    out = np.full(p.shape, np.nan)
    ok = np.flatnonzero(np.isfinite(p))
    order = ok[np.argsort(p[ok], kind="stable")]
    m = order.size
    q = p[order] * m / np.arange(1, m + 1)
    out[order] = np.minimum(1.0, np.minimum.accumulate(q[::-1])[::-1])
    return out


CORRECTIONS = {"bh": bh, "holm": holm}
