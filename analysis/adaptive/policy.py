"""The round policy of an adaptive scaling study: which cells to run next, and when a curve is settled.

Round 0 runs the corners of the grid (`cells.axis_ends`). After each round every curve is judged by
the ordinary analysis (`analysis.study.build_study`: the same fits, covariance and BH family as
`medscale analyze`; data curves - metric vs training cases, where the grid has train sizes - by
`analysis.data_axis`, their own family, as there). A curve is *settled* when every planned point of
it has run and
 - its claim passes the interim level (BH-adjusted p <= ``interim_alpha``, a Haybittle-Peto
   boundary) and would stay the same at the full grid's precision, or
 - it is `flat` (every pairwise 95% CI inside the margin) or `noisy`, and would stay so at the full
   grid's precision (more seeds would not change it),
 - or its cells are seed-free (seeds repeat one value: an ordering, decided by the points),
 - or every seed of it has run (nothing left to learn).
"At the full grid's precision": the curve's covariance with each point's seed part scaled by
seeds-now / seeds-planned, at the current estimates, at the estimates moved ``stability_z`` SDs of
the unseen seeds' mean along each contrast that decides a shape (gain, rise, fall, pairs, top
slope: a verdict whose margin or sign test is within that of flipping is not settled), and at
``draws`` predictive draws of the full-seed estimates, each judged by `verdict.analyse_curve` at the
current family's BH cut-off; every one must give the current verdict.

Open curves ask for cells (`asks`): missing points first, then seeds where they shrink the contrasts
that decide the shape; asks of curves the projection expects to move count double, those whose
estimates show a peak triple. Asks are summed over curves and metrics (one cell serves many curves)
and taken greedily by value per unit of cost, up to ``round_share`` of the full grid's cost per
round (more when the budget left would not fit in the rounds left at that pace) and the budget. Costs are the candidates' (`cells.cost_of`): per cell, or - priced by
extraction - each extraction once, by the first chosen cell that needs it, plus each cell's head.

Error control across rounds (docs/analysis.md, "Adaptive sweeps"): a claim frozen at an interim
look passed BH at ``interim_alpha``; every other claim is decided once, on the final points, by BH
over the whole family at ``final_alpha = alpha - (max_rounds - 1) * interim_alpha``. The false
discovery rate of the union of looks is at most the sum of the levels, i.e. ``alpha``. With a budget
of the whole grid (>= 1) nothing is frozen, no level is spent, and the result is the full grid's.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field, fields, replace

import numpy as np
import pandas as pd

from analysis.adaptive.asks import rank_asks
from analysis.adaptive.cells import (
    PlannedCurve,
    axis_ends,
    cost_of,
    drawn_cells,
    extractions_of,
    grid_cost,
    performance_metrics,
    planned_curves,
    planned_data_curves,
    seed_counts,
)
from analysis.adaptive.judged import Judged, judge_points
from analysis.bootstrap import CurveReplicates
from analysis.curves import CurveKey
from analysis.points import plotted_metrics
from analysis.study import Study
from analysis.verdict import analyse_curve, top_slope_contrast
from analysis.verdict_model import ALPHA, DIRECTIONAL
from analysis.verdict_text import _decide

OPEN = "open"  # the adaptive verdict of a curve with too few points (or no end) for any verdict
CLAIMS = tuple(v for v in DIRECTIONAL if v != "mixed")
PEAK_WEIGHT = 3.0  # asks of an open curve whose estimates show a peak count this much more
STATE = {"state": True}  # field metadata: the rounds' state, not a parameter (`AdaptivePolicy.parameters`)


@dataclass
class CurveStatus:
    key: CurveKey
    settled: bool
    verdict: str  # the analysis' verdict on the points so far, or OPEN
    reason: str  # why settled, or why still open
    n_points: int
    planned_points: int
    settled_round: int | None = None
    frozen: bool = False  # settled with a claim at an interim look: no later data changes it
    freeze: bool = False  # its claim passed the interim level: frozen when this look is an interim one
    weight: float = 1.0  # how much its asks count: 2 when the full grid's precision is expected to change it


@dataclass
class Round:
    index: int
    cells: pd.DataFrame  # candidate rows to run (cell columns, cost, reason)
    reasons: list[str]
    cost: float

    @property
    def empty(self) -> bool:
        return self.cells.empty


@dataclass
class AdaptivePolicy:
    """Rounds over a grid of candidate cells (rows: `cells.cell_columns`, params, gflops, cost).

    ``budget``: the share of the full grid's cost the run may spend (>= 1: the whole grid, in the
    policy's order). ``confidence``: 1 - interim_alpha when ``interim_alpha`` is not given."""

    budget: float = 0.5
    confidence: float = 0.9995
    alpha: float = ALPHA
    initial_seeds: int = 2
    interior_seeds: int = 1
    max_rounds: int = 12
    round_share: float = 0.05  # smaller rounds look more often before spending (docs/analysis.md, "Measured")
    interim_alpha: float | None = None
    n_boot: int = 20  # verdicts read analytic tails; replicates only feed shape shares
    draws: int = 6  # predictive draws of the full-seed estimates a settled curve must agree with
    stability_z: float = 2.0  # SDs of the unseen seeds' mean a settled verdict must survive along each contrast
    # the rounds' state, not parameters (`parameters()`)
    frozen: dict = field(default_factory=dict, metadata=STATE)  # CurveKey -> CurveStatus frozen at an interim look
    first_settled: dict = field(default_factory=dict, metadata=STATE)  # CurveKey -> the first look that settled it
    last_status: dict = field(default_factory=dict, metadata=STATE)
    round: int = field(default=0, metadata=STATE)
    _cache: tuple | None = field(default=None, metadata=STATE)

    def parameters(self) -> dict:
        """Every parameter that derives the rounds (its fields but the state), e.g. for a resumed
        sweep to check it derives them as before (`orchestrator.sweep.rounds.policy_settings`)."""
        return {f.name: getattr(self, f.name) for f in fields(self) if not f.metadata.get("state")}

    @property
    def exhaustive(self) -> bool:
        return self.budget >= 1.0

    @property
    def look_alpha(self) -> float:
        return float(self.interim_alpha if self.interim_alpha is not None else 1.0 - self.confidence)

    @property
    def final_alpha(self) -> float:
        """The level left for the final look after the interim looks' share (none when exhaustive)."""
        if self.exhaustive:
            return self.alpha
        return max(self.alpha - (self.max_rounds - 1) * self.look_alpha, 0.0)

    def __post_init__(self) -> None:
        if self.final_alpha <= 0:
            raise ValueError(f"interim looks spend all of alpha={self.alpha}: lower interim_alpha or max_rounds")

    # -- rounds --------------------------------------------------------------------------------
    def initial_cells(self, candidates: pd.DataFrame) -> Round:
        """Round 0: the corners of every axis with ``initial_seeds`` seeds, within the budget."""
        self.round, self.frozen, self.first_settled, self.last_status = 0, {}, {}, {}
        ends = axis_ends(candidates, self.initial_seeds)
        room = self.budget * grid_cost(candidates) * (1 + 1e-9)
        keep, paid, spent = [], set(), 0.0
        # cheapest first, within the budget: a cell's cost when nothing is paid yet (priced by
        # extraction: its site's encoding and its head - the head alone would put a subset's cheap
        # head on the dearest site first)
        first = ends["cost"] + (ends["extraction_cost"] if "extraction_cost" in ends.columns else 0.0)
        for i in first.sort_values(kind="stable").index:
            c = cost_of(candidates, [i], paid)
            if spent + c <= room:
                keep.append(i)
                spent += c
                paid |= extractions_of(candidates, [i])
        return self._round(candidates.loc[keep], ["corner of the grid (round 0)"] * len(keep), spent)

    def next_cells(self, points: pd.DataFrame, candidates: pd.DataFrame, spent: float | None = None) -> Round:
        """The next round after judging ``points`` (every point of the cells run so far)."""
        total = grid_cost(candidates)
        drawn = drawn_cells(points, candidates)
        spent = cost_of(candidates, candidates.index[drawn]) if spent is None else spent
        paid = extractions_of(candidates, candidates.index[drawn])  # features already cached
        last = self.round + 1 >= self.max_rounds and not self.exhaustive
        # the look after the last round is the final one: it freezes nothing (its level is final_alpha)
        status = self.settled(points, candidates, freeze=not last)
        self.round += 1
        if last:
            return self._round(candidates.iloc[:0], [], 0.0)
        asks = rank_asks(status, self.judged(points).verdicts, points, candidates, drawn,
                         every_curve=self.exhaustive, new_point_seeds=self.interior_seeds, paid=paid)
        room = self.budget * total - spent
        # at most round_share of the grid - or more, when the budget left would not fit in the
        # rounds left at that pace (a large budget must be spendable within max_rounds)
        cap = max(self.round_share * total, room / max(self.max_rounds - self.round, 1))
        picked, reasons, cost = [], [], 0.0
        for idx, reason in asks:
            c = cost_of(candidates, idx, paid)
            if c > room + 1e-9 * total or (picked and cost + c > cap):
                continue
            picked.extend(idx)
            reasons.extend([reason] * len(idx))
            cost, room = cost + c, room - c
            paid |= extractions_of(candidates, idx)
        if not picked and self.exhaustive:  # every curve settled: the whole grid still runs
            rest = candidates.index[~drawn]
            picked, reasons = list(rest), ["the whole grid was bought (budget >= 1)"] * len(rest)
            cost = cost_of(candidates, rest, paid)
        return self._round(candidates.loc[picked], reasons, cost)

    def _round(self, cells: pd.DataFrame, reasons: list[str], cost: float) -> Round:
        """``cost``: what the round adds to the spend (an extraction already paid is not paid again)."""
        return Round(self.round, cells.assign(reason=reasons), reasons, float(cost))

    # -- judging -------------------------------------------------------------------------------
    def judge(self, points: pd.DataFrame) -> Study:
        """The ordinary analysis of the points so far (the model size, resolution and GFLOPs curves)."""
        return self.judged(points).study

    def judged(self, points: pd.DataFrame) -> Judged:
        """The analysis of the points so far, data curves included (cached for the same points)."""
        key = (len(points), float(points["value"].sum()))
        if self._cache is None or self._cache[0] != key:
            self._cache = (key, judge_points(points, self.n_boot))
        return self._cache[1]

    def settled(self, points: pd.DataFrame, candidates: pd.DataFrame,
                freeze: bool = True) -> dict[CurveKey, CurveStatus]:
        """Status of every planned curve after the points so far; with ``freeze``, settled claims are
        frozen at this look (an interim look: one of at most ``max_rounds - 1``)."""
        judged = self.judged(points)
        seeds = seed_counts(points, candidates)
        out = {key: self.frozen.get(key) or self._status(key, pc, judged, seeds)
               for key, pc in _curve_keys(points, candidates, judged.counts)}
        for k, s in out.items():
            if s.settled:
                self.first_settled.setdefault(k, self.round)
                s.settled_round = self.first_settled[k]
        if freeze and not self.exhaustive:
            self.frozen |= {k: replace(s, frozen=True) for k, s in out.items()
                            if s.settled and s.freeze and k not in self.frozen}
        self.last_status = out
        return out

    def final(self, points: pd.DataFrame, candidates: pd.DataFrame) -> dict[CurveKey, CurveStatus]:
        """Verdicts at the end: frozen claims as frozen; every other curve from the final points, its
        claim held only at ``final_alpha`` (the level the interim looks left). Nothing is frozen here."""
        judged = self.judged(points)
        seeds = seed_counts(points, candidates)
        out = {}
        for key, pc in _curve_keys(points, candidates, judged.counts):
            if key in self.frozen:
                out[key] = self.frozen[key]
                continue
            s = self._status(key, pc, judged, seeds)
            v = judged.family(key).get(key)
            if (s.verdict != OPEN and v is not None and v.kind == "ci" and v.verdict in DIRECTIONAL
                    and not v.p_adj < self.final_alpha):
                s.verdict = _decide(replace(v), v.p_adj * self.alpha / self.final_alpha).verdict
            s.settled_round = self.first_settled.get(key) if s.settled else None
            out[key] = s
        return out

    def _status(self, key: CurveKey, pc: PlannedCurve, judged: Judged,
                seeds: dict[tuple, tuple[int, int]]) -> CurveStatus:
        unit = pc.unit
        now = [seeds.get((*unit, *s), (0, 0)) for s in pc.sites]
        have = [n > 0 for n, _ in now]
        n_pts = int(sum(have))
        v = judged.family(key).get(key)

        def status(settled: bool, verdict: str, reason: str, freeze: bool = False) -> CurveStatus:
            return CurveStatus(key, settled, verdict, reason, n_pts, len(pc.sites),
                               self.round if settled else None, freeze=freeze)
        if v is None or n_pts < 2:
            return status(False, OPEN, f"{n_pts} of {len(pc.sites)} points: too few for any verdict")
        if not (have[0] and have[-1]):
            return status(False, OPEN, "an end of the curve has not run: no verdict on the planned range")
        if not all(have):
            return status(False, v.verdict, f"{len(pc.sites) - n_pts} interior point(s) not run yet")
        claim_ok = v.verdict in CLAIMS and np.isfinite(v.p_adj) and v.p_adj <= self.look_alpha
        if all(n >= full for n, full in now):
            # nothing left to buy; frozen only at the interim level (a claim there is spent alpha),
            # else the final look judges it at the level the interim looks left
            return status(True, v.verdict, "every cell and seed of the curve has run", freeze=claim_ok)
        if v.verdict == "degenerate":
            return status(True, v.verdict, "degenerate predictions")
        if v.kind == "ordering":
            # an ordering although some cell of its group ran >= 2 seeds: those seeds repeated one
            # value, so the protocol ignores the seed (kNN) and no cell of the group needs another
            if max((n for k, (n, _) in seeds.items() if k[:3] == unit), default=0) >= 2:
                return status(True, v.verdict, "seed-free cells (the seeds repeat one value): decided by the points")
            return status(False, v.verdict, "no interval yet (one seed per cell): more seeds decide")
        if not claim_ok and v.verdict not in ("noisy", "flat"):
            out = status(False, v.verdict, f"'{v.verdict}' not yet at the interim level: more seeds decide")
            out.weight = PEAK_WEIGHT if v.claim == "peaks" else 1.0
            return out
        seen = self._projected(key, judged, now)
        if all(p == v.verdict for p in seen):
            if claim_ok:
                return status(True, v.verdict, f"claim at the interim level (adjusted p {v.p_adj:.1e}), stable at "
                              "the full grid's precision", freeze=True)
            return status(True, v.verdict, f"{v.verdict}, and still {v.verdict} at the full grid's precision")
        # seen[0]: the verdict at the full grid's precision at today's estimates; seen[-1]: the
        # first projection that dissents from it (a move within the unseen seeds' spread)
        spread = f", '{seen[-1]}' within the unseen seeds' spread" if seen[-1] != seen[0] else ""
        out = status(False, v.verdict, f"more seeds decide: '{v.verdict}' now, '{seen[0]}' expected with "
                     f"every seed{spread}")
        out.weight = 2.0 if seen[0] != v.verdict else 1.0  # even the current estimates say it will move
        if v.claim == "peaks":  # the finding that changes a recommendation; its fall is often the smallest contrast
            out.weight *= PEAK_WEIGHT
        return out

    def _projected(self, key: CurveKey, judged: Judged, now: list[tuple[int, int]]) -> list[str]:
        """Verdicts the curve would get with every planned seed, each with the seed part of the
        covariance scaled by n / N, at this look's BH cut-off: first at the current estimates; then
        moved ``stability_z`` SDs of the unseen seeds' mean along each contrast that decides a shape
        (`_deciding_contrasts`, both ways); then at ``draws`` predictive draws of the full-seed
        estimates (each point moves by N(0, sigma^2 (N - n) / (N n)): the unseen seeds' mean, with
        the current mean's own error). Stops at the first dissent."""
        rep, margin = judged.replicates(key)
        f2 = np.array([n / max(full, 1) for n, full in now], float)  # points and sites share x order
        if rep is None or rep.no_ci or f2.size != rep.x.size or not rep.parts:
            return ["noisy"]
        seed_var = np.diag(rep.parts.get("seeds", np.zeros((f2.size, f2.size))))  # sigma^2 / n per point
        move_var = seed_var * (1.0 - f2)  # sigma^2 (N - n) / (N n) = (sigma^2 / n) (1 - n / N)
        f = np.sqrt(f2)
        parts = {k: (p * f[:, None] * f[None, :] if k == "seeds" else p) for k, p in rep.parts.items()}
        p_all = [v.p_adj for v in judged.family(key).values() if np.isfinite(v.p_adj)]  # its BH family
        # BH makes one more discovery at p <= alpha * (found + 1) / m
        scale = max(len(p_all), 1) / (sum(q < self.alpha for q in p_all) + 1)
        # a stable seed (not hash(), which Python salts per process): a resumed live sweep
        # re-derives its rounds in a new process and must draw the same projections
        rng = np.random.default_rng(zlib.crc32(repr(key).encode()))
        shifts = [np.zeros(f.size)]
        for c in _deciding_contrasts(rep.x, rep.estimate) if self.stability_z > 0 else []:
            sd = float(np.sqrt(np.sum(c**2 * move_var)))
            if sd > 0:  # the likeliest move of the points that shifts c'y by z SDs
                shifts += [self.stability_z * move_var * c / sd, -self.stability_z * move_var * c / sd]
        shifts += [rng.normal(size=f.size) * np.sqrt(move_var) for _ in range(self.draws)]
        out = []
        for shift in shifts:
            est = rep.estimate + shift
            reps = est + (rep.replicates - rep.estimate) * f
            proj = analyse_curve(CurveReplicates(rep.x, est, reps, rep.method, parts, rep.dfs),
                                 min_effect=margin, describe=False)
            out.append(_decide(proj, proj.p_claim * scale if np.isfinite(proj.p_claim) else float("nan")).verdict)
            if out[-1] != out[0]:
                break  # one dissenting projection is enough to keep the curve open
        return out


