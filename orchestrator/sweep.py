"""Run a sweep: plan the grid, embed each (encoder, weights, resolution, dataset) once, run every
cell as a Ray Tune trial, record each cell as exactly one MLflow run, and summarise.

State lives in three durable places, so a killed driver loses nothing: the feature cache, the
per-cell result directories (written by the trial before it reports) and MLflow. `--resume`
re-derives what is missing from them instead of trusting Tune's own experiment state. On a
cluster the first two live on shared storage (`storage:`), so any node's work is visible to the
driver; a trial whose node dies is retried elsewhere (`max_failures`).
"""

from __future__ import annotations

import functools
import hashlib
import json
import subprocess
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from orchestrator import __version__, console
from orchestrator.cache import FeatureCache
from orchestrator.cells import cell_spec
from orchestrator.config import SweepConfig
from orchestrator.extract import DigestMemo, ExtractResult, describe, planned_precision
from orchestrator.extraction_phase import Plan
from orchestrator.grid import Cell, plan_cells
from orchestrator.identity import RESULT_FORMAT, config_part, resolved_hparams, resolved_pooling
from orchestrator.results import SUBSET_FILE, ResultStore
from orchestrator.tracking import Tracker
from tasks.errors import ConfigError, MedscaleError


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


@functools.lru_cache(maxsize=1)
def git_commit() -> str:
    try:
        root = Path(__file__).resolve().parents[1]
        sha = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True,
                             text=True, timeout=5).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5).stdout.strip()
        return f"{sha}{'+dirty' if dirty else ''}" if sha else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


@dataclass
class PlannedCell:
    """A cell with its spec (identity included) and the params its run records; `error`: why it
    cannot run (its extraction could not be planned), then `spec` holds only the identity."""

    cell: Cell
    spec: dict[str, Any]
    params: dict[str, Any]
    error: str = ""

    @property
    def cell_id(self) -> str:
        return self.spec["cell_id"]

    @property
    def tags(self) -> dict[str, str]:
        from orchestrator.tracking import CONFIG_IDENTITY_TAG, IDENTITY_TAG, SEED_FREE_TAG

        ident = self.spec["identity"]
        tags = {IDENTITY_TAG: ident["identity"], CONFIG_IDENTITY_TAG: ident["config_identity"]}
        if self.cell.seed_free:
            tags[SEED_FREE_TAG] = "true"
        return tags


class _Runner:
    """Holds one sweep's state while it runs; the Tune callback reports to it."""

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
        kind = self.params[cell_id].get("weights_kind", self.cfg.weights)
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


def _cell_params(cfg: SweepConfig, cell: Cell, ex: ExtractResult, ds_cls: Any, hparams: dict[str, Any],
                 fingerprint: str, preprocess: dict[str, Any]) -> dict[str, Any]:
    from tasks.encoders import get_encoder_spec

    spec = get_encoder_spec(cell.encoder)
    return {
        "precision": next(iter(ex.keys.values())).precision, "seed_free": str(cell.seed_free).lower(),
        "result_format": RESULT_FORMAT,
        "encoder": cell.encoder, "family": spec.family, "encoder_library": spec.library,
        "timm_model": spec.timm_name, "params": spec.params,
        "gflops": float(spec.gflops(cell.resolution)), "resolution": cell.resolution,
        "dataset": cell.dataset, "protocol": cell.protocol, "seed": cell.seed, "pooling": ex.job.pooling,
        "train_fraction": cell.train_fraction, "train_shots": cell.train_shots if cell.train_shots is not None else "",
        "weights": cfg.weights_of(cell.encoder), "weights_kind": next(iter(ex.keys.values())).weights_kind, "weights_source": ex.weights_source,
        "weights_digest": ex.weights_digest, "dataset_fingerprint": fingerprint, "task": ds_cls.task,
        "n_classes": len(ds_cls.classes), "sweep": cfg.name, "medscale_version": __version__,
        "git_commit": git_commit(),
        **{f"cache_key_{s}": k.digest for s, k in ex.keys.items()},
        **{f"preprocess_{k}": v for k, v in preprocess.items()},
        **{f"hp_{k}": v for k, v in hparams.items()},
        **{f"dataset_{k}": v for k, v in cfg.options_for(cell.dataset).items()},
        **({"evaluate_on": ",".join(cfg.evaluate_on[cell.dataset])} if cell.dataset in cfg.evaluate_on else {}),
    }


