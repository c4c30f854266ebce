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

def is_per_case_table(frame) -> bool:
    """True for a dense run's per-case table (one row per case and class, one column per metric)."""
    return "class" in frame.columns and not any(str(c).startswith("target_") for c in frame.columns)


def case_values(frame, metric: str):
    """Each case's value of a run metric, as a Series by case_id, or None: `dice` or `dice_mean` ->
    the case's mean of column `dice` over its classes; `dice_<class>` -> that class's row."""
    cols = [c for c in frame.columns if c not in ("case_id", "split", "class")]
    base = metric.removesuffix("_mean")
    if base in cols:
        return frame.groupby(frame["case_id"].astype(str))[base].mean()
    for col in sorted(cols, key=len, reverse=True):
        cls = metric.removeprefix(f"{col}_")
        if metric.startswith(f"{col}_") and cls in set(frame["class"].astype(str)):
            sub = frame[frame["class"].astype(str) == cls]
            return sub.groupby(sub["case_id"].astype(str))[col].mean()
    return None


def aligned_case_values(frames, metric: str):
    """(values (N, 1) per frame on the cases common to all, None, case ids), or why not."""
    series = [case_values(f, metric) for f in frames]
    if any(s is None for s in series):
        return f"no per-case column for {metric!r}"
    common = sorted(set.intersection(*(set(s.index) for s in series)))
    if not common:
        return "the runs share no test case"
    return [s.loc[common].to_numpy(np.float64)[:, None] for s in series], None, common


def case_mean(values, targets, counts):
    """The mean over (resampled) cases of per-case values (N, 1); cases without a value (NaN, e.g.
    a class absent from both truth and prediction) are left out of that case's average."""
    v = np.asarray(values, float)[:, 0]
    ok = np.isfinite(v)
    num = counts[:, ok] @ v[ok]
    den = counts[:, ok].sum(axis=1)
    return _ratio(num, den)
