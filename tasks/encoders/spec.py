"""What an encoder is, before any weights are read: `EncoderSpec`, its preprocessing, the registry.

Every family module (`timm_family`, `open_clip_family`, `hf_family`) registers its entries here,
beside the code that builds them, as datasets and protocols register themselves. A spec holds only
static metadata and callables: parameters and GFLOPs are computed from the architecture built on the
meta device (`tasks.encoders.flops`), never typed in, so a new encoder needs no new arithmetic.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from tasks.errors import ConfigError

# A checkpoint's tensors by name (tasks.weights reads them); spelled out here so the spec never
# imports the loader, which sits below the registry.
StateDict = dict[str, torch.Tensor]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
ARCHS = ("vit", "convnet")
# Poolings of token models. "head" is the embedding the model's authors recommend when the model
# has its own pooling (a projection, an attention pool); cls/mean/cls+mean read the last block.
TOKEN_POOLINGS = ("cls", "mean", "cls+mean")


@dataclass(frozen=True)
class Preprocessing:
    """uint8 pixels -> model input: value = lo + (hi - lo) * u / 255, then (value - mean) / std.

    `value_range` is (0, 1) for photographs; (-1000, 1000) for a CT model fed HU-windowed uint8
    slices (the CT readers map the window [-1000, 1000] HU linearly onto 0..255)."""

    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    interpolation: str = "bicubic"
    channels: str = "rgb"  # rgb | grey->rgb (one channel, replicated to the three the model takes)
    value_range: tuple[float, float] = (0.0, 1.0)

    def affine(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(scale, shift), each (1, 3, 1, 1): normalised = u * scale + shift, one fused step."""
        lo, hi = self.value_range
        mean, std = torch.tensor(self.mean).view(1, 3, 1, 1), torch.tensor(self.std).view(1, 3, 1, 1)
        return (hi - lo) / (255.0 * std), (lo - mean) / std

    def info(self) -> dict[str, Any]:
        out: dict[str, Any] = {"interpolation": self.interpolation, "mean": list(self.mean), "std": list(self.std)}
        # Only non-default entries: the default ones would change every existing cache key.
        if self.value_range != (0.0, 1.0):
            out["value_range"] = list(self.value_range)
        if self.channels != "rgb":
            out["channels"] = self.channels
        return out


class FamilyOps(Protocol):
    """How one library's model gives tokens, its own pooled embedding and intermediate maps."""

    def tokens(self, model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
        """ViT: (B, prefix + N, D) final-normed tokens; convnet: (B, C, h, w) feature map."""
        ...

    def head(self, model: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
        """The model's own pooled embedding from `tokens` (B, D_head)."""
        ...

    def intermediates(self, model: torch.nn.Module, x: torch.Tensor, idx: list[int]) -> list[torch.Tensor]:
        """Normed patch maps (B, D, h, w) of the listed blocks (ViTs)."""
        ...


@dataclass(frozen=True)
class EncoderSpec:
    name: str
    library: str  # timm | open_clip | transformers
    family: str  # model family for the analysis: dinov3, meddinov3, biomedclip, uni, conch, ...
    arch: str  # vit | convnet: what the features look like (tokens or a feature map)
    timm_name: str  # the library's architecture name (timm model, open_clip tower, transformers class)
    patch_size: int  # ViT patch; convnets: output stride. Inputs must be multiples of it.
    prefix_tokens: int  # CLS + registers ahead of the patch tokens (0 for convnets and SigLIP)
    embed_dim: int  # width of the last block's tokens / feature map (dense channels per layer)
    depth: int  # blocks a `dense(layers=...)` index may name (ViTs)
    size: str  # tiny | small | base | large | huge | giant: resource planning (config.cell_gpus)
    default_pooling: str  # what `pooling: auto` means: the embedding the authors recommend
    pooling_dims: dict[str, int] = field(compare=False)  # embedding width per pooling
    build: Callable[[], torch.nn.Module] = field(compare=False, repr=False)  # random init, no network
    ops: FamilyOps = field(compare=False, repr=False)
    preprocess: Preprocessing = Preprocessing()
    # Input side the published weights were trained at; None without weights (test encoders).
    pretrain_resolution: int | None = None
    licence: str = "-"
    gated: bool = False  # hub weights need an accepted licence and a login
    hf_hub_id: str | None = None  # where `weights: hub` reads from; None: no published weights
    hub_files: tuple[str, ...] = ("model.safetensors", "pytorch_model.bin")
    # Checkpoint -> this model's state-dict names (prefixes, renames, dropped heads); None: as is.
    filter_checkpoint: Callable[[StateDict, torch.nn.Module], StateDict] | None = field(
        default=None, compare=False, repr=False)
    pretrained_tag: str | None = None  # timm pretrained tag of hub weights (timm entries only)
    unavailable: str | None = None  # why it cannot be built here, and how to make it buildable

    @property
    def pooling_options(self) -> tuple[str, ...]:
        return tuple(self.pooling_dims)

    def resolve_pooling(self, pooling: str) -> str:
        """The config's pooling for this encoder ("auto": the authors' recommended embedding)."""
        pooling = self.default_pooling if pooling == "auto" else pooling
        if pooling not in self.pooling_dims:
            raise ConfigError(f"pooling {pooling!r} is not available for {self.name}; "
                              f"use auto or one of {', '.join(self.pooling_options)}")
        return pooling

    def embedding_dim(self, pooling: str) -> int:
        return self.pooling_dims[self.resolve_pooling(pooling)]

    def preprocess_info(self) -> dict[str, Any]:
        """What turns a file into the encoder's input; recorded with every result."""
        from tasks.preprocess import PREPROCESS_VERSION, RESIZE_POLICY

        return {**self.preprocess.info(), "resize": RESIZE_POLICY, "version": PREPROCESS_VERSION}

    @property
    def input_multiple(self) -> int:
        return self.patch_size

    @property
    def params(self) -> int:
        """Parameters of the architecture as built (numel on the meta device; no classifier head)."""
        from tasks.encoders.flops import count_params

        return count_params(self)

    def gflops(self, resolution: int) -> float:
        """Inference GFLOPs per image at `resolution` px, to the default pooled embedding."""
        from tasks.encoders.flops import count_gflops

        return count_gflops(self, int(resolution))


ENCODERS: dict[str, EncoderSpec] = {}


def register(*specs: EncoderSpec) -> None:
    for s in specs:
        if s.name in ENCODERS:
            raise ValueError(f"encoder {s.name!r} registered twice")
        if s.arch not in ARCHS or s.default_pooling not in s.pooling_dims:
            raise ValueError(f"{s.name}: arch {s.arch!r} / default pooling {s.default_pooling!r} inconsistent")
        ENCODERS[s.name] = s


def list_encoders() -> list[str]:
    return list(ENCODERS)


def get_encoder_spec(name: str) -> EncoderSpec:
    try:
        return ENCODERS[name]
    except KeyError:
        raise ConfigError(f"unknown encoder {name!r}; known: {', '.join(ENCODERS)}") from None


def token_poolings(dim: int, head: int | None = None, cls: bool = True) -> dict[str, int]:
    """Pooling -> width for a token model: with a CLS token cls/mean/cls+mean, plus the model's own
    pooled `head` embedding when it has one (listed first when it is the recommended one)."""
    out = {"head": head} if head else {}
    out.update({"cls": dim, "mean": dim, "cls+mean": 2 * dim} if cls else {"mean": dim})
    return out
