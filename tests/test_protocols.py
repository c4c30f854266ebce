"""Protocols: one scikit-learn-style contract for every registered protocol and task, then the
specifics of kNN (exact reference, limits) and the linear probe (parity with scikit-learn)."""

from __future__ import annotations

import math
import pickle
from pathlib import Path

import numpy as np
import pytest
from sklearn.base import clone
from sklearn.exceptions import NotFittedError
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score

import tasks.protocols.knn as knn_module
from tasks.errors import ConfigError
from tasks.protocols import ABMIL, KNN, PROTOCOLS, LinearProbe, create_protocol, list_protocols

# Small, fast settings per protocol for the contract test (defaults are the paper's).
FAST = {"linear_probe": {"epochs": 100, "batch_size": 64}, "knn": {"k": 10},
        "abmil": {"epochs": 8, "batch_size": 8, "embed_dim": 16, "attn_dim": 16}}
BAD_VALUES = {
    "linear_probe": [("lr", -0.1), ("lr", "5e-3"), ("epochs", 0), ("epochs", 2.5), ("batch_size", True),
                     ("optimizer", "lbfgs"), ("weight_decay", -1.0), ("standardize", "yes")],
    "knn": [("k", 0), ("k", 3.0), ("temperature", 0.0), ("temperature", float("nan"))],
    "abmil": [("lr", 0.0), ("epochs", 0), ("patience", 1.5), ("dropout", 1.0), ("val_fraction", 1.0),
              ("embed_dim", True)],
    "em_affinity": [("lr", 0.0), ("epochs", 0), ("thresholds", [0.5, 1.5]), ("select_by", "rand"),
                    ("hidden", -1)],
}
# The contract test fits (X, Y) arrays: feature and bag heads. Dense heads have their own tests
# (test_em, ...); the hyperparameter checks below cover every protocol listed in BAD_VALUES.
CASES = [(name, task) for name in list_protocols() if PROTOCOLS[name].family in ("feature", "bag")
         for task in sorted(PROTOCOLS[name].supports)]
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def separable(task: str, n: int = 240, D: int = 16, C: int = 3, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Features with a wide margin: each class (or label) pushes its own dimension to +-3."""
    rng = np.random.default_rng(seed)
    if task == "binary":
        Y = rng.integers(0, 2, size=(n, 1))
    elif task == "multilabel":
        Y = rng.integers(0, 2, size=(n, C))
    else:
        Y = np.eye(C, dtype=int)[rng.integers(0, C, size=n)]
    X = rng.normal(scale=0.5, size=(n, D))
    X[:, :Y.shape[1]] += 3.0 * (2 * Y - 1)  # every label pattern its own direction (cosine too)
    return X.astype(np.float32), Y.astype(np.int64)


def as_input(cls: type, X: np.ndarray) -> np.ndarray | list[np.ndarray]:
    """Bag protocols (family "bag") get each row as a bag of 3 noisy copies of it."""
    if cls.family != "bag":
        return X
    rng = np.random.default_rng(7)
    return [np.repeat(x[None], 3, 0) + rng.normal(scale=0.1, size=(3, len(x))).astype(np.float32) for x in X]


def trailing_underscore(obj: object) -> set[str]:
    return {a for a in vars(obj) if a.endswith("_") and not a.startswith("__")}


# -- the contract ----------------------------------------------------------------------------------
@pytest.mark.parametrize("name, task", CASES, ids=[f"{n}-{t}" for n, t in CASES])
def test_protocol_contract(name, task):
    cls = PROTOCOLS[name]
    params = {**FAST[name], "task": task, "seed": 3}
    p = create_protocol(name, **params)

    # The constructor only stores: params round-trip, clone works, nothing fitted yet.
    assert {k: p.get_params()[k] for k in params} == params
    assert clone(p).get_params() == p.get_params() == cls(**params).get_params()
    assert trailing_underscore(p) == set()
    assert repr(p).startswith(cls.__name__)

    X, Y = separable(task)
    X_test, Y_test = separable(task, seed=1)
    X, X_test = as_input(cls, X), as_input(cls, X_test)
    with pytest.raises(NotFittedError, match="not fitted yet: call fit"):
        p.predict_proba(X_test)

    before = set(vars(p))
    assert p.fit(X, Y) is p
    new = set(vars(p)) - before
    assert new and all(a.endswith("_") for a in new)
    assert p.get_params() == clone(p).get_params()  # fitting changed no hyperparameter

    S = p.predict_proba(X_test)
    assert S.shape == Y_test.shape and S.dtype == np.float64
    assert np.isfinite(S).all() and S.min() >= 0.0 and S.max() <= 1.0
    if task == "multiclass":
        np.testing.assert_allclose(S.sum(axis=1), 1.0, atol=1e-9)
    for j in range(Y.shape[1]):
        assert roc_auc_score(Y_test[:, j], S[:, j]) > 0.9, f"class {j}"

    # Deterministic for a fixed seed; survives pickling (results travel between processes).
    again = create_protocol(name, **params).fit(X, Y).predict_proba(X_test)
    np.testing.assert_array_equal(S, again)
    np.testing.assert_array_equal(pickle.loads(pickle.dumps(p)).predict_proba(X_test), S)

    # Wrong inputs are told apart from bad settings.
    with pytest.raises(ValueError, match="features"):
        p.predict_proba(as_input(cls, separable(task, D=15, seed=1)[0]))
    with pytest.raises(ValueError):
        cls(**params).fit(X, Y[:, :0] if task == "binary" else Y[:-1])
    if hasattr(cls, "attention"):  # bag protocols: weights per instance, summing to 1
        a = p.attention(X_test[0])
        assert a.shape == (len(X_test[0]),) and abs(a.sum() - 1.0) < 1e-9


@pytest.mark.parametrize("name", sorted(BAD_VALUES))
def test_bad_hyperparameters_raise_config_error(name):
    for param, value in BAD_VALUES[name]:
        with pytest.raises(ConfigError, match=f"{name} hyperparameter {param} must be"):
            create_protocol(name, **{param: value})
    with pytest.raises(ConfigError, match=r"no hyperparameter 'bogus'; valid hyperparameters: .*seed"):
        create_protocol(name, bogus=1)
    with pytest.raises(ConfigError, match="task must be one of"):
        create_protocol(name, task="regression")
    # fit validates again: set_params cannot smuggle in a bad value.
    param, value = BAD_VALUES[name][0]
    p = create_protocol(name).set_params(**{param: value})
    with pytest.raises(ConfigError):
        p.fit(*(lambda X, Y: (as_input(PROTOCOLS[name], X), Y))(*separable("binary")))


def test_registry_and_messages():
    assert {"abmil", "knn", "linear_probe"} <= set(list_protocols()) and list_protocols() == sorted(PROTOCOLS)
    assert {k: PROTOCOLS[k] for k in ("linear_probe", "knn", "abmil")} == {"linear_probe": LinearProbe, "knn": KNN,
                                                                          "abmil": ABMIL}
    with pytest.raises(ConfigError, match=f"unknown protocol 'svm'; valid protocols: {', '.join(list_protocols())}$"):
        create_protocol("svm")
    with pytest.raises(ConfigError, match=r"did you mean 'k'\?.*valid hyperparameters: k, temperature"):
        create_protocol("knn", kk=3)  # the typo tests/test_config.py feeds the sweep config
    with pytest.raises(ConfigError, match="YAML reads 5e-3 as text"):
        create_protocol("linear_probe", lr="5e-3")
    with pytest.raises(ConfigError, match="device"):
        create_protocol("knn", device="gpu")


def test_defaults_are_the_papers_and_the_dino_knn():
    lp, knn = create_protocol("linear_probe"), create_protocol("knn")
    assert (lp.lr, lp.batch_size, lp.epochs, lp.optimizer, lp.weight_decay, lp.standardize) == \
        (0.005, 1024, 50, "adamw", 0.0, True)
    assert (knn.k, knn.temperature) == (20, 0.07)
    assert lp.task == knn.task == "binary" and lp.seed == knn.seed == 0 and lp.device == "auto"


# -- kNN -------------------------------------------------------------------------------------------
def brute_force_knn(X_tr, Y_tr, X, k, T):
    """The definition, in float64 loops: cosine top-k, weights exp(s/T), weighted label share."""
    def unit(A):
        return A / np.linalg.norm(A, axis=1, keepdims=True)
    bank, q = unit(X_tr.astype(np.float64)), unit(X.astype(np.float64))
    out = np.zeros((len(X), Y_tr.shape[1]))
    for i, row in enumerate(q):
        s = bank @ row
        nn = np.argsort(-s, kind="stable")[:k]
        w = np.exp(s[nn] / T)
        out[i] = (w[:, None] * Y_tr[nn]).sum(0) / w.sum()
    return out


def test_knn_matches_brute_force_reference():
    rng = np.random.default_rng(0)
    X_tr = rng.normal(size=(40, 6)).astype(np.float32)
    Y_tr = rng.integers(0, 2, size=(40, 3))
    X = rng.normal(size=(25, 6)).astype(np.float32)
    p = create_protocol("knn", k=7, temperature=0.1, task="multilabel").fit(X_tr, Y_tr)
    np.testing.assert_allclose(p.predict_proba(X), brute_force_knn(X_tr, Y_tr, X, 7, 0.1), atol=1e-5)


def test_knn_k1_on_its_training_set_returns_the_labels(monkeypatch):
    for task in ("multilabel", "multiclass"):
        X, Y = separable(task, seed=5)
        X = X + np.random.default_rng(9).normal(scale=2.0, size=X.shape).astype(np.float32)  # no margin
        p = create_protocol("knn", k=1, task=task).fit(X, Y)
        np.testing.assert_array_equal(p.predict_proba(X), Y)
        # Chunking the similarity matrix changes nothing.
        monkeypatch.setattr(knn_module, "_MAX_CHUNK_ELEMENTS", 3 * len(X))
        np.testing.assert_array_equal(p.predict_proba(X), Y)
        monkeypatch.undo()


def test_knn_temperature_limits():
    rng = np.random.default_rng(1)
    X_tr, X = rng.normal(size=(60, 8)).astype(np.float32), rng.normal(size=(30, 8)).astype(np.float32)
    Y_tr = np.eye(4, dtype=int)[rng.integers(0, 4, size=60)]
    nearest = create_protocol("knn", k=1, task="multiclass").fit(X_tr, Y_tr).predict_proba(X)
    # T -> 0: all weight on the nearest neighbour (and no overflow: exp(1/T) would be inf).
    cold = create_protocol("knn", k=10, temperature=1e-6, task="multiclass").fit(X_tr, Y_tr).predict_proba(X)
    np.testing.assert_allclose(cold, nearest, atol=1e-12)
    # T -> inf: an unweighted vote, the plain share of each class among the k nearest.
    hot = create_protocol("knn", k=10, temperature=1e6, task="multiclass").fit(X_tr, Y_tr).predict_proba(X)
    np.testing.assert_allclose(hot, brute_force_knn(X_tr, Y_tr, X, 10, np.inf), atol=1e-5)
    assert set(np.round(hot.ravel() * 10, 4)) <= set(range(11))  # multiples of 1/k


def test_knn_with_k_above_the_train_size_votes_with_everyone():
    X, Y = separable("multilabel", n=12)
    p = create_protocol("knn", k=50, task="multilabel").fit(X, Y)
    assert p.k_ == 12 and p.k == 50
    np.testing.assert_allclose(p.predict_proba(X[:5]), brute_force_knn(X, Y, X[:5], 12, 0.07), atol=1e-5)


# -- linear probe ----------------------------------------------------------------------------------
def standard_problem(n=1500, D=20, C=1, seed=0):
    """Overlapping classes (AUC ~0.85, not 1.0), so parity with sklearn means something."""
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, D))
    W = rng.normal(size=(D, C))
    logits = X @ W / np.sqrt(D) * 2 + rng.normal(size=(n, C))
    return X.astype(np.float32), logits


def test_linear_probe_matches_logistic_regression_binary():
    X, logits = standard_problem()
    Y = (logits > 0).astype(int)
    tr, te = slice(0, 1000), slice(1000, None)
    ref = LogisticRegression(max_iter=2000).fit(X[tr], Y[tr, 0]).predict_proba(X[te])[:, 1]
    p = create_protocol("linear_probe", batch_size=100, epochs=50).fit(X[tr], Y[tr])
    auc_ref, auc = roc_auc_score(Y[te, 0], ref), roc_auc_score(Y[te, 0], p.predict_proba(X[te])[:, 0])
    assert 0.75 < auc_ref < 0.97 and abs(auc - auc_ref) < 0.02
    assert np.corrcoef(ref, p.predict_proba(X[te])[:, 0])[0, 1] > 0.98  # the same classifier


def test_linear_probe_matches_logistic_regression_multiclass():
    X, logits = standard_problem(C=4, seed=1)
    y = logits.argmax(axis=1)
    Y = np.eye(4, dtype=int)[y]
    tr, te = slice(0, 1000), slice(1000, None)
    ref = LogisticRegression(max_iter=2000).fit(X[tr], y[tr]).predict_proba(X[te])
    S = create_protocol("linear_probe", batch_size=100, epochs=50, task="multiclass").fit(X[tr], Y[tr]).predict_proba(X[te])
    auc_ref = roc_auc_score(y[te], ref, multi_class="ovr")
    assert abs(roc_auc_score(y[te], S, multi_class="ovr") - auc_ref) < 0.02
    assert abs((S.argmax(1) == y[te]).mean() - (ref.argmax(1) == y[te]).mean()) < 0.03


def test_binary_equals_one_class_multilabel():
    X, logits = standard_problem(n=300)
    Y = (logits > 0).astype(int)
    b = create_protocol("linear_probe", epochs=30, task="binary").fit(X, Y).predict_proba(X)
    m = create_protocol("linear_probe", epochs=30, task="multilabel").fit(X, Y).predict_proba(X)
    np.testing.assert_array_equal(b, m)


def test_standardize_makes_the_probe_blind_to_feature_scale():
    X, logits = standard_problem(n=400)
    Y = (logits > 0).astype(int)
    rng = np.random.default_rng(2)
    scaled = (X * np.exp(rng.uniform(-4, 4, X.shape[1])) + rng.normal(scale=50, size=X.shape[1])).astype(np.float32)
    a = create_protocol("linear_probe", epochs=20).fit(X, Y)
    b = create_protocol("linear_probe", epochs=20).fit(scaled, Y)
    np.testing.assert_allclose(a.predict_proba(X), b.predict_proba(scaled), atol=1e-4)
    # The head is stored in raw feature space: scores are a plain affine map of X.
    np.testing.assert_allclose(b.decision_function(scaled), scaled.astype(np.float64) @ b.coef_.T + b.intercept_)
    assert b.coef_.shape == (1, X.shape[1]) and len(b.loss_curve_) == 20
    assert b.loss_curve_[-1] < b.loss_curve_[0]


def test_linear_probe_sgd_and_seeds():
    X, Y = separable("binary")
    p = create_protocol("linear_probe", optimizer="sgd", epochs=50, batch_size=32).fit(X, Y)
    assert roc_auc_score(Y[:, 0], p.predict_proba(X)[:, 0]) > 0.95
    s0 = create_protocol("linear_probe", epochs=5, seed=0).fit(X, Y).predict_proba(X)
    s1 = create_protocol("linear_probe", epochs=5, seed=1).fit(X, Y).predict_proba(X)
    assert not np.array_equal(s0, s1)  # the seed drives init and shuffling


@pytest.mark.parametrize("name, weight_decay", [("adamw", 0.0), ("adamw", 0.05), ("sgd", 0.0), ("sgd", 0.05)])
def test_the_probes_written_out_update_is_torch_optims_bit_for_bit(name, weight_decay):
    """The probe updates its two tensors with torch.optim's AdamW / SGD (momentum 0.9) arithmetic
    written out; on CPU both give identical tensors after every step."""
    import torch

    from tasks.protocols.optim import SGD, SGD_MOMENTUM, AdamW

    gen = torch.Generator().manual_seed(0)
    ours = [torch.randn(3, 5, generator=gen), torch.randn(3, generator=gen)]
    ref = [t.clone().requires_grad_() for t in ours]
    opt = (torch.optim.AdamW(ref, lr=0.01, weight_decay=weight_decay) if name == "adamw"
           else torch.optim.SGD(ref, lr=0.01, momentum=SGD_MOMENTUM, weight_decay=weight_decay))
    mine = (AdamW(ours, lr=0.01, weight_decay=weight_decay) if name == "adamw"
            else SGD(ours, lr=0.01, weight_decay=weight_decay))
    for step in range(1, 26):
        grads = [torch.randn(t.shape, generator=gen) for t in ours]
        for p, g in zip(ours, grads, strict=True):
            p.grad = g.clone()
        for p, g in zip(ref, grads, strict=True):
            p.grad = g.clone()
        mine.step()
        opt.step()
        assert all(torch.equal(a, b.detach()) for a, b in zip(ours, ref, strict=True)), (name, step)


@pytest.mark.parametrize("name", ["adamw", "adam", "sgd"])
def test_the_heads_optimizers_are_torch_optims_bit_for_bit(name):
    """The heads' AdamW / Adam / SGD (tasks/protocols/optim.py) against torch.optim on a small
    network: a schedule changing lr between steps, a parameter without a gradient on some steps
    (skipped, keeping its own step count and momentum, as torch.optim does), Adam at lr 1
    (ConvexAdam's)."""
    import torch

    from tasks.protocols.optim import SGD, SGD_MOMENTUM, Adam, AdamW

    gen = torch.Generator().manual_seed(3)
    ours = [torch.randn(4, 3, generator=gen), torch.randn(4, generator=gen), torch.randn(2, 2, generator=gen)]
    ref = [t.clone().requires_grad_() for t in ours]
    ours = [t.requires_grad_() for t in ours]
    if name == "adamw":
        opt, torch_opt = AdamW(ours, lr=0.01, weight_decay=0.05), torch.optim.AdamW(ref, lr=0.01, weight_decay=0.05)
    elif name == "adam":
        opt, torch_opt = Adam(ours, lr=1), torch.optim.Adam(ref, lr=1)
    else:
        opt = SGD(ours, lr=0.01, weight_decay=0.05)
        torch_opt = torch.optim.SGD(ref, lr=0.01, momentum=SGD_MOMENTUM, weight_decay=0.05)
    for step in range(1, 21):
        lr = (1.0 if name == "adam" else 0.01) * (0.5 + 0.5 * math.cos(step / 7))
        opt.lr = lr
        for g in torch_opt.param_groups:
            g["lr"] = lr
        opt.zero_grad(), torch_opt.zero_grad()
        grads = [torch.randn(t.shape, generator=gen) for t in ours]
        for i, (a, b, g) in enumerate(zip(ours, ref, grads, strict=True)):
            if i == 2 and step % 3:  # the third parameter gets a gradient on every third step only
                continue
            a.grad, b.grad = g.clone(), g.clone()
        opt.step(), torch_opt.step()
        assert all(torch.equal(a.detach(), b.detach()) for a, b in zip(ours, ref, strict=True)), (name, step)


def test_a_probe_fit_and_the_dense_heads_import_neither_torch_dynamo_nor_monai():
    """What the written-out update, blocks and losses are for: a cell process fitting a probe never
    imports torch._dynamo (torch.optim's step does, 1.1 s of CPU in every Tune trial process), and
    building and training the dense heads' networks never imports MONAI (~5 s of CPU)."""
    import subprocess
    import sys

    code = ("import sys, numpy as np, torch; from tasks.protocols import create_protocol; "
            "from tasks.protocols.seg3d_decoder import Seg3DNet; from tasks.protocols.seg2d_decoder import "
            "AdaptiveDecoder2D; from tasks.protocols.losses import dice_ce_loss, sigmoid_dice_loss; "
            "X = np.random.default_rng(0).normal(size=(64, 8)).astype('float32'); Y = (X[:, :1] > 0).astype(int); "
            "create_protocol('linear_probe', epochs=3).fit(X, Y); "
            "create_protocol('linear_probe', epochs=3, optimizer='sgd').fit(X, Y); "
            "net = Seg3DNet(1, 2, 4, 3, patch=4, base=4); y = net(torch.randn(1, 8, 2, 2, 2)); "
            "dice_ce_loss(y, torch.zeros(1, 1, 2, 8, 8, dtype=torch.long)).backward(); "
            "z = AdaptiveDecoder2D(4, 2, width=8)(torch.randn(2, 4, 3, 3)); "
            "sigmoid_dice_loss(z, torch.ones_like(z)).backward(); "
            "from tasks.protocols.optim import AdamW; AdamW(list(net.parameters()), lr=0.1).step(); "
            "print(sorted(m for m in ('torch._dynamo', 'monai') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         cwd=Path(__file__).resolve().parents[1])
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stdout + out.stderr
