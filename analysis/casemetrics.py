"""The classification metrics of `tasks.metrics`, recomputed from per-case predictions for many
bootstrap replicates at once.

Why a second implementation: the bootstrap needs each metric on ~1000 resamplings of the test
set, and calling scikit-learn per replicate is far too slow. A replicate is a row of case counts
(analysis.bootstrap), so every count a metric needs (true/false positives per class, supports)
is one matrix product ``counts @ indicator``; AUC comes from `analysis.bootstrap.auc`.
With all counts equal to one these functions equal `tasks.metrics.classification_metrics`
(tests/test_analysis_pipeline.py checks that, metric by metric and task by task), so a curve's
point estimate is the number the sweep logged.

Inputs follow the protocol contract: targets (N, C) 0/1, scores (N, C) in [0, 1]; binary C == 1,
multilabel multi-hot, multiclass one-hot. Predictions: ``score >= 0.5`` (multiclass: argmax).
"""

from __future__ import annotations

import numpy as np

from analysis.bootstrap import CaseMetric, auc

THRESHOLD = 0.5
_PRF = {"precision", "recall", "f1", "jaccard"}


def _predicted(scores: np.ndarray, task: str) -> np.ndarray:
    if task == "multiclass":
        return np.eye(scores.shape[1], dtype=bool)[np.argmax(scores, axis=1)]
    return scores >= THRESHOLD


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    # zero_division=0, as tasks.metrics asks of scikit-learn
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, num / np.where(den > 0, den, 1.0), 0.0)


def _per_class(kind: str, tp: np.ndarray, fp: np.ndarray, fn: np.ndarray) -> np.ndarray:
    if kind == "precision":
        return _ratio(tp, tp + fp)
    if kind == "recall":
        return _ratio(tp, tp + fn)
    if kind == "f1":
        return _ratio(2 * tp, 2 * tp + fp + fn)
    return _ratio(tp, tp + fp + fn)  # jaccard


def _prf(kind: str, average: str, task: str) -> CaseMetric:
    """Precision / recall / F1 / Jaccard with scikit-learn's averaging rules as tasks.metrics uses them."""
    def metric(scores, targets, counts):
        Y = np.asarray(targets).astype(bool)
        P = _predicted(np.asarray(scores, float), task)
        if task == "binary":
            # classes {negative, positive}; "binary" averaging is the positive class alone
            Y = np.column_stack([~Y[:, 0], Y[:, 0]])
            P = np.column_stack([~P[:, 0], P[:, 0]])
        tp = counts @ (P & Y).astype(float)
        fp = counts @ (P & ~Y).astype(float)
        fn = counts @ (~P & Y).astype(float)
        per = _per_class(kind, tp, fp, fn)
        support = tp + fn
        if average == "binary":
            return per[:, -1]
        if task == "multiclass":
            # label-vector averages run over the classes present in truth or prediction
            present = (support + tp + fp) > 0
        else:
            present = np.ones_like(per, dtype=bool)
        if average == "weighted":
            w = support * present
            return _ratio((per * w).sum(axis=1), w.sum(axis=1))
        return _ratio((per * present).sum(axis=1), present.sum(axis=1).astype(float))
    return metric


def _accuracy(task: str) -> CaseMetric:
    def metric(scores, targets, counts):
        Y = np.asarray(targets).astype(bool)
        P = _predicted(np.asarray(scores, float), task)
        # multilabel: the mean per-class accuracy (1 - Hamming loss); multiclass: top-1
        right = (P == Y).all(axis=1) if task == "multiclass" else (P == Y).mean(axis=1)
        return counts @ right.astype(float) / counts.sum(axis=1)
    return metric


def _auc(scores, targets, counts):
    s, t = np.asarray(scores, float), np.asarray(targets)
    return auc(s[:, 0], t[:, 0], counts) if s.shape[1] == 1 else auc(s, t, counts)


