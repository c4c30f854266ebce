"""Linear probe: one linear layer trained on frozen features (the paper's section 3.1 protocol).

Paper: "a single linear layer ... using binary cross-entropy (BCE) loss with a learning rate of
0.005, a batch size of 1024, and for 50 epochs". Those are the defaults. What the paper leaves
open, and what we chose:

- Loss: BCE-with-logits for binary and multilabel (the paper's loss; one sigmoid per class),
  softmax cross-entropy for multiclass (BCE on one-hot targets would not give scores that sum
  to 1, which the metrics' one-vs-rest AUC and argmax accuracy assume).
- Optimizer: AdamW, weight_decay 0 (i.e. Adam). lr 0.005 is an Adam-scale rate; plain SGD at
  0.005 for 50 epochs of ~100 steps barely moves a linear layer on unscaled features. AdamW (not
  Adam) so a configured weight_decay is decoupled from the adaptive step. `optimizer: sgd`
  (momentum 0.9, as in the DINOv2 linear eval) is available for ablations.
- Standardization (default on): z-score each feature with TRAIN mean/std. Raw DINOv3 features
  (and those of random-init encoders) have arbitrary per-dimension scales, and a fixed lr only
  means the same thing across encoders and resolutions if the inputs are on one scale.
- Init: weights N(0, 0.01^2), bias 0, as the DINOv2/v3 linear heads; drawn from a seeded
  generator, as is the per-epoch shuffling, so a (data, seed) pair gives one result.
- No class weighting, no schedule, no early stopping: the paper names none, and the point of
  the study is to compare frozen features under one fixed head.

The fitted head is stored in the RAW feature space (`coef_`, `intercept_`, standardization
folded in), so prediction needs no standardized copy of X; `mean_`/`scale_` are kept for the record.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from scipy.special import expit, softmax

from tasks.protocols.base import Protocol, register_protocol
from tasks.protocols.optim import SGD, AdamW

OPTIMIZERS = ("adamw", "sgd")
_PREDICT_CHUNK = 65536  # rows per float64 matmul at predict time: bounds memory for 100k x 4096


@register_protocol
class LinearProbe(Protocol):
    """Linear probe. Hyperparameters: lr, batch_size, epochs, optimizer, weight_decay, standardize
    (+ task, seed, device).

    Fitted attributes: `coef_` (C, D) and `intercept_` (C,) in raw feature space (float64),
    `mean_`/`scale_` (D,) the train statistics (zeros/ones if standardize is off), `loss_curve_`
    (mean train loss per epoch), `n_features_in_`, `n_classes_`, `device_`.
    """

    name = "linear_probe"
    supports = frozenset({"binary", "multilabel", "multiclass"})

    def __init__(self, lr: float = 0.005, batch_size: int = 1024, epochs: int = 50,
                 optimizer: str = "adamw", weight_decay: float = 0.0, standardize: bool = True,
                 task: str = "binary", seed: int = 0, device: str = "auto"):
        self.lr = lr
        self.batch_size = batch_size
        self.epochs = epochs
        self.optimizer = optimizer
        self.weight_decay = weight_decay
        self.standardize = standardize
        self.task = task
        self.seed = seed
        self.device = device

    def _check_params(self) -> None:
        self._float("lr", 0.0)
        self._int("batch_size", 1)
        self._int("epochs", 1)
        self._choice("optimizer", OPTIMIZERS)
        self._float("weight_decay", 0.0, inclusive=True)
        self._bool("standardize")

    def _fit(self, X: np.ndarray, Y: np.ndarray) -> None:
        device = torch.device(self.device_)
        n, D = X.shape
        C = Y.shape[1]
        Xt = torch.from_numpy(X).to(device)  # shares memory with X on CPU: never modified in place
        if self.standardize:
            var, mean = torch.var_mean(Xt, dim=0, correction=0)
            # A constant feature (std 0) carries nothing; scale 1 keeps it at 0 instead of NaN.
            std = var.sqrt()
            scale = torch.where(std > 1e-12, std, torch.ones_like(std))
            Xt = (Xt - mean) / scale
        else:
            mean, scale = torch.zeros(D, device=device), torch.ones(D, device=device)

        if self.task == "multiclass":
            target = torch.from_numpy(Y.argmax(axis=1)).to(device)
        else:
            target = torch.from_numpy(Y).to(device)

        # All randomness from one CPU generator (same draws on CPU and GPU runs).
        gen = torch.Generator().manual_seed(int(self.seed))
        weight = (torch.randn(C, D, generator=gen) * 0.01).to(device).requires_grad_()
        bias = torch.zeros(C, device=device, requires_grad=True)
        # torch.optim's arithmetic written out (tasks/protocols/optim.py): its step imports
        # torch._dynamo, more CPU than a probe's whole fit on cached features.
        opt = (AdamW([weight, bias], lr=self.lr, weight_decay=self.weight_decay) if self.optimizer == "adamw"
               else SGD([weight, bias], lr=self.lr, weight_decay=self.weight_decay))

        bs = min(int(self.batch_size), n)
        self.loss_curve_: list[float] = []
        for _ in range(int(self.epochs)):
            # Index the resident tensors directly: a DataLoader costs more than the step itself
            # on small feature sets.
            perm = torch.randperm(n, generator=gen).to(device)
            total = torch.zeros((), device=device)
            for start in range(0, n, bs):
                idx = perm[start:start + bs]
                logits = F.linear(Xt[idx], weight, bias)
                if self.task == "multiclass":
                    loss = F.cross_entropy(logits, target[idx])
                else:
                    loss = F.binary_cross_entropy_with_logits(logits, target[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
                total += loss.detach() * len(idx)
            self.loss_curve_.append(float(total) / n)  # one sync per epoch, not per step

        # Fold the standardization into the head: w.(x - m)/s + b = (w/s).x + (b - (w/s).m).
        w = weight.detach().double().cpu().numpy()
        s = scale.double().cpu().numpy()
        m = mean.double().cpu().numpy()
        self.mean_ = m.astype(np.float32)
        self.scale_ = s.astype(np.float32)
        self.coef_ = w / s
        self.intercept_ = bias.detach().double().cpu().numpy() - self.coef_ @ m

    def decision_function(self, X: np.ndarray) -> np.ndarray:
        """Logits (n, C), float64."""
        return self._logits(self._check_predict(X))

    def _logits(self, X: np.ndarray) -> np.ndarray:
        out = np.empty((len(X), self.n_classes_), dtype=np.float64)
        for start in range(0, len(X), _PREDICT_CHUNK):
            chunk = X[start:start + _PREDICT_CHUNK].astype(np.float64)
            out[start:start + len(chunk)] = chunk @ self.coef_.T + self.intercept_
        return out

    def _predict_proba(self, X: np.ndarray) -> np.ndarray:
        logits = self._logits(X)
        if self.task == "multiclass":
            return softmax(logits, axis=1)
        return expit(logits)
