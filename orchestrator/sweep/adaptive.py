"""`medscale sweep CONFIG --adaptive`: run the grid in rounds and spend cells only where a verdict
is open (the policy: analysis/adaptive/policy.py; docs/analysis.md, "Adaptive sweeps").

Round 0 is the policy's corners of the grid; each round runs its cells as an ordinary sweep of
that subset (`run_sweep(only=...)`: cells of a round in parallel on Ray Tune, same identities,
same per-cell MLflow runs), then reads the points of the cells the rounds chose (`load_points`,
as `medscale analyze` does) and asks the policy for the next round, until every curve is settled,
the budget is spent or `max_rounds` have run.

Each finished round is a row of `rounds.csv` and one MLflow run (kind `adaptive_round`, with the
cells it added and why). Resume: the rounds are re-derived from round 0, each from the points of
the cells the earlier rounds chose (in a fixed order, the policy's draws seeded stably), so a
restarted sweep arrives at the same round in progress; rounds in rounds.csv are not run again, and
the ordinary resume skips the finished cells of the round in progress.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pandas as pd

from analysis.adaptive.cells import cost_of, grid_cost
from analysis.adaptive.figures import rounds_figure
from analysis.adaptive.policy import AdaptivePolicy
from analysis.adaptive.summary import ADAPTIVE_CURVES, ROUNDS_FIGURE, curves_frame, end_lines
from orchestrator import console
from orchestrator.grid.adaptive import AdaptiveSettings
from orchestrator.grid.cells import config_identities, plan_cells
from orchestrator.grid.config import SweepConfig
from orchestrator.sweep.driver import open_tracker, run_sweep
from orchestrator.sweep.listener import SweepOutcome
from orchestrator.sweep.planning import print_plan
from orchestrator.sweep.rounds import (
    RoundLog,
    budget_share,
    candidates,
    points_of,
    policy_settings,
    round_row,
)
from orchestrator.sweep.summary import write_summary
from orchestrator.tracking import Tracker, load_points
from tasks.errors import ConfigError

ROUND_KIND = "adaptive_round"  # the medscale.kind of a round's MLflow run
ROUND_TAG = "medscale.round"


@dataclass
class AdaptiveOutcome:
    sweep: SweepOutcome  # the cells this invocation ran, as an ordinary sweep reports them
    rounds: pd.DataFrame  # rounds.csv as derived (every round, resumed ones included)
    curves: pd.DataFrame  # adaptive_curves.csv
    grid_cells: int
    cells_chosen: int  # cells the rounds chose (finished or failed)
    spent_share: float


@dataclass
class _Loop:
    """The rounds' state: the cells chosen so far (candidate rows), those without points after
    their round (failed: never asked for again), the points of the chosen cells."""

    cfg: SweepConfig
    tracker: Tracker
    cands: pd.DataFrame
    policy: AdaptivePolicy
    log: RoundLog
    run_round: Callable[[set[str]], SweepOutcome]
    chosen: set[int] = field(default_factory=set)
    failed: set[int] = field(default_factory=set)
    points: pd.DataFrame = field(default_factory=pd.DataFrame)
    rows: list[dict] = field(default_factory=list)
    outcome: SweepOutcome = field(default_factory=SweepOutcome)
    round_cost: dict[int, float] = field(default_factory=dict)  # what each round added to the spend

    def __post_init__(self) -> None:
        self.total = grid_cost(self.cands)
        self.current = set(config_identities(self.cfg))
        self.logged = {t.get(ROUND_TAG) for t in self.tracker.sweep_runs(ROUND_KIND).values()}

    @property
    def spent(self) -> float:  # failed cells were paid for; an extraction once (pricing: extraction)
        return cost_of(self.cands, sorted(self.chosen))

    def run(self) -> None:
        rnd = self.policy.initial_cells(self.cands)
        while not rnd.empty:
            todo = rnd.cells.drop(index=[i for i in rnd.cells.index if i in self.failed])
            if todo.empty:
                console.note(f"adaptive round {rnd.index}: the policy asks only for cells that failed "
                             "in earlier rounds; stopping")
                return
            self._play(rnd.index, todo)
            if self.points.empty:
                raise ConfigError(f"adaptive round {rnd.index}: none of its cells finished, so no curve can be "
                                  "judged; see summary.csv and the cells' MLflow runs for why")
            nxt = self.policy.next_cells(self.points, self.cands, spent=self.spent)
            self._record(rnd.index, todo)
            rnd = nxt

    def _play(self, k: int, todo: pd.DataFrame) -> None:
        """Run round k's cells (unless rounds.csv says it finished), then read the chosen cells' points."""
        self.log.start(k, todo)
        before = self.spent
        self.chosen |= set(todo.index)
        self.round_cost[k] = self.spent - before
        if self.log.finished(k):
            console.note(f"adaptive round {k}: finished before (rounds.csv): {len(todo)} cells")
        else:
            console.note(f"adaptive round {k}: {len(todo)} cell(s), {self.round_cost[k] / self.total:.1%} of the "
                         f"grid's cost; spent with it {self.spent / self.total:.1%}")
            out = self.run_round(set(todo["prefix"]))
            self.outcome.cells.update(out.cells)
            self.outcome.metrics.update(out.metrics)
            self.outcome.errors.update(out.errors)
            self.outcome.retries.update(out.retries)
            self.outcome.extractions += out.extractions
        pts = load_points(self.cfg.resolved_tracking_uri, [self.cfg.name], config_identities=self.current)
        self.points, drawn = points_of(pts, self.cands, self.chosen)
        self.failed = self.chosen - drawn

    def _record(self, k: int, todo: pd.DataFrame) -> None:
        """rounds.csv and the round's MLflow run (each written once, whichever a crash left out)."""
        status = self.policy.last_status
        row = round_row(k, todo, self.failed, self.total, self.spent, status, self.round_cost[k])
        self.rows.append(row)
        if not self.log.finished(k):
            self.log.finish(row)
        console.note(f"adaptive round {k} judged: {row['settled']} curve(s) settled, {row['open']} open; "
                     f"spent {row['spent_share']:.1%} of the grid's cost")
        if str(k) in self.logged:
            return
        d = self.cfg.output_path / "adaptive" / f"round_{k}"
        d.mkdir(parents=True, exist_ok=True)
        cols = ["prefix", "dataset", "protocol", "encoder", "resolution", "train_fraction", "seed", "cost", "reason"]
        todo[cols].to_csv(d / "cells.csv", index=False)
        (d / "round.json").write_text(json.dumps({
            "round": k, "budget_share": self.policy.budget,
            "cells": [{"cell": r["prefix"], "cost": float(r["cost"]), "why": r["reason"]} for _, r in todo.iterrows()],
            "failed": sorted(self.cands.loc[sorted(set(todo.index) & self.failed), "prefix"]),
            "curves": {s.key.label(): {"settled": s.settled, "verdict": s.verdict, "why": s.reason}
                       for s in status.values()}}, indent=2, default=str) + "\n")
        self.tracker.log_sweep_run(
            f"round {k}", {"round": k, "cells_added": len(todo), "cost": row["cost"], "budget_share": self.policy.budget},
            {"cells": float(len(todo)), "cells_failed": float(row["failed"]), "cost_share": row["cost_share"],
             "spent_share": row["spent_share"], "curves_settled": float(row["settled"]),
             "curves_open": float(row["open"])}, str(d), kind=ROUND_KIND, tags={ROUND_TAG: str(k)})