def case_metric(name: str, task: str) -> CaseMetric | None:
    """The replicate-wise metric `name` of tasks.metrics for `task`, or None if it has none here."""
    if name == "auc":
        return _auc
    if name == "acc":
        return _accuracy(task)
    kind, _, average = name.partition("_")
    if kind not in _PRF or average not in ("", "macro", "weighted"):
        return None
    if kind == "jaccard" and not (task == "multiclass" and average == "macro"):
        return None  # tasks.metrics logs jaccard_macro for multiclass tasks only
    if not average:
        # the unqualified name is the positive class for binary tasks, the macro average otherwise
        average = "binary" if task == "binary" else "macro"
    return _prf(kind, average, task)


def case_metrics(names, task: str) -> dict[str, CaseMetric]:
    """Those of `names` that can be recomputed from predictions."""
    out: dict[str, CaseMetric] = {}
    for n in names:
        m = case_metric(str(n), task)
        if m is not None:
            out[str(n)] = m
    return out


# -- dense runs: per-case metric tables (per_case.parquet: case_id, class, dice, iou, ...) ----------
# A dense handler's aggregate is, per class, the mean over cases (NaN: class absent from both masks,
# skipped), then the mean over classes (`mdice`, `miou`, `precision`, `recall`, `<metric>_mean`);
# `<metric>_<class>` is one class's (or group's) mean. `case_mean` recomputes exactly that for
# resampled cases, so a curve's point estimate is the logged value.
_MEANS = {"mdice": "dice", "miou": "iou"}


def is_per_case_table(frame) -> bool:
    """True for a dense run's per-case table (one row per case and class, one column per metric)."""
    return "class" in frame.columns and not any(str(c).startswith("target_") for c in frame.columns)


def _slug(name) -> str:
    import re

    return re.sub(r"[^0-9a-zA-Z]+", "_", str(name)).strip("_").lower()


def case_values(frame, metric: str):
    """Per-case values of a run metric as a (cases x classes) table indexed by case_id, or None."""
    cols = [c for c in frame.columns if c not in ("case_id", "split", "class", "kind")]
    base = _MEANS.get(metric, metric.removesuffix("_mean"))
    rows = frame[frame["kind"] == "class"] if "kind" in frame.columns else frame
    if base not in cols:
        rows = None
        for col in sorted(cols, key=len, reverse=True):
            if metric.startswith(f"{col}_"):
                hit = frame[frame["class"].map(_slug) == metric.removeprefix(f"{col}_")]
                if len(hit):
                    rows, base = hit, col
                    break
        if rows is None:
            return None
    ids = rows["case_id"].astype(str)
    return rows.groupby([ids, rows["class"].astype(str)])[base].mean().unstack("class")


def aligned_case_values(frames, metric: str):
    """(values (N, K) per frame on the cases common to all, None, case ids), or why not."""
    tables = [case_values(f, metric) for f in frames]
    if any(t is None for t in tables):
        return f"no per-case column for {metric!r}"
    common = sorted(set.intersection(*(set(t.index) for t in tables)))
    classes = sorted(set.union(*(set(t.columns) for t in tables)))
    if not common:
        return "the runs share no test case"
    return [t.reindex(index=common, columns=classes).to_numpy(np.float64) for t in tables], None, common


def case_mean(values, targets, counts):
    """Per class the mean over (resampled) cases of its finite values, then the mean over classes
    that have one: the dense handlers' aggregate (module note above)."""
    v = np.asarray(values, float)
    per_class = []
    for k in range(v.shape[1]):
        ok = np.isfinite(v[:, k])
        den = counts[:, ok].sum(axis=1)
        with np.errstate(invalid="ignore", divide="ignore"):
            per_class.append(np.where(den > 0, (counts[:, ok] @ v[ok, k]) / np.where(den > 0, den, 1), np.nan))
    m = np.stack(per_class, axis=1)
    with np.errstate(invalid="ignore"):
        n = np.isfinite(m).sum(axis=1)
        return np.where(n > 0, np.nansum(np.nan_to_num(m, nan=0.0), axis=1) / np.maximum(n, 1), np.nan)
