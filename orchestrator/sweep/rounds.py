"""The bookkeeping of an adaptive sweep, apart from Ray and MLflow: the grid as the policy's
candidate cells (with the plan's cost), the budget as a share of that cost, which points belong to
the cells the rounds chose, and the round record on disk (`rounds.csv`, `adaptive_cells.csv`) that
`--resume` reads to know which rounds finished.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from analysis.adaptive.cells import cell_columns, grid_cost, priced_by_extraction, with_cost
from analysis.adaptive.policy import AdaptivePolicy
from orchestrator.grid.adaptive import AdaptiveSettings
from orchestrator.grid.cells import Cell
from orchestrator.grid.config import SweepConfig
from orchestrator.plan.model import Plan
from tasks.errors import ConfigError

DEFAULT_BUDGET = 0.5
ROUNDS_FILE = "rounds.csv"  # one row per finished round
CELLS_FILE = "adaptive_cells.csv"  # one row per cell a round runs, written when the round starts
SETTINGS_FILE = "adaptive_settings.json"  # what the rounds were derived with, written by the first round
ROUND_COLUMNS = ["round", "cells", "failed", "cost", "cost_share", "spent_share", "settled", "open"]
CELL_COLUMNS = ["round", "prefix", "dataset", "protocol", "encoder", "resolution", "train_fraction",
                "train_shots", "seed", "cost", "reason"]


def candidates(cfg: SweepConfig, cells: list[Cell], plan: Plan | None,
               settings: AdaptiveSettings | None = None) -> pd.DataFrame:
    """Every planned cell as a candidate row of the policy (`analysis.adaptive.cells`), valued as
    `medscale analyze` reads its run back (weights kind, train_shots 0 for "none"), so a point
    finds its cell; cost = the plan's GFLOPs per item x items of the cell's extraction (items
    unknown: GFLOPs alone, as the replay does), paid once per extraction under the settings'
    `pricing: extraction` (the default: features are cached; `cells.priced_by_extraction`).
    `prefix` names the cell for `run_sweep(only=...)`; `train_share`, the share of its split the
    cell's head trains on, where the plan counted its training cases."""
    from tasks.encoders import get_encoder_spec
    from tasks.weights import parse_weights

    ext = {(e.encoder, e.resolution, e.dataset): e for e in (plan.extractions if plan else [])}
    n_train = {p.cell_id: p.n_train for p in (plan.cells if plan else [])}  # known with the datasets' indexes
    rows = []
    for c in cells:
        spec, e = get_encoder_spec(c.encoder), ext.get(c.extraction)
        gflops = e.gflops_per_item if e is not None else spec.gflops(c.resolution)
        rows.append({"dataset": c.dataset, "protocol": c.protocol, "weights": parse_weights(cfg.weights_of(c.encoder))[0],
                     "encoder": c.encoder, "family": spec.family, "resolution": int(c.resolution), "train_fraction": float(c.train_fraction),
                     "train_shots": int(c.train_shots or 0), "seed": int(c.seed), "params": int(spec.params or 0),
                     "gflops": float(gflops) if gflops is not None else np.nan,
                     "items": float(e.items) if e is not None and e.items is not None else np.nan,
                     "n_train": float(n_train[c.cell_id]) if n_train.get(c.cell_id) is not None else np.nan,
                     "prefix": c.prefix})
    out = with_cost(pd.DataFrame(rows))
    # the share of its split a cell's head trains on (k-shot subsets too): its cases over the whole split's
    out["train_share"] = out["n_train"] / out.groupby("dataset")["n_train"].transform("max")
    settings = settings or AdaptiveSettings()
    return priced_by_extraction(out, settings.head_share) if settings.pricing == "extraction" else out


def _pricing_words(settings: AdaptiveSettings) -> str:
    return (f"each extraction once, a head {settings.head_share:g} of its dataset's mean extraction"
            if settings.pricing == "extraction" else "each cell its extraction in full")


