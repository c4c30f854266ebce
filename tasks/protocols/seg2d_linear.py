"""seg2d_linear: the cheapest dense probe. BatchNorm then a 1x1 convolution on the patch-token
grid (a per-patch linear classifier: BatchNorm folds into the convolution at inference, as in
DINOv2's linear segmentation probe), logits upsampled bilinearly to each case's size. Each pixel
sees only its own patch (and its neighbours through the bilinear blend), which is what makes it
the baseline for the decoder. Defaults: docs/seg2d.md.
"""

from __future__ import annotations

import torch

from tasks.protocols.base import register_protocol
from tasks.protocols.seg2d_common import Seg2DHead


@register_protocol
class Seg2DLinear(Seg2DHead):
    name = "seg2d_linear"

    def __init__(self, lr: float = 2e-3, weight_decay: float = 1e-4, max_steps: int = 2000, batch_size: int = 8,
                 val_every: int = 100, patience: int = 5, train_size: int = 256, loss: str = "ce",
                 layers: list[int] | None = None,
                 task: str = "multiclass", seed: int = 0, device: str = "auto"):
        self.lr = lr
        self.weight_decay = weight_decay
        self.max_steps = max_steps
        self.batch_size = batch_size
        self.val_every = val_every
        self.patience = patience
        self.train_size = train_size
        self.loss = loss
        self.layers = layers
        self.task = task
        self.seed = seed
        self.device = device

    def _check_params(self) -> None:
        self._check_common()

    def _module(self, channels: int, n_out: int) -> torch.nn.Module:
        return torch.nn.Sequential(torch.nn.BatchNorm2d(channels), torch.nn.Conv2d(channels, n_out, kernel_size=1))
