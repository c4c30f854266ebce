"""seg2d_decoder: the paper's "lightweight 2D adaptive decoder" (arXiv 2509.06467, section 3.2):
shallow convolutional blocks with progressive bilinear upsampling, then a segmentation head whose
logits are upsampled bilinearly to each case's size (the paper's dynamic upsampling).

Blocks are MONAI's `Convolution` (3x3 conv, batch norm, ReLU; written out in
tasks/protocols/blocks.py, bit-equal to MONAI's):

    patch grid (C, h, w) -> conv 3x3 to `width`                     (context of the 3x3 neighbouring patches)
    `n_up` times: bilinear x2, conv 3x3 halving the channels        (h*2^n_up; 4x the grid by default)
    1x1 conv to the classes -> bilinear to the case's size

Loss: Dice + cross-entropy (MONAI's `DiceCELoss`, softmax; tasks/protocols/losses.py) for label
maps; Dice (sigmoid) + binary cross-entropy per class for multi-label masks. AdamW. Defaults and their sources: docs/seg2d.md.
"""

from __future__ import annotations

import torch

from tasks.protocols.base import register_protocol
from tasks.protocols.blocks import conv_norm_act
from tasks.protocols.seg2d_common import Seg2DHead


class AdaptiveDecoder2D(torch.nn.Module):
    def __init__(self, channels: int, n_out: int, width: int = 256, n_up: int = 2):
        super().__init__()
        self.stem = conv_norm_act(2, channels, width)
        chans = [max(16, width // 2 ** (i + 1)) for i in range(n_up)]
        self.ups = torch.nn.ModuleList(conv_norm_act(2, cin, cout) for cin, cout in zip([width, *chans[:-1]], chans, strict=True))
        self.head = torch.nn.Conv2d(chans[-1] if chans else width, n_out, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for up in self.ups:
            x = up(torch.nn.functional.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False))
        return self.head(x)


@register_protocol
class Seg2DDecoder(Seg2DHead):
    name = "seg2d_decoder"

    def __init__(self, width: int = 256, n_up: int = 2, lr: float = 2e-3, weight_decay: float = 1e-4,
                 max_steps: int = 2000, batch_size: int = 8, val_every: int = 100, patience: int = 5,
                 train_size: int = 256, loss: str = "dicece", layers: list[int] | None = None,
                 task: str = "multiclass", seed: int = 0,
                 device: str = "auto"):
        self.width = width
        self.n_up = n_up
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
        self._int("width", 1)
        self._int("n_up", 0)
        self._check_common()

    def _module(self, channels: int, n_out: int) -> torch.nn.Module:
        return AdaptiveDecoder2D(channels, n_out, self.width, self.n_up)
