"""Bootstrap replicates of a scaling curve's points (one point per x: the mean over seeds).

Why two levels, paired: every cell of a curve (config x seed) scores the same test cases, so the
case-sampling error is shared between x-values. Resampling cases with the SAME draw for every cell
keeps that correlation, which makes differences between x-values (what a verdict is about) far
tighter than independent CIs would suggest. Seeds (head initialisation) are a second source. With
many seeds (>= ``PARAMETRIC_BELOW_SEEDS``) they are resampled after the cases, one draw shared
across x because seed s of every config is the same run recipe. With the usual 3-5 seeds that
resampling has too few distinct outcomes (3 seeds: 10) and understates the spread - the
monotonicity test then rejected a flat curve 10-17% of the time at a 5% level in simulation - so
the seed level is drawn from the two-way model y[x, s] = mu_x + b_s + e instead (`seed_model`).
Per-case noise that differs between seeds is counted at both levels: conservative.

Speed: a case draw is held as a count matrix C (R, N) - how often each case appears in each
replicate - so a metric is a weighted statistic computed for all replicates at once. AUC sorts
each cell's scores once and reads every replicate off cumulative sums of counts; nothing is sorted
per replicate. 1000 replicates x 15 cells x 5000 cases take about a second.

Fewer inputs, less said: per-seed values only -> resample seeds (paired across x), or with fewer
than ``PARAMETRIC_BELOW_SEEDS`` seeds draw from the two-way (x + seed) model, since 3 resampled
seeds understate the spread; a table's mean ± SD over n cases -> SD / sqrt(n) (`printed_spread`);
means only -> no replicates, and the curve is marked "no CI". Cells whose seeds agree
(`zero_spread`: a protocol that ignores the seed) get no seed noise.

Every curve also carries its noise split by source (`CurveReplicates.parts`), which the analytic
tests of `analysis.nulls` read instead of counting replicates.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from analysis.seed_model import seed_level

CaseMetric = Callable[[np.ndarray, "np.ndarray | None", np.ndarray], np.ndarray]
"""metric(values (N, ...), targets (N, ...) or None, counts (R, N)) -> (R,) one value per replicate."""

PARAMETRIC_BELOW_SEEDS = 30  # fewer seeds than this: parametric seed replicates (see bootstrap_seeds)
CHUNK_ELEMENTS = 2_000_000  # replicate rows x cases processed at once: bounds memory, keeps cache-friendly


@dataclass(frozen=True)
class CurveReplicates:
    """Points of one curve: estimates (n,) at x (n,) and bootstrap replicates (R, n) or None.

    ``parts`` splits the covariance of the point estimates by source ("cases", "seeds"): each an
    (n, n) matrix, with its degrees of freedom in ``dfs`` (inf for a part known from many cases;
    (x - 1)(seeds - 1) for the two-way seed model). The tests of `analysis.nulls` read contrasts
    off their sum and a Satterthwaite df; the report prints each part's share. A shift that
    moves every point alike (one seed's offset) cancels in every difference and is left out.
    """

    x: np.ndarray
    estimate: np.ndarray
    replicates: np.ndarray | None = None
    method: str = "none"  # "cases+seeds", "seeds", "seeds-parametric", "printed-sd" or "none"
    parts: dict[str, np.ndarray] | None = None
    dfs: dict[str, float] | None = None

    @property
    def no_ci(self) -> bool:
        return self.replicates is None or self.replicates.shape[0] < 2

    def se(self) -> np.ndarray:
        """Bootstrap standard error per point (NaN without replicates)."""
        if self.no_ci:
            return np.full(self.x.shape, np.nan)
        return np.nanstd(self.replicates, axis=0, ddof=1)

    def ci(self, level: float = 0.95) -> tuple[np.ndarray, np.ndarray]:
        """Percentile interval per point; (estimate, estimate) without replicates."""
        if self.no_ci:
            return self.estimate.copy(), self.estimate.copy()
        q = 50 * (1 - level)
        lo, hi = np.nanpercentile(self.replicates, [q, 100 - q], axis=0)
        return lo, hi

    def noise(self) -> tuple[dict[str, np.ndarray], dict[str, float]]:
        """Covariance parts and their dfs; without ``parts``, the replicates' covariance ("replicates", inf)."""
        if self.parts:
            return self.parts, dict(self.dfs or {})
        if self.no_ci:
            return {}, {}
        reps = self.replicates[np.isfinite(self.replicates).all(axis=1)]
        return {"replicates": np.atleast_2d(np.cov(reps, rowvar=False))}, {"replicates": np.inf}

    def take(self, rows: np.ndarray, sign: float = 1.0) -> CurveReplicates:
        """The sub-curve at ``rows`` (positions), times ``sign`` (orientation)."""
        reps = None if self.replicates is None else sign * self.replicates[:, rows]
        parts = None if self.parts is None else {k: v[np.ix_(rows, rows)] for k, v in self.parts.items()}
        return CurveReplicates(self.x[rows], sign * self.estimate[rows], reps, self.method, parts, self.dfs)


def zero_spread(v: np.ndarray, rtol: float = 1e-6) -> np.ndarray:
    """Rows (cells) of per-seed values v (n_x, n_seeds) whose seeds agree to a relative tolerance:
    a protocol that ignores the seed (kNN, registration) repeats one value, and float rounding
    must not turn that repetition into a tiny, falsely precise spread. Needs >= 2 finite seeds."""
    v = np.asarray(v, float)
    ok = np.isfinite(v)
    with np.errstate(invalid="ignore"):
        hi = np.where(ok, v, -np.inf).max(axis=1)
        lo = np.where(ok, v, np.inf).min(axis=1)
        scale = np.maximum(np.abs(hi), np.abs(lo))
    return (ok.sum(axis=1) >= 2) & (hi - lo <= rtol * np.maximum(scale, 1e-12))


def case_counts(n_cases: int, n_boot: int, rng: np.random.Generator) -> np.ndarray:
    """Multinomial case counts (n_boot, n_cases): row r says how often case i is in replicate r."""
    idx = rng.integers(0, n_cases, size=(n_boot, n_cases))
    idx += (np.arange(n_boot) * n_cases)[:, None]
    return np.bincount(idx.ravel(), minlength=n_boot * n_cases).reshape(n_boot, n_cases).astype(np.float64)


def _auc_1d(scores: np.ndarray, targets: np.ndarray, counts: np.ndarray) -> np.ndarray:
    pos = targets.astype(bool)
    order = np.argsort(scores[~pos], kind="mergesort")
    neg_sorted = scores[~pos][order]
    cum = np.zeros((counts.shape[0], order.size + 1))
    np.cumsum(counts[:, np.flatnonzero(~pos)[order]], axis=1, out=cum[:, 1:])  # negatives at or below
    cp = counts[:, pos]
    lo = np.searchsorted(neg_sorted, scores[pos], "left")
    hi = np.searchsorted(neg_sorted, scores[pos], "right")
    below = cum[:, lo] if np.array_equal(lo, hi) else 0.5 * (cum[:, lo] + cum[:, hi])  # a tie counts 1/2
    num = np.einsum("rp,rp->r", cp, below)
    den = cp.sum(axis=1) * cum[:, -1]
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, num / np.where(den > 0, den, 1.0), np.nan)