def budget_share(settings: AdaptiveSettings, plan: Plan | None, cands: pd.DataFrame | None = None) -> tuple[float, str]:
    """The policy's budget (a share of the grid's cost) and a line saying where it came from.
    Device-hours convert by the plan's encoder hours for the whole grid (every extraction, cached
    or not: the share is of the full grid), priced as the candidates ``cands`` are (the same
    `grid_cost`, with each cell's extraction in hours instead of GFLOPs x items; without ``cands``,
    each extraction once). The plan knows them only with every dataset's item count."""
    if settings.budget_hours is None:
        share = settings.budget if settings.budget is not None else DEFAULT_BUDGET
        return share, (f"adaptive budget: {share:.0%} of the full grid's planned cost (GFLOPs x items: "
                       f"{_pricing_words(settings)})")
    if plan is None:
        raise ConfigError("--budget-hours: the plan could not be made (see above), so device-hours cannot be "
                          "converted to a share of the grid; give the budget as a share (--budget F)")
    unknown = [f"{e.encoder}@{e.resolution}px/{e.dataset}" for e in plan.extractions if e.device_hours is None]
    hours = {(e.encoder, e.resolution, e.dataset): e.device_hours or 0.0 for e in plan.extractions}
    total = sum(hours.values())
    if cands is not None and len(cands):
        in_hours = cands.drop(columns=["extraction_cost"], errors="ignore").assign(cost=[
            hours.get((e, int(r), d), 0.0) for e, r, d in cands[["encoder", "resolution", "dataset"]].itertuples(index=False)])
        if settings.pricing == "extraction":
            in_hours = priced_by_extraction(in_hours, settings.head_share)
        total = grid_cost(in_hours)
    if unknown or not total > 0:
        why = (f"the plan does not know the device-hours of {len(unknown)} extraction(s) ({', '.join(unknown[:4])}"
               f"{' ...' if len(unknown) > 4 else ''}: item counts unknown)" if unknown else
               "the plan's device-hours for the grid are 0")
        raise ConfigError(f"--budget-hours {settings.budget_hours:g}: {why}; give the budget as a share of the "
                          "grid's cost instead (--budget F or adaptive.budget)")
    share = settings.budget_hours / total
    return share, (f"adaptive budget: {settings.budget_hours:g} device-hours of the full grid's {total:.3g} "
                   f"(encoder hours on {plan.accelerator} as planned, {_pricing_words(settings)}) = "
                   f"{share:.1%} of its cost")


def points_of(points: pd.DataFrame, cands: pd.DataFrame, chosen: set[int]) -> tuple[pd.DataFrame, set[int]]:
    """The points of the chosen candidate rows, in a fixed order (the policy's analysis must not
    depend on the order MLflow returns runs in), and the chosen rows that have points."""
    if points.empty:
        return points, set()
    cols = cell_columns(cands)
    p = points.assign(weights=points["weights"].fillna("").astype(str),
                      train_shots=points["train_shots"].fillna(0).astype(int))
    key = p[cols].merge(cands[cols].reset_index(), on=cols, how="left")["index"].to_numpy()
    keep = pd.Series(key).isin(chosen).to_numpy()
    drawn = {int(i) for i in key[keep]}
    return p[keep].sort_values([*cols, "metric"], kind="stable").reset_index(drop=True), drawn


