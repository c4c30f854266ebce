"""Run a sweep: plan the grid, embed each (encoder, weights, resolution, dataset) once, run every
cell as a Ray Tune trial, record each cell as exactly one MLflow run, and summarise.

State lives in three durable places, so a killed driver loses nothing: the feature cache, the
per-cell result directories (written by the trial before it reports) and MLflow. `--resume`
re-derives what is missing from them instead of trusting Tune's own experiment state. On a
cluster the first two live on shared storage (`storage:`), so any node's work is visible to the
driver; a trial whose node dies is retried elsewhere (`max_failures`).

`run_sweep` reads as its steps: check the data, open tracking, plan cells and extractions (their
identities), decide what is left (resume / rerun), extract, turn cells into trial specs, run them.
"""

from __future__ import annotations

import json
import time
from typing import Any

from orchestrator import console, ray_backend
from orchestrator.cells.run import run_cell
from orchestrator.cells.seg3d import group_specs
from orchestrator.extraction.jobs import describe
from orchestrator.extraction.phase import extract_all, plan_extractions
from orchestrator.extraction.weights import DigestMemo, planned_precision
from orchestrator.grid.cells import Cell, plan_cells
from orchestrator.grid.config import SweepConfig
from orchestrator.store.cache import FeatureCache
from orchestrator.store.results import ResultStore
from orchestrator.sweep import preflight
from orchestrator.sweep.listener import CellRecorder, SweepOutcome
from orchestrator.sweep.planning import (
    PlannedCell,
    dense_runtime,
    online,
    plan_cell,
    plan_training_free,
    print_plan,
    superseded_note,
)
from orchestrator.sweep.summary import write_summary
from orchestrator.tracking import Tracker
from tasks.errors import ConfigError


def run_sweep(cfg: SweepConfig, *, resume: bool = False, rerun: bool = False, address: str | None = None,
              ray_init: dict[str, Any] | None = None, allow_missing: bool = False,
              accelerator: str = "H100", only: set[str] | None = None) -> SweepOutcome:
    """`allow_missing`: datasets whose root or index files are missing fail their cells (once each)
    while the others run; by default nothing starts until every dataset is there.

    `only`: run just these cells of the grid (by `Cell.prefix`), as one round of an adaptive sweep
    (orchestrator/sweep/adaptive.py) does. Each keeps the identity it has in the full grid, so a
    full sweep resumes from it; runs of the grid's other cells are left alone (never marked
    superseded); the plan and summary.csv are the caller's (it prints one for all its rounds)."""
    missing_data = preflight.check_data(cfg, allow_missing)
    cfg.output_path.mkdir(parents=True, exist_ok=True)
    tracker = open_tracker(cfg)
    cells, skipped = plan_cells(cfg)
    others: set[str] = set()
    if only is not None:
        cells, skipped, others = _subset(cells, only)
    outcome = SweepOutcome(skipped=skipped)
    results = ResultStore(f"{cfg.sweep_root}/cells")
    console.banner(cfg, len(cells), skipped)
    if missing_data:
        console.note(f"--allow-missing: the cells of {', '.join(missing_data)} will fail:\n"
                     f"{preflight.report(missing_data)}")
    if only is None:
        print_plan(cfg, cells, skipped, tracker, accelerator)

    # Plan before anything runs: precision (from the cluster's GPUs), weights digests, dataset
    # fingerprints and cache keys make each cell's identity, which says what is already done.
    n_gpus = _start_ray(address, ray_init)
    precision = planned_precision(n_gpus, cfg.resources.extract_gpus, cfg.resources.precision)
    cache = FeatureCache(cfg.cache_root, clean=True)
    if cache.cleaned:
        console.note(f"removed {len(cache.cleaned)} scratch director(ies) of extractions that died")
    memo = DigestMemo(cfg.output_path / "weights_digests.json")
    # Training-free cells (registration) encode online inside the cell: nothing to extract.
    plan = plan_extractions(cfg, [c for c in cells if not online(c)], memo, precision)
    planned = [plan_training_free(cfg, c, memo, results.root, n_gpus) if online(c)
               else plan_cell(cfg, c, plan, results.root, precision) for c in cells]
    _mark_superseded(cfg, tracker, planned, others)

    todo = _cells_to_run(cfg, tracker, results, planned, outcome, resume=resume, rerun=rerun,
                         subset=only is not None)
    if todo is None:
        return outcome
    recorder = CellRecorder(cfg, tracker, outcome, total=len(cells))
    for p in planned:
        recorder.params[p.cell_id], recorder.extra_tags[p.cell_id] = p.params, p.tags
    for cid, status in outcome.cells.items():
        if status == "FINISHED":
            outcome.metrics[cid] = results.read(cid) or {}

    extractions, failures = extract_all(cfg, [p.cell for p in todo if not p.error and not online(p.cell)], cache,
                                        memo, n_gpus, plan)
    outcome.extractions = list(extractions.values())
    with (cfg.output_path / "extractions.jsonl").open("a") as f:
        for ex in extractions.values():
            f.write(json.dumps(describe(ex)) + "\n")

    specs = _trial_specs(cfg, todo, extractions, failures, recorder, results)
    _run_trials(cfg, specs, recorder, results, n_gpus)
    for p in planned:  # a trial Tune never reported on (should not happen): record it, never leave RUNNING
        if p.cell_id not in outcome.cells:
            recorder.on_error(p.cell_id, "the cell ended without a result or an error from Ray Tune")
    for cid in skipped:
        outcome.cells[cid] = "SKIPPED"
    if only is None:
        write_summary(cfg, outcome)
    return outcome


