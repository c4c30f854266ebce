"""Planning a sweep's cells on the driver: each cell's spec (its identity: cache keys, weights digest,
resolved hyperparameters) and the params its MLflow run records, before anything is encoded; the
printed plan (orchestrator/plan/) and the dense cells' runtime feature source."""

from __future__ import annotations

import functools
import hashlib
import subprocess
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from orchestrator import __version__, console
from orchestrator.cells.spec import cell_spec, head_family
from orchestrator.extraction.jobs import ExtractResult
from orchestrator.extraction.phase import PlannedExtractions
from orchestrator.extraction.weights import DigestMemo, planned_precision
from orchestrator.grid.cells import Cell
from orchestrator.grid.config import SweepConfig
from orchestrator.grid.identity import RESULT_FORMAT, config_part, resolved_hparams, resolved_pooling
from orchestrator.plan.model import Plan
from orchestrator.tracking import Tracker


@functools.lru_cache(maxsize=1)
def git_commit() -> str:
    try:
        root = Path(__file__).resolve().parents[2]  # the repository: orchestrator/sweep/ is two levels down
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


def cell_params(cfg: SweepConfig, cell: Cell, ex: ExtractResult, ds_cls: Any, hparams: dict[str, Any],
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
        "weights": cfg.weights_of(cell.encoder), "weights_kind": next(iter(ex.keys.values())).weights_kind,
        "weights_source": ex.weights_source,
        "weights_digest": ex.weights_digest, "dataset_fingerprint": fingerprint, "task": ds_cls.task,
        "n_classes": len(ds_cls.classes), "sweep": cfg.name, "medscale_version": __version__,
        "git_commit": git_commit(),
        **{f"cache_key_{s}": k.digest for s, k in ex.keys.items()},
        **{f"preprocess_{k}": v for k, v in preprocess.items()},
        **{f"hp_{k}": v for k, v in hparams.items()},
        **{f"dataset_{k}": v for k, v in cfg.options_for(cell.dataset).items()},
        **({"evaluate_on": ",".join(cfg.evaluate_on[cell.dataset])} if cell.dataset in cfg.evaluate_on else {}),
    }


def plan_cell(cfg: SweepConfig, c: Cell, plan: PlannedExtractions, results_dir: str, precision: str) -> PlannedCell:
    """The cell's spec (its identity) from the planned extractions; a cell whose extraction (or an
    out-of-domain test set's) could not be planned gets an identity from the config alone."""
    from orchestrator.cells.seg3d import data_order_for
    from orchestrator.grid.identity import identify
    from tasks.datasets import dataset_class
    from tasks.encoders import get_encoder_spec

    ds_cls = dataset_class(c.dataset)
    hparams = resolved_hparams(c.protocol, ds_cls.task, c.seed, cfg.protocols.get(c.protocol, {}))
    ex = plan.results.get(c.extraction)
    pooling = ex.job.pooling if ex else resolved_pooling(c.encoder, cfg.pooling)
    common = {"task": ds_cls.task, "classes": list(ds_cls.classes), "hparams": hparams,
              "config": config_part(cfg, c.encoder, c.dataset, pooling), "size": get_encoder_spec(c.encoder).size,
              "cache_root": cfg.cache_root, "results_dir": results_dir,
              "runner": head_family(c.protocol, getattr(ds_cls, "kind", "image"))}
    error = plan.failures.get(c.extraction, "")
    cases, ood, scheme = None, None, ""
    if ex is not None and ex.cases:  # a slide dataset: the cell's own split, and its out-of-domain test sets
        cases, scheme = ex.cases[c.seed]
        ood, error = ood_sets(cfg, c, plan.results, plan.failures)
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
    if order:  # (orchestrator/cells/seg3d.py)
        spec = identify({**spec, "data_order": order}, c.prefix)
    fingerprint, preprocess = plan.info[c.extraction]
    params = cell_params(cfg, c, ex, ds_cls, hparams, fingerprint, preprocess)
    if scheme:
        params["split_scheme"] = scheme
    return PlannedCell(c, spec, params)


def ood_sets(cfg: SweepConfig, c: Cell, extractions: dict, failures: dict) -> tuple[list[dict[str, Any]], str]:
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


def print_plan(cfg: SweepConfig, cells: list[Cell], skipped: dict[str, str], tracker: Tracker,
               accelerator: str) -> Plan | None:
    """Print the plan (orchestrator/plan/build.py), save it beside the outputs, log it as the sweep's
    "plan" run, and return it. A plan that cannot be made is noted (None); it never stops a sweep."""
    from orchestrator.plan.build import build_plan, gather
    from orchestrator.plan.format import format_plan, write_plan
    from orchestrator.plan.seg3d import plan_text

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
        return None
    console.block(format_plan(plan))
    d = write_plan(plan, cfg.output_path / "plan")
    t = plan.totals
    tracker.log_sweep_run("plan", {"accelerator": plan.accelerator, "utilisation": plan.utilisation},
                          {"device_hours": t["device_hours"], "cache_bytes": float(t["cache_bytes"]),
                           "cache_bytes_new": float(t["cache_bytes_new"]), "cells": float(t["cells"]),
                           "warnings": float(len(plan.warnings))}, str(d), kind="plan")
    return plan


def plan_training_free(cfg: SweepConfig, c: Cell, memo: DigestMemo, results_dir: str, n_gpus: float) -> PlannedCell:
    """A registration cell (orchestrator/cells/registration.py): it encodes online, inside the cell,
    so its identity holds the dataset fingerprint and weights digest instead of cache keys."""
    from orchestrator import ray_backend
    from orchestrator.cells.registration import registration_spec
    from orchestrator.extraction.weights import weights_info
    from orchestrator.grid.identity import identify
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
             "config": config_part(cfg, c.encoder, c.dataset, resolved_pooling(c.encoder, cfg.pooling))}
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
        return PlannedCell(c, identify({**spec, **extra}, c.prefix), params, ray_backend.error_text(e))
    share = cfg.resources.cell_gpu_share(enc.size, c.resolution) if n_gpus else 0.0
    spec = registration_spec(c, cfg, results_dir, info, share, ds_cls.task, list(ds_cls.classes))
    spec = identify({**spec, **extra, "dataset_fingerprint": params["dataset_fingerprint"]}, c.prefix)
    return PlannedCell(c, spec, params)


def online(c: Cell) -> bool:
    from tasks.protocols import PROTOCOLS

    return PROTOCOLS[c.protocol].family == "training_free"


def superseded_note(cfg: SweepConfig, planned: list[PlannedCell]) -> str:
    digest = hashlib.sha256("".join(sorted(p.spec["identity"]["identity"] for p in planned)).encode()).hexdigest()
    return (f"not a cell of sweep '{cfg.name}' as configured on {time.strftime('%Y-%m-%d %H:%M:%S %Z')} "
            f"(its cells' digest {digest[:12]}): a setting that determines the result changed")


def dense_runtime(cfg: SweepConfig, p: PlannedCell, ex: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """A dense dataset's cell: the cached/online rule's choice for its head (a runtime field of the
    spec; what determines the features is in its identity already) and the params it records."""
    from orchestrator.cells.dense import dense_cell_plan
    from tasks.protocols import create_protocol

    head = create_protocol(p.cell.protocol, task=p.spec["task"], seed=p.cell.seed, **p.spec["hparams"])
    return dense_cell_plan(cfg, p.cell, ex, head)
