"""Run a sweep: plan the grid, embed each (encoder, weights, resolution, dataset) once, run every
cell as a Ray Tune trial, record each cell as exactly one MLflow run, and summarise.

State lives in three durable places, so a killed driver loses nothing: the feature cache, the
per-cell result directories (written by the trial before it reports) and MLflow. `--resume`
re-derives what is missing from them instead of trusting Tune's own experiment state. On a
cluster the first two live on shared storage (`storage:`), so any node's work is visible to the
driver; a trial whose node dies is retried elsewhere (`max_failures`).
"""

from __future__ import annotations

import itertools
import json
import subprocess
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from orchestrator import __version__, console
from orchestrator.cache import FeatureCache
from orchestrator.cells import SUBSET_FILE, Cell, ResultStore, cell_spec
from orchestrator.config import SweepConfig
from orchestrator.extract import DigestMemo, ExtractResult, describe
from orchestrator.tracking import Tracker
from tasks.errors import ConfigError, MedscaleError

HEADLINE = "test_auc"


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


def plan_cells(cfg: SweepConfig) -> tuple[list[Cell], dict[str, str]]:
    """The grid's cells, minus those that make no sense (returned with the reason)."""
    from tasks.datasets import dataset_class
    from tasks.protocols import PROTOCOLS

    cells, skipped = [], {}
    g = cfg.grid
    for enc, res, ds, proto, seed, size in itertools.product(g.encoders, g.resolutions, g.datasets, g.protocols,
                                                             g.seeds, g.train_sizes):
        if PROTOCOLS[proto].family == "training_free" and (seed, size) != (g.seeds[0], g.train_sizes[0]):
            continue  # nothing is trained or drawn: one cell, on the first seed and training-set size
        cell = Cell(enc, res, ds, proto, seed, size.fraction, size.shots)
        reason = PROTOCOLS[proto].accepts(dataset_class(ds))
        if reason:
            skipped[cell.cell_id] = reason
        else:
            cells.append(cell)
    return cells, skipped


class _Runner:
    """Holds one sweep's state while it runs; the Tune callback reports to it."""

    def __init__(self, cfg: SweepConfig, tracker: Tracker, outcome: SweepOutcome, total: int):
        self.cfg, self.tracker, self.outcome, self.total = cfg, tracker, outcome, total
        self.results = ResultStore(f"{cfg.sweep_root}/cells")
        self.params: dict[str, dict[str, Any]] = {}
        self.run_ids: dict[str, str] = {}

    def _run_id(self, cell_id: str) -> str:
        if cell_id not in self.run_ids:
            self.run_ids[cell_id] = self.tracker.open_run(cell_id, self.params[cell_id], self.tags(cell_id))
        return self.run_ids[cell_id]

    def tags(self, cell_id: str) -> dict[str, str]:
        kind = self.params[cell_id].get("weights_kind", self.cfg.weights)
        tags = {"medscale.weights": kind}
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
        console.cell_line(n, self.total, cell_id, status, metrics.get(HEADLINE),
                          metrics.get("compute_s"), self.outcome.errors.get(cell_id))


def _cell_params(cfg: SweepConfig, cell: Cell, ex: ExtractResult, ds_cls: Any, hparams: dict[str, Any],
                 fingerprint: str, preprocess: dict[str, Any]) -> dict[str, Any]:
    from tasks.encoders import get_encoder_spec

    spec = get_encoder_spec(cell.encoder)
    return {
        "encoder": cell.encoder, "timm_model": spec.timm_name, "params": spec.params,
        "gflops": float(spec.gflops(cell.resolution)), "resolution": cell.resolution,
        "dataset": cell.dataset, "protocol": cell.protocol, "seed": cell.seed, "pooling": ex.job.pooling,
        "train_fraction": cell.train_fraction, "train_shots": cell.train_shots if cell.train_shots is not None else "",
        "weights": cfg.weights, "weights_kind": next(iter(ex.keys.values())).weights_kind, "weights_source": ex.weights_source,
        "weights_digest": ex.weights_digest, "dataset_fingerprint": fingerprint, "task": ds_cls.task,
        "n_classes": len(ds_cls.classes), "sweep": cfg.name, "medscale_version": __version__,
        "git_commit": git_commit(),
        **{f"cache_key_{s}": k.digest for s, k in ex.keys.items()},
        **{f"preprocess_{k}": v for k, v in preprocess.items()},
        **{f"hp_{k}": v for k, v in hparams.items()},
        **{f"dataset_{k}": v for k, v in cfg.options_for(cell.dataset).items()},
        **({"evaluate_on": ",".join(cfg.evaluate_on[cell.dataset])} if cell.dataset in cfg.evaluate_on else {}),
    }


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


