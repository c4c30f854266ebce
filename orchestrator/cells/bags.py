"""A grid cell on feature bags (whole-slide datasets, `abmil`): fit on the train slides' bags,
early-stop on the val slides, score val and test. Plain Python, like `cells.run_cell`.

Bags are stored in fp16 and read one slide at a time while training and scoring
(`extraction.slides.SlideBags`, a lazy mapping; ABMIL accepts a lazy sequence of bags), so a cell's
memory does not grow with the number of slides.

The bag entry holds every slide of the dataset; the cell's spec says which slide is in which split
(`cases`), so folds and seeds reuse one embedding pass. Slides without a bag (they failed to tile or
read; the entry's metadata says why) are left out and listed in `failed_slides.csv`, with the count
as a metric, so a reader sees that the test set is smaller than the official one.

Out-of-domain test sets (config `evaluate_on`, e.g. CAMELYON16 models on CAMELYON17's unseen
centres) are scored by the same fitted model: metrics `<dataset>_test_<metric>`, predictions with
split `<dataset>_test`.

Artifacts beyond the image cells' ones: `attention.parquet` (case_id, split, x, y, attention) for
every val and test slide (`medscale wsi heatmap SLIDE --attention attention.parquet` draws any of
them), and `heatmaps/<slide>.png` for the test slides the model scores highest.
"""

from __future__ import annotations

import io
import json
import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

from orchestrator.cells.spec import EVAL_SPLITS, cell_train_subset, predictions_frame, subset_record
from orchestrator.store.cache import CacheKey, FeatureCache
from orchestrator.store.results import PLACEMENT_FILE, RESULT_FILE, SUBSET_FILE, ResultStore

HEATMAPS = 3  # attention heatmaps drawn per cell: its highest-scoring test slides


class _SplitBags(Sequence):
    """The embeddings of one split's slides, read from the cache when indexed (one slide at a time)."""

    def __init__(self, bags: Mapping[str, tuple[np.ndarray, np.ndarray]], ids: list[str]):
        self.bags, self.ids = bags, ids

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> np.ndarray:  # type: ignore[override]
        return self.bags[self.ids[i]][1]


def _split_bags(cases: pd.DataFrame, bags: Mapping[str, tuple[np.ndarray, np.ndarray]], split: str, n_classes: int):
    sub = cases[(cases["split"] == split) & cases["case_id"].isin(list(bags))]
    ids = sub["case_id"].tolist()
    Y = np.array(sub["target"].tolist(), dtype=np.int64).reshape(len(sub), n_classes)
    return ids, _SplitBags(bags, ids), Y, sub["patient_id"].tolist()


def _score(protocol: Any, cases: pd.DataFrame, bags: dict, split: str, spec: dict[str, Any], label: str):
    """Scores of one split's slides: (metrics, predictions, per-class table, attention rows)."""
    from tasks.metrics import classification_metrics

    C = len(spec["classes"])
    ids, split_bags, Y, patients = _split_bags(cases, bags, split, C)
    scores = protocol.predict_proba(split_bags) if split_bags else np.zeros((0, C))
    agg, table = classification_metrics(Y, scores, spec["task"], spec["classes"])
    attn = []
    for cid in ids:  # one slide read at a time
        xy, bag = bags[cid]
        attn.append(pd.DataFrame({"case_id": cid, "split": label, "x": xy[:, 0], "y": xy[:, 1],
                                  "attention": protocol.attention(bag).astype(np.float32)}))
    return ({f"{label}_{k}": float(v) for k, v in agg.items()},
            predictions_frame(label, ids, patients, Y, scores, spec["classes"]), table, attn)


def _lost(cases: pd.DataFrame, bags: dict, failed: dict[str, str], dataset: str) -> pd.DataFrame:
    lost = cases[~cases["case_id"].isin(list(bags))]
    return pd.DataFrame({"dataset": dataset, "case_id": lost["case_id"], "split": lost["split"], "path": lost["path"],
                         "error": [failed.get(c, "no bag in the cache entry") for c in lost["case_id"]]})


