"""The seed level of a curve's noise (analysis/seed_model.py), known truth: intervals from 3-5
seeds that cover it, seed-free cells (kNN) as one value, and points that ran different seed sets
read through the two-way model (least-squares parity with scikit-learn, contrasts free of the
missing seeds' shifts, coverage)."""

from __future__ import annotations

import numpy as np

from analysis.bootstrap import bootstrap_seeds
from analysis.verdict import judge_curves

RES = np.array([224, 256, 384, 512, 768, 1024.0])
PARAMS_M = np.array([21, 86, 300, 840, 6700.0])  # DINOv3 S, B, L, H+, 7B (millions)


def test_three_seed_intervals_cover_the_truth():
    """3 resampled seeds give intervals far too narrow; the two-way seed model must not."""
    truth = np.array([0.70, 0.74, 0.76, 0.77])
    hits = {"seeds-parametric": 0, "seeds": 0}
    for rep in range(200):
        r = np.random.default_rng(rep)
        v = truth[:, None] + 0.01 * r.normal(size=(1, 3)) + 0.01 * r.normal(size=(4, 3))
        for parametric in (None, False):
            c = bootstrap_seeds(RES[:4], v, n_boot=400, seed=rep, parametric=parametric)
            lo, hi = np.percentile(c.replicates[:, -1] - c.replicates[:, 0], [2.5, 97.5])
            hits[c.method] += lo <= truth[-1] - truth[0] <= hi
    assert hits["seeds-parametric"] >= 180, hits
    assert hits["seeds"] < hits["seeds-parametric"]


def test_unequal_seed_sets_are_read_through_the_two_way_model():
    """Cells that ran different seeds (an adaptive sweep, a failed run): each point is its mean over
    every seed seen, the shared seed shifts estimated from the cells that ran them - least squares,
    equal to scikit-learn's on the one-hot design; with one seed set everywhere, the plain means."""
    from sklearn.linear_model import LinearRegression

    r = np.random.default_rng(3)
    n, S = 6, 5
    mu = np.linspace(0.70, 0.80, n)
    shift = 0.02 * r.normal(size=S)  # large next to the run noise: plain means of unequal seeds differ
    v = mu[:, None] + shift[None] + 0.002 * r.normal(size=(n, S))
    balanced = bootstrap_seeds(RES[:n], v, n_boot=50)
    np.testing.assert_array_equal(balanced.estimate, v.mean(axis=1))
    np.testing.assert_array_equal(balanced.parts["seeds"], np.diag(np.diag(balanced.parts["seeds"])))
    v[3, 2:] = np.nan
    v[5, 1:] = np.nan
    v[0, 4] = np.nan
    c = bootstrap_seeds(RES[:n], v, n_boot=4000)
    ok = np.isfinite(v)
    rows, seeds = np.nonzero(ok)
    X = np.zeros((rows.size, n + S))
    X[np.arange(rows.size), rows] = 1.0
    X[np.arange(rows.size), n + seeds] = 1.0
    lr = LinearRegression(fit_intercept=False).fit(X[:, :-1], v[ok])  # the last seed is the baseline
    np.testing.assert_allclose(c.estimate, lr.coef_[:n] + np.r_[lr.coef_[n:], 0.0].mean(), atol=1e-12)
    # contrasts recover the truth: the plain means are off by the shifts of the missing seeds
    d_two_way = np.abs(np.diff(c.estimate) - np.diff(mu)).max()
    d_plain = np.abs(np.diff(np.nanmean(v, axis=1)) - np.diff(mu)).max()
    assert d_two_way < 0.006 < d_plain, (d_two_way, d_plain)
    # the replicates' differences spread as the fit's covariance says (x df / (df - 2): the
    # variance is drawn from its scaled inverse chi-square); a 1-seed point is the least certain
    P = c.parts["seeds"]
    for i, j in ((1, 5), (0, 3), (2, 4)):
        ratio = np.var(c.replicates[:, i] - c.replicates[:, j]) / (P[i, i] + P[j, j] - 2 * P[i, j])
        assert 0.85 < ratio < 1.6, (i, j, ratio)
    assert P[5, 5] > 3 * P[1, 1]


def test_unequal_seed_intervals_cover_the_truth():
    """With the seeds' shifts several times the run noise and points that ran 1-5 seeds, the
    two-way model's 95% intervals of the end-to-end gain still cover the truth."""
    truth = np.array([0.70, 0.74, 0.76, 0.77])
    hits = 0
    for rep in range(200):
        r = np.random.default_rng(rep)
        v = truth[:, None] + 0.01 * r.normal(size=(1, 5)) + 0.003 * r.normal(size=(4, 5))
        v[0, 1:] = np.nan  # one seed at the first point, two at the last
        v[3, 2:] = np.nan
        c = bootstrap_seeds(RES[:4], v, n_boot=400, seed=rep)
        lo, hi = np.percentile(c.replicates[:, -1] - c.replicates[:, 0], [2.5, 97.5])
        hits += lo <= truth[-1] - truth[0] <= hi
    assert 180 <= hits <= 199, hits


def test_seed_free_cells_are_one_value_and_get_no_interval_backed_verdict():
    """kNN ignores the seed: 0.800 / 0.806 / 0.8005 repeated over 5 seeds (with float rounding noise)
    is an ordering, never a CI-backed 'peaks' with a fake-precise interval."""
    from analysis.bootstrap import zero_spread

    y = np.array([0.800, 0.806, 0.8005])
    v = y[:, None] + np.array([0, 1e-12, -1e-12, 0, 2e-12])[None, :]
    assert zero_spread(v).all() and not zero_spread(v + [[0, 0.001, 0, 0, 0]] * 3).any()
    c = bootstrap_seeds(PARAMS_M[:3] * 1e6, v)
    assert c.no_ci
    out = judge_curves([c])[0]
    assert out.kind == "ordering" and out.label == "order: peaks" and np.isnan(out.p_adj)
    # one seed-free cell among seed-dependent ones gets no seed noise of its own
    mixed = np.vstack([np.full(5, 0.80), 0.81 + 0.003 * np.random.default_rng(0).normal(size=(2, 5))])
    m = bootstrap_seeds(RES[:3], mixed, n_boot=300)
    assert np.ptp(m.replicates[:, 0]) == 0 and m.replicates[:, 1:].std() > 0
    assert m.parts["seeds"][0, 0] == 0 and m.parts["seeds"][1, 1] > 0