def _training_free_spec(cfg: SweepConfig, c: Cell, runner: _Runner, results: ResultStore, memo: DigestMemo,
                        has_gpu: bool) -> dict[str, Any] | None:
    """The spec of a registration cell (orchestrator/registration_cells.py), its MLflow params
    recorded; None when the cell cannot run (recorded as FAILED) or was computed already."""
    from orchestrator.extraction_phase import _error_text, weights_info
    from orchestrator.registration_cells import registration_spec
    from tasks.datasets import dataset_class, get_dataset
    from tasks.encoders import create_encoder, get_encoder_spec
    from tasks.protocols import create_protocol

    ds_cls = dataset_class(c.dataset)
    hp = create_protocol(c.protocol, task=ds_cls.task, seed=c.seed, **cfg.protocols.get(c.protocol, {}))
    hparams = {k: v for k, v in hp.get_params().items() if k not in ("task", "seed")}
    enc = get_encoder_spec(c.encoder)
    params = {"encoder": c.encoder, "timm_model": enc.timm_name, "params": enc.params,
              "gflops": float(enc.gflops(c.resolution)), "resolution": c.resolution, "dataset": c.dataset,
              "protocol": c.protocol, "seed": c.seed, "weights": cfg.weights, "task": ds_cls.task,
              "n_classes": len(ds_cls.classes), "sweep": cfg.name, "medscale_version": __version__,
              "git_commit": git_commit(), "feature_source": "online", "layers": "last",
              **{f"hp_{k}": v for k, v in hparams.items()},
              **{f"dataset_{k}": v for k, v in cfg.options_for(c.dataset).items()}}
    runner.params[c.cell_id] = params
    try:
        ds = get_dataset(c.dataset, str(cfg.data_root(c.dataset)), val_fraction=cfg.val_fraction,
                         seed=cfg.split_seed, **cfg.options_for(c.dataset))
        params["dataset_fingerprint"] = ds.fingerprint()
        info = weights_info(c.encoder, cfg.weights, memo)
        params.update(weights_kind=info.get("kind", ""), weights_source=info["source"],
                      weights_digest=info["digest"],
                      **{f"preprocess_{k}": v for k, v in create_encoder(c.encoder, weights="random", device="meta")
                         .preprocess_info().items()})
    except Exception as e:  # noqa: BLE001 - this cell fails alone, with the reason
        runner.on_error(c.cell_id, _error_text(e))
        return None
    if results.read(c.cell_id) is not None:  # computed before the driver died: log it
        runner.on_start(c.cell_id)
        runner.on_result(c.cell_id, {})
        return None
    share = cfg.resources.cell_gpu_share(enc.size, c.resolution) if has_gpu else 0.0
    return registration_spec(c, cfg, results.root, info, share, ds_cls.task, list(ds_cls.classes))