def run_bag_cell(spec: dict[str, Any], results: ResultStore, placement: dict[str, Any] | None) -> dict[str, float]:
    from orchestrator.store.bags import SLIDES
    from tasks.protocols import create_protocol

    t0 = time.perf_counter()
    cache = FeatureCache(spec["cache_root"])
    key = CacheKey(**spec["keys"][SLIDES])
    bags = cache.read_bags(key)
    cases = pd.DataFrame(spec["cases"])
    lost = [_lost(cases, bags, cache.meta(key).get("failed", {}), spec["dataset"])]
    C = len(spec["classes"])
    tr_ids, _, Y_tr, tr_pats = _split_bags(cases, bags, "train", C)
    # The data axis: a nested, stratified, patient-level subset of the train slides (cells.py),
    # still read one slide at a time.
    subset = cell_train_subset(spec, tr_pats, Y_tr)
    tr_bags = _SplitBags(bags, [c for c, k in zip(tr_ids, subset.mask, strict=True) if k])
    Y_tr = Y_tr[subset.mask]
    if not tr_bags:
        raise ValueError(f"{spec['cell_id']}: no train slide has a bag ({len(lost[0])} slide(s) failed)")
    _, va_bags, Y_va, _ = _split_bags(cases, bags, "val", C)
    protocol = create_protocol(spec["protocol"], task=spec["task"], seed=spec["seed"], **spec["hparams"])
    if va_bags:  # early stopping on the cell's own validation slides
        protocol.fit(tr_bags, Y_tr, va_bags, Y_va)
    else:
        protocol.fit(tr_bags, Y_tr)
    fit_s = time.perf_counter() - t0

    metrics: dict[str, float] = {}
    frames, attn, files = [], [], {}
    n_tiles = list(cache.meta(key).get("n_tiles", {}).values()) or [0]  # from the entry's metadata: no bag read
    for split in EVAL_SPLITS:
        m, pred, table, a = _score(protocol, cases, bags, split, spec, split)
        metrics.update(m)
        frames.append(pred)
        attn += a
        files[f"per_class_{split}.csv"] = table.to_csv(index=False).encode()
    for ood in spec.get("ood", []):  # out-of-domain test sets (config evaluate_on), e.g. camelyon17
        d = ood["dataset"]
        okey = CacheKey(**ood["keys"][SLIDES])
        obags, ocases = cache.read_bags(okey), pd.DataFrame(ood["cases"])
        lost.append(_lost(ocases, obags, cache.meta(okey).get("failed", {}), d))
        m, pred, table, a = _score(protocol, ocases, obags, "test", spec, f"{d}_test")
        metrics.update(m)
        metrics[f"{d}_n_test"] = float(len(pred))
        frames.append(pred)
        attn += a
        files[f"per_class_{d}_test.csv"] = table.to_csv(index=False).encode()
    lost_df = pd.concat(lost, ignore_index=True)
    metrics.update(n_train=float(len(tr_bags)), feature_dim=float(protocol.n_features_in_), fit_s=fit_s,
                   n_failed_slides=float(len(lost_df)), tiles_per_slide_median=float(np.median(n_tiles)),
                   best_epoch=float(getattr(protocol, "best_epoch_", -1)), compute_s=time.perf_counter() - t0)

    if spec.get("coords_uri"):
        files.update(_heatmaps(spec, cases, frames[EVAL_SPLITS.index("test")], attn))
    files["predictions.parquet"] = _parquet(pd.concat(frames, ignore_index=True))
    files["attention.parquet"] = _parquet(pd.concat(attn, ignore_index=True) if attn else pd.DataFrame(
        columns=["case_id", "split", "x", "y", "attention"]))
    files[SUBSET_FILE] = subset_record(spec, subset)
    if len(lost_df):
        files["failed_slides.csv"] = lost_df.to_csv(index=False).encode()
    if placement:
        files[PLACEMENT_FILE] = json.dumps({**placement, "t_end": time.time()}, sort_keys=True).encode()
    files[RESULT_FILE] = json.dumps(metrics, indent=1, sort_keys=True).encode()
    results.write(spec["cell_id"], files)
    return metrics


def _heatmaps(spec: dict[str, Any], cases: pd.DataFrame, test_pred: pd.DataFrame,
              attn: list[pd.DataFrame]) -> dict[str, bytes]:
    """PNGs of the HEATMAPS test slides the model scores highest (first class): attention over the
    slide's thumbnail, what a pathologist looks at first. A slide that cannot be drawn (its file
    is not reachable from this node) is named in heatmaps_error.txt; the cell's results stand."""
    import sys

    from orchestrator.store import storage
    from tasks.wsi.heatmap import render_heatmap, slide_attention
    from tasks.wsi.tiling import load_coordinates

    if test_pred.empty or not attn:
        return {}
    score = next(c for c in test_pred.columns if c.startswith("score_"))
    top = test_pred.sort_values(score, ascending=False)["case_id"].head(HEATMAPS).tolist()
    weights = pd.concat(attn, ignore_index=True)
    weights = weights[weights["split"] == "test"]
    paths = cases.set_index("case_id")["path"]
    fs, root = storage.split_uri(spec["coords_uri"])
    out, errors = {}, []
    for cid in top:
        try:
            coords, att = slide_attention(load_coordinates(f"{root}/{cid}.parquet", filesystem=fs), weights, cid)
            buf = io.BytesIO()
            render_heatmap(paths[cid], coords, att).save(buf, format="PNG")
            out[f"heatmaps/{cid}.png"] = buf.getvalue()
        except Exception as e:  # noqa: BLE001 - a drawing, not a result: record why and go on
            errors.append(f"{cid}: {type(e).__name__}: {e}")
            print(f"medscale: {spec['cell_id']}: no heatmap for {cid}: {e}", file=sys.stderr)
    if errors:
        out["heatmaps_error.txt"] = "\n".join(errors).encode()
    return out


def _parquet(df: pd.DataFrame) -> bytes:
    buf = io.BytesIO()
    df.to_parquet(buf, index=False)
    return buf.getvalue()
