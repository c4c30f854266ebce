"""The seed level of a curve's noise: the two-way model v[x, s] = mu_x + b_s + e of per-seed values.

Seed s is one run recipe for every cell (head initialisation, data order), so its offset b_s is
shared by the cells of a curve and cancels in every difference between points - exactly when
every point ran the same seeds (`two_way_balanced`: plain means); when they did not, least squares
on the runs there are (`two_way_unbalanced`). `seed_level` turns either fit into the replicate
noise, the seed part of the points' covariance and the correction of each point's mean
(`analysis.bootstrap` uses it for per-seed values and for per-case predictions alike).
"""

from __future__ import annotations

import numpy as np


def two_way_balanced(v: np.ndarray) -> tuple[float, float, float]:
    """Residual variance, its degrees of freedom and the seed-effect variance of the two-way model
    v[x, s] = mu_x + b_s + e: seed effects shift every x alike, so contrasts between x see only e.
    Uses the seeds present at every x; without two of them, the pooled within-x variance."""
    complete = np.isfinite(v).all(axis=0)
    n, sc = v.shape[0], int(complete.sum())
    if n >= 2 and sc >= 2:
        c = v[:, complete]
        resid = c - c.mean(axis=1, keepdims=True) - c.mean(axis=0, keepdims=True) + c.mean()
        df = (n - 1) * (sc - 1)
        var = float((resid**2).sum() / df)
        return var, float(df), max(0.0, float(np.var(c.mean(axis=0), ddof=1)) - var / n)
    dev = v - np.nanmean(v, axis=1, keepdims=True)
    df = float(np.sum(np.maximum(np.isfinite(v).sum(axis=1) - 1, 0)))
    return (float(np.nansum(dev**2) / df) if df else float("nan")), df, 0.0


def two_way_unbalanced(v: np.ndarray):
    """Least squares of v[x, s] = mu_x + b_s + e on the cells that ran, when the x ran different
    seeds (an adaptive sweep adds seeds where they decide; a failed run leaves a hole).

    Why: a point's plain mean over its own seeds carries those seeds' shifts (seed s is one recipe
    for every cell, so its offset is shared), which cancel between points only when every point
    ran the same seeds. Here mu_x is each point's mean over *every* seed seen (the b_s sum to zero
    over them), the shifts estimated from the points that ran them; with one seed set everywhere
    this is the plain mean. Returns (mu (n,), C (n, n) with Cov(mu) = sigma^2 C, sigma^2, df,
    seed-effect variance), or None when the design has no residual df or does not link every x
    through shared seeds (then the caller keeps the plain means)."""
    ok = np.isfinite(v)
    seen = np.flatnonzero(ok.any(axis=0))
    n, S = v.shape[0], seen.size
    r, c = np.nonzero(ok[:, seen])
    p = n + S - 1
    if r.size - p < 1:
        return None
    Q = np.vstack([np.eye(S - 1), -np.ones((1, S - 1))])  # sum-to-zero coding of the seed effects
    X = np.zeros((r.size, p))
    X[np.arange(r.size), r] = 1.0
    X[:, n:] = Q[c]
    XtX = X.T @ X
    if np.linalg.matrix_rank(XtX) < p:
        return None
    inv = np.linalg.inv(XtX)
    y = v[:, seen][r, c]
    theta = inv @ (X.T @ y)
    df = float(r.size - p)
    var = float(np.sum((y - X @ theta) ** 2) / df)
    b, cov_b = Q @ theta[n:], Q @ inv[n:, n:] @ Q.T
    var_seed = max(0.0, float(np.var(b, ddof=1)) - var * float(np.mean(np.diag(cov_b)))) if S >= 2 else 0.0
    return theta[:n], inv[:n, :n], var, df, var_seed


def seed_level(v: np.ndarray, free: np.ndarray, n_boot: int, rng: np.random.Generator):
    """Seed-level replicate noise (n_boot, n_x) from the two-way model fitted to the per-seed values
    v of the cells that vary with the seed: a residual variance drawn from its scaled inverse
    chi-square (t-like tails, since a variance from 3-5 seeds is itself uncertain), one seed shift
    common to every x, independent noise per x; none for seed-free cells. Also returns the seed
    part of the covariance of the point estimates (diagonal: var / seeds; the common shift cancels
    in every contrast), its df, and what to add to each point's plain mean over its seeds: zero
    when every x ran the same seeds, else the two-way model's correction for the seeds an x lacks
    (`two_way_unbalanced`; the covariance is then that fit's). (None, None, inf, zeros) when v
    says nothing about seed spread."""
    n_per_x = np.isfinite(v).sum(axis=1)
    live = ~free & (n_per_x >= 1)
    zero = np.zeros(v.shape[0])
    if (n_per_x[live] < 2).all():
        return None, None, np.inf, zero
    ran = np.isfinite(v[live])
    fit = None if (ran == ran[0]).all() else two_way_unbalanced(v[live])
    if fit is None:
        var, df, var_seed = two_way_balanced(v[live])
        if not df or not np.isfinite(var):
            return None, None, np.inf, zero
    else:
        mu, C, var, df, var_seed = fit
    var_r = var * df / rng.chisquare(df, size=(n_boot, 1))
    shift = rng.normal(size=(n_boot, 1)) * np.sqrt(var_seed / n_per_x.max()) * live
    if fit is None:  # independent points, var / seeds each
        w = np.where(live, 1.0 / np.maximum(n_per_x, 1), 0.0)
        noise = shift + rng.normal(size=(n_boot, v.shape[0])) * np.sqrt(var_r * w)
        return noise, np.diag(var * w), float(df), zero
    idx = np.flatnonzero(live)
    part = np.zeros((v.shape[0], v.shape[0]))
    part[np.ix_(idx, idx)] = var * C
    noise = shift.copy()
    noise[:, idx] += (rng.normal(size=(n_boot, idx.size)) @ np.linalg.cholesky(C).T) * np.sqrt(var_r)
    adjust = zero.copy()
    adjust[idx] = mu - np.nanmean(v[live], axis=1)
    return noise, part, df, adjust
