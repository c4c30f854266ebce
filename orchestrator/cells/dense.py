"""A grid cell of a dense head (family `dense`: segmentation decoders, EM heads): fit on the cell's
train cases, early-stop on its val cases, predict every val and test case, score each one with the
dataset's target handler. Plain Python (no Ray, no MLflow), like `cells.run_cell`, which
dispatches here by the protocol's family.

The feature source is the one the rule chose for the cell's extraction (`dense_cell_plan`, on the
driver; recorded as params `feature_source` and `feature_source_reason`): `CachedFeatures`
(memory-mapped fp16 maps, one file per case) or `tasks.features.OnlineFeatures` (the frozen encoder
built here, beside the head; the cell then asks Ray for `resources.online_encoder_gpus` more of a
GPU). Online cells do not share encoded batches with other cells: each encodes what it reads
(except seg3d_decoder's seed groups, orchestrator/cells/seg3d.py).

Results (`<sweep>/cells/<cell_id>/`, logged to MLflow as the run's artifacts):
- `metrics.json`: `val_*` / `test_*` from `handler.aggregate`, counts, timings, `n_failed_cases`;
- `per_case.parquet`: case_id, split, class, one column per metric (what `medscale analyze`
  bootstraps over cases);
- `predictions/...`: each test case's prediction as the handler writes it (PNG at the image's
  size, NIfTI on the source affine, ...); `figures/...`: the handler's figures of the best and
  worst test cases (by the case's mean of its first metric);
- `failed_cases.csv` (split, case_id, error): cases that could not be read, left out.
"""

from __future__ import annotations

import heapq
import io
import json
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from orchestrator.cells.spec import subset_record
from orchestrator.extraction.dense import (
    DenseExtractResult,
    class_path,
    head_augments,
    head_layers,
    layers_key,
    load_class,
    open_dataset,
    source_for,
)
from orchestrator.store.cache import CacheKey, FeatureCache
from orchestrator.store.dense_maps import CachedFeatures
from orchestrator.store.results import PLACEMENT_FILE, RESULT_FILE, SUBSET_FILE, ResultStore

FIGURE_CASES = 2  # best and worst test cases drawn per cell
SPLITS = ("train", "val", "test")


