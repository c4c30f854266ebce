"""A frozen backbone: uint8 pixels in, pooled embeddings or dense patch-feature grids out.

Input is always a uint8 batch (B, 3, H, W): the cache and the decode workers stay compact, and the
normalisation that belongs to the weights (the spec's `Preprocessing`: mean/std, and for a CT model
the HU range the uint8 values stand for) happens here, once. Every family goes through the same
methods: the spec's `ops` say how its library's model gives tokens, its own pooled embedding and
intermediate maps, so protocols and dense heads never see which library built the encoder.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from tasks.errors import ConfigError
from tasks.preprocess import PREPROCESS_VERSION, RESIZE_POLICY

if TYPE_CHECKING:
    from tasks.encoders.spec import EncoderSpec
    from tasks.weights import WeightsInfo

POOLINGS = ("head", "cls", "mean", "cls+mean")


class FrozenEncoder:
    def __init__(self, spec: EncoderSpec, model: torch.nn.Module, weights: WeightsInfo, device: torch.device):
        self.spec, self.weights, self.device = spec, weights, device
        model.eval().requires_grad_(False)
        self.model = model if device.type == "meta" else model.to(device)
        pp = spec.preprocess
        self.mean, self.std, self.interpolation = pp.mean, pp.std, pp.interpolation
        # uint8 -> normalised in one affine step (Preprocessing.affine).
        scale, shift = pp.affine()
        self._scale, self._shift = scale.to(device), shift.to(device)
        # bf16 autocast on CUDA: ~2x throughput, features are stored as float32 anyway.
        self.autocast = device.type == "cuda"

    def __repr__(self) -> str:
        return f"FrozenEncoder({self.spec.name}, weights={self.weights.source}, device={self.device})"

    # -- checks ----------------------------------------------------------------------------------
    def check_resolution(self, resolution: int) -> int:
        p = self.spec.input_multiple
        if resolution <= 0 or resolution % p:
            lo, hi = max(p, resolution - resolution % p), resolution - resolution % p + p
            what = "patch size" if self.spec.arch == "vit" else "output stride"
            raise ConfigError(f"resolution {resolution} is not a multiple of {p} (the {what} of "
                              f"{self.spec.name}); use {lo} or {hi}")
        return resolution

    def resolve_pooling(self, pooling: str) -> str:
        pooling = self.spec.default_pooling if pooling == "auto" else pooling
        if pooling not in self.spec.pooling_options:
            raise ConfigError(f"pooling {pooling!r} is not available for {self.spec.name}; "
                              f"use auto or one of {', '.join(self.spec.pooling_options)}")
        return pooling

    def embedding_dim(self, pooling: str) -> int:
        return self.spec.pooling_dims[self.resolve_pooling(pooling)]

    def preprocess_info(self) -> dict[str, Any]:
        """What turns a file into the encoder's input; recorded with every result."""
        return {**self.spec.preprocess.info(), "resize": RESIZE_POLICY, "version": PREPROCESS_VERSION}

    # -- forward ---------------------------------------------------------------------------------
    def _normalised(self, x: np.ndarray | torch.Tensor) -> torch.Tensor:
        """A checked uint8 batch (B, 3, H, W) -> float, normalised with the weights' mean/std, on device."""
        x = torch.as_tensor(x)
        if x.dtype != torch.uint8 or x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"expected a uint8 batch (B, 3, H, W), got {tuple(x.shape)} {x.dtype}")
        self.check_resolution(int(x.shape[2]))
        self.check_resolution(int(x.shape[3]))
        return x.to(self.device, non_blocking=True).float() * self._scale + self._shift

    def _features(self, x: np.ndarray | torch.Tensor) -> torch.Tensor:
        x = self._normalised(x)
        with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.autocast):
            return self.spec.ops.tokens(self.model, x)

    def embed(self, x: np.ndarray | torch.Tensor, pooling: str = "auto") -> np.ndarray:
        """Global embeddings, float32 (B, D'), with explicit pooling (never a library's silent default):
        `head` the model's own pooled embedding, `cls` the CLS token, `mean` the mean patch token
        (convnets: their global pool), `cls+mean` both concatenated."""
        pooling = self.resolve_pooling(pooling)
        feats = self._features(x)
        with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.autocast):
            if self.spec.arch == "convnet" or pooling == "head":
                out = self.spec.ops.head(self.model, feats)
            else:
                cls, patches = feats[:, 0], feats[:, self.spec.prefix_tokens:].mean(dim=1)
                out = {"cls": cls, "mean": patches, "cls+mean": torch.cat([cls, patches], dim=1)}[pooling]
            return out.float().cpu().numpy()

    def dense(self, x: np.ndarray | torch.Tensor, layers: Sequence[int] | None = None) -> torch.Tensor:
        """Patch-feature grid, float32 (B, C, H/p, W/p), for dense heads (segmentation, registration).

        `layers` None: the last block's normed tokens (what `embed` pools). Otherwise the listed
        blocks' tokens (timm `forward_intermediates`, final norm applied to each), concatenated on
        channels in the order given: C = len(layers) x width, for decoders with skips."""
        h, w = int(torch.as_tensor(x).shape[2]), int(torch.as_tensor(x).shape[3])
        if layers is not None:
            return self._intermediates(x, list(layers))
        feats = self._features(x)
        with torch.inference_mode():
            if self.spec.arch == "convnet":
                return feats.float()
            patches = feats[:, self.spec.prefix_tokens:]
            b, n, d = patches.shape
            p = self.spec.patch_size
            return patches.float().transpose(1, 2).reshape(b, d, h // p, w // p).contiguous()

    def check_layers(self, layers: Sequence[int] | None) -> tuple[int, ...] | None:
        """Block indices for `dense` (negative counts from the end), validated; None = last block."""
        if layers is None:
            return None
        if self.spec.arch != "vit":
            raise ConfigError(f"{self.spec.name}: intermediate layers are available for ViT encoders only")
        depth = self.spec.depth
        out = []
        for i in layers:
            j = int(i) + depth if int(i) < 0 else int(i)
            if not 0 <= j < depth:
                raise ConfigError(f"{self.spec.name} has {depth} blocks; layer {i} does not exist")
            out.append(j)
        return tuple(out)

    def _intermediates(self, x: np.ndarray | torch.Tensor, layers: list[int]) -> torch.Tensor:
        idx = list(self.check_layers(layers) or ())
        x = self._normalised(x)
        with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.autocast):
            maps = self.spec.ops.intermediates(self.model, x, idx)
        return torch.cat([m.float() for m in maps], dim=1).contiguous()
