"""Scaling curves from analysis points: bootstrap replicates per cell, curves along each axis, and
one verdict per curve from a single `judge_curves` call (so one correction runs across every curve).

A *group* is every cell of one (dataset, protocol, metric, weights). Its replicates are made once,
for all its cells together, then sliced into curves; that keeps the pairing the statistics rely
on: every curve of a dataset sees the same resampled test cases in the same replicate row.

- per-case predictions for every cell and seed -> `bootstrap_cases_seeds` (cases, then seeds);
- per-seed values only, >= 2 seeds somewhere  -> `bootstrap_seeds`;
- one value per cell (a paper table, one seed) -> `means_only`: fitted as given, "no CI".

Curves (AXES): metric vs parameters at each fixed resolution, vs resolution for each encoder, and
vs inference GFLOPs across all cells. Lower-is-better metrics are negated first (``sign``), as the
verdict rules require, so a curve's "gain" is always an improvement. The equivalence margin is
chosen per metric and unit (`metric_table.margin_for`). A cell whose seeds agree (a protocol that
ignores the seed, or a `seed_free` flag) is one value; a published table that prints "mean ± SD
over n cases" gets intervals from SD / sqrt(n) (`bootstrap.printed_spread`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from analysis.bootstrap import (
    CurveReplicates,
    bootstrap_cases_seeds,
    bootstrap_seeds,
    printed_spread,
    zero_spread,
)
from analysis.casemetrics import aligned_case_values, case_mean, case_metric, is_per_case_table
from analysis.metric_table import higher_is_better, margin_for
from analysis.points import MAIN_METRICS, metric_order
from analysis.verdict import judge_curves
from analysis.verdict_model import CI_LEVEL, CurveVerdict

AXES = ("params", "resolution", "gflops")
AXIS_LABELS = {"params": "parameters", "resolution": "input resolution", "gflops": "inference GFLOPs"}
GROUP_KEY = ["dataset", "protocol", "metric", "weights"]
__all__ = ["margin_for", "Curve", "CurveKey", "Group", "group_curves", "judge", "make_group"]


@dataclass(frozen=True, order=True)
class CurveKey:
    dataset: str
    protocol: str
    metric: str
    weights: str
    axis: str
    fixed: str  # the held-fixed value: "224 px", an encoder name, or "all cells"

    def label(self, with_weights: bool = False) -> str:
        w = f" [{self.weights}]" if with_weights and self.weights else ""
        return f"{self.dataset} / {self.protocol} / {self.metric}{w} vs {self.axis} @ {self.fixed}"


@dataclass
class Group:
    """Replicates of every cell of one (dataset, protocol, metric, weights), in original units."""

    cells: pd.DataFrame  # the aggregate's rows (mean, params, gflops, resolution, encoder, ...)
    estimate: np.ndarray
    replicates: np.ndarray | None
    method: str
    unit: str = ""
    notes: list[str] = field(default_factory=list)
    parts: dict[str, np.ndarray] | None = None  # covariance of the cell estimates by source
    dfs: dict[str, float] | None = None
    seed_free: int = 0  # cells whose seeds gave one value
    degenerate: np.ndarray | None = None  # (n_cells,) bool: the companion metrics say the prediction is empty

    def replicates_of(self) -> CurveReplicates:
        x = np.arange(1.0, len(self.cells) + 1)
        return CurveReplicates(x, self.estimate, self.replicates, self.method, self.parts, self.dfs)


@dataclass
class Curve:
    key: CurveKey
    cells: pd.DataFrame  # the group's rows on this curve, in x order
    x: np.ndarray
    replicates: CurveReplicates  # oriented: sign * metric
    sign: int
    margin: float
    unit: str
    degenerate: bool = False  # a cell on it has a degenerate prediction (`study.flag_degenerate`)


def resolution_label(r: int) -> str:
    return f"{int(r)} px" if int(r) > 0 else "resolution n/s"


# -- replicates of a group -------------------------------------------------------------------------
def _aligned(frames: list[pd.DataFrame]) -> tuple[list[np.ndarray], np.ndarray, list[str]] | None:
    """Scores (N, C) per frame on the cases common to all, and the shared targets; None if the
    frames disagree on classes or targets (then they are not one test set)."""
    classes = [c[len("target_"):] for c in frames[0].columns if c.startswith("target_")]
    if not classes or any([c[len("target_"):] for c in f.columns if c.startswith("target_")] != classes
                          for f in frames):
        return None
    common = sorted(set.intersection(*(set(f["case_id"].astype(str)) for f in frames)))
    if not common:
        return None
    idx = [f.assign(case_id=f["case_id"].astype(str)).drop_duplicates("case_id").set_index("case_id").loc[common]
           for f in frames]
    targets = idx[0][[f"target_{c}" for c in classes]].to_numpy(np.int8)
    if any(not np.array_equal(d[[f"target_{c}" for c in classes]].to_numpy(np.int8), targets) for d in idx[1:]):
        return None
    return [d[[f"score_{c}" for c in classes]].to_numpy(np.float64) for d in idx], targets, common


def _case_group(cells: pd.DataFrame, pts: pd.DataFrame, predictions: dict, task: str, metric: str,
                n_boot: int, seed: int) -> Group | str:
    """The group from per-case predictions, or why it cannot be made from them."""
    # AUC is the same for every task (a macro mean over classes); the rest need the task
    fn = case_metric(metric, task) if task else (case_metric(metric, "multilabel") if metric == "auc" else None)
    # dense runs (Dice, IoU, ...) log per-case metric tables instead of scores
    dense = any(is_per_case_table(predictions[r]) for r in pts.get("run_id", ()) if r in predictions)
    if fn is None and not dense:
        return f"no per-case form of {metric!r}" + ("" if task else " without the task")
    if "run_id" not in pts.columns:
        return "no run ids"
    seeds = sorted(pts["seed"].unique())
    runs = [[None] * len(seeds) for _ in range(len(cells))]
    for i, (enc, res) in enumerate(zip(cells["encoder"], cells["resolution"], strict=True)):
        sub = pts[(pts["encoder"] == enc) & (pts["resolution"] == res)]
        for rid, s in zip(sub["run_id"], sub["seed"], strict=True):
            if rid not in predictions:
                return f"run {rid} has none"  # the whole group falls back to seeds
            runs[i][seeds.index(s)] = rid
    order = [(i, s) for i in range(len(cells)) for s in range(len(seeds)) if runs[i][s] is not None]
    if dense:  # Dice, IoU, ...: the mean over cases of each case's value, cases resampled
        aligned = aligned_case_values([predictions[runs[i][s]] for i, s in order], metric)
        if isinstance(aligned, str):
            return aligned
        fn = case_mean
    else:
        aligned = _aligned([predictions[runs[i][s]] for i, s in order])
    if aligned is None:
        return "the runs disagree on the test cases or their labels"
    scores, targets, common = aligned
    preds: list[list] = [[None] * len(seeds) for _ in range(len(cells))]
    for (i, s), sc in zip(order, scores, strict=True):
        preds[i][s] = sc
    free = _seed_free_cells(cells, pts)
    c = bootstrap_cases_seeds(np.arange(1.0, len(cells) + 1), preds, targets, fn, n_boot=n_boot, seed=seed,
                              seed_free=free)
    notes = [f"{cells['dataset'].iloc[0]}: {len(common)} test cases"]
    return Group(cells, c.estimate, c.replicates, c.method, notes=notes, parts=c.parts, dfs=c.dfs,
                 seed_free=int(free.sum()))


def _seed_free_cells(cells: pd.DataFrame, pts: pd.DataFrame) -> np.ndarray:
    """Cells flagged `seed_free` by their runs (a protocol that ignores the seed)."""
    if "seed_free" not in pts.columns:
        return np.zeros(len(cells), bool)
    flag = pts["seed_free"].map(lambda v: str(v).strip().lower() in ("true", "1", "yes", "1.0"))
    out = np.zeros(len(cells), bool)
    out[_cell_index(cells, pts)[flag.to_numpy()]] = True
    return out


def _cell_index(cells: pd.DataFrame, pts: pd.DataFrame) -> np.ndarray:
    """Row of `cells` that each point belongs to (cells are unique per encoder x resolution)."""
    where = {(e, int(r)): i for i, (e, r) in enumerate(zip(cells["encoder"], cells["resolution"], strict=True))}
    return np.array([where[(e, int(r))] for e, r in zip(pts["encoder"], pts["resolution"], strict=True)])


def make_group(cells: pd.DataFrame, pts: pd.DataFrame, *, predictions: dict | None = None, task: str = "",
               n_boot: int = 1000, seed: int = 0, unit: str = "") -> Group:
    """Replicates for one group's cells (`cells`: aggregate rows; `pts`: their per-seed points)."""
    metric = str(cells["metric"].iloc[0])
    cells = cells.reset_index(drop=True)
    if n_boot < 2:  # asked for no bootstrap (--n-boot 0): the means as given, verdicts "no CI"
        return Group(cells, cells["mean"].to_numpy(float), None, "none", unit)
    notes = []
    if predictions:
        g = _case_group(cells, pts, predictions, task, metric, n_boot, seed)
        if isinstance(g, Group):
            g.unit = unit
            return g
        first = cells.iloc[0]
        notes.append(f"{first['dataset']} / {first['protocol']} / {metric}: per-case predictions not used ({g})")
    if "spread" in pts.columns and "n_cases" in pts.columns:
        sd, nc = pts["spread"].to_numpy(float), pts["n_cases"].to_numpy(float)
        if len(pts) == len(cells) and np.isfinite(sd).all() and np.isfinite(nc).all() and (nc >= 2).all():
            order = _cell_index(cells, pts)
            sd_c, n_c = np.empty(len(cells)), int(nc.min())
            sd_c[order] = sd
            c = printed_spread(np.arange(1.0, len(cells) + 1), cells["mean"].to_numpy(float), sd_c, n_c,
                               n_boot=n_boot, seed=seed)
            notes.append(f"{cells['dataset'].iloc[0]} / {metric}: intervals from the printed SD / sqrt({n_c})")
            return Group(cells, c.estimate, c.replicates, c.method, unit, notes, c.parts, c.dfs)
    seeds = np.unique(pts["seed"].to_numpy())
    free = _seed_free_cells(cells, pts)
    if seeds.size >= 2:
        v = np.full((len(cells), seeds.size), np.nan)
        total, count = np.zeros_like(v), np.zeros_like(v)
        rows, cols = _cell_index(cells, pts), np.searchsorted(seeds, pts["seed"].to_numpy())
        np.add.at(total, (rows, cols), pts["value"].to_numpy(float))  # repeated (cell, seed) rows: averaged
        np.add.at(count, (rows, cols), 1.0)
        v = np.where(count > 0, total / np.maximum(count, 1.0), np.nan)
        free |= zero_spread(v)
        c = bootstrap_seeds(np.arange(1.0, len(cells) + 1), v, n_boot=n_boot, seed=seed, seed_free=free)
        if not c.no_ci:
            return Group(cells, c.estimate, c.replicates, c.method, unit, notes, c.parts, c.dfs, int(free.sum()))
    return Group(cells, cells["mean"].to_numpy(float), None, "none", unit, notes, seed_free=int(free.sum()))


