"""One grid cell: a protocol fitted on cached features and scored on val and test.

`run_cell` is plain Python (no Ray, no MLflow): the Tune trainable calls it, and so can a test.
It writes its results atomically to `<output>/cells/<cell_id>/` before returning, so a result
survives a driver that dies before logging it, and `--resume` never recomputes it.
"""

from __future__ import annotations

import json
import shutil
import time
import traceback
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from orchestrator.cache import CacheKey, FeatureCache

RESULT_FILE = "metrics.json"
ERROR_FILE = "error.json"
EVAL_SPLITS = ("val", "test")


@dataclass(frozen=True)
class Cell:
    encoder: str
    resolution: int
    dataset: str
    protocol: str
    seed: int

    @property
    def cell_id(self) -> str:
        return f"{self.dataset}__{self.protocol}__{self.encoder}__{self.resolution}px__s{self.seed}"

    @property
    def extraction(self) -> tuple[str, int, str]:
        return (self.encoder, self.resolution, self.dataset)


def cell_spec(cell: Cell, *, keys: dict[str, CacheKey], cache_root: str, results_dir: str, task: str,
              classes: list[str], hparams: dict[str, Any], size: str) -> dict[str, Any]:
    """Everything a worker needs to run the cell, as plain data (it travels through Tune)."""
    return {**asdict(cell), "cell_id": cell.cell_id, "keys": {s: asdict(k) for s, k in keys.items()},
            "cache_root": cache_root, "results_dir": results_dir, "task": task, "classes": classes,
            "hparams": hparams, "size": size}


def result_dir(results_dir: str, cell_id: str) -> Path:
    return Path(results_dir) / cell_id


def read_result(results_dir: str, cell_id: str) -> dict[str, Any] | None:
    path = result_dir(results_dir, cell_id) / RESULT_FILE
    return json.loads(path.read_text()) if path.exists() else None


def read_error(results_dir: str, cell_id: str) -> str | None:
    path = Path(results_dir) / f".{cell_id}.{ERROR_FILE}"
    return json.loads(path.read_text())["message"] if path.exists() else None


def _predictions(split: str, case_ids: list[str], patients: list[str], Y: np.ndarray, scores: np.ndarray,
                 classes: list[str]) -> pd.DataFrame:
    df = pd.DataFrame({"case_id": case_ids, "split": split, "patient_id": patients})
    for j, c in enumerate(classes):
        df[f"target_{c}"] = Y[:, j].astype(np.int8)
        df[f"score_{c}"] = scores[:, j].astype(np.float32)
    return df


def run_cell(spec: dict[str, Any]) -> dict[str, float]:
    """Fit the cell's protocol on train, score val and test, write results, return metrics."""
    from tasks.metrics import classification_metrics
    from tasks.protocols import create_protocol

    cell_id, out_root = spec["cell_id"], spec["results_dir"]
    error_path = Path(out_root) / f".{cell_id}.{ERROR_FILE}"
    try:
        t0 = time.perf_counter()
        cache = FeatureCache(spec["cache_root"])
        arrays = {s: cache.read_arrays(CacheKey(**spec["keys"][s])) for s in ("train", *EVAL_SPLITS)}
        _, X_tr, Y_tr, _ = arrays["train"]
        if len(X_tr) == 0:
            raise ValueError(f"{cell_id}: the train split is empty")
        protocol = create_protocol(spec["protocol"], task=spec["task"], seed=spec["seed"], **spec["hparams"])
        protocol.fit(X_tr, Y_tr)
        fit_s = time.perf_counter() - t0

        metrics: dict[str, float] = {}
        frames, per_class = [], {}
        for split in EVAL_SPLITS:
            ids, X, Y, patients = arrays[split]
            scores = protocol.predict_proba(X)
            agg, table = classification_metrics(Y, scores, spec["task"], spec["classes"])
            metrics.update({f"{split}_{k}": float(v) for k, v in agg.items()})
            frames.append(_predictions(split, ids, patients, Y, scores, spec["classes"]))
            per_class[split] = table
        metrics.update(n_train=float(len(X_tr)), feature_dim=float(X_tr.shape[1]), fit_s=fit_s,
                       compute_s=time.perf_counter() - t0)

        # Stage everything, then one rename: a result directory is complete or absent.
        final = result_dir(out_root, cell_id)
        stage = Path(out_root) / f".stage-{cell_id}-{uuid.uuid4().hex[:8]}"
        stage.mkdir(parents=True)
        pd.concat(frames, ignore_index=True).to_parquet(stage / "predictions.parquet", index=False)
        for split, table in per_class.items():
            table.to_csv(stage / f"per_class_{split}.csv", index=False)
        (stage / RESULT_FILE).write_text(json.dumps(metrics, indent=1, sort_keys=True))
        if final.exists():
            shutil.rmtree(final)
        stage.rename(final)
        error_path.unlink(missing_ok=True)
        return metrics
    except Exception as e:
        Path(out_root).mkdir(parents=True, exist_ok=True)
        message = f"{type(e).__name__}: {e}"
        error_path.write_text(json.dumps({"message": message, "traceback": traceback.format_exc()}))
        raise