def _open_record(log: RoundLog, tracker: Tracker, *, resume: bool, rerun: bool) -> None:
    """--rerun starts the rounds afresh; a recorded earlier run goes on only with --resume."""
    if rerun:
        log.clear()
        tracker.delete_runs(tracker.sweep_runs(ROUND_KIND))
        return
    n = len(log.rounds)
    if not n and not len(log.cells):  # no record (or one removed to derive the rounds afresh)
        stale = tracker.sweep_runs(ROUND_KIND)  # a round's cells are recorded before its MLflow run
        if stale:
            tracker.delete_runs(stale)
            console.note(f"adaptive: {len(stale)} MLflow round run(s) without a record in {log.out} deleted "
                         "(the rounds are derived afresh)")
        return
    if not resume:
        raise ConfigError(f"{log.out}: an earlier adaptive run of this sweep recorded {n} finished round(s); "
                          "pass --resume to continue it (or to report it again when it is complete), "
                          "or --rerun to start over")


def run_adaptive(cfg: SweepConfig, *, resume: bool = False, rerun: bool = False, address: str | None = None,
                 ray_init: dict[str, Any] | None = None, allow_missing: bool = False, accelerator: str = "H100",
                 budget: float | None = None, budget_hours: float | None = None) -> AdaptiveOutcome:
    """Run `cfg` adaptively; `budget` / `budget_hours` override the config's `adaptive:` block."""
    try:
        settings = (cfg.adaptive or AdaptiveSettings()).with_overrides(budget, budget_hours)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    cfg.output_path.mkdir(parents=True, exist_ok=True)
    tracker = open_tracker(cfg)
    cells, skipped = plan_cells(cfg)
    if not cells:
        raise ConfigError(f"sweep '{cfg.name}': the grid has no cell to run")
    plan = print_plan(cfg, cells, skipped, tracker, accelerator)
    cands = candidates(cfg, cells, plan, settings)
    share, note = budget_share(settings, plan, cands)
    console.note(note)
    try:
        policy = AdaptivePolicy(budget=share, confidence=settings.confidence, max_rounds=settings.max_rounds,
                                round_share=settings.round_share)
    except ValueError as e:
        raise ConfigError(f"adaptive: {e}") from None
    log = RoundLog(cfg.output_path)
    _open_record(log, tracker, resume=resume, rerun=rerun)
    log.check_settings(policy_settings(policy, settings))

    def run_round(only: set[str]) -> SweepOutcome:
        return run_sweep(cfg, resume=resume, rerun=rerun, address=address, ray_init=ray_init,
                         allow_missing=allow_missing, accelerator=accelerator, only=only)

    loop = _Loop(cfg, tracker, cands, policy, log, run_round)
    loop.run()
    if loop.points.empty:
        raise ConfigError(f"adaptive budget {share:.1%}: it buys no cell of round 0 (the grid's corners)")
    curves = curves_frame(policy.final(loop.points, cands))
    curves.to_csv(cfg.output_path / ADAPTIVE_CURVES, index=False)
    rounds_figure(pd.DataFrame(loop.rows), len(curves), share, cfg.output_path, ROUNDS_FIGURE,
                  title=f"adaptive sweep '{cfg.name}': {len(loop.chosen)} of {len(cells)} cells")
    write_summary(cfg, loop.outcome)
    out = AdaptiveOutcome(loop.outcome, pd.DataFrame(loop.rows), curves, len(cells), len(loop.chosen),
                          loop.spent / loop.total if loop.total else float("nan"))
    _report(cfg, out)
    return out


def _report(cfg: SweepConfig, out: AdaptiveOutcome) -> None:
    console.line()
    console.line(f"adaptive sweep '{cfg.name}': {len(out.rounds)} round(s), {out.cells_chosen} of {out.grid_cells} "
                 f"cells ({out.spent_share:.1%} of the full grid's cost)")
    for line in end_lines(out.curves):
        console.line(line)
    console.line(f"rounds:   {cfg.output_path / 'rounds.csv'}   curves: {cfg.output_path / ADAPTIVE_CURVES}")
