"""The `feature` head family: a protocol (linear probe, kNN) fitted on cached pooled features of
the train split and scored on val and test. Plain Python (no Ray, no MLflow)."""

from __future__ import annotations

import io
import json
import time
from typing import Any

import pandas as pd

from orchestrator.cells.spec import EVAL_SPLITS, cell_train_subset, predictions_frame, subset_record
from orchestrator.store.cache import CacheKey, FeatureCache
from orchestrator.store.results import PLACEMENT_FILE, RESULT_FILE, SUBSET_FILE, ResultStore


def run_feature_cell(spec: dict[str, Any], results: ResultStore, placement: dict[str, Any] | None) -> dict[str, float]:
    """Fit the cell's protocol on train, score val and test, write results, return metrics."""
    from tasks.datasets import DATASETS
    from tasks.metrics import classification_metrics
    from tasks.protocols import create_protocol

    cell_id = spec["cell_id"]
    grouped = getattr(DATASETS.get(spec["dataset"]), "grouped_metrics", None)
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
        frames.append(predictions_frame(split, ids, patients, Y, scores, spec["classes"]))
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