# -- curves ---------------------------------------------------------------------------------------
def _slices(cells: pd.DataFrame) -> list[tuple[str, str, np.ndarray, np.ndarray]]:
    """(axis, fixed, row positions in x order, x) of every curve with >= 2 distinct x."""
    res, params = cells["resolution"].to_numpy(np.int64), cells["params"].to_numpy(float)
    gflops, enc = cells["gflops"].to_numpy(float), cells["encoder"].to_numpy(str)
    # Several encoder families (analysis.families): parameter and GFLOPs curves per family.
    fam = cells["family"].to_numpy(str) if "family" in cells.columns else np.full(len(cells), "")
    families = list(dict.fromkeys(fam)) if len(set(fam)) > 1 else [None]
    out = []

    def add(axis: str, fixed: str, rows: np.ndarray, x: np.ndarray) -> None:
        order = np.argsort(x[rows], kind="stable")
        out.append((axis, fixed, rows[order], x[rows][order]))
    for f in families:
        in_f = np.ones(len(cells), bool) if f is None else fam == f
        for r in [*sorted(set(res[res > 0])), *([0] if (res == 0).any() else [])]:
            label = resolution_label(r) if f is None else f"{resolution_label(r)}, {f}"
            add("params", label, np.flatnonzero((res == r) & in_f), params)
    for e in dict.fromkeys(enc[np.argsort(params, kind="stable")]):
        add("resolution", str(e), np.flatnonzero((enc == e) & (res > 0)), res.astype(float))
    # a curve needs two distinct x; repeated x (two encoders of one size) would make it no function
    out = [s for s in out if s[3].size >= 2 and np.unique(s[3]).size == s[3].size]
    for f in families:
        rows = np.flatnonzero(np.isfinite(gflops) & (np.ones(len(cells), bool) if f is None else fam == f))
        # Across all cells (of the family), unless those are exactly one curve already (one resolution,
        # or one encoder): the same points judged twice would count twice in the correction and tally.
        if rows.size and not any(set(rows) == set(s[2]) for s in out):
            add("gflops", "all cells" if f is None else f"all {f} cells", rows, gflops)
            if out[-1][3].size < 2 or np.unique(out[-1][3]).size != out[-1][3].size:
                out.pop()
    return out


