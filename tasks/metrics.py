"""Classification metrics of the paper (section 3.4), defined once for every task.

Paper: "AUC, accuracy, precision, recall, and F1-score. For multi-label tasks ... averaged across
classes. For endoscopic datasets, we additionally report the Jaccard index (for surgical phase
recognition) as well as both macro-averaged and weighted-averaged precision, recall, and F1".

`classification_metrics(Y, scores, task, classes, threshold=0.5)` returns (aggregate dict, per-class
table). Inputs follow the protocol contract: Y int (n, C) 0/1 (binary C=1, multilabel multi-hot,
multiclass one-hot), scores (n, C) in [0, 1].

Definitions (all threshold-free except where a prediction is needed):

- binary: predictions `score >= threshold`. `auc` ROC AUC; `acc` accuracy; `precision`, `recall`,
  `f1` of the POSITIVE class; `*_macro` / `*_weighted` over the two classes {negative, positive}
  (scikit-learn's averages with labels [0, 1]).
- multilabel: each class is its own binary problem at `threshold`. `auc` = mean of the per-class
  AUCs that are defined (`n_auc_classes` says how many); `acc` = mean per-class accuracy
  (= 1 - Hamming loss; subset accuracy, all 14 labels right at once, is near 0 and says little);
  `precision`/`recall`/`f1` = the macro averages; `*_weighted` weight classes by their positives.
  Like scikit-learn on indicator matrices, every class counts in the P/R/F1 averages, a class with
  no positives and no predicted positives scoring 0 (zero_division=0).
- multiclass: predictions = argmax of the scores (threshold unused). `acc` = top-1 accuracy;
  `auc` = one-vs-rest macro AUC over the classes whose AUC is defined (equal to scikit-learn's
  `roc_auc_score(multi_class="ovr")` when every class is present); `precision`/`recall`/`f1` =
  macro; `jaccard_macro` too (the paper's surgical-phase metric). As scikit-learn does for label
  vectors, the P/R/F1/Jaccard averages run over the classes present in truth or prediction.

AUC is undefined for a class whose labels hold one value only: it is NaN in the table, left out of
the mean, and the mean is NaN when no class has one. Nothing here warns or raises on that.

Per-class table (one row per class; binary: the positive class): class, n, n_pos, support (= n_pos),
auc, acc, precision, recall, f1, jaccard. Multiclass rows are one-vs-rest.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
from sklearn.metrics import jaccard_score, precision_recall_fscore_support, roc_auc_score

TASKS = ("binary", "multilabel", "multiclass")
TABLE_COLUMNS = ("class", "n", "n_pos", "support", "auc", "acc", "precision", "recall", "f1", "jaccard")


def classification_metrics(Y: np.ndarray, scores: np.ndarray, task: str, classes: Sequence[str],
                           threshold: float = 0.5) -> tuple[dict[str, float], pd.DataFrame]:
    """Aggregate metrics (floats) and a per-class table. See the module docstring for definitions."""
    Y, scores = _check(Y, scores, task, classes)
    n, C = Y.shape
    if n == 0:
        return _empty(task, classes)

    aucs = np.array([_auc(Y[:, j], scores[:, j]) for j in range(C)])
    defined = ~np.isnan(aucs)
    auc = float(aucs[defined].mean()) if defined.any() else float("nan")

    if task == "multiclass":
        y, pred = Y.argmax(axis=1), scores.argmax(axis=1)
        P = np.eye(C, dtype=int)[pred]  # one-hot predictions, for the per-class (one-vs-rest) table
        avg_true, avg_pred, avg_labels = y, pred, None  # sklearn's label-vector averages
    else:
        P = (scores >= threshold).astype(int)
        if task == "binary":
            avg_true, avg_pred, avg_labels = Y[:, 0], P[:, 0], [0, 1]
        elif C == 1:
            avg_true, avg_pred, avg_labels = Y[:, 0], P[:, 0], [1]
        else:
            avg_true, avg_pred, avg_labels = Y, P, None

    def averaged(average: str) -> tuple[float, float, float]:
        p, r, f, _ = precision_recall_fscore_support(avg_true, avg_pred, labels=avg_labels, average=average,
                                                     zero_division=0)
        return float(p), float(r), float(f)

    p_mac, r_mac, f_mac = averaged("macro")
    p_w, r_w, f_w = averaged("weighted")
    # Per class, each column of Y against the same column of P: binary and multilabel directly,
    # multiclass one-vs-rest. labels= keeps classes absent from this split as rows.
    # One column (binary, or a 1-class multilabel set) goes as 1-D vectors with the positive label:
    # sklearn reads an (n, 1) matrix as a column vector, not as an indicator matrix.
    per_class = (Y[:, 0], P[:, 0], [1]) if C == 1 else (Y, P, list(range(C)))
    p_c, r_c, f_c, _ = precision_recall_fscore_support(*per_class[:2], labels=per_class[2], average=None,
                                                       zero_division=0)
    j_c = jaccard_score(*per_class[:2], labels=per_class[2], average=None, zero_division=0)
    acc_c = (Y == P).mean(axis=0)

    if task == "binary":
        precision, recall, f1 = float(p_c[0]), float(r_c[0]), float(f_c[0])
        acc = float(acc_c[0])
    elif task == "multilabel":
        precision, recall, f1 = p_mac, r_mac, f_mac
        acc = float(acc_c.mean())
    else:
        precision, recall, f1 = p_mac, r_mac, f_mac
        acc = float((y == pred).mean())

    agg = {
        "auc": auc, "n_auc_classes": float(defined.sum()), "acc": acc,
        "precision": precision, "recall": recall, "f1": f1,
        "precision_macro": p_mac, "precision_weighted": p_w,
        "recall_macro": r_mac, "recall_weighted": r_w,
        "f1_macro": f_mac, "f1_weighted": f_w,
        "n_cases": float(n),
    }
    if task == "multiclass":
        agg["jaccard_macro"] = float(jaccard_score(y, pred, average="macro", zero_division=0))

    n_pos = Y.sum(axis=0)
    table = pd.DataFrame({
        "class": list(classes), "n": n, "n_pos": n_pos, "support": n_pos, "auc": aucs, "acc": acc_c,
        "precision": p_c, "recall": r_c, "f1": f_c, "jaccard": j_c,
    }, columns=list(TABLE_COLUMNS))
    return agg, table


def _auc(y: np.ndarray, s: np.ndarray) -> float:
    """ROC AUC, NaN when y holds one value only (checked first: sklearn would warn or raise)."""
    if y.min() == y.max():
        return float("nan")
    return float(roc_auc_score(y, s))


def _check(Y: np.ndarray, scores: np.ndarray, task: str, classes: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    if task not in TASKS:
        raise ValueError(f"task must be one of {', '.join(TASKS)}, got {task!r}")
    Y, scores = np.asarray(Y), np.asarray(scores, dtype=np.float64)
    if Y.ndim != 2 or scores.shape != Y.shape:
        raise ValueError(f"Y and scores must both be (n, C), got {Y.shape} and {scores.shape}")
    if Y.shape[1] != len(classes):
        raise ValueError(f"Y has {Y.shape[1]} columns but {len(classes)} classes were named")
    if task == "binary" and Y.shape[1] != 1:
        raise ValueError(f"binary task needs Y of shape (n, 1), got {Y.shape}")
    if not np.isin(Y, (0, 1)).all():
        raise ValueError("Y must hold only 0 and 1")
    if task == "multiclass" and len(Y) and not (Y.sum(axis=1) == 1).all():
        raise ValueError("multiclass Y must be one-hot (exactly one 1 per row)")
    if not np.isfinite(scores).all():
        # A diverged head: fail the cell loudly rather than record metrics of garbage.
        raise ValueError("scores contain NaN or infinite values")
    return Y.astype(int), scores


def _empty(task: str, classes: Sequence[str]) -> tuple[dict[str, float], pd.DataFrame]:
    """An empty split: every metric NaN (undefined), counts 0."""
    nan = float("nan")
    keys = ["auc", "acc", "precision", "recall", "f1", "precision_macro", "precision_weighted",
            "recall_macro", "recall_weighted", "f1_macro", "f1_weighted"]
    agg = {k: nan for k in keys} | {"n_auc_classes": 0.0, "n_cases": 0.0}
    if task == "multiclass":
        agg["jaccard_macro"] = nan
    table = pd.DataFrame({"class": list(classes), "n": 0, "n_pos": 0, "support": 0}, columns=list(TABLE_COLUMNS))
    return agg, table
