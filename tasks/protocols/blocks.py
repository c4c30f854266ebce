"""The few MONAI network blocks the dense heads use, written out (docs/seg3d.md, docs/seg2d.md).

Why not import them: `import monai` initialises every MONAI subpackage (torchvision, transformers,
mlflow among them), ~5 s of CPU in each fresh process, and every sweep trial that trains a dense
head is a fresh process. These classes build the same modules in the same order as MONAI 1.6's
`Convolution`, `UnetResBlock`, `UnetBasicBlock`, `UnetUpBlock` and `UnetOutBlock` with the
arguments the heads pass (no dropout, stride 1 convolutions, kernel == stride transposed ones):
the same state-dict keys, the same draws from torch's generator at initialisation, the same
arithmetic in `forward`. tests/test_blocks_losses.py checks weights, outputs and gradients are
bit-equal to MONAI's on CPU.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import torch
from torch import nn

_CONV = {2: nn.Conv2d, 3: nn.Conv3d}
_CONV_T = {2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}
_INSTANCE = {2: nn.InstanceNorm2d, 3: nn.InstanceNorm3d}
_BATCH = {2: nn.BatchNorm2d, 3: nn.BatchNorm3d}


def _same_padding(kernel_size: int) -> int:
    if kernel_size % 2 == 0:
        raise ValueError(f"kernel size {kernel_size}: only odd kernels keep the size with stride 1")
    return (kernel_size - 1) // 2


def conv_only(dims: int, c_in: int, c_out: int, kernel_size: int, bias: bool = False) -> nn.Sequential:
    """MONAI `Convolution(conv_only)` / `get_conv_layer(act=None, norm=None)`: a stride-1 convolution
    keeping the size, under the key `conv`."""
    conv = _CONV[dims](c_in, c_out, kernel_size, stride=1, padding=_same_padding(kernel_size), bias=bias)
    return nn.Sequential(OrderedDict(conv=conv))


def conv_norm_act(dims: int, c_in: int, c_out: int, kernel_size: int = 3) -> nn.Sequential:
    """MONAI `Convolution(dims, c_in, c_out, kernel_size, norm="batch", act="relu")`: conv (with
    bias), then batch norm and ReLU under `adn.N` / `adn.A` (MONAI's "NDA" order, no dropout)."""
    conv = _CONV[dims](c_in, c_out, kernel_size, stride=1, padding=_same_padding(kernel_size), bias=True)
    adn = nn.Sequential(OrderedDict(N=_BATCH[dims](c_out), A=nn.ReLU()))
    return nn.Sequential(OrderedDict(conv=conv, adn=adn))


class UnetBasicBlock(nn.Module):
    """conv-norm-lrelu twice (MONAI `UnetBasicBlock`, stride 1, instance norm without affine)."""

    def __init__(self, dims: int, c_in: int, c_out: int, kernel_size: int = 3):
        super().__init__()
        self.conv1 = conv_only(dims, c_in, c_out, kernel_size)
        self.conv2 = conv_only(dims, c_out, c_out, kernel_size)
        self.lrelu = nn.LeakyReLU(negative_slope=0.01, inplace=True)
        self.norm1 = _INSTANCE[dims](c_out)
        self.norm2 = _INSTANCE[dims](c_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.lrelu(self.norm1(self.conv1(x)))
        return self.lrelu(self.norm2(self.conv2(out)))


class UnetResBlock(UnetBasicBlock):
    """MONAI `UnetResBlock` at stride 1: the basic block's two conv-norm stages plus the input
    (through a 1x1 conv + norm when the channel count changes), then leaky ReLU."""

    def __init__(self, dims: int, c_in: int, c_out: int, kernel_size: int = 3):
        super().__init__(dims, c_in, c_out, kernel_size)
        self.downsample = c_in != c_out
        if self.downsample:  # created after norm1/norm2, as MONAI does: the init draws follow its order
            self.conv3 = conv_only(dims, c_in, c_out, 1)
            self.norm3 = _INSTANCE[dims](c_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        residual = x
        out = self.lrelu(self.norm1(self.conv1(x)))
        out = self.norm2(self.conv2(out))
        if self.downsample:
            residual = self.norm3(self.conv3(residual))
        out += residual
        return self.lrelu(out)


class UnetUpBlock(nn.Module):
    """MONAI `UnetUpBlock`: a transposed convolution whose kernel equals its stride (no bias),
    concatenated with the skip, then a `UnetBasicBlock`."""

    def __init__(self, dims: int, c_in: int, c_out: int, upsample: Sequence[int], kernel_size: int = 3):
        super().__init__()
        up = tuple(int(u) for u in upsample)
        self.transp_conv = nn.Sequential(OrderedDict(conv=_CONV_T[dims](c_in, c_out, up, stride=up, bias=False)))
        self.conv_block = UnetBasicBlock(dims, 2 * c_out, c_out, kernel_size)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return self.conv_block(torch.cat((self.transp_conv(x), skip), dim=1))


class UnetOutBlock(nn.Module):
    """MONAI `UnetOutBlock`: a 1x1 convolution with bias, to the class logits."""

    def __init__(self, dims: int, c_in: int, c_out: int):
        super().__init__()
        self.conv = conv_only(dims, c_in, c_out, 1, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)
