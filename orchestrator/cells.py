"""One grid cell: a protocol fitted on cached features and scored on val and test.

`run_cell` is plain Python (no Ray, no MLflow): the Tune trainable calls it, and so can a test.
It writes its results to `<sweep storage>/cells/<cell_id>/` before returning, so a result survives
a driver (or a node) that dies before logging it, and `--resume` never recomputes it. Results go
through pyarrow filesystems (`ResultStore`): the driver reads what a trial wrote on any node.
"""

from __future__ import annotations

import io
import json
import time
import traceback
import uuid
from contextlib import AbstractContextManager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from orchestrator import storage
from orchestrator.cache import CacheKey, FeatureCache
from tasks.subsets import TrainSize, train_subset

RESULT_FILE = "metrics.json"  # written last: a result directory without it is not a result
PLACEMENT_FILE = "placement.json"  # where the cell ran (node, resources), when run by Ray
ERROR_FILE = "error.json"
RUNNING_FILE = "running.json"  # .<cell_id>.running.json: where an attempt runs now (or ran, if it died)
IDENTITY_FILE = "identity.json"  # the cell's identity digests (orchestrator.identity), beside its metrics
EVAL_SPLITS = ("val", "test")
# The runner of each head family but `feature` (run here): "module:function", imported when a cell
# of that family runs (a new family adds its runner here).
FAMILY_RUNNERS: dict[str, str] = {
    "bag": "orchestrator.bag_cells:run_bag_cell",
    "dense": "orchestrator.dense_cells:run_dense_cell",
    "training_free": "orchestrator.registration_cells:run_registration_cell",
}


@dataclass(frozen=True)
class Cell:
    """A point of the grid. Its id (`cell_id` in a spec) is `prefix` plus a digest of everything that
    determines its result (orchestrator.identity); `seed_free`: the protocol ignores the seed, so one
    cell stands for every seed of the grid."""

    encoder: str
    resolution: int
    dataset: str
    protocol: str
    seed: int
    # The data axis (tasks/subsets.py): the whole training split unless told otherwise.
    train_fraction: float = 1.0
    train_shots: int | None = None
    seed_free: bool = False

    @property
    def train_size(self) -> TrainSize:
        return TrainSize(self.train_fraction, self.train_shots)

    @property
    def prefix(self) -> str:
        """The readable part of the cell's id; the train size shows only when it is not the whole split."""
        from orchestrator.identity import cell_prefix

        tail = f"__{self.train_size.label}" if not self.train_size.is_full else ""
        return cell_prefix(self.encoder, self.resolution, self.dataset, self.protocol, self.seed, self.seed_free) + tail

    @property
    def cell_id(self) -> str:
        """The readable id, before planning adds its identity digest (the id of a run and a result
        directory is `spec["cell_id"]`, from `cell_spec`)."""
        return self.prefix

    @property
    def extraction(self) -> tuple[str, int, str]:
        return (self.encoder, self.resolution, self.dataset)


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