def _deciding_contrasts(x: np.ndarray, y: np.ndarray) -> list[np.ndarray]:
    """The contrasts of the points whose sign or size against the margin decides a verdict: total
    gain, rise to and fall from the best point before the largest x (and that point against its
    neighbours, which decide where the best is), best minus worst (the widest pair `flat` and `mixed`
    turn on), and the top slope."""
    n = y.size
    if n < 2:
        return []
    js = int(np.argmax(y[:-1]))
    pairs = {(0, n - 1), (0, js), (js, n - 1), tuple(sorted((int(np.argmin(y)), int(np.argmax(y))))),
             (max(js - 1, 0), js), (js, min(js + 1, n - 1))}
    e = np.eye(n)
    out = [e[j] - e[i] for i, j in sorted(pairs) if i != j]
    slope = top_slope_contrast(np.asarray(x, float))
    return out + ([slope] if np.isfinite(slope).all() else [])


def _curve_keys(points: pd.DataFrame, candidates: pd.DataFrame, counts: bool = True):
    """(curve key, its planned curve) for every metric the points hold of every planned curve; data
    curves for the metrics `analysis.data_axis` draws them for, and only where the points give
    training cases (``counts``: a points file without them has no data curve to settle)."""
    metrics = performance_metrics(points)
    for pc in planned_curves(candidates):
        for metric in metrics.get(pc.unit, []):
            yield CurveKey(*pc.unit[:2], metric, pc.unit[2], pc.axis, pc.fixed), pc
    for pc in planned_data_curves(candidates) if counts else []:
        for metric in plotted_metrics(metrics.get(pc.unit, [])):
            yield CurveKey(*pc.unit[:2], metric, pc.unit[2], pc.axis, pc.fixed), pc