@dataclass
class RoundLog:
    """`rounds.csv` and `adaptive_cells.csv` in the sweep's output directory. A round is finished
    when its row is in rounds.csv; the cells of a round are recorded before it runs, so a resumed
    sweep can check that it re-derives the same round."""

    out: Path

    def _read(self, name: str, columns: list[str]) -> pd.DataFrame:
        path = self.out / name
        return pd.read_csv(path) if path.is_file() and path.stat().st_size else pd.DataFrame(columns=columns)

    @property
    def rounds(self) -> pd.DataFrame:
        return self._read(ROUNDS_FILE, ROUND_COLUMNS)

    @property
    def cells(self) -> pd.DataFrame:
        return self._read(CELLS_FILE, CELL_COLUMNS)

    def finished(self, k: int) -> bool:
        return bool((self.rounds["round"] == k).any())

    def start(self, k: int, todo: pd.DataFrame) -> None:
        """Record the round's cells, or check them against the record of an earlier start."""
        cells = self.cells
        recorded = sorted(cells.loc[cells["round"] == k, "prefix"].astype(str))
        if recorded and recorded != sorted(todo["prefix"]):
            raise ConfigError(
                f"{self.out / CELLS_FILE}: round {k} was recorded with other cells than the policy derives now "
                "(the grid, the adaptive settings or the finished cells changed since); to derive the rounds afresh, "
                f"remove {ROUNDS_FILE} and {CELLS_FILE} and pass --resume (finished cells are read back, not "
                "rerun), or pass --rerun to rerun them as well")
        if not recorded:
            self._append(CELLS_FILE, todo.assign(round=k)[CELL_COLUMNS])

    def check_settings(self, settings: dict) -> None:
        """Record what the rounds are derived with, or check it against the record of an earlier
        start: a resumed sweep re-derives its rounds, so a changed setting (a new default, an edited
        `adaptive:` block, another budget) would ask for other cells and move the alpha spending."""
        path = self.out / SETTINGS_FILE
        if not len(self.cells):  # no round has started: these settings are the rounds'
            path.write_text(json.dumps(settings, indent=2, sort_keys=True) + "\n")
            return
        if not path.is_file():  # begun before the settings were recorded: the cells' check remains
            return
        before = json.loads(path.read_text())
        changed = [f"{k} {before.get(k)!r} -> {v!r}" for k, v in settings.items() if before.get(k) != v]
        if changed:
            raise ConfigError(
                f"{path}: the adaptive rounds began with other settings ({'; '.join(changed)}); to continue "
                "them, give the values before each arrow again (the config's `adaptive:` block, --budget); to "
                f"derive the rounds afresh with these, remove {ROUNDS_FILE} and {CELLS_FILE} and pass --resume "
                "(finished cells are read back, not rerun), or pass --rerun to rerun them as well")

    def finish(self, row: dict) -> None:
        self._append(ROUNDS_FILE, pd.DataFrame([row], columns=ROUND_COLUMNS))

    def _append(self, name: str, rows: pd.DataFrame) -> None:
        path = self.out / name
        rows.to_csv(path, mode="a", header=not path.is_file() or not path.stat().st_size, index=False)

    def clear(self) -> None:
        for name in (ROUNDS_FILE, CELLS_FILE, SETTINGS_FILE):
            (self.out / name).unlink(missing_ok=True)


def policy_settings(policy: AdaptivePolicy, settings: AdaptiveSettings) -> dict:
    """What derives the rounds, as `RoundLog.check_settings` records it: every parameter of the
    policy - the config's and the code's defaults alike (`stability_z`, `draws`, ...), since a new
    default also asks for other cells - the budget as the share it resolved to (device-hours
    convert through the plan), and the pricing."""
    out = {**policy.parameters(), "budget": round(float(policy.budget), 12)}
    return {**out, "pricing": settings.pricing, "head_share": settings.head_share}


def round_row(k: int, todo: pd.DataFrame, failed: set[int], total: float, spent: float,
              status: dict, cost: float) -> dict:
    """A row of rounds.csv: the round's cells and cost (what it added to the spend), what the rounds
    spent so far, and the curves settled and open after judging its points."""
    return {"round": k, "cells": len(todo), "failed": len(set(todo.index) & failed), "cost": cost,
            "cost_share": cost / total if total else math.nan, "spent_share": spent / total if total else math.nan,
            "settled": sum(s.settled for s in status.values()), "open": sum(not s.settled for s in status.values())}