def _plan_cell(cfg: SweepConfig, c: Cell, plan: Plan, results_dir: str, precision: str) -> PlannedCell:
    """The cell's spec (its identity) from the planned extractions; a cell whose extraction (or an
    out-of-domain test set's) could not be planned gets an identity from the config alone."""
    from orchestrator.identity import identify
    from orchestrator.seg3d_cells import data_order_for
    from tasks.datasets import dataset_class
    from tasks.encoders import get_encoder_spec

    ds_cls = dataset_class(c.dataset)
    hparams = resolved_hparams(c.protocol, ds_cls.task, c.seed, cfg.protocols.get(c.protocol, {}))
    ex = plan.results.get(c.extraction)
    pooling = ex.job.pooling if ex else resolved_pooling(c.encoder, cfg.pooling)
    common = {"task": ds_cls.task, "classes": list(ds_cls.classes), "hparams": hparams,
              "config": config_part(cfg, c.dataset, pooling), "size": get_encoder_spec(c.encoder).size,
              "cache_root": cfg.cache_root, "results_dir": results_dir}
    error = plan.failures.get(c.extraction, "")
    cases, ood, scheme = None, None, ""
    if ex is not None and ex.cases:  # a slide dataset: the cell's own split, and its out-of-domain test sets
        cases, scheme = ex.cases[c.seed]
        ood, error = _ood_sets(cfg, c, plan.results, plan.failures)
    order = data_order_for(cfg, c)  # seg3d: the planned group's crop stream determines the result
    if ex is None or error:
        spec = cell_spec(c, keys={}, **common)
        if order:
            spec = identify({**spec, "data_order": order}, c.prefix)
        params = {"encoder": c.encoder, "resolution": c.resolution, "dataset": c.dataset, "protocol": c.protocol,
                  "seed": c.seed, "seed_free": str(c.seed_free).lower(), "weights": cfg.weights_of(c.encoder),
                  "precision": precision, "result_format": RESULT_FORMAT}
        return PlannedCell(c, spec, params, error or "not planned")
    spec = cell_spec(c, keys=ex.keys, cases=cases, ood=ood, coords_uri=ex.coords_uri, split_scheme=scheme, **common)
    if order:  # (orchestrator/seg3d_cells.py)
        spec = identify({**spec, "data_order": order}, c.prefix)
    fingerprint, preprocess = plan.info[c.extraction]
    params = _cell_params(cfg, c, ex, ds_cls, hparams, fingerprint, preprocess)
    if scheme:
        params["split_scheme"] = scheme
    return PlannedCell(c, spec, params)


def _ood_sets(cfg: SweepConfig, c: Cell, extractions: dict, failures: dict) -> tuple[list[dict[str, Any]], str]:
    """The out-of-domain test sets of a cell (config evaluate_on): their bag keys and test slides;
    or the reason the cell cannot run when one of them failed to extract."""
    out = []
    for d in cfg.evaluate_on.get(c.dataset, []):
        ex = extractions.get((c.encoder, c.resolution, d))
        if ex is None:
            return [], f"out-of-domain test set {d}: {failures.get((c.encoder, c.resolution, d), 'not extracted')}"
        cases, _ = ex.cases[c.seed]
        out.append({"dataset": d, "keys": {s: asdict(k) for s, k in ex.keys.items()},
                    "cases": [x for x in cases if x["split"] == "test"]})
    return out, ""


def _plan(cfg: SweepConfig, cells: list[Cell], skipped: dict[str, str], tracker: Tracker, accelerator: str) -> None:
    """Print the plan (orchestrator/plan.py), save it beside the outputs, log it as the sweep's
    "plan" run. A plan that cannot be made is noted; it never stops a sweep."""
    from orchestrator.plan import build_plan, format_plan, gather, write_plan
    from orchestrator.plan_seg3d import plan_text

    try:  # 3D segmentation encodes online: its encoder GPU-hours, printed before anything starts
        text = plan_text(cfg)
        if text:
            console.block(text)
    except Exception as e:  # noqa: BLE001 - the plan informs; the sweep is what was asked for
        console.note(f"no seg3d plan: {type(e).__name__}: {e}")
    try:
        plan = build_plan(cfg, cells, skipped, gather(cfg, cells), accelerator)
    except Exception as e:  # noqa: BLE001 - the plan informs; the sweep is what was asked for
        console.note(f"no plan: {type(e).__name__}: {e}")
        return
    console.block(format_plan(plan))
    d = write_plan(plan, cfg.output_path / "plan")
    t = plan.totals
    tracker.log_sweep_run("plan", {"accelerator": plan.accelerator, "utilisation": plan.utilisation},
                          {"device_hours": t["device_hours"], "cache_bytes": float(t["cache_bytes"]),
                           "cache_bytes_new": float(t["cache_bytes_new"]), "cells": float(t["cells"]),
                           "warnings": float(len(plan.warnings))}, str(d), kind="plan")