def group_curves(g: Group) -> list[Curve]:
    """Every curve of one group, oriented so that higher is better."""
    first = g.cells.iloc[0]
    metric = str(first["metric"])
    sign = 1 if higher_is_better(metric) else -1
    margin = margin_for(metric, g.unit)
    out = []
    whole = g.replicates_of()
    for axis, fixed, rows, x in _slices(g.cells):
        key = CurveKey(str(first["dataset"]), str(first["protocol"]), metric, str(first["weights"]), axis, fixed)
        rep = whole.take(rows, sign)
        rep = CurveReplicates(x, rep.estimate, rep.replicates, rep.method, rep.parts, rep.dfs)
        degenerate = g.degenerate is not None and bool(g.degenerate[rows].any())
        out.append(Curve(key, g.cells.iloc[rows].reset_index(drop=True), x, rep, sign, margin, g.unit, degenerate))
    return out


def curve_order(c: Curve) -> tuple:
    """Sort key: dataset, protocol, metric (paper order), then axis, then the fixed value by size."""
    rank = metric_order([c.key.metric, *MAIN_METRICS])
    held = {"params": c.cells["resolution"].iloc[0], "resolution": c.cells["params"].iloc[0]}.get(c.key.axis, 0)
    return (c.key.dataset, c.key.protocol, rank.index(c.key.metric) if c.key.metric in MAIN_METRICS else len(rank),
            c.key.metric, c.key.weights, AXES.index(c.key.axis), float(held), c.key.fixed)


def cell_intervals(g: Group, level: float = CI_LEVEL) -> tuple[np.ndarray, np.ndarray]:
    """Percentile interval of every cell of the group (NaN without replicates)."""
    if g.replicates is None:
        return np.full(g.estimate.shape, np.nan), np.full(g.estimate.shape, np.nan)
    q = 50 * (1 - level)
    lo, hi = np.nanpercentile(g.replicates, [q, 100 - q], axis=0)
    return lo, hi


def judge(curves: list[Curve], correction: str = "bh", describe: bool = True) -> dict[CurveKey, CurveVerdict]:
    """One `judge_curves` call over every curve: one family, each curve with its margin; degenerate
    curves are left out of the family and marked `degenerate`."""
    if not curves:
        return {}
    out = judge_curves({c.key: c.replicates for c in curves}, min_effect={c.key: c.margin for c in curves},
                       exclude={c.key: c.degenerate for c in curves}, correction=correction, describe=describe)
    for c in curves:
        if c.degenerate:
            v = out[c.key]
            reading = v.label
            v.verdict, v.reason = "degenerate", ("a companion overlap metric (Dice/IoU) is ~0 or the predictions "
                                                 f"are empty on this curve; its '{reading}' reading is not counted")
    return out
