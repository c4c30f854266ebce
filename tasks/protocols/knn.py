"""Weighted k-nearest-neighbour classifier on frozen features (DINOv2/v3 kNN evaluation).

The paper runs kNN on CT-RATE without giving its settings, so we use the DINO family's: features
L2-normalised, cosine similarity, the k most similar training cases vote with weight
exp(similarity / T), T = 0.07, k = 20 (DINOv2/v3 report k in {10, 20, 100, 200}; 20 is their headline).

Scores are soft votes: for class c, score_c = sum_j w_j * y_jc / sum_j w_j over the k neighbours j.
That is the weighted share of neighbours carrying label c, in [0, 1]; for multiclass (one-hot
labels) the shares sum to 1; for binary and multilabel each class is an independent vote, which
is what makes AUC defined per label (the paper treats CT-RATE's 18 findings as binary tasks).

Nothing is learned: `fit` stores the normalised training bank. The seed is accepted for the common
interface and unused (the result is deterministic).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from tasks.protocols.base import Protocol, register_protocol

# Similarity entries per query chunk (float32: 128 MiB). Keeps memory bounded however large the
# bank (100k queries x 100k train would be 40 GB at once); results do not depend on it.
_MAX_CHUNK_ELEMENTS = 1 << 25


@register_protocol
class KNN(Protocol):
    """Temperature-weighted cosine kNN. Hyperparameters: k, temperature (+ task, seed, device).

    Fitted attributes: `bank_` (n_train, D) L2-normalised float32 train features, `labels_`
    (n_train, C) float32 train targets, `k_` the k actually used, `n_features_in_`, `n_classes_`,
    `device_`.
    """

    name = "knn"
    supports = frozenset({"binary", "multilabel", "multiclass"})
    uses_seed = False  # exact neighbours, no randomness: one cell per (encoder, resolution, dataset)

    def __init__(self, k: int = 20, temperature: float = 0.07, task: str = "binary", seed: int = 0,
                 device: str = "auto"):
        self.k = k
        self.temperature = temperature
        self.task = task
        self.seed = seed
        self.device = device

    def _check_params(self) -> None:
        self._int("k", 1)
        self._float("temperature", 0.0)

    def _fit(self, X: np.ndarray, Y: np.ndarray) -> None:
        self.bank_ = _l2_normalise(X)
        self.labels_ = Y
        # k > n_train happens legitimately in data-scaling runs on small train subsets: vote with
        # every training case rather than failing the cell (k_ records what was used).
        self.k_ = min(int(self.k), len(X))

    def _predict_proba(self, X: np.ndarray) -> np.ndarray:
        device = torch.device(self.device_)
        # from_numpy shares memory on CPU; on GPU the bank is copied once per predict call.
        bank = torch.from_numpy(self.bank_).to(device)
        labels = torch.from_numpy(self.labels_).to(device=device, dtype=torch.float64)
        queries = torch.from_numpy(_l2_normalise(X))
        rows = max(1, _MAX_CHUNK_ELEMENTS // len(self.bank_))
        out = np.empty((len(X), self.n_classes_), dtype=np.float64)
        for start in range(0, len(X), rows):
            q = queries[start:start + rows].to(device)
            sims, idx = (q @ bank.T).topk(self.k_, dim=1)  # sorted, most similar first
            # exp(s/T) / sum exp(s/T) == exp((s - s_max)/T) / sum(...): subtracting the row's top
            # similarity changes no vote share but keeps exp finite for tiny T (s/T up to 1/T).
            sims = sims.double()
            w = torch.exp((sims - sims[:, :1]) / float(self.temperature))
            votes = (w.unsqueeze(-1) * labels[idx]).sum(dim=1) / w.sum(dim=1, keepdim=True)
            out[start:start + len(q)] = votes.cpu().numpy()
        # Float rounding can leave a share a hair outside [0, 1].
        return np.clip(out, 0.0, 1.0)


def _l2_normalise(X: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm (an all-zero row stays zero: it is similar to nothing)."""
    return F.normalize(torch.from_numpy(X), dim=1, eps=1e-12).numpy()
