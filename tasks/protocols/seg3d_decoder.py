"""`seg3d_decoder`: the paper's lightweight 3D decoder on pseudo-3D features (docs/seg3d.md).

Every axial slice goes through the frozen 2D encoder; the patch-token maps stacked along z make a
feature volume at full z resolution and 1/16 in-plane. The decoder (MONAI's DynUNet blocks, UNETR-like;
written out in tasks/protocols/blocks.py, bit-equal to MONAI's):

- the encoder's last block -> `UnetResBlock` bottleneck at 1/16;
- log2(patch) `UnetUpBlock`s, each upsampling in-plane only (kernel/stride (1, 2, 2)); the first
  ones take skip connections from earlier encoder blocks (`layers`: block indices, negative from
  the end; default the last four, DINOv3's multi-layer dense evaluation), each brought to its scale
  by (1, 2, 2) transposed convolutions (UNETR's skips);
  stages without an encoder skip upsample and refine;
- `UnetOutBlock` -> voxel logits at the encoder input's in-plane size, then trilinearly to the
  volume's own size (tasks.dense.upsample_logits), where the loss and every metric are computed.

Skips come from the encoder, not from the image: an image skip would let the decoder segment bright
voxels (PET lesions) without the encoder, and the study measures the encoder.

Training (tasks/protocols/seg3d_group.py, shared by every head of an (encoder, resolution,
dataset)): crops of `crop_slices` whole axial slices, `fg_ratio` of them centred on foreground;
in-plane flips and rot90 applied to PIXELS before encoding (so features are online);
MONAI's `DiceCELoss` (tasks/protocols/losses.py); AdamW (lr 1e-4, the paper's) with cosine annealing, after a linear warm-up
of `warmup` x steps (None: the dataset's default, 0 for MSD, 0.05 for AutoPET-II/HECKTOR);
validation Dice every `val_every` steps keeps the best weights. Inference: MONAI's
`sliding_window_inference` (constant blending; `seg3d_group.z_windows`) over the whole volume, windows of `crop_slices` slices (full plane),
`overlap` along z; each slice is encoded once, when the first window that holds it is predicted
(the maps of slices shared with the next window are carried over, not encoded again).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from tasks.dense import FeatureSource
from tasks.protocols.base import register_protocol
from tasks.protocols.blocks import UnetOutBlock, UnetResBlock, UnetUpBlock
from tasks.protocols.dense_base import DenseHead

UP = (1, 2, 2)  # in-plane only: the feature volume is already at full z resolution


class Seg3DNet(nn.Module):
    """(B, M*L*E, D, h, w) features -> (B, K, D, h*p, w*p) logits. Channel order of the input is
    modalities x layers x width (tasks.dense.FeatureSource); each skip level takes one layer of
    every modality."""

    def __init__(self, n_modalities: int, n_layers: int, width: int, n_classes: int, patch: int = 16,
                 base: int = 32):
        super().__init__()
        self.m, self.n_layers, self.width = n_modalities, n_layers, width
        n_up = int(round(math.log2(patch)))
        if 2 ** n_up != patch:
            raise ValueError(f"patch size {patch} is not a power of two")
        ch = [base * 2 ** max(0, n_up - 1 - i) for i in range(n_up)] + [max(8, base // 2)]
        c_in = n_modalities * width
        self.bottleneck = UnetResBlock(3, c_in, ch[0])
        self.skips, self.ups = nn.ModuleList(), nn.ModuleList()
        for i in range(n_up):
            if i + 1 < n_layers:  # skip from layer n_layers-2-i, upsampled i+1 times to this stage's scale
                proj: list[nn.Module] = [nn.ConvTranspose3d(c_in, ch[i + 1], UP, UP)]
                proj += [nn.ConvTranspose3d(ch[i + 1], ch[i + 1], UP, UP) for _ in range(i)]
                proj.append(UnetResBlock(3, ch[i + 1], ch[i + 1]))
                self.skips.append(nn.Sequential(*proj))
                self.ups.append(UnetUpBlock(3, ch[i], ch[i + 1], upsample=UP))
            else:
                self.ups.append(nn.Sequential(
                    nn.ConvTranspose3d(ch[i], ch[i + 1], UP, UP),
                    UnetResBlock(3, ch[i + 1], ch[i + 1])))
        self.out = UnetOutBlock(3, ch[-1], n_classes)

    def layer(self, x: torch.Tensor, j: int) -> torch.Tensor:
        b, _, d, h, w = x.shape
        return x.view(b, self.m, self.n_layers, self.width, d, h, w)[:, :, j].reshape(b, -1, d, h, w)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bottleneck(self.layer(x, self.n_layers - 1))
        for i, up in enumerate(self.ups):
            if i + 1 < self.n_layers:
                y = up(y, self.skips[i](self.layer(x, self.n_layers - 2 - i)))
            else:
                y = up(y)
        return self.out(y)


@register_protocol
class Seg3DDecoder(DenseHead):
    """Hyperparameters: crop_slices, batch_size, steps, lr, weight_decay, warmup, layers, base,
    fg_ratio, augment, val_every, overlap (+ task, seed, device).

    Fitted: `net_` (best-validation weights), `loss_curve_`, `val_curve_` [(step, mean Dice)],
    `best_step_`, `n_updates_`, `warmup_steps_`, `data_seed_`, `shared_data_order_` (True when the
    head trained in a group whose seeds and folds shared one crop order), `group_size_`,
    `trained_cases_` (cases whose crops gave it gradients), `n_encoded_slices_` (the group's)."""

    name = "seg3d_decoder"
    supports = frozenset({"multiclass"})
    target_kinds = frozenset({"mask3d"})
    item_kinds = frozenset({"volume"})
    augments = True

    # Hyperparameters that decide the data stream; heads share encoded crops only when they agree.
    DATA_PARAMS = ("crop_slices", "batch_size", "steps", "fg_ratio", "augment", "val_every", "layers")

    def __init__(self, crop_slices: int = 16, batch_size: int = 2, steps: int = 2000, lr: float = 1e-4,
                 weight_decay: float = 1e-5, warmup: float | None = None,
                 layers: Sequence[int] | None = (-4, -3, -2, -1), base: int = 32,
                 fg_ratio: float = 0.33, augment: bool = True, val_every: int = 500, overlap: float = 0.25,
                 task: str = "multiclass", seed: int = 0, device: str = "auto"):
        self.crop_slices = crop_slices
        self.batch_size = batch_size
        self.steps = steps
        self.lr = lr
        self.weight_decay = weight_decay
        self.warmup = warmup
        self.layers = layers
        self.base = base
        self.fg_ratio = fg_ratio
        self.augment = augment
        self.val_every = val_every
        self.overlap = overlap
        self.task = task
        self.seed = seed
        self.device = device

    def _check_params(self) -> None:
        for p in ("crop_slices", "batch_size", "steps", "base"):
            self._int(p, minimum=1)
        if self.layers is not None and (isinstance(self.layers, (str, bytes)) or not len(self.layers) or not all(
                isinstance(i, (int, np.integer)) and not isinstance(i, bool) for i in self.layers)):
            self._bad("layers", self.layers, "a non-empty list of encoder block indices (negative from the end), "
                      "or null for the last block")
        self._int("val_every", minimum=0)
        self._float("lr", 0.0)
        self._float("weight_decay", 0.0, inclusive=True)
        if self.warmup is not None:
            self._float("warmup", 0.0, inclusive=True)
            if self.warmup >= 1:
                self._bad("warmup", self.warmup, "a fraction of the steps in [0, 1), or null (dataset default)")
        self._float("fg_ratio", 0.0, inclusive=True)
        if self.fg_ratio > 1:
            self._bad("fg_ratio", self.fg_ratio, "a fraction in [0, 1]")
        self._bool("augment")
        self._float("overlap", 0.0, inclusive=True)
        if self.overlap >= 1:
            self._bad("overlap", self.overlap, "a fraction in [0, 1)")

    def build(self, source: FeatureSource, n_modalities: int, n_classes: int, patch: int) -> Seg3DNet:
        n_layers = max(1, len(source.layers or ()))
        want = 1 if self.layers is None else len(self.layers)
        if n_layers != want:
            raise ValueError(f"{self.name}: the feature source has {n_layers} encoder layers, the head wants "
                             f"{want} ({self.layers})")
        width = int(source.channels) // (n_modalities * n_layers)
        if width * n_modalities * n_layers != int(source.channels):
            raise ValueError(f"{self.name}: {source.channels} feature channels are not {n_modalities} modalities x "
                             f"{n_layers} layers x a width")
        torch.manual_seed(self.seed)
        return Seg3DNet(n_modalities, n_layers, width, n_classes, patch, self.base)

    def _fit(self, source: FeatureSource, train_ids: list[str], val_ids: list[str]) -> None:
        from tasks.protocols.seg3d_group import fit_group

        fit_group([self], source, [train_ids], [val_ids])

    def _predict(self, source: FeatureSource, case_id: str) -> np.ndarray:
        from tasks.protocols.seg3d_group import predict_group

        return predict_group([self], source, case_id)[0]
