"""ABMIL: gated-attention multiple-instance learning on bags of frozen tile features.

The paper's equations: (1) h_i = W_proj e_i + b_proj (D0 -> D, D < D0); (2) gated attention
a_i = softmax_i(w^T (tanh(V h_i) * sigmoid(U h_i))), slide embedding z = sum_i a_i h_i; a task
head g(z) gives the logits; bag-level cross-entropy (BCE-with-logits for binary/multilabel,
softmax cross-entropy for multiclass, as the linear probe). Only these layers train.

Defaults (docs/libraries.md, "Protocol defaults"; eva's): project to 128, attention hidden 128, AdamW lr 1e-3, 100 epochs,
early stopping with patience 20 on the validation loss; weight decay 1e-5 (Patho-Bench). One bag
per step (`batch_size` 1, the ABMIL paper's setting); larger batches pad bags and mask the padding.

Bag contract (family `bag`, not the (n, D) one of the feature heads):
`fit(bags, Y, val_bags=None, val_Y=None)` with bags a sequence of (n_i, D0) arrays (a list, or a lazy
sequence that reads each bag when indexed: bags are read one at a time, never held together) and Y
(n, C) of 0/1; without an explicit validation set, `val_fraction` of the bags is held out (seeded).
`predict_proba(bags)` -> (n, C) float64; `attention(bag)` -> (n_i,) float64 summing to 1, in the
bag's row order (what the heatmap artifact stores next to the tile coordinates).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from scipy.special import expit, softmax
from sklearn.exceptions import NotFittedError
from torch import nn

from tasks.protocols.base import Protocol, register_protocol
from tasks.protocols.optim import AdamW


class GatedABMIL(nn.Module):
    """Equations (1)-(2) plus a linear task head."""

    def __init__(self, d_in: int, d: int, hidden: int, n_out: int, dropout: float):
        super().__init__()
        self.proj = nn.Linear(d_in, d)  # (1)
        self.V = nn.Linear(d, hidden)
        self.U = nn.Linear(d, hidden)
        self.w = nn.Linear(hidden, 1)
        self.drop = nn.Dropout(dropout)
        self.head = nn.Linear(d, n_out)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B, N, D0), mask (B, N) True on real instances -> logits (B, C), attention (B, N)."""
        h = self.drop(self.proj(x))
        score = self.w(torch.tanh(self.V(h)) * torch.sigmoid(self.U(h))).squeeze(-1)  # (2)
        a = torch.softmax(score.masked_fill(~mask, float("-inf")), dim=1)
        z = torch.einsum("bn,bnd->bd", a, h)
        return self.head(self.drop(z)), a


