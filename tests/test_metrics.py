"""Metrics agree with scikit-learn for every task, and undefined AUCs are NaN, never a crash."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from sklearn.metrics import (
    accuracy_score,
    hamming_loss,
    jaccard_score,
    precision_recall_fscore_support,
    roc_auc_score,
)

from tasks.metrics import TABLE_COLUMNS, classification_metrics

REQUIRED = {"auc", "n_auc_classes", "acc", "precision", "recall", "f1", "f1_macro", "f1_weighted",
            "precision_macro", "precision_weighted", "recall_macro", "recall_weighted", "n_cases"}


@pytest.fixture(autouse=True)
def _no_warnings():
    # Warnings from sklearn (undefined metrics, column vectors) would flood sweep logs: none allowed.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        yield


def noisy_scores(Y: np.ndarray, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.clip(0.35 * Y + rng.uniform(0, 0.65, size=Y.shape), 0, 1)


def prfs(y, p, average, labels=None):
    return precision_recall_fscore_support(y, p, average=average, labels=labels, zero_division=0)[:3]


def test_binary_agrees_with_sklearn():
    rng = np.random.default_rng(0)
    Y = rng.integers(0, 2, size=(300, 1))
    S = noisy_scores(Y)
    agg, table = classification_metrics(Y, S, "binary", ["pneumonia"])
    y, s, p = Y[:, 0], S[:, 0], (S[:, 0] >= 0.5).astype(int)
    assert set(agg) == REQUIRED
    assert agg["auc"] == pytest.approx(roc_auc_score(y, s))
    assert agg["acc"] == pytest.approx(accuracy_score(y, p))
    assert (agg["precision"], agg["recall"], agg["f1"]) == pytest.approx(prfs(y, p, "binary"))
    for avg in ("macro", "weighted"):
        expected = prfs(y, p, avg, labels=[0, 1])
        assert (agg[f"precision_{avg}"], agg[f"recall_{avg}"], agg[f"f1_{avg}"]) == pytest.approx(expected)
    assert agg["n_auc_classes"] == 1 and agg["n_cases"] == 300
    assert list(table.columns) == list(TABLE_COLUMNS) and len(table) == 1
    row = table.iloc[0]
    assert row["class"] == "pneumonia" and row["n"] == 300 and row["n_pos"] == row["support"] == y.sum()
    assert row["auc"] == pytest.approx(agg["auc"]) and row["f1"] == pytest.approx(agg["f1"])
    assert row["jaccard"] == pytest.approx(jaccard_score(y, p))
    # The threshold moves predictions, not AUC.
    agg_hi, _ = classification_metrics(Y, S, "binary", ["pneumonia"], threshold=0.8)
    assert agg_hi["auc"] == agg["auc"] and agg_hi["recall"] < agg["recall"]


def test_multilabel_agrees_with_sklearn():
    rng = np.random.default_rng(1)
    Y = (rng.uniform(size=(400, 5)) < np.array([0.05, 0.1, 0.2, 0.4, 0.5])).astype(int)
    S = noisy_scores(Y, seed=1)
    classes = [f"c{j}" for j in range(5)]
    agg, table = classification_metrics(Y, S, "multilabel", classes)
    P = (S >= 0.5).astype(int)
    assert set(agg) == REQUIRED
    assert agg["auc"] == pytest.approx(roc_auc_score(Y, S, average="macro"))
    assert agg["acc"] == pytest.approx(1 - hamming_loss(Y, P))  # mean per-class accuracy
    for avg in ("macro", "weighted"):
        expected = prfs(Y, P, avg)
        assert (agg[f"precision_{avg}"], agg[f"recall_{avg}"], agg[f"f1_{avg}"]) == pytest.approx(expected)
    assert (agg["precision"], agg["recall"], agg["f1"]) == pytest.approx(prfs(Y, P, "macro"))
    assert agg["n_auc_classes"] == 5
    p_c, r_c, f_c = prfs(Y, P, None)
    np.testing.assert_allclose(table["auc"], roc_auc_score(Y, S, average=None))
    np.testing.assert_allclose(table[["precision", "recall", "f1"]].to_numpy().T, [p_c, r_c, f_c])
    np.testing.assert_allclose(table["jaccard"], jaccard_score(Y, P, average=None))
    np.testing.assert_allclose(table["acc"], (Y == P).mean(0))
    assert table["class"].tolist() == classes and (table["n_pos"] == Y.sum(0)).all()


def test_multiclass_agrees_with_sklearn():
    rng = np.random.default_rng(2)
    y = rng.integers(0, 4, size=500)
    Y = np.eye(4, dtype=int)[y]
    logits = 1.5 * Y + rng.normal(size=Y.shape)
    S = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    agg, table = classification_metrics(Y, S, "multiclass", list("abcd"))
    pred = S.argmax(1)
    assert set(agg) == REQUIRED | {"jaccard_macro"}
    assert agg["auc"] == pytest.approx(roc_auc_score(y, S, multi_class="ovr", average="macro"))
    assert agg["acc"] == pytest.approx(accuracy_score(y, pred))
    for avg in ("macro", "weighted"):
        expected = prfs(y, pred, avg)
        assert (agg[f"precision_{avg}"], agg[f"recall_{avg}"], agg[f"f1_{avg}"]) == pytest.approx(expected)
    assert (agg["precision"], agg["recall"], agg["f1"]) == pytest.approx(prfs(y, pred, "macro"))
    assert agg["jaccard_macro"] == pytest.approx(jaccard_score(y, pred, average="macro"))
    p_c, r_c, f_c = prfs(y, pred, None, labels=[0, 1, 2, 3])
    np.testing.assert_allclose(table[["precision", "recall", "f1"]].to_numpy().T, [p_c, r_c, f_c])
    np.testing.assert_allclose(table["jaccard"], jaccard_score(y, pred, average=None))
    np.testing.assert_allclose(table["acc"], [((pred == j) == (y == j)).mean() for j in range(4)])


def test_a_class_without_positives_is_nan_and_left_out():
    rng = np.random.default_rng(3)
    Y = rng.integers(0, 2, size=(200, 4))
    Y[:, 2] = 0  # no positives in this split
    Y[:, 3] = 1  # no negatives either
    S = noisy_scores(Y, seed=3)
    agg, table = classification_metrics(Y, S, "multilabel", ["a", "b", "c", "d"])
    assert np.isnan(table["auc"][2]) and np.isnan(table["auc"][3]) and not table["auc"][:2].isna().any()
    assert agg["n_auc_classes"] == 2
    assert agg["auc"] == pytest.approx(roc_auc_score(Y[:, :2], S[:, :2], average="macro"))
    assert table.loc[2, "n_pos"] == 0 and table.loc[2, "recall"] == 0  # 0/0 -> 0 (zero_division=0)

    # No class has both labels: AUC is NaN, everything else still defined.
    agg, table = classification_metrics(np.zeros((50, 2), int), S[:50, :2], "multilabel", ["a", "b"])
    assert np.isnan(agg["auc"]) and agg["n_auc_classes"] == 0 and table["auc"].isna().all()
    assert np.isfinite(agg["acc"]) and np.isfinite(agg["f1_macro"])
    agg, _ = classification_metrics(np.ones((20, 1), int), S[:20, :1], "binary", ["x"])
    assert np.isnan(agg["auc"]) and agg["recall"] == pytest.approx(((S[:20, 0] >= 0.5)).mean())


def test_multiclass_with_an_absent_class():
    rng = np.random.default_rng(4)
    y = rng.integers(0, 3, size=120)  # class 3 never occurs in this split
    Y = np.eye(4, dtype=int)[y]
    S = rng.dirichlet(np.ones(4), size=120)
    agg, table = classification_metrics(Y, S, "multiclass", list("abcd"))
    assert agg["n_auc_classes"] == 3 and np.isnan(table["auc"][3])
    assert agg["auc"] == pytest.approx(np.mean([roc_auc_score(Y[:, j], S[:, j]) for j in range(3)]))
    assert agg["f1_macro"] == pytest.approx(prfs(y, S.argmax(1), "macro")[2])


def test_empty_split_and_bad_input():
    agg, table = classification_metrics(np.zeros((0, 2), int), np.zeros((0, 2)), "multilabel", ["a", "b"])
    assert set(agg) == REQUIRED and np.isnan(agg["auc"]) and agg["n_cases"] == 0 and len(table) == 2
    Y = np.array([[0], [1]])
    with pytest.raises(ValueError, match="NaN"):
        classification_metrics(Y, np.array([[0.1], [np.nan]]), "binary", ["x"])
    with pytest.raises(ValueError, match=r"\(n, C\)"):
        classification_metrics(Y, np.array([0.1, 0.9]), "binary", ["x"])
    with pytest.raises(ValueError, match="classes"):
        classification_metrics(Y, np.array([[0.1], [0.9]]), "binary", ["x", "y"])
    with pytest.raises(ValueError, match="one-hot"):
        classification_metrics(np.array([[1, 1], [0, 1]]), np.full((2, 2), 0.5), "multiclass", ["a", "b"])
    with pytest.raises(ValueError, match="task"):
        classification_metrics(Y, Y.astype(float), "regression", ["x"])