def run_sweep(cfg: SweepConfig, *, resume: bool = False, rerun: bool = False, address: str | None = None,
              ray_init: dict[str, Any] | None = None, allow_missing: bool = False,
              accelerator: str = "H100") -> SweepOutcome:
    """`allow_missing`: datasets whose root or index files are missing fail their cells (once each)
    while the others run; by default nothing starts until every dataset is there."""
    from orchestrator import preflight, ray_backend
    from orchestrator.extraction_phase import extract_all
    from tasks.datasets import dataset_class
    from tasks.protocols import create_protocol

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

    if rerun:
        n = tracker.delete_cells(c.cell_id for c in cells)
        for c in cells:
            results.delete(c.cell_id)
        console.note(f"--rerun: deleted {n} earlier run(s); features stay cached")
    finished = tracker.finished_cells()
    done = [c for c in cells if c.cell_id in finished]
    if done and not resume and not rerun:
        if len(done) == len(cells):
            console.note(f"sweep '{cfg.name}' is already complete ({len(cells)} cells); "
                         "pass --rerun to run it again")
            outcome.already_done = True
            for c in cells:
                outcome.cells[c.cell_id] = "FINISHED"
            return outcome
        raise ConfigError(
            f"{out}: an earlier run of sweep '{cfg.name}' finished {len(done)}/{len(cells)} cells; "
            "pass --resume to run only the missing cells, or --rerun to start over"
        )
    for c in done:
        outcome.cells[c.cell_id] = "FINISHED"
    todo = [c for c in cells if c.cell_id not in finished]
    if resume:
        console.note(f"--resume: {len(done)} cell(s) already finished, {len(todo)} to go")

    resources = ray_backend.start(address, **(ray_init or {}))
    has_gpu = resources.get("GPU", 0) > 0
    if not has_gpu:
        console.note("no GPU in the Ray cluster: encoders and heads run on CPU")

    runner = _Runner(cfg, tracker, outcome, total=len(cells))
    for c in done:
        outcome.metrics[c.cell_id] = results.read(c.cell_id) or {}

    cache = FeatureCache(cfg.cache_root)
    memo = DigestMemo(out / "weights_digests.json")
    # Training-free cells (registration) encode online inside the cell: nothing to extract.
    from tasks.protocols import PROTOCOLS

    free = {c.cell_id for c in todo if PROTOCOLS[c.protocol].family == "training_free"}
    extractions, failures, datasets = extract_all(cfg, [c for c in todo if c.cell_id not in free], cache, memo,
                                                  resources.get("GPU", 0.0))
    outcome.extractions = list(extractions.values())
    with (out / "extractions.jsonl").open("a") as f:
        for ex in extractions.values():
            f.write(json.dumps(describe(ex)) + "\n")

    specs = []
    for c in todo:
        if c.cell_id in free:
            spec = _training_free_spec(cfg, c, runner, results, memo, has_gpu)
            if spec is not None:
                specs.append(spec)
            continue
        ex = extractions.get(c.extraction)
        if ex is None:
            runner.params[c.cell_id] = {"encoder": c.encoder, "resolution": c.resolution, "dataset": c.dataset,
                                        "protocol": c.protocol, "seed": c.seed, "weights": cfg.weights}
            runner.on_error(c.cell_id, failures[c.extraction])
            continue
        ds_cls = dataset_class(c.dataset)
        hp = create_protocol(c.protocol, task=ds_cls.task, seed=c.seed, **cfg.protocols.get(c.protocol, {}))
        hparams = {k: v for k, v in hp.get_params().items() if k not in ("task", "seed")}
        fingerprint, preprocess = datasets[c.extraction]
        runner.params[c.cell_id] = _cell_params(cfg, c, ex, ds_cls, hparams, fingerprint, preprocess)
        dense = None
        if getattr(ex, "choices", None) is not None:  # a dense dataset: the source rule's choice for this head
            from orchestrator.dense_cells import dense_cell_plan

            dense, dparams = dense_cell_plan(cfg, c, ex, hp)
            runner.params[c.cell_id].update(dparams)
        existing = results.read(c.cell_id)
        if existing is not None:  # computed before the driver died: log it, do not recompute
            runner.on_start(c.cell_id)
            runner.on_result(c.cell_id, {})
            continue
        from tasks.encoders import get_encoder_spec

        cases, ood = None, None
        if ex.cases:  # a slide dataset: the cell's own split, and its out-of-domain test sets
            cases, runner.params[c.cell_id]["split_scheme"] = ex.cases[c.seed]
            ood, missing = _ood_sets(cfg, c, extractions, failures)
            if missing:
                runner.on_error(c.cell_id, missing)
                continue
        specs.append(cell_spec(c, keys=ex.keys, cache_root=cache.root, results_dir=results.root,
                               task=ds_cls.task, classes=list(ds_cls.classes),
                               hparams=cfg.protocols.get(c.protocol, {}),
                               size=get_encoder_spec(c.encoder).size, cases=cases, ood=ood,
                               coords_uri=ex.coords_uri, dense=dense))

    def cell_resources(spec: dict[str, Any]) -> dict[str, float]:
        res = {"CPU": cfg.resources.cell_cpus}
        if has_gpu:  # a share of one GPU, by encoder size and resolution (config: resources.cell_gpus)
            res["GPU"] = cfg.resources.cell_gpu_share(spec["size"], spec["resolution"])
            if (spec.get("dense") or {}).get("source") == "online":  # the frozen encoder runs in the trial
                res["GPU"] = min(1.0, res["GPU"] + cfg.resources.online_encoder_gpus)
        return res

    ray_backend.run_cells(specs, runner, name=f"{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}",
                          storage_path=f"{cfg.sweep_root}/tune", resources=cell_resources,
                          max_failures=cfg.max_failures, error_reader=results.read_error)
    for c in cells:  # a trial Tune never reported on (should not happen): record it, never leave RUNNING
        if c.cell_id not in outcome.cells:
            runner.on_error(c.cell_id, "the cell ended without a result or an error from Ray Tune")
    for cid in skipped:
        outcome.cells[cid] = "SKIPPED"
    console.summary(cfg, outcome)
    return outcome


__all__ = ["run_sweep", "plan_cells", "SweepOutcome", "MedscaleError"]