class ResultStore:
    """Cell result directories under one root (a path or a URI), complete or absent."""

    def __init__(self, root: str, identity: dict[str, str] | None = None):
        """`identity` (a cell spec's): written beside every result as identity.json, so each runner
        stores it without knowing of it."""
        self.root = root
        self.identity = identity
        self.fs, self.base = storage.split_uri(root)
        self.fs.create_dir(self.base, recursive=True)

    def path(self, cell_id: str) -> str:
        return f"{self.base}/{cell_id}"

    def read(self, cell_id: str) -> dict[str, Any] | None:
        return storage.read_json(self.fs, f"{self.path(cell_id)}/{RESULT_FILE}")

    def read_file(self, cell_id: str, name: str) -> Any | None:
        """A JSON file of the cell's result directory, or None."""
        return storage.read_json(self.fs, f"{self.path(cell_id)}/{name}")

    def read_identity(self, cell_id: str) -> dict[str, str]:
        return storage.read_json(self.fs, f"{self.path(cell_id)}/{IDENTITY_FILE}") or {}

    def attempted(self, cell_id: str) -> bool:
        """A result, a running mark or an error of this cell exists (an earlier sweep got to it)."""
        return any(storage.exists(self.fs, p) for p in (f"{self.path(cell_id)}/{RESULT_FILE}",
                                                        f"{self.base}/.{cell_id}.{RUNNING_FILE}",
                                                        f"{self.base}/.{cell_id}.{ERROR_FILE}"))

    def placement(self, cell_id: str) -> dict[str, Any]:
        return storage.read_json(self.fs, f"{self.path(cell_id)}/{PLACEMENT_FILE}") or {}

    def read_error(self, cell_id: str) -> str | None:
        err = storage.read_json(self.fs, f"{self.base}/.{cell_id}.{ERROR_FILE}")
        return err["message"] if err else None

    def write_error(self, cell_id: str, message: str, tb: str) -> None:
        data = json.dumps({"message": message, "traceback": tb}).encode()
        storage.write_bytes(self.fs, f"{self.base}/.{cell_id}.{ERROR_FILE}", data)

    def mark_running(self, cell_id: str, placement: dict[str, Any]) -> None:
        storage.write_bytes(self.fs, f"{self.base}/.{cell_id}.{RUNNING_FILE}",
                            json.dumps(placement, sort_keys=True).encode())

    def running(self) -> dict[str, dict[str, Any]]:
        """Attempts under way, by cell id, with their node (a node that died leaves its marks)."""
        out = {}
        for name in storage.files_under(self.fs, self.base):
            if name.startswith(".") and name.endswith(f".{RUNNING_FILE}"):
                mark = storage.read_json(self.fs, f"{self.base}/{name}")
                if mark is not None:
                    out[name[1:-len(RUNNING_FILE) - 1]] = mark
        return out

    def clear_marks(self, cell_id: str, *kinds: str) -> None:
        for kind in kinds:
            path = f"{self.base}/.{cell_id}.{kind}"
            if storage.exists(self.fs, path):
                self.fs.delete_file(path)

    def delete(self, cell_id: str) -> None:
        storage.delete_dir(self.fs, self.path(cell_id))
        self.clear_marks(cell_id, ERROR_FILE, RUNNING_FILE)

    def write(self, cell_id: str, files: dict[str, bytes | Path]) -> None:
        """Stage every file, metrics last, then publish; an earlier result (a retry after a node
        died between writing and reporting) is replaced. A value may be a local file's path (read
        when staged, one at a time: many prediction files never sit in memory together)."""
        stage = f"{self.base}/.stage-{cell_id}-{uuid.uuid4().hex[:8]}"
        self.fs.create_dir(stage, recursive=True)
        if self.identity and IDENTITY_FILE not in files:
            files = {**files, IDENTITY_FILE: json.dumps(self.identity, indent=1, sort_keys=True).encode()}
        for name in sorted(files, key=lambda n: n == RESULT_FILE):
            data = files[name]
            storage.write_bytes(self.fs, f"{stage}/{name}", data.read_bytes() if isinstance(data, Path) else data)
        final = self.path(cell_id)
        if not storage.publish_dir(self.fs, stage, final, last=RESULT_FILE):
            self.fs.move(final, f"{stage}-old")  # a rename: never a half-deleted result in place
            storage.publish_dir(self.fs, stage, final, last=RESULT_FILE)
            self.fs.delete_dir(f"{stage}-old")
        self.clear_marks(cell_id, ERROR_FILE, RUNNING_FILE)

    def local_dir(self, cell_id: str) -> AbstractContextManager[str]:
        """The result directory as a local path (downloaded from an object store), for MLflow."""
        return storage.local_copy(self.fs, self.path(cell_id))


SUBSET_FILE = "train_subset.json"  # the cell's train size and what its subset holds (run params)


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
