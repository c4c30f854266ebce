"""One grid cell: a protocol fitted on cached features and scored on val and test.

`run_cell` is plain Python (no Ray, no MLflow): the Tune trainable calls it, and so can a test.
It writes its results through `orchestrator.results.ResultStore` (one directory per cell) before
returning. The grid point (`Cell`) is orchestrator.grid's; the other head families' runners are
imported by path (`FAMILY_RUNNERS`) when a cell of theirs runs.
"""

from __future__ import annotations

import io
import json
import time
import traceback
from dataclasses import asdict
from typing import Any

import numpy as np
import pandas as pd

from orchestrator.cache import CacheKey, FeatureCache
from orchestrator.grid import Cell
from orchestrator.results import PLACEMENT_FILE, RESULT_FILE, RUNNING_FILE, SUBSET_FILE, ResultStore
from tasks.subsets import TrainSize, train_subset

EVAL_SPLITS = ("val", "test")
# The runner of each head family but `feature` (run here): "module:function", imported when a cell
# of that family runs (a new family adds its runner here).
FAMILY_RUNNERS: dict[str, str] = {
    "bag": "orchestrator.bag_cells:run_bag_cell",
    "dense": "orchestrator.dense_cells:run_dense_cell",
    "training_free": "orchestrator.registration_cells:run_registration_cell",
}


def cell_spec(cell: Cell, *, keys: dict[str, CacheKey], cache_root: str, results_dir: str, task: str,
              classes: list[str], hparams: dict[str, Any], size: str, config: dict[str, Any] | None = None,
              cases: list[dict[str, Any]] | None = None, ood: list[dict[str, Any]] | None = None,
              coords_uri: str = "", split_scheme: str = "", dense: dict[str, Any] | None = None) -> dict[str, Any]:
    """Everything a worker needs to run the cell, as plain data (it travels through Tune), with its
    identity: `cell_id` = readable prefix + digest of every field but the runtime ones
    (orchestrator.identity). `hparams`: resolved (defaults included). `config`: what the sweep
    config says beyond that (identity.config_part). `cases` (slide datasets): every slide with its
    split and target; the cell reads bags. `ood`: out-of-domain test sets, each {dataset, keys,
    cases}; `coords_uri`: the slides' tile coordinates, for the attention heatmaps (see bag_cells).
    `dense`: a dense cell's feature source and the classes its workers import (see
    dense_cells.dense_cell_plan)."""
    from orchestrator.identity import identify

    spec = {**asdict(cell), "keys": {s: asdict(k) for s, k in keys.items()},
            "cache_root": cache_root, "results_dir": results_dir, "task": task, "classes": classes,
            "hparams": hparams, "config": config or {}, "size": size, "cases": cases or None, "ood": ood or [],
            "coords_uri": coords_uri, "split_scheme": split_scheme, "dense": dense}
    return identify(spec, cell.prefix)


def cell_train_subset(spec: dict[str, Any], patients: list[str], Y: np.ndarray):
    """The cell's training subset (tasks/subsets.py), seeded by the cell's seed: nested across
    train sizes of one seed, a different draw per seed."""
    size = TrainSize(float(spec.get("train_fraction", 1.0)), spec.get("train_shots"))
    return train_subset(patients, Y, size, seed=int(spec["seed"]), classes=spec["classes"], task=spec["task"])


def subset_record(spec: dict[str, Any], subset: Any) -> bytes:
    size = TrainSize(float(spec.get("train_fraction", 1.0)), spec.get("train_shots"))
    return json.dumps(subset.params(size), indent=1, sort_keys=True).encode()


def _predictions(split: str, case_ids: list[str], patients: list[str], Y: np.ndarray, scores: np.ndarray,
                 classes: list[str]) -> pd.DataFrame:
    df = pd.DataFrame({"case_id": case_ids, "split": split, "patient_id": patients})
    for j, c in enumerate(classes):
        df[f"target_{c}"] = Y[:, j].astype(np.int8)
        df[f"score_{c}"] = scores[:, j].astype(np.float32)
    return df


