"""The sweep's side of Ray Tune's trial events: `CellRecorder` is the `ray_backend.CellListener`
that turns each cell's start, result, retry and error into exactly one MLflow run (through
`Tracker`, never a Ray object) and a console line; `SweepOutcome` is what the sweep returns."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from orchestrator import console
from orchestrator.extraction.jobs import ExtractResult
from orchestrator.grid.config import SweepConfig
from orchestrator.store.results import SUBSET_FILE, ResultStore
from orchestrator.tracking import Tracker


@dataclass
class SweepOutcome:
    cells: dict[str, str] = field(default_factory=dict)  # cell_id -> FINISHED | FAILED | SKIPPED
    metrics: dict[str, dict[str, float]] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    retries: dict[str, int] = field(default_factory=dict)  # cell_id -> attempts lost (node died, ...)
    extractions: list[ExtractResult] = field(default_factory=list)
    already_done: bool = False

    @property
    def n_encoded(self) -> int:
        return sum(r.n_encoded for r in self.extractions)


class CellRecorder:
    """Holds one sweep's state while it runs; the Tune callback (ray_backend) reports to it."""

    def __init__(self, cfg: SweepConfig, tracker: Tracker, outcome: SweepOutcome, total: int):
        self.cfg, self.tracker, self.outcome, self.total = cfg, tracker, outcome, total
        self.results = ResultStore(f"{cfg.sweep_root}/cells")
        self.params: dict[str, dict[str, Any]] = {}
        self.extra_tags: dict[str, dict[str, str]] = {}  # identity tags, by cell id
        self.run_ids: dict[str, str] = {}

    def _run_id(self, cell_id: str) -> str:
        if cell_id not in self.run_ids:
            self.run_ids[cell_id] = self.tracker.open_run(cell_id, self.params[cell_id], self.tags(cell_id))
        return self.run_ids[cell_id]

    def tags(self, cell_id: str) -> dict[str, str]:
        kind = self.params[cell_id].get("weights_kind") or str(self.params[cell_id].get("weights", ""))
        tags = {"medscale.weights": kind, **self.extra_tags.get(cell_id, {})}
        if kind == "random":
            tags["mlflow.note.content"] = "RANDOM-INIT encoder weights (weights: random): not a pretrained result."
        return tags

    def on_start(self, cell_id: str) -> None:
        self._run_id(cell_id)

    def on_result(self, cell_id: str, result: dict[str, Any]) -> None:
        metrics = self.results.read(cell_id) or {}
        if not metrics:
            return self.on_error(cell_id, "the trial reported but wrote no result files")
        run_id = self._run_id(cell_id)
        # Where it ran: from the result files (durable, so a resumed driver logs it too), else
        # from what Tune reported.
        placement = self.results.placement(cell_id)
        placement.update({k: result[k] for k in ("node_id", "node_ip") if result.get(k)})
        tags = {f"medscale.{k}": str(placement[k]) for k in ("node_id", "node_ip") if k in placement}
        if placement:
            tags["medscale.placement"] = json.dumps(placement, sort_keys=True)
        self.tracker.set_tags(run_id, tags)
        subset = self.results.read_file(cell_id, SUBSET_FILE)
        if subset:  # the data axis: what the cell's training subset holds (cases, positives per class)
            self.tracker.log_params(run_id, subset)
        with self.results.local_dir(cell_id) as artifacts:
            self.tracker.finish(run_id, metrics, artifacts)
        self._done(cell_id, "FINISHED", metrics)

    def on_retry(self, cell_id: str, message: str) -> None:
        n = self.outcome.retries[cell_id] = self.outcome.retries.get(cell_id, 0) + 1
        self.tracker.set_tags(self._run_id(cell_id), {"medscale.retries": str(n),
                                                      f"medscale.retry_{n}": message[:4000]})
        console.note(f"retrying {cell_id} (attempt {n + 1}): {message.splitlines()[0][:200]}")

    def on_error(self, cell_id: str, message: str) -> None:
        self.tracker.fail(self._run_id(cell_id), message)
        self.outcome.errors[cell_id] = message
        self._done(cell_id, "FAILED", {})

    def _done(self, cell_id: str, status: str, metrics: dict[str, float]) -> None:
        self.outcome.cells[cell_id] = status
        self.outcome.metrics[cell_id] = metrics
        n = sum(1 for s in self.outcome.cells.values() if s != "SKIPPED")
        console.cell_line(n, self.total, cell_id, status, metrics,
                          metrics.get("compute_s"), self.outcome.errors.get(cell_id))
