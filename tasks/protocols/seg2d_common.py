"""What the 2D segmentation heads share: targets at a training size, the training loop with early
stopping on validation, prediction at each case's original size. docs/seg2d.md gives the defaults
and their sources.

A head is a torch module mapping a (B, C, h, w) patch-token map to (B, K, h', w') logits; logits are
upsampled bilinearly to each case's target size (tasks.dense.upsample_logits), so frames of
different sizes (EDD2020) and non-square frames (EndoVis18, 1280x1024) train in one batch.

Training size: targets are kept in memory with their longest side brought to `train_size`
(nearest-neighbour, aspect kept; 0 = the original size), and the loss is computed there. The
decoder's output is at most 4x the patch grid (256 px at 1024 input), so a finer training target
adds memory, not signal. Validation losses and every reported metric use the same rule and the
original size respectively: `predict` upsamples to the original size.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F

from tasks.dense import FeatureSource, as_tensor_features, upsample_logits
from tasks.protocols.dense_base import DenseHead
from tasks.protocols.losses import dice_ce_loss, sigmoid_dice_loss
from tasks.protocols.optim import AdamW

LOSSES = ("ce", "dicece")


def training_size(size: tuple[int, int], cap: int) -> tuple[int, int]:
    """(H, W) with the longest side at most `cap` (aspect kept; 0 = unchanged)."""
    h, w = size
    if cap <= 0 or max(h, w) <= cap:
        return h, w
    s = cap / max(h, w)
    return max(1, round(h * s)), max(1, round(w * s))


def resize_target(target: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour resize of an int (H, W) label map or bool (C, H, W) masks: labels stay labels."""
    if tuple(target.shape[-2:]) == tuple(size):
        return target
    t = torch.from_numpy(np.ascontiguousarray(target.astype(np.uint8)))
    t = t[None, None] if t.ndim == 2 else t[None]
    out = F.interpolate(t.float(), size=size, mode="nearest-exact")[0].to(torch.uint8).numpy()
    return out[0] if target.ndim == 2 else out.astype(bool)


def case_classes(source: FeatureSource, case_id: str, task: str) -> list[str]:
    """The dataset's class names: the source's `classes` or its dataset's where it has them, else
    the sample's `meta["classes"]` (every mask2d dataset sets it), else numbered from the target."""
    names = getattr(source, "classes", None) or getattr(getattr(source, "dataset", None), "classes", None)
    if names:
        return list(names)
    s = source.sample(case_id)
    if s.meta.get("classes"):
        return list(s.meta["classes"])
    t = s.target
    n = int(t.shape[0]) if task == "multilabel" else int(t.max())
    return [str(k) for k in range(1, n + 1)]