def _family_runner(spec: dict[str, Any]) -> Any:
    """The runner of the cell's head family; None for `feature` heads (run_cell itself)."""
    import importlib

    if spec.get("family"):  # set by the driver's spec (registration cells)
        family = spec["family"]
    elif spec.get("dense"):  # dense maps: the family the driver saw (its head may be known by path only)
        family = spec["dense"].get("family", "dense")
    elif spec.get("cases") is not None:
        family = "bag"  # a slide dataset: bags, not one row per case
    else:
        from tasks.protocols import PROTOCOLS

        family = getattr(PROTOCOLS.get(spec["protocol"]), "family", "feature")
    if family == "feature":
        return None
    target = FAMILY_RUNNERS.get(family)
    if not target:
        raise NotImplementedError(f"{spec['cell_id']}: no cell runner for head family {family!r} yet "
                                  "(orchestrator.cells.FAMILY_RUNNERS)")
    module, _, fn = target.partition(":")
    return getattr(importlib.import_module(module), fn)


def run_cell(spec: dict[str, Any], placement: dict[str, Any] | None = None) -> dict[str, float]:
    """Fit the cell's protocol on train, score val and test, write results, return metrics.
    `placement` (node, resources) is saved beside the results, so a resumed driver can log it."""
    from tasks.datasets import DATASETS
    from tasks.metrics import classification_metrics
    from tasks.protocols import create_protocol

    if spec.get("members"):  # several cells in one trial (3D segmentation: seeds sharing encoded crops)
        from orchestrator.seg3d_cells import run_group_spec

        return run_group_spec(spec, placement)
    cell_id = spec["cell_id"]
    grouped = getattr(DATASETS.get(spec["dataset"]), "grouped_metrics", None)
    results = ResultStore(spec["results_dir"], identity={**spec.get("identity", {}), "cell_id": cell_id})
    if placement:
        results.mark_running(cell_id, placement)
    try:
        runner = _family_runner(spec)
        if runner is not None:  # bags, dense maps, registration: their own runners
            return runner(spec, results, placement)
        t0 = time.perf_counter()
        cache = FeatureCache(spec["cache_root"])
        arrays = {s: cache.read_arrays(CacheKey(**spec["keys"][s])) for s in ("train", *EVAL_SPLITS)}
        _, X_tr, Y_tr, pat_tr = arrays["train"]
        if len(X_tr) == 0:
            raise ValueError(f"{cell_id}: the train split is empty")
        # The data axis: a nested, stratified, patient-level subset of train (val and test whole).
        subset = cell_train_subset(spec, pat_tr, Y_tr)
        X_tr, Y_tr = X_tr[subset.mask], Y_tr[subset.mask]
        protocol = create_protocol(spec["protocol"], task=spec["task"], seed=spec["seed"], **spec["hparams"])
        protocol.fit(X_tr, Y_tr)
        fit_s = time.perf_counter() - t0

        metrics: dict[str, float] = {}
        frames, files = [], {}
        for split in EVAL_SPLITS:
            ids, X, Y, patients = arrays[split]
            scores = protocol.predict_proba(X)
            agg, table = classification_metrics(Y, scores, spec["task"], spec["classes"])
            metrics.update({f"{split}_{k}": float(v) for k, v in agg.items()})
            if grouped is not None:  # e.g. AutoLaparo: metrics per video, then averaged
                metrics.update({f"{split}_{k}": v for k, v in grouped(Y, scores, patients).items()})
            frames.append(_predictions(split, ids, patients, Y, scores, spec["classes"]))
            files[f"per_class_{split}.csv"] = table.to_csv(index=False).encode()
        # Cases that failed to decode (left out of the features, named in the cache entries).
        lost = [(s, c, e) for s in ("train", *EVAL_SPLITS)
                for c, e in cache.meta(CacheKey(**spec["keys"][s])).get("failed", {}).items()]
        if lost:
            files["failed_cases.csv"] = pd.DataFrame(lost, columns=["split", "case_id", "error"]).to_csv(
                index=False).encode()
        metrics.update(n_train=float(len(X_tr)), feature_dim=float(X_tr.shape[1]), fit_s=fit_s,
                       n_failed_cases=float(len(lost)), compute_s=time.perf_counter() - t0)
        files[SUBSET_FILE] = subset_record(spec, subset)

        buf = io.BytesIO()
        pd.concat(frames, ignore_index=True).to_parquet(buf, index=False)
        files["predictions.parquet"] = buf.getvalue()
        if placement:
            files[PLACEMENT_FILE] = json.dumps({**placement, "t_end": time.time()}, sort_keys=True).encode()
        files[RESULT_FILE] = json.dumps(metrics, indent=1, sort_keys=True).encode()
        results.write(cell_id, files)
        return metrics
    except Exception as e:
        results.write_error(cell_id, f"{type(e).__name__}: {e}", traceback.format_exc())
        results.clear_marks(cell_id, RUNNING_FILE)
        raise