def dense_cell_plan(cfg: Any, cell: Any, ex: DenseExtractResult, head: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """(the spec's `dense` entry, the run's params) of a dense cell: which source the rule chose
    for its head's layers and augmentation, and why. Runs on the driver."""
    from tasks.encoders import create_encoder
    from tasks.targets import TARGET_HANDLERS

    enc = create_encoder(cell.encoder, weights="random", device="meta")
    layers = head_layers(head)
    lk = layers_key(enc, layers)
    choice = source_for(ex, lk, head_augments(head), cfg.resources.dense_cache_max_gb)
    key = ex.dense_keys.get(lk) if choice.kind == "cached" else None
    dataset = open_dataset(ex.dataset_ref)
    handler = TARGET_HANDLERS.get(dataset.target_kind)
    _, scheme = dataset.cell_splits(cell.seed)
    dense = {"source": choice.kind, "reason": choice.reason, "planned_bytes": choice.planned_bytes,
             "key": asdict(key) if key is not None else None, "layers": lk, "dataset": ex.dataset_ref,
             "protocol_cls": class_path(head), "family": head.family, "handler_cls": class_path(handler) if handler is not None else "",
             "target_kind": dataset.target_kind, "weights": cfg.weights_of(cell.encoder), "expected_digest": ex.weights_digest,
             "precision": ex.precision}
    params = {"feature_kind": "dense", "pooling": "none (dense maps)", "feature_source": choice.kind,
              "feature_source_reason": choice.reason, "feature_layers": lk or "last",
              "feature_planned_gb": round(choice.planned_bytes / 1e9, 4), "feature_precision": dense["precision"],
              "dense_cache_max_gb": cfg.resources.dense_cache_max_gb, "split_scheme": scheme,
              "target_kind": dataset.target_kind}
    if key is not None:
        params["cache_key_dense"] = CacheKey(**dense["key"]).digest
    return dense, params


def _probe(dataset: Any, ids: list[str]) -> dict[str, str]:
    """Online cells: read every case once before training, so a case that cannot be read fails
    alone (as it does at extraction for cached cells) instead of stopping the head mid-epoch."""
    from tasks.datasets.dense_base import check_sample

    failed = {}
    for cid in ids:
        try:
            check_sample(dataset.read_sample(cid), dataset.target_kind)
        except Exception as e:  # noqa: BLE001 - named and left out
            failed[cid] = str(e)
    return failed


def build_source(spec: dict[str, Any], dataset: Any, splits: dict[str, str]) -> tuple[Any, dict[str, str]]:
    """(FeatureSource, {case_id: error} of the cases it cannot serve) for the cell."""
    d = spec["dense"]
    if d["source"] == "cached":
        source = CachedFeatures(FeatureCache(spec["cache_root"]), CacheKey(**d["key"]), dataset, splits)
        failed = {c: source.failed.get(c, "no cached features (not in the dataset when the entry was made)")
                  for c in splits if c not in source.files}
        return source, failed
    from orchestrator.extraction.weights import check_planned
    from tasks.encoders import create_encoder
    from tasks.features import OnlineFeatures

    # The encoder runs in the planned precision (the extraction's, which is in the cell's keys), so
    # an online cell and a cached one of the same plan compute the same kind of numbers.
    encoder = check_planned(create_encoder(spec["encoder"], weights=d["weights"]), d["expected_digest"],
                            d.get("precision"))
    layers = [int(i) for i in d["layers"].split(",")] if d["layers"] else None
    # Keep encoded cases between epochs while they fit in ~2 GB (float32); beyond, re-encode.
    per_case = max(1, d["planned_bytes"] * 2 // max(1, len(splits)))
    source = OnlineFeatures(encoder, dataset, spec["resolution"], layers, keep=int(min(len(splits), 2e9 // per_case)))
    return source, _probe(dataset, list(splits))


def _train_subset(spec: dict[str, Any], dataset: Any, train_ids: list[str]) -> Any:
    """The cell's nested, stratified, patient-level subset of its train cases (cells.py's rule for
    every family), stratified on each case's class presence (the dense index's `target`)."""
    from tasks.subsets import TrainSize, train_subset

    idx = dataset.index()
    idx = idx.set_index(idx["case_id"].astype(str))
    Y = np.array([list(idx.at[c, "target"]) for c in train_ids], dtype=np.int64).reshape(len(train_ids), -1)
    size = TrainSize(float(spec.get("train_fraction", 1.0)), spec.get("train_shots"))
    classes = list(dataset.classes) if len(dataset.classes) == Y.shape[1] else None
    return train_subset([str(idx.at[c, "patient_id"]) for c in train_ids], Y, size, seed=int(spec["seed"]),
                        classes=classes, task="multilabel")


def _create_head(spec: dict[str, Any], task: str) -> Any:
    cls = load_class(spec["dense"]["protocol_cls"])
    cls.check_param_names(list(spec["hparams"]))
    return cls(**{**spec["hparams"], "task": task, "seed": spec["seed"]}).validate()


def _case_score(rows: list[dict[str, Any]]) -> float:
    """One number per case to rank best and worst: the mean of its first metric over classes."""
    df = pd.DataFrame(rows)
    cols = [c for c in df.columns if c not in ("case_id", "split", "class") and pd.api.types.is_numeric_dtype(df[c])]
    pick = next((c for c in ("dice", "iou") if c in cols), cols[0] if cols else None)
    return float(df[pick].mean()) if pick is not None and df[pick].notna().any() else float("nan")


def run_dense_cell(spec: dict[str, Any], results: ResultStore, placement: dict[str, Any] | None) -> dict[str, float]:
    t0 = time.perf_counter()
    d = spec["dense"]
    if not d["handler_cls"]:
        raise ValueError(f"{spec['cell_id']}: no target handler is registered for {d['target_kind']} targets "
                         "(tasks.targets.register_target_handler)")
    dataset = open_dataset(d["dataset"])
    splits, scheme = dataset.cell_splits(spec["seed"])
    source, failed = build_source(spec, dataset, splits)
    ids = {s: [c for c, sp in splits.items() if sp == s and c not in failed] for s in SPLITS}
    if not ids["train"]:
        raise ValueError(f"{spec['cell_id']}: no train case can be read ({len(failed)} failed; first: "
                         f"{next(iter(failed.values()), 'none')})")
    subset = _train_subset(spec, dataset, ids["train"])  # the data axis (tasks/subsets.py)
    ids["train"] = [c for c, k in zip(ids["train"], subset.mask, strict=True) if k]
    head = _create_head(spec, dataset.task)
    head.fit(source, ids["train"], ids["val"])
    fit_s = time.perf_counter() - t0

    handler = load_class(d["handler_cls"])()
    classes = list(dataset.classes)
    files: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="medscale-dense-") as tmp:
        rows, best, worst = _score_cases(head, source, handler, classes, ids, Path(tmp), files)
        chosen = sorted({id(x[2]): x[2] for x in best + worst}.values(), key=lambda c: -c[2])
        for rel, data in handler.figures(chosen).items():
            files[_under("figures", rel)] = data

        per_case = pd.DataFrame(rows)
        front = [c for c in ("case_id", "split", "class") if c in per_case.columns]
        per_case = per_case[front + [c for c in per_case.columns if c not in front]]
        metrics: dict[str, float] = {}
        for split in ("val", "test"):
            sub = per_case[per_case["split"] == split] if len(per_case) else per_case
            if len(sub):
                metrics.update({f"{split}_{k}": float(v) for k, v in handler.aggregate(sub, classes).items()})
        lost = [(splits.get(c, ""), c, e) for c, e in sorted(failed.items())]
        if lost:
            files["failed_cases.csv"] = pd.DataFrame(lost, columns=["split", "case_id", "error"]).to_csv(
                index=False).encode()
        metrics.update(n_train=float(len(ids["train"])), n_val=float(len(ids["val"])), n_test=float(len(ids["test"])),
                       feature_channels=float(source.channels), n_failed_cases=float(len(lost)), fit_s=fit_s,
                       best_epoch=float(getattr(head, "best_epoch_", -1)), compute_s=time.perf_counter() - t0)
        if callable(getattr(head, "summary", None)):  # what training did (steps, best step, ...)
            metrics.update({f"head_{k}": float(v) for k, v in head.summary().items()})
        buf = io.BytesIO()
        per_case.to_parquet(buf, index=False)
        files["per_case.parquet"] = buf.getvalue()
        files[SUBSET_FILE] = subset_record(spec, subset)
        files["feature_source.json"] = json.dumps({k: d[k] for k in ("source", "reason", "planned_bytes", "layers",
                                                                     "precision")} | {"split_scheme": scheme},
                                                  indent=1).encode()
        if placement:
            files[PLACEMENT_FILE] = json.dumps({**placement, "t_end": time.time()}, sort_keys=True).encode()
        files[RESULT_FILE] = json.dumps(metrics, indent=1, sort_keys=True).encode()
        results.write(spec["cell_id"], files)
    return metrics


def _under(folder: str, rel: str) -> str:
    return rel if rel.startswith(f"{folder}/") else f"{folder}/{rel}"


def _keep(heap: list, entry: tuple[float, int, Any]) -> None:
    """Keep the FIGURE_CASES largest entries (by their first element) in a min-heap."""
    if len(heap) < FIGURE_CASES:
        heapq.heappush(heap, entry)
    elif entry[0] > heap[0][0]:
        heapq.heapreplace(heap, entry)


def _score_cases(head: Any, source: Any, handler: Any, classes: list[str], ids: dict[str, list[str]], tmp: Path,
                 files: dict[str, Any]) -> tuple[list[dict[str, Any]], list, list]:
    """Predict every val and test case: per-case metric rows, the test predictions as files under
    `tmp` (added to `files`), and heaps of the best and worst test cases for the figures."""
    rows: list[dict[str, Any]] = []
    best: list[tuple[float, int, Any]] = []  # min-heaps of (score, tie, (sample, pred, score))
    worst: list[tuple[float, int, Any]] = []
    for split in ("val", "test"):
        for i, cid in enumerate(ids[split]):
            pred = head.predict(source, cid)
            sample = source.sample(cid)
            case_rows = [{**r, "case_id": cid, "split": split} for r in handler.case_metrics(sample, pred, classes)]
            rows += case_rows
            if split != "test":
                continue
            # Predictions go to local files now, read one at a time when the result is
            # published: memory does not grow with the number of test cases.
            for rel, data in handler.prediction_files(sample, pred).items():
                rel = _under("predictions", rel)  # a handler may name the directory itself (mask3d does)
                path = tmp / rel
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(data)
                files[rel] = path
            score = _case_score(case_rows)
            if np.isfinite(score):
                item = (sample, pred, score)
                _keep(best, (score, i, item))
                _keep(worst, (-score, i, item))
    return rows, best, worst