def _subset(cells: list[Cell], only: set[str]) -> tuple[list[Cell], dict[str, str], set[str]]:
    """The grid's cells named in `only`, no skipped ones (the caller chose among planned cells),
    and the prefixes of the grid's other cells."""
    unknown = only - {c.prefix for c in cells}
    if unknown:
        raise ConfigError(f"{len(unknown)} cell(s) to run are not cells of the grid: {', '.join(sorted(unknown)[:5])}")
    return [c for c in cells if c.prefix in only], {}, {c.prefix for c in cells if c.prefix not in only}


def open_tracker(cfg: SweepConfig) -> Tracker:
    uri = cfg.resolved_tracking_uri
    # A tracking server stores artifacts itself (--artifacts-destination); an embedded store
    # (sqlite) would otherwise put them in ./mlruns of whatever the working directory is.
    served = uri.startswith(("http://", "https://", "databricks"))
    return Tracker(uri, cfg.name, artifact_root=None if served else str(cfg.output_path / "mlartifacts"))


def _start_ray(address: str | None, ray_init: dict[str, Any] | None) -> float:
    """Join or start Ray; the cluster's GPU count."""
    address = ray_backend.resolve_address(address)
    if address != "local":
        console.note(f"joining the Ray cluster at {address}")
    n_gpus = ray_backend.start(address, **(ray_init or {})).get("GPU", 0.0)
    if not n_gpus:
        console.note("no GPU in the Ray cluster: encoders and heads run on CPU")
    return n_gpus


def _mark_superseded(cfg: SweepConfig, tracker: Tracker, planned: list[PlannedCell], others: set[str]) -> None:
    """`others`: prefixes of grid cells this run does not plan (a subset run): their runs stay as they are."""
    unresolved = {p.cell.prefix for p in planned if p.error} | others
    marked, restored = tracker.mark_superseded({p.cell_id for p in planned}, superseded_note(cfg, planned),
                                               unresolved)
    if marked or restored:
        console.note(f"{marked} earlier run(s) no longer match the config: kept in MLflow, tagged "
                     f"medscale.superseded" + (f"; {restored} match it again" if restored else ""))