def auc(scores: np.ndarray, targets: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """ROC AUC per replicate (Mann-Whitney with ties as 1/2); (N, L) inputs give the macro mean
    over labels that have both classes in a replicate (the paper averages per-class metrics)."""
    scores, targets = np.asarray(scores, float), np.asarray(targets)
    if scores.ndim == 1:
        return _auc_1d(scores, targets, counts)
    per = np.stack([_auc_1d(scores[:, j], targets[:, j], counts) for j in range(scores.shape[1])], 1)
    with np.errstate(invalid="ignore"):
        return np.nanmean(np.where(np.isfinite(per), per, np.nan), axis=1)


def mean_metric(values: np.ndarray, targets: np.ndarray | None, counts: np.ndarray) -> np.ndarray:
    """Case-weighted mean of a per-case value (Dice per case, correctness, loss); (N, L) -> mean of L."""
    v = np.asarray(values, float)
    v = v.mean(axis=1) if v.ndim > 1 else v
    return counts @ v / counts.sum(axis=1)


def accuracy(predicted: np.ndarray, targets: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Accuracy of predicted labels (N,) or multi-label rows (N, L), as a case-weighted mean."""
    return mean_metric(np.asarray(predicted) == np.asarray(targets), None, counts)


def per_replicate(fn: Callable[[np.ndarray, np.ndarray | None], float]) -> CaseMetric:
    """Wrap a plain metric fn(values, targets) -> float; loops over replicates (slow but general)."""
    def metric(values, targets, counts):
        out = np.empty(counts.shape[0])
        for r, row in enumerate(counts.astype(np.int64)):
            idx = np.repeat(np.arange(row.size), row)
            out[r] = fn(np.asarray(values)[idx], None if targets is None else np.asarray(targets)[idx])
        return out
    return metric


def _metric_chunked(metric: CaseMetric, values, targets, counts: np.ndarray) -> np.ndarray:
    step = max(1, CHUNK_ELEMENTS // max(counts.shape[1], 1))
    return np.concatenate([metric(values, targets, counts[i:i + step]) for i in range(0, counts.shape[0], step)])


def _seed_mean(cells: np.ndarray, seed_w: np.ndarray) -> np.ndarray:
    """Weighted mean over seeds (last axis) ignoring missing cells; NaN where nothing is left."""
    w = seed_w * np.isfinite(cells)
    tot = w.sum(axis=-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(tot > 0, np.nansum(np.nan_to_num(cells) * w, axis=-1) / np.where(tot > 0, tot, 1), np.nan)


def bootstrap_cases_seeds(x: Sequence[float], predictions, targets, metric: CaseMetric = auc,
                          n_boot: int = 1000, seed: int = 0, seed_free=None) -> CurveReplicates:
    """Two-level paired bootstrap of one curve.

    ``predictions[i][s]`` holds the per-case outputs (N, ...) of x-value i, seed s (None or a
    missing entry for a cell that did not run); every cell scores the same N test cases in the
    same order as ``targets`` (N, ...) (None for metrics that need none). Returns the point
    estimates (mean over seeds of the metric on all cases) and replicates (n_boot, n_x): cases
    resampled with one draw for all cells, then the seed level (module docstring). A cell whose
    seeds give one value (``seed_free`` (n_x,) or `zero_spread`) gets no seed-level noise.
    """
    x = np.asarray(x, float)
    if len(predictions) != x.size:
        raise ValueError(f"{len(predictions)} x-values of predictions for {x.size} x")
    n_seeds = max((len(p) for p in predictions), default=0)
    cells = [[p[s] if s < len(p) else None for s in range(n_seeds)] for p in predictions]
    n_cases = {np.shape(c)[0] for row in cells for c in row if c is not None}
    if not n_cases:
        return CurveReplicates(x, np.full(x.shape, np.nan), None, "none")
    if len(n_cases) != 1:
        raise ValueError(f"cells must share one test set; case counts seen: {sorted(n_cases)}")
    (N,) = n_cases
    rng = np.random.default_rng(seed)
    counts = case_counts(N, n_boot, rng)  # one draw for every cell: the pairing
    full = np.ones((1, N))
    M = np.full((n_boot, x.size, n_seeds), np.nan)
    est = np.full((x.size, n_seeds), np.nan)
    for i, row in enumerate(cells):
        for s, v in enumerate(row):
            if v is not None:
                M[:, i, s] = _metric_chunked(metric, v, targets, counts)
                est[i, s] = metric(v, targets, full)[0]
    free = zero_spread(est) | (np.zeros(x.size, bool) if seed_free is None else np.asarray(seed_free, bool))
    point = _seed_mean(est, np.ones((1, n_seeds)))
    reps = _seed_mean(M, np.ones((1, 1, n_seeds)))  # case level, every seed
    noise, seed_part, df, adjust = seed_level(est, free, n_boot, rng)
    point, reps = point + adjust, reps + adjust  # the seeds a cell lacks (`seed_model.two_way_unbalanced`)
    parts = {"cases": np.atleast_2d(np.cov(reps[np.isfinite(reps).all(axis=1)], rowvar=False))}
    dfs = {"cases": np.inf}
    if seed_part is not None:
        parts["seeds"], dfs["seeds"] = seed_part, df
    if n_seeds >= PARAMETRIC_BELOW_SEEDS:
        seed_w = case_counts(n_seeds, n_boot, rng)[:, None, :]  # shared across x: seeds are paired
        return CurveReplicates(x, point, _seed_mean(M, seed_w) + adjust, "cases+seeds", parts, dfs)
    return CurveReplicates(x, point, reps if noise is None else reps + noise, "cases+seeds", parts, dfs)


def bootstrap_seeds(x: Sequence[float], values, n_boot: int = 1000, seed: int = 0,
                    parametric: bool | None = None, seed_free=None) -> CurveReplicates:
    """Replicates of a curve known by per-seed values (n_x, n_seeds); NaN marks a missing cell.

    Resampling seeds (paired across x) is right with many seeds, but 3 seeds give 10 distinct
    resamples, intervals far too narrow and a covariance too rough for the monotonicity test.
    So below ``PARAMETRIC_BELOW_SEEDS`` seeds (or with ``parametric=True``) the replicates come
    from the two-way (x + seed) model instead (see `seed_model.seed_level`). A cell whose seeds agree
    (`zero_spread`, or ``seed_free``) is one value without seed noise; when no cell varies with
    the seed - or fewer than 2 seeds - there is no CI.
    """
    x = np.asarray(x, float)
    v = np.asarray(values, float).reshape(x.size, -1)
    free = zero_spread(v) | (np.zeros(x.size, bool) if seed_free is None else np.asarray(seed_free, bool))
    est = _seed_mean(v, np.ones((1, v.shape[1])))
    rng = np.random.default_rng(seed)
    if free.all():
        return CurveReplicates(x, est, None, "none")
    if parametric is False or (parametric is None and v.shape[1] >= PARAMETRIC_BELOW_SEEDS):
        if (np.isfinite(v).sum(axis=1) < 2).all():
            return CurveReplicates(x, est, None, "none")
        w = case_counts(v.shape[1], n_boot, rng)[:, None, :]
        vv = np.where(free[:, None], est[:, None], v)  # a seed-free cell resamples to itself
        reps = _seed_mean(vv[None], w)
        cov = np.atleast_2d(np.cov(reps, rowvar=False))
        return CurveReplicates(x, est, reps, "seeds", {"seeds": cov}, {"seeds": float(v.shape[1] - 1)})
    noise, part, df, adjust = seed_level(v, free, n_boot, rng)
    if noise is None:
        return CurveReplicates(x, est, None, "none")
    est = est + adjust  # the seeds a cell lacks (`seed_model.two_way_unbalanced`)
    return CurveReplicates(x, est, est + noise, "seeds-parametric", {"seeds": part}, {"seeds": df})


def printed_spread(x: Sequence[float], means: Sequence[float], sd: Sequence[float], n_cases: int,
                   n_boot: int = 1000, seed: int = 0) -> CurveReplicates:
    """A curve known by published means ± SD over ``n_cases`` test cases (e.g. "0.748 ± 0.117" over
    50 patients): each point's standard error is SD / sqrt(n), with n - 1 degrees of freedom.
    Points are taken as independent: the pairing of cases between models is not published, and
    for the positive correlation a shared test set brings, this overstates the error of every
    difference (conservative). Replicates are drawn from the normal model for the plots' bands."""
    x, m = np.asarray(x, float), np.asarray(means, float)
    se = np.asarray(sd, float) / np.sqrt(n_cases)
    rng = np.random.default_rng(seed)
    reps = m + rng.standard_normal((n_boot, m.size)) * se * np.sqrt(rng.chisquare(max(n_cases - 1, 1), (n_boot, 1))
                                                                      / max(n_cases - 1, 1)) ** -1
    return CurveReplicates(x, m, reps, "printed-sd", {"cases": np.diag(se**2)}, {"cases": float(max(n_cases - 1, 1))})


def means_only(x: Sequence[float], means: Sequence[float]) -> CurveReplicates:
    """A curve known only by its points (e.g. a paper table): fitted as given, marked "no CI"."""
    return CurveReplicates(np.asarray(x, float), np.asarray(means, float), None, "none")