def _plan_training_free(cfg: SweepConfig, c: Cell, memo: DigestMemo, results_dir: str, n_gpus: float) -> PlannedCell:
    """A registration cell (orchestrator/registration_cells.py): it encodes online, inside the cell,
    so its identity holds the dataset fingerprint and weights digest instead of cache keys."""
    from orchestrator.extraction_phase import _error_text, weights_info
    from orchestrator.identity import identify
    from orchestrator.registration_cells import registration_spec
    from tasks.datasets import dataset_class, get_dataset
    from tasks.encoders import create_encoder, get_encoder_spec

    ds_cls = dataset_class(c.dataset)
    hparams = resolved_hparams(c.protocol, ds_cls.task, c.seed, cfg.protocols.get(c.protocol, {}))
    enc = get_encoder_spec(c.encoder)
    # the cell's own GPU share, when the cluster has GPUs
    precision = planned_precision(n_gpus, 1, cfg.resources.precision)
    params = {"encoder": c.encoder, "family": enc.family, "timm_model": enc.timm_name, "params": enc.params,
              "gflops": float(enc.gflops(c.resolution)), "resolution": c.resolution, "dataset": c.dataset,
              "protocol": c.protocol, "seed": c.seed, "weights": cfg.weights_of(c.encoder), "task": ds_cls.task,
              "n_classes": len(ds_cls.classes), "sweep": cfg.name, "medscale_version": __version__,
              "git_commit": git_commit(), "feature_source": "online", "layers": "last", "precision": precision,
              "seed_free": str(c.seed_free).lower(), "result_format": RESULT_FORMAT,
              **{f"hp_{k}": v for k, v in hparams.items()},
              **{f"dataset_{k}": v for k, v in cfg.options_for(c.dataset).items()}}
    extra = {"hparams": hparams, "precision": precision,
             "config": config_part(cfg, c.dataset, resolved_pooling(c.encoder, cfg.pooling))}
    try:
        ds = get_dataset(c.dataset, str(cfg.data_root(c.dataset)), val_fraction=cfg.val_fraction,
                         seed=cfg.split_seed, **cfg.options_for(c.dataset))
        params["dataset_fingerprint"] = ds.fingerprint()
        info = weights_info(c.encoder, cfg.weights_of(c.encoder), memo)
        params.update(weights_kind=info.get("kind", ""), weights_source=info["source"],
                      weights_digest=info["digest"],
                      **{f"preprocess_{k}": v for k, v in create_encoder(c.encoder, weights="random", device="meta")
                         .preprocess_info().items()})
    except Exception as e:  # noqa: BLE001 - this cell fails alone, with the reason
        spec = registration_spec(c, cfg, results_dir, {}, 0.0, ds_cls.task, list(ds_cls.classes))
        return PlannedCell(c, identify({**spec, **extra}, c.prefix), params, _error_text(e))
    share = cfg.resources.cell_gpu_share(enc.size, c.resolution) if n_gpus else 0.0
    spec = registration_spec(c, cfg, results_dir, info, share, ds_cls.task, list(ds_cls.classes))
    spec = identify({**spec, **extra, "dataset_fingerprint": params["dataset_fingerprint"]}, c.prefix)
    return PlannedCell(c, spec, params)


def _online(c: Cell) -> bool:
    from tasks.protocols import PROTOCOLS

    return PROTOCOLS[c.protocol].family == "training_free"