def _cells_to_run(cfg: SweepConfig, tracker: Tracker, results: ResultStore, planned: list[PlannedCell],
                  outcome: SweepOutcome, *, resume: bool, rerun: bool, subset: bool = False) -> list[PlannedCell] | None:
    """The cells this run must compute (finished ones are marked in `outcome`); None when the sweep
    is already complete. An interrupted sweep is continued only with --resume (or redone with --rerun)."""
    if rerun:
        n = tracker.delete_cells({p.cell_id: p for p in planned})
        for p in planned:
            results.delete(p.cell_id)
        console.note(f"--rerun: deleted {n} earlier run(s); features stay cached")
    finished = tracker.finished_cells()
    done = [p for p in planned if p.cell_id in finished]
    todo = [p for p in planned if p.cell_id not in finished]
    if done and not resume and not rerun:
        if not todo:
            console.note(f"these {len(planned)} cells of sweep '{cfg.name}' have finished already" if subset else
                         f"sweep '{cfg.name}' is already complete ({len(planned)} cells); pass --rerun to run it again")
            outcome.already_done = True
            outcome.cells.update({p.cell_id: "FINISHED" for p in planned})
            return None
        # An interrupted sweep left runs or results of cells it did not finish: going on is a
        # resume, and says so. Cells that are merely new (the config changed) just run.
        index = tracker.index()
        started = [p for p in todo if index.get(p.cell_id) or results.attempted(p.cell_id)]
        if started:
            raise ConfigError(
                f"{cfg.output_path}: an earlier run of sweep '{cfg.name}' finished {len(done)}/{len(planned)} cells "
                f"and left {len(started)} unfinished; pass --resume to run only the missing cells, or --rerun to "
                "start over")
        console.note(f"{len(todo)} cell(s) are new (the config changed, or the grid grew); "
                     f"{len(done)} unchanged cell(s) stay finished")
    outcome.cells.update({p.cell_id: "FINISHED" for p in done})
    if resume:
        console.note(f"--resume: {len(done)} cell(s) already finished, {len(todo)} to go")
    return todo


def _failure_of(cfg: SweepConfig, p: PlannedCell, failures: dict) -> str:
    """Why a planned cell cannot run: its own planning error, or its (out-of-domain) extraction's."""
    c = p.cell
    return p.error or failures.get(c.extraction) or next(
        (failures[(c.encoder, c.resolution, d)] for d in cfg.evaluate_on.get(c.dataset, [])
         if (c.encoder, c.resolution, d) in failures), "")


def _trial_specs(cfg: SweepConfig, todo: list[PlannedCell], extractions: dict, failures: dict,
                 recorder: CellRecorder, results: ResultStore) -> list[dict[str, Any]]:
    """The specs Tune runs: cells whose extraction failed are recorded as failed, results a dead
    driver left are logged (not recomputed), seg3d seeds sharing one crop stream become one trial."""
    specs = []
    for p in todo:
        failure = _failure_of(cfg, p, failures)
        if failure:
            recorder.on_error(p.cell_id, failure)
            continue
        ex = extractions.get(p.cell.extraction)
        if ex is not None and getattr(ex, "choices", None) is not None:
            p.spec["dense"], dparams = dense_runtime(cfg, p, ex)
            p.params.update(dparams)
        existing = results.read(p.cell_id)
        if existing is not None and results.read_identity(p.cell_id).get("identity") in (None, p.spec["identity"]["identity"]):
            # Computed before the driver died: log it, do not recompute.
            recorder.on_start(p.cell_id)
            recorder.on_result(p.cell_id, {})
            continue
        if existing is not None:  # another cell's result under this id (cannot match): recompute
            results.delete(p.cell_id)
        specs.append(p.spec)
    # seg3d_decoder cells differing only in their seed run as one trial on one stream of encoded
    # crops (orchestrator/cells/seg3d.py); each member keeps its own run and result directory.
    specs, grouped = group_specs(specs)
    for cid, gparams in grouped.items():
        recorder.params[cid].update(gparams)
    return specs


def _run_trials(cfg: SweepConfig, specs: list[dict[str, Any]], recorder: CellRecorder, results: ResultStore,
                n_gpus: float) -> None:
    def cell_resources(spec: dict[str, Any]) -> dict[str, float]:
        res = {"CPU": cfg.resources.cell_cpus}
        if n_gpus:  # a share of one GPU, by encoder size and resolution (config: resources.cell_gpus)
            res["GPU"] = cfg.resources.cell_gpu_share(spec["size"], spec["resolution"])
            if (spec.get("dense") or {}).get("source") == "online":  # the frozen encoder runs in the trial
                res["GPU"] = min(1.0, res["GPU"] + cfg.resources.online_encoder_gpus)
        return res

    ray_backend.run_cells(specs, recorder, run_cell, name=f"{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}",
                          storage_path=f"{cfg.sweep_root}/tune", resources=cell_resources,
                          max_failures=cfg.max_failures, error_reader=results.read_error)
