"""A frozen backbone: uint8 pixels in, pooled embeddings or dense patch-feature grids out.

Input is always a uint8 batch (B, 3, H, W): the cache and the decode workers stay compact, and the
normalisation that belongs to the weights (the model's pretrained mean/std) happens here, once.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from tasks.errors import ConfigError
from tasks.preprocess import PREPROCESS_VERSION, RESIZE_POLICY

if TYPE_CHECKING:
    from tasks.encoders import EncoderSpec
    from tasks.weights import WeightsInfo

POOLINGS = ("cls", "mean", "cls+mean")


class FrozenEncoder:
    def __init__(self, spec: EncoderSpec, model: torch.nn.Module, weights: WeightsInfo, device: torch.device):
        self.spec, self.weights, self.device = spec, weights, device
        model.eval().requires_grad_(False)
        self.model = model if device.type == "meta" else model.to(device)
        cfg = getattr(model, "pretrained_cfg", {}) or {}
        self.mean = tuple(float(v) for v in cfg.get("mean", (0.485, 0.456, 0.406)))
        self.std = tuple(float(v) for v in cfg.get("std", (0.229, 0.224, 0.225)))
        self.interpolation = str(cfg.get("interpolation", "bicubic"))
        # uint8 -> normalised in one affine step: (x / 255 - mean) / std = x * scale + shift.
        std = torch.tensor(self.std).view(1, 3, 1, 1)
        self._scale = (1.0 / (255.0 * std)).to(device)
        self._shift = (-torch.tensor(self.mean).view(1, 3, 1, 1) / std).to(device)
        # bf16 autocast on CUDA: ~2x throughput, features are stored as float32 anyway.
        self.autocast = device.type == "cuda"

    def __repr__(self) -> str:
        return f"FrozenEncoder({self.spec.name}, weights={self.weights.source}, device={self.device})"

    # -- checks ----------------------------------------------------------------------------------
    def check_resolution(self, resolution: int) -> int:
        p = self.spec.patch_size
        if resolution <= 0 or resolution % p:
            lo, hi = max(p, resolution - resolution % p), resolution - resolution % p + p
            raise ConfigError(f"resolution {resolution} is not a multiple of {p} (the patch size of "
                              f"{self.spec.name}); use {lo} or {hi}")
        return resolution

    def resolve_pooling(self, pooling: str) -> str:
        pooling = self.spec.default_pooling if pooling == "auto" else pooling
        if pooling not in self.spec.pooling_options:
            raise ConfigError(f"pooling {pooling!r} is not available for {self.spec.name}; "
                              f"use auto or one of {', '.join(self.spec.pooling_options)}")
        return pooling

    def embedding_dim(self, pooling: str) -> int:
        pooling = self.resolve_pooling(pooling)
        return 2 * self.spec.embed_dim if pooling == "cls+mean" else self.spec.embed_dim

    def preprocess_info(self) -> dict[str, Any]:
        """What turns a file into the encoder's input; recorded with every result."""
        return {"interpolation": self.interpolation, "mean": list(self.mean), "std": list(self.std),
                "resize": RESIZE_POLICY, "version": PREPROCESS_VERSION}

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
            return self.model.forward_features(x)

    def embed(self, x: np.ndarray | torch.Tensor, pooling: str = "auto") -> np.ndarray:
        """Global embeddings, float32 (B, D'), with explicit pooling (never timm's silent default)."""
        pooling = self.resolve_pooling(pooling)
        feats = self._features(x)
        with torch.inference_mode():
            if self.spec.family == "convnext":
                # Global average pool + the model's final LayerNorm: DINOv3 ConvNeXt's embedding.
                out = self.model.forward_head(feats, pre_logits=True)
            else:
                n_prefix = self.model.num_prefix_tokens
                cls, patches = feats[:, 0], feats[:, n_prefix:].mean(dim=1)
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
            if self.spec.family == "convnext":
                return feats.float()
            patches = feats[:, self.model.num_prefix_tokens:]
            b, n, d = patches.shape
            p = self.spec.patch_size
            return patches.float().transpose(1, 2).reshape(b, d, h // p, w // p).contiguous()

    def check_layers(self, layers: Sequence[int] | None) -> tuple[int, ...] | None:
        """Block indices for `dense` (negative counts from the end), validated; None = last block."""
        if layers is None:
            return None
        if self.spec.family != "vit":
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
            maps = self.model.forward_intermediates(x, indices=idx, norm=True, output_fmt="NCHW",
                                                    intermediates_only=True)
        return torch.cat([m.float() for m in maps], dim=1).contiguous()