def _superseded_note(cfg: SweepConfig, planned: list[PlannedCell]) -> str:
    digest = hashlib.sha256("".join(sorted(p.spec["identity"]["identity"] for p in planned)).encode()).hexdigest()
    return (f"not a cell of sweep '{cfg.name}' as configured on {time.strftime('%Y-%m-%d %H:%M:%S %Z')} "
            f"(its cells' digest {digest[:12]}): a setting that determines the result changed")


def run_sweep(cfg: SweepConfig, *, resume: bool = False, rerun: bool = False, address: str | None = None,
              ray_init: dict[str, Any] | None = None, allow_missing: bool = False,
              accelerator: str = "H100") -> SweepOutcome:
    """`allow_missing`: datasets whose root or index files are missing fail their cells (once each)
    while the others run; by default nothing starts until every dataset is there."""
    from orchestrator import preflight, ray_backend
    from orchestrator.extraction_phase import extract_all, plan_extractions

    missing = preflight.missing_data(cfg)
    if missing and not allow_missing:
        raise ConfigError(f"data missing for {len(missing)} dataset(s); nothing was run:\n"
                          f"{preflight.report(missing)}\n(fix the paths under data: in the config, or pass "
                          "--allow-missing to run the other datasets)")
    out = cfg.output_path
    out.mkdir(parents=True, exist_ok=True)
    uri = cfg.resolved_tracking_uri
    # A tracking server stores artifacts itself (--artifacts-destination); an embedded store
    # (sqlite) would otherwise put them in ./mlruns of whatever the working directory is.
    served = uri.startswith(("http://", "https://", "databricks"))
    tracker = Tracker(uri, cfg.name, artifact_root=None if served else str(out / "mlartifacts"))
    cells, skipped = plan_cells(cfg)
    outcome = SweepOutcome(skipped=skipped)
    results = ResultStore(f"{cfg.sweep_root}/cells")
    console.banner(cfg, len(cells), skipped)
    if missing:
        console.note(f"--allow-missing: the cells of {', '.join(missing)} will fail:\n{preflight.report(missing)}")
    _plan(cfg, cells, skipped, tracker, accelerator)

    # Plan before anything runs: precision (from the cluster's GPUs), weights digests, dataset
    # fingerprints and cache keys make each cell's identity, which says what is already done.
    resources = ray_backend.start(address, **(ray_init or {}))
    n_gpus = resources.get("GPU", 0.0)
    if not n_gpus:
        console.note("no GPU in the Ray cluster: encoders and heads run on CPU")
    precision = planned_precision(n_gpus, cfg.resources.extract_gpus, cfg.resources.precision)
    cache = FeatureCache(cfg.cache_root, clean=True)
    if cache.cleaned:
        console.note(f"removed {len(cache.cleaned)} scratch director(ies) of extractions that died")
    memo = DigestMemo(out / "weights_digests.json")
    # Training-free cells (registration) encode online inside the cell: nothing to extract.
    plan = plan_extractions(cfg, [c for c in cells if not _online(c)], memo, precision)
    planned = [_plan_training_free(cfg, c, memo, results.root, n_gpus) if _online(c)
               else _plan_cell(cfg, c, plan, results.root, precision) for c in cells]
    by_id = {p.cell_id: p for p in planned}
    unresolved = {p.cell.prefix for p in planned if p.error}
    marked, restored = tracker.mark_superseded(set(by_id), _superseded_note(cfg, planned), unresolved)
    if marked or restored:
        console.note(f"{marked} earlier run(s) no longer match the config: kept in MLflow, tagged "
                     f"medscale.superseded" + (f"; {restored} match it again" if restored else ""))

    if rerun:
        n = tracker.delete_cells(by_id)
        for cid in by_id:
            results.delete(cid)
        console.note(f"--rerun: deleted {n} earlier run(s); features stay cached")
    finished = tracker.finished_cells()
    done = [p for p in planned if p.cell_id in finished]
    todo = [p for p in planned if p.cell_id not in finished]
    if done and not resume and not rerun:
        if not todo:
            console.note(f"sweep '{cfg.name}' is already complete ({len(cells)} cells); "
                         "pass --rerun to run it again")
            outcome.already_done = True
            for p in planned:
                outcome.cells[p.cell_id] = "FINISHED"
            return outcome
        # An interrupted sweep left runs or results of cells it did not finish: going on is a
        # resume, and says so. Cells that are merely new (the config changed) just run.
        index = tracker.index()
        started = [p for p in todo if index.get(p.cell_id) or results.attempted(p.cell_id)]
        if started:
            raise ConfigError(
                f"{out}: an earlier run of sweep '{cfg.name}' finished {len(done)}/{len(cells)} cells and left "
                f"{len(started)} unfinished; pass --resume to run only the missing cells, or --rerun to start over"
            )
        console.note(f"{len(todo)} cell(s) are new (the config changed, or the grid grew); "
                     f"{len(done)} unchanged cell(s) stay finished")
    for p in done:
        outcome.cells[p.cell_id] = "FINISHED"
    if resume:
        console.note(f"--resume: {len(done)} cell(s) already finished, {len(todo)} to go")

    runner = _Runner(cfg, tracker, outcome, total=len(cells))
    for p in done:
        outcome.metrics[p.cell_id] = results.read(p.cell_id) or {}
    for p in planned:
        runner.params[p.cell_id], runner.extra_tags[p.cell_id] = p.params, p.tags

    extractions, failures = extract_all(cfg, [p.cell for p in todo if not p.error and not _online(p.cell)], cache,
                                        memo, n_gpus, plan)
    outcome.extractions = list(extractions.values())
    with (out / "extractions.jsonl").open("a") as f:
        for ex in extractions.values():
            f.write(json.dumps(describe(ex)) + "\n")

    specs = []
    for p in todo:
        c = p.cell
        missing = p.error or failures.get(c.extraction) or next(
            (failures[(c.encoder, c.resolution, d)] for d in cfg.evaluate_on.get(c.dataset, [])
             if (c.encoder, c.resolution, d) in failures), "")
        if missing:
            runner.on_error(p.cell_id, missing)
            continue
        ex = extractions.get(c.extraction)
        if ex is not None and getattr(ex, "choices", None) is not None:
            # A dense dataset: the cached/online rule's choice for this head (a runtime field of the
            # spec; what determines the features is in its identity already).
            from orchestrator.dense_cells import dense_cell_plan
            from tasks.protocols import create_protocol

            hp = create_protocol(c.protocol, task=p.spec["task"], seed=c.seed, **p.spec["hparams"])
            p.spec["dense"], dparams = dense_cell_plan(cfg, c, ex, hp)
            p.params.update(dparams)
        existing = results.read(p.cell_id)
        if existing is not None and results.read_identity(p.cell_id).get("identity") in (None, p.spec["identity"]["identity"]):
            # Computed before the driver died: log it, do not recompute.
            runner.on_start(p.cell_id)
            runner.on_result(p.cell_id, {})
            continue
        if existing is not None:  # another cell's result under this id (cannot match): recompute
            results.delete(p.cell_id)
        specs.append(p.spec)

    # seg3d_decoder cells differing only in their seed run as one trial on one stream of encoded
    # crops (orchestrator/seg3d_cells.py); each member keeps its own run and result directory.
    from orchestrator.seg3d_cells import group_specs

    specs, grouped = group_specs(specs)
    for cid, gparams in grouped.items():
        runner.params[cid].update(gparams)

    def cell_resources(spec: dict[str, Any]) -> dict[str, float]:
        res = {"CPU": cfg.resources.cell_cpus}
        if n_gpus:  # a share of one GPU, by encoder size and resolution (config: resources.cell_gpus)
            res["GPU"] = cfg.resources.cell_gpu_share(spec["size"], spec["resolution"])
            if (spec.get("dense") or {}).get("source") == "online":  # the frozen encoder runs in the trial
                res["GPU"] = min(1.0, res["GPU"] + cfg.resources.online_encoder_gpus)
        return res

    ray_backend.run_cells(specs, runner, name=f"{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}",
                          storage_path=f"{cfg.sweep_root}/tune", resources=cell_resources,
                          max_failures=cfg.max_failures, error_reader=results.read_error)
    for p in planned:  # a trial Tune never reported on (should not happen): record it, never leave RUNNING
        if p.cell_id not in outcome.cells:
            runner.on_error(p.cell_id, "the cell ended without a result or an error from Ray Tune")
    for cid in skipped:
        outcome.cells[cid] = "SKIPPED"
    console.summary(cfg, outcome)
    return outcome


__all__ = ["run_sweep", "plan_cells", "SweepOutcome", "MedscaleError"]
