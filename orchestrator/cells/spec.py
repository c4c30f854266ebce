"""A cell's spec: the plain data a worker needs to run one grid cell, and the helpers every head
family's runner shares (train subset, predictions table). The spec names its runner (`runner`, a
head family of `orchestrator.cells.run.RUNNERS`), decided once on the driver by `head_family`.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from typing import Any

import numpy as np
import pandas as pd

from orchestrator.grid.cells import Cell
from orchestrator.store.cache import CacheKey
from tasks.subsets import TrainSize, train_subset

EVAL_SPLITS = ("val", "test")


def cell_spec(cell: Cell, *, keys: dict[str, CacheKey], cache_root: str, results_dir: str, task: str,
              classes: list[str], hparams: dict[str, Any], size: str, config: dict[str, Any] | None = None,
              cases: list[dict[str, Any]] | None = None, ood: list[dict[str, Any]] | None = None,
              coords_uri: str = "", split_scheme: str = "", dense: dict[str, Any] | None = None,
              runner: str = "feature") -> dict[str, Any]:
    """Everything a worker needs to run the cell, as plain data (it travels through Tune), with its
    identity: `cell_id` = readable prefix + digest of every field but the runtime ones
    (orchestrator.grid.identity). `hparams`: resolved (defaults included). `config`: what the sweep
    config says beyond that (identity.config_part). `cases` (slide datasets): every slide with its
    split and target; the cell reads bags. `ood`: out-of-domain test sets, each {dataset, keys,
    cases}; `coords_uri`: the slides' tile coordinates, for the attention heatmaps (see cells.bags).
    `dense`: a dense cell's feature source and the classes its workers import (see
    cells.dense.dense_cell_plan). `runner`: the head family whose runner runs it (`head_family`)."""
    from orchestrator.grid.identity import identify

    spec = {**asdict(cell), "keys": {s: asdict(k) for s, k in keys.items()},
            "cache_root": cache_root, "results_dir": results_dir, "task": task, "classes": classes,
            "hparams": hparams, "config": config or {}, "size": size, "cases": cases or None, "ood": ood or [],
            "coords_uri": coords_uri, "split_scheme": split_scheme, "dense": dense, "runner": runner}
    return identify(spec, cell.prefix)


def head_family(protocol: str, dataset_kind: str) -> str:
    """The runner of a cell: a slide dataset's cells read bags whatever their head; every other
    cell runs its protocol's family (feature, dense, training_free). Decided on the driver, where
    the registries hold what the config named (a worker may not know a test's head by name)."""
    from tasks.protocols import PROTOCOLS

    if dataset_kind == "slide":
        return "bag"
    return PROTOCOLS[protocol].family


def cell_train_subset(spec: dict[str, Any], patients: list[str], Y: np.ndarray):
    """The cell's training subset (tasks/subsets.py), seeded by the cell's seed: nested across
    train sizes of one seed, a different draw per seed."""
    size = TrainSize(float(spec.get("train_fraction", 1.0)), spec.get("train_shots"))
    return train_subset(patients, Y, size, seed=int(spec["seed"]), classes=spec["classes"], task=spec["task"])


def subset_record(spec: dict[str, Any], subset: Any) -> bytes:
    size = TrainSize(float(spec.get("train_fraction", 1.0)), spec.get("train_shots"))
    return json.dumps(subset.params(size), indent=1, sort_keys=True).encode()


def predictions_frame(split: str, case_ids: list[str], patients: list[str], Y: np.ndarray, scores: np.ndarray,
                 classes: list[str]) -> pd.DataFrame:
    df = pd.DataFrame({"case_id": case_ids, "split": split, "patient_id": patients})
    for j, c in enumerate(classes):
        df[f"target_{c}"] = Y[:, j].astype(np.int8)
        df[f"score_{c}"] = scores[:, j].astype(np.float32)
    return df
