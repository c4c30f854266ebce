"""The dense heads' losses, written as MONAI 1.6 computes them (`DiceLoss`, `DiceCELoss` with the
arguments the heads pass), without importing MONAI (why: tasks/protocols/blocks.py).

Dice per (case, channel) over the spatial axes, smoothed by 1e-5 above and below, averaged over
cases and channels, background included; the arithmetic follows MONAI's order so the values are
bit-equal on CPU (tests/test_blocks_losses.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

SMOOTH = 1e-5  # MONAI's smooth_nr and smooth_dr defaults


def soft_dice_loss(probs: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """1 - soft Dice of (B, C, *spatial) probabilities against a same-shaped 0/1 target, averaged
    over cases and channels (MONAI `DiceLoss` after its activation)."""
    if probs.shape != target.shape:
        raise ValueError(f"ground truth has shape {tuple(target.shape)}, predictions {tuple(probs.shape)}")
    axes = list(range(2, probs.ndim))
    tp = torch.sum(probs * target, dim=axes)
    fp = (torch.sum(probs, dim=axes) - tp) * 0.5
    fn = (torch.sum(target, dim=axes) - tp) * 0.5
    return torch.mean(1 - (2 * tp + SMOOTH) / (2 * (tp + fp + fn) + SMOOTH))


def one_hot(labels: torch.Tensor, n_classes: int) -> torch.Tensor:
    """(B, 1, *spatial) integer labels -> (B, n_classes, *spatial) float32 one-hot."""
    out = torch.zeros((labels.shape[0], n_classes, *labels.shape[2:]), dtype=torch.float32, device=labels.device)
    return out.scatter_(1, labels.long(), 1)


def dice_ce_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Softmax Dice + cross-entropy of (B, K, *spatial) logits against (B, 1, *spatial) labels
    (MONAI `DiceCELoss(to_onehot_y=True, softmax=True)`), for K >= 2 (background is a class)."""
    if logits.ndim != labels.ndim or labels.shape[1] != 1:
        raise ValueError(f"labels must be (B, 1, *spatial) for logits {tuple(logits.shape)}, got {tuple(labels.shape)}")
    k = logits.shape[1]
    if k < 2:
        raise ValueError("dice_ce_loss needs at least two classes (background and one label)")
    dice = soft_dice_loss(torch.softmax(logits, 1), one_hot(labels, k))
    return dice + F.cross_entropy(logits, torch.squeeze(labels, dim=1).long())


def sigmoid_dice_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Sigmoid Dice of multi-label (B, C, *spatial) logits against a 0/1 target of the same shape
    (MONAI `DiceLoss(sigmoid=True)`)."""
    return soft_dice_loss(torch.sigmoid(logits), target)