class Seg2DHead(DenseHead):
    """Base of seg2d_linear and seg2d_decoder: subclasses build the module (`_module(C, K)`)."""

    supports: ClassVar[frozenset[str]] = frozenset({"multiclass", "multilabel"})
    target_kinds: ClassVar[frozenset[str]] = frozenset({"mask2d"})
    item_kinds: ClassVar[frozenset[str]] = frozenset({"image"})

    # set by subclasses' __init__: lr, weight_decay, max_steps, batch_size, val_every, patience,
    # train_size, loss, layers (encoder blocks whose maps are concatenated on channels; None = the
    # last block: the cache pipeline reads it), task, seed, device
    lr: float
    weight_decay: float
    max_steps: int
    batch_size: int
    val_every: int
    patience: int
    train_size: int
    loss: str
    layers: list[int] | None

    def _module(self, channels: int, n_out: int) -> torch.nn.Module:
        raise NotImplementedError

    def _check_common(self) -> None:
        self._float("lr", 0.0)
        self._float("weight_decay", 0.0, inclusive=True)
        self._int("max_steps", 1)
        self._int("batch_size", 1)
        self._int("val_every", 1)
        self._int("patience", 0)
        self._int("train_size", 0)
        self._choice("loss", LOSSES)
        ok = self.layers is None or (isinstance(self.layers, (list, tuple)) and self.layers and all(
            isinstance(i, int) and not isinstance(i, bool) for i in self.layers))
        if not ok:
            self._bad("layers", self.layers, "null (the last block) or a list of block indices, e.g. [-4, -1]")

    # -- data ---------------------------------------------------------------------------------------
    def _targets(self, source: FeatureSource, ids: Sequence[str]) -> list[torch.Tensor]:
        out = []
        for cid in ids:
            s = source.sample(cid)
            if s.target is None:
                raise ValueError(f"{self.name}: case {cid} has no ground truth")
            t = resize_target(s.target, training_size(tuple(s.target.shape[-2:]), self.train_size))
            out.append(torch.from_numpy(t.astype(np.int64 if t.ndim == 2 else np.float32)))
        return out

    def _batch(self, source: FeatureSource, ids: Sequence[str]) -> torch.Tensor:
        feats = [source.features(c) for c in ids]
        x = torch.cat([as_tensor_features(f) for f in feats], dim=0)  # (B, C, h, w): one slice per image
        return x.to(self.device_)

    # -- loss ---------------------------------------------------------------------------------------
    def _loss_fn(self):
        if self.loss == "ce":
            if self.task == "multiclass":
                return lambda logits, t: F.cross_entropy(logits, t[None])
            return lambda logits, t: F.binary_cross_entropy_with_logits(logits, t[None])
        if self.task == "multiclass":
            return lambda logits, t: dice_ce_loss(logits, t[None, None])
        return lambda logits, t: sigmoid_dice_loss(logits, t[None]) + F.binary_cross_entropy_with_logits(logits, t[None])

    def _case_losses(self, module: torch.nn.Module, x: torch.Tensor, targets: list[torch.Tensor], fn) -> torch.Tensor:
        logits = module(x)
        losses = [fn(upsample_logits(logits[i:i + 1], t.shape[-2:]), t.to(self.device_))
                  for i, t in enumerate(targets)]
        return torch.stack(losses)

    # -- fit / predict ------------------------------------------------------------------------------
    def _fit(self, source: FeatureSource, train_ids: list[str], val_ids: list[str]) -> None:
        self.classes_ = case_classes(source, train_ids[0], self.task)
        n_out = len(self.classes_) + (1 if self.task == "multiclass" else 0)
        gen = torch.Generator().manual_seed(int(self.seed))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(self.seed))
            module = self._module(int(source.channels), n_out).to(self.device_)
        y_train, y_val = self._targets(source, train_ids), self._targets(source, val_ids)
        opt = AdamW(module.parameters(), lr=self.lr, weight_decay=self.weight_decay)
        fn = self._loss_fn()
        best, best_state, bad, step = float("inf"), None, 0, 0
        history: list[dict[str, float]] = []
        order = torch.randperm(len(train_ids), generator=gen).tolist()
        pos = 0
        while step < self.max_steps:
            if pos + self.batch_size > len(order) and pos > 0:  # a new epoch: reshuffle
                order, pos = torch.randperm(len(train_ids), generator=gen).tolist(), 0
            idx = order[pos:pos + self.batch_size]
            pos += self.batch_size
            module.train()
            x = self._batch(source, [train_ids[i] for i in idx])
            loss = self._case_losses(module, x, [y_train[i] for i in idx], fn).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            if val_ids and (step % self.val_every == 0 or step == self.max_steps):
                v = self._val_loss(module, source, val_ids, y_val, fn)
                history.append({"step": step, "train_loss": float(loss.detach()), "val_loss": v})
                if v < best - 1e-6:
                    best, best_state, bad, self.best_step_ = v, copy.deepcopy(module.state_dict()), 0, step
                else:
                    bad += 1
                    if self.patience and bad >= self.patience:
                        break
        if best_state is not None:
            module.load_state_dict(best_state)  # the weights of the best validation loss
        else:
            self.best_step_ = step
        self.module_, self.steps_, self.history_ = module.eval(), step, history
        self.best_val_loss_ = best if best_state is not None else float("nan")

    @torch.no_grad()
    def _val_loss(self, module: torch.nn.Module, source: FeatureSource, ids: list[str],
                  targets: list[torch.Tensor], fn) -> float:
        module.eval()
        total = 0.0
        for i in range(0, len(ids), self.batch_size):
            x = self._batch(source, ids[i:i + self.batch_size])
            total += float(self._case_losses(module, x, targets[i:i + self.batch_size], fn).sum())
        return total / len(ids)

    @torch.no_grad()
    def predict_scores(self, source: FeatureSource, case_id: str) -> np.ndarray:
        """float32 (K, H, W) at the case's original size: softmax over background + classes
        (multiclass) or per-class sigmoids (multilabel)."""
        self._fitted()
        size = tuple(source.sample(case_id).images.shape[2:4])
        logits = upsample_logits(self.module_(self._batch(source, [case_id])), size)[0]
        p = logits.softmax(0) if self.task == "multiclass" else logits.sigmoid()
        return p.float().cpu().numpy()

    def _predict(self, source: FeatureSource, case_id: str) -> np.ndarray:
        p = self.predict_scores(source, case_id)
        return p.argmax(0).astype(np.int64) if self.task == "multiclass" else p > 0.5

    def summary(self) -> dict[str, Any]:
        """What training did (for the run's record): steps run, best step, best validation loss."""
        self._fitted()
        return {"steps": self.steps_, "best_step": self.best_step_, "best_val_loss": self.best_val_loss_}