@register_protocol
class ABMIL(Protocol):
    """Hyperparameters: embed_dim, attn_dim, dropout, lr, weight_decay, epochs, patience,
    batch_size, val_fraction (+ task, seed, device).

    Fitted: `module_` (the best-validation weights, on CPU), `loss_curve_`, `val_curve_`,
    `best_epoch_`, `n_features_in_`, `n_classes_`, `device_`."""

    name = "abmil"
    supports = frozenset({"binary", "multilabel", "multiclass"})
    family = "bag"
    item_kinds = frozenset({"slide"})

    def __init__(self, embed_dim: int = 128, attn_dim: int = 128, dropout: float = 0.0, lr: float = 1e-3,
                 weight_decay: float = 1e-5, epochs: int = 100, patience: int = 20, batch_size: int = 1,
                 val_fraction: float = 0.2, task: str = "binary", seed: int = 0, device: str = "auto"):
        self.embed_dim = embed_dim
        self.attn_dim = attn_dim
        self.dropout = dropout
        self.lr = lr
        self.weight_decay = weight_decay
        self.epochs = epochs
        self.patience = patience
        self.batch_size = batch_size
        self.val_fraction = val_fraction
        self.task = task
        self.seed = seed
        self.device = device

    def _check_params(self) -> None:
        self._int("embed_dim", 1)
        self._int("attn_dim", 1)
        self._float("dropout", 0.0, inclusive=True)
        if self.dropout >= 1.0:
            self._bad("dropout", self.dropout, "a number in [0, 1)")
        self._float("lr", 0.0)
        self._float("weight_decay", 0.0, inclusive=True)
        self._int("epochs", 1)
        self._int("patience", 1)
        self._int("batch_size", 1)
        self._float("val_fraction", 0.0, inclusive=True)
        if self.val_fraction >= 1.0:
            self._bad("val_fraction", self.val_fraction, "a number in [0, 1)")

    # -- inputs ---------------------------------------------------------------------------------
    def _check_bags(self, bags: Sequence[np.ndarray], width: int | None = None) -> _Bags:
        """A checked view of `bags`: each bag is converted to float32 and checked when it is read,
        so a lazy sequence (bags read from disk one slide at a time) is never loaded whole."""
        if isinstance(bags, np.ndarray) and bags.ndim == 2:
            raise ValueError(f"{self.name}: expects a list of bags (n_i, D) arrays, got one 2-D array; "
                             "wrap it as [X] for a single bag")
        return _Bags(self.name, bags, width)

    def _check_y(self, bags: list[np.ndarray], Y: np.ndarray) -> np.ndarray:
        # The shared checks of (X, Y), with one dummy row per bag standing in for X.
        _, Yc = self._check_xy(np.zeros((len(bags), 1), np.float32), Y)
        return Yc

    # -- fit / predict --------------------------------------------------------------------------
    def fit(self, bags: Sequence[np.ndarray], Y: np.ndarray, val_bags: Sequence[np.ndarray] | None = None,
            val_Y: np.ndarray | None = None) -> ABMIL:
        self.validate()
        bags = self._check_bags(bags)
        Y = self._check_y(bags, Y)
        device = self._torch_device()
        gen = torch.Generator().manual_seed(int(self.seed))
        if val_bags is not None:
            vb = self._check_bags(val_bags, bags.width)
            vy = self._check_y(vb, val_Y)
            tb, ty = bags, Y
        else:
            n_val = int(round(self.val_fraction * len(bags))) if len(bags) >= 5 else 0
            order = np.random.default_rng(self.seed).permutation(len(bags))
            vi, ti = order[:n_val], order[n_val:]
            tb, ty = bags.subset(ti), Y[ti]
            vb, vy = bags.subset(vi), Y[vi]
        # nn.Linear init and dropout draw from torch's global generator: seed it inside a fork, so
        # a fit is reproducible and leaves the caller's random state as it was.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(self.seed))
            model = self._train(tb, ty, vb, vy, device, gen)
        self.module_ = model.cpu().eval()
        self.device_ = str(device)
        self.n_features_in_ = bags.width
        self.n_classes_ = Y.shape[1]
        return self

    def _train(self, tb: Sequence[np.ndarray], ty: np.ndarray, vb: Sequence[np.ndarray], vy: np.ndarray,
               device: torch.device, gen: torch.Generator) -> nn.Module:
        model = GatedABMIL(tb.width, self.embed_dim, self.attn_dim, ty.shape[1], float(self.dropout))
        model.to(device)
        opt = AdamW(model.parameters(), lr=self.lr, weight_decay=self.weight_decay)
        self.loss_curve_: list[float] = []
        self.val_curve_: list[float] = []
        best, best_state, since = np.inf, copy.deepcopy(model.state_dict()), 0
        self.best_epoch_ = 0
        bs = int(self.batch_size)
        for epoch in range(int(self.epochs)):
            model.train()
            perm = torch.randperm(len(tb), generator=gen).tolist()
            total = 0.0
            for s in range(0, len(perm), bs):
                idx = perm[s:s + bs]
                x, m = _pad([tb[i] for i in idx], device)
                logits, _ = model(x, m)
                loss = self._loss(logits, torch.from_numpy(ty[idx]).to(device))
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                total += float(loss.detach()) * len(idx)
            self.loss_curve_.append(total / len(tb))
            if not vb:
                best_state, self.best_epoch_ = copy.deepcopy(model.state_dict()), epoch
                continue
            vloss = self._loss(torch.from_numpy(self._logits(model, vb, device)),
                               torch.from_numpy(vy)).item()
            self.val_curve_.append(vloss)
            # Early stopping: keep the weights of the best validation loss, stop after `patience`
            # epochs without improvement (small WSI training sets overfit within tens of epochs).
            if vloss < best - 1e-6:
                best, best_state, since, self.best_epoch_ = vloss, copy.deepcopy(model.state_dict()), 0, epoch
            else:
                since += 1
                if since >= self.patience:
                    break
        model.load_state_dict(best_state)
        return model

    def _loss(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if self.task == "multiclass":
            return F.cross_entropy(logits, target.argmax(dim=1))
        return F.binary_cross_entropy_with_logits(logits, target.to(logits.dtype))

    @torch.no_grad()
    def _logits(self, model: nn.Module, bags: Sequence[np.ndarray], device: torch.device) -> np.ndarray:
        model.eval()
        out = [model(*_pad([b], device))[0][0].double().cpu().numpy() for b in bags]
        return np.stack(out)

    def _fitted(self) -> None:
        if not hasattr(self, "module_"):
            raise NotFittedError(f"this {self.name} protocol is not fitted yet: call fit(bags, Y) before predicting")

    def decision_function(self, bags: Sequence[np.ndarray]) -> np.ndarray:
        self._fitted()
        bags = self._check_bags(bags, self.n_features_in_)
        if not bags:
            return np.zeros((0, self.n_classes_))
        return self._logits(self.module_, bags, torch.device("cpu"))

    def predict_proba(self, bags: Sequence[np.ndarray]) -> np.ndarray:
        """Scores (n, C) float64 in [0, 1]; multiclass rows sum to 1."""
        logits = self.decision_function(bags)
        return softmax(logits, axis=1) if self.task == "multiclass" else expit(logits)

    @torch.no_grad()
    def attention(self, bag: np.ndarray) -> np.ndarray:
        """Attention weights a_i (n_i,) of one bag, float64, summing to 1, in the bag's row order."""
        self._fitted()
        (b,) = self._check_bags([bag], self.n_features_in_)
        self.module_.eval()
        _, a = self.module_(*_pad([b], torch.device("cpu")))
        a64 = a[0].double().numpy()
        return a64 / a64.sum()  # float32 softmax sums to 1 +- 1e-7; exact in float64 for the artifact


def _pad(bags: list[np.ndarray], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, N_max, D) zero-padded batch and its (B, N_max) instance mask."""
    if len(bags) == 1:  # the common case: no copy beyond the tensor view
        x = torch.from_numpy(bags[0]).unsqueeze(0).to(device)
        return x, torch.ones(x.shape[:2], dtype=torch.bool, device=device)
    n = max(len(b) for b in bags)
    x = torch.zeros(len(bags), n, bags[0].shape[1])
    m = torch.zeros(len(bags), n, dtype=torch.bool)
    for i, b in enumerate(bags):
        x[i, :len(b)] = torch.from_numpy(b)
        m[i, :len(b)] = True
    return x.to(device), m.to(device)


class _Bags(Sequence):
    """Bags checked as they are read (float32, 2-D, non-empty, finite, one width). Wraps any
    sequence, lists in memory or a lazy reader of a cache entry's slides: training touches one bag
    (or one batch) at a time, so memory does not grow with the number of slides."""

    def __init__(self, name: str, bags: Sequence[np.ndarray], width: int | None,
                 indices: Sequence[int] | None = None):
        self.name, self.bags = name, bags
        self.indices = list(range(len(bags))) if indices is None else [int(i) for i in indices]
        # The width all bags must share: the fitted one, or the first bag's.
        self.width = width if width is not None or not self.indices else self[0].shape[1]

    def __len__(self) -> int:
        return len(self.indices)

    def __iter__(self):
        return (self[i] for i in range(len(self)))

    def __getitem__(self, i: int) -> np.ndarray:  # type: ignore[override]
        j = self.indices[i]
        b = np.ascontiguousarray(np.asarray(self.bags[j]), dtype=np.float32)
        if b.ndim != 2 or len(b) == 0:
            raise ValueError(f"{self.name}: bag {j} must be a non-empty (n_i, D) array, got shape {b.shape}")
        if getattr(self, "width", None) is not None and b.shape[1] != self.width:
            raise ValueError(f"{self.name}: bag {j} has {b.shape[1]} features, but the bags (or the fitted "
                             f"protocol) have {self.width}")
        if not np.isfinite(b).all():
            raise ValueError(f"{self.name}: bag {j} contains NaN or infinite values")
        return b

    def subset(self, idx: Sequence[int]) -> _Bags:
        return _Bags(self.name, self.bags, self.width, [self.indices[int(i)] for i in idx])
