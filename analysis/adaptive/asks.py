"""What an open curve asks for, and how the asks of all curves are ranked (`policy.AdaptivePolicy`).

A curve missing points asks for them (an end: value 3; an interior point next to the best point so
far, a suspected peak, or in the widest gap of log x, a suspected knee: 2; else 1). A complete curve
asks for one more seed where that shrinks most the variance of the contrasts that decide its shape.
One cell serves many curves (axes and metrics), so asks are summed per cell, then ranked by value per
unit of cost.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from analysis.adaptive.cells import (
    PlannedCurve,
    cost_of,
    planned_curves,
    planned_data_curves,
    seed_counts,
    site_rows,
)
from analysis.verdict import top_slope_contrast


def rank_asks(status: dict, verdicts: dict, points: pd.DataFrame, candidates: pd.DataFrame, drawn: pd.Series, *,
              every_curve: bool, new_point_seeds: int, paid: set | None = None) -> list[tuple[list, str]]:
    """Asks of the open curves (of every curve with ``every_curve``), as (candidate indices, reason),
    best value per unit of cost first (an extraction in ``paid`` is not priced again); a new point
    comes with ``new_point_seeds`` seeds. ``verdicts``: the analysis' verdict per curve key."""
    sites = site_rows(candidates)  # whole-split sites and train-size subsets, keyed as the curves' points
    value: dict[tuple, float] = {}
    why: dict[tuple, str] = {}
    curves = {(pc.unit, pc.axis, pc.fixed): pc for pc in [*planned_curves(candidates), *planned_data_curves(candidates)]}
    seeds = seed_counts(points, candidates)
    for key, s in status.items():
        if s.settled and not every_curve:
            continue
        pc = curves[((key.dataset, key.protocol, key.weights), key.axis, key.fixed)]
        for site, v, reason in curve_asks(pc, s, seeds, verdicts.get(key)):
            value[site] = value.get(site, 0.0) + v * s.weight
            why.setdefault(site, f"{key.label()}: {reason}")
    asks = []
    for site, v in value.items():
        if site not in sites:
            continue
        rows = candidates.loc[sites[site]]
        todo = rows.index[~drawn.loc[rows.index]]
        n_now = len(rows) - len(todo)
        # a new point comes with few seeds: the corners already fix the seed variance, and
        # targeted seeds (`seed_value`) are worth more than a second seed everywhere
        take = list(todo[: (new_point_seeds if n_now == 0 else 1)])
        if take:
            asks.append((v / max(cost_of(candidates, take, paid), 1e-12), take, why[site]))
    asks.sort(key=lambda a: -a[0])
    return [(take, reason) for _, take, reason in asks]


def curve_asks(pc: PlannedCurve, s, seeds: dict, v):  # s: policy.CurveStatus, v: its CurveVerdict or None
    """(site key, value, reason) of one open curve."""
    now = [seeds.get((*pc.unit, *site), (0, 0)) for site in pc.sites]
    have = np.array([n > 0 for n, _ in now])
    keys = [(*pc.unit, *site) for site in pc.sites]
    if not have.all():
        u = np.log(np.asarray(pc.x))
        idx = np.flatnonzero(have)
        best = None
        if v is not None and v.x.size == idx.size >= 2:  # the best point so far: a suspected peak
            best = int(idx[int(np.argmax(v.estimate))])  # the verdict's points are the sites run, in order
        gaps = np.diff(u[idx]) if idx.size >= 2 else np.array([])
        wide = (idx[int(np.argmax(gaps))], idx[int(np.argmax(gaps)) + 1]) if gaps.size else (0, len(u) - 1)
        for i in np.flatnonzero(~have):
            if i in (0, len(u) - 1):
                yield keys[i], 3.0, "an end of the curve"
            elif (best is not None and abs(i - best) == 1) or wide[0] < i < wide[1]:
                yield keys[i], 2.0, "interior point next to the best so far / in the widest gap"
            else:
                yield keys[i], 1.0, "interior point"
        return
    n = np.array([max(k, 1) for k, _ in now], float)
    gain = seed_value(v, n) if v is not None and v.x.size == n.size else np.ones(n.size) / n
    for k, (got, full), g in zip(keys, now, gain, strict=True):
        if got < full and g > 0:
            yield k, float(g), "one more seed: " + s.reason


def seed_value(v, n: np.ndarray) -> np.ndarray:
    """Per point: the share by which one more seed there shrinks the variance of the contrasts that
    decide the curve's shape (equal seed variance assumed): peaks - rise and fall around the best
    point; scales / saturates - total gain and the top slope; inverse - total gain; otherwise the
    range between the best and worst point (what `flat` and `mixed` turn on)."""
    size, y = n.size, v.estimate
    e = np.eye(size)
    js = int(np.argmax(y[:-1]))
    slope = np.nan_to_num(top_slope_contrast(v.x))  # the verdict's own top slope (repeated x: none)
    contrasts = {"peaks": [e[js] - e[0], e[-1] - e[js]], "scales": [e[-1] - e[0], slope],
                 "saturates": [e[-1] - e[0], slope], "inverse": [e[-1] - e[0]]}.get(
        v.claim, [e[int(np.argmax(y))] - e[int(np.argmin(y))]])
    out = np.zeros(size)
    for c in contrasts:
        var = float(np.sum(c**2 / n))
        if var > 0:
            out += c**2 * (1 / n - 1 / (n + 1)) / var
    return out
