"""timm encoders: DINOv3 ViTs and ConvNeXts, MedDINOv3, UNI / UNI2-h, the truncated ResNet50 baseline.

Every architecture is built here from timm's classes with explicit arguments (docs/encoders.md says
where each comes from), so nothing is read from the hub to build one; `weights: hub` then loads only
the weight file of the family's own repository.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

import torch

from tasks.encoders.spec import EncoderSpec, Preprocessing, register, token_poolings
from tasks.errors import ConfigError
from tasks.weights import StateDict

DINOV3_TAG = "lvd1689m"
DINOV3_LICENCE = "DINOv3 License (gated)"
# Pretraining input sizes as timm's pretrained configs of the DINOv3 weights state them.
DINOV3_PRETRAIN_RESOLUTION = 256
CONVNEXT_PRETRAIN_RESOLUTION = 224
# MedDINOv3's CT normalisation (arXiv:2509.02379): HU clipped to [-1000, 1000], then z-scored with
# these statistics; one channel replicated to the three the ViT takes.
MEDDINOV3_CT = Preprocessing(mean=(65.108,) * 3, std=(178.017,) * 3, channels="grey->rgb",
                             value_range=(-1000.0, 1000.0))


class TimmViTOps:
    """timm VisionTransformer / Eva: `forward_features` gives the final-normed tokens."""

    def tokens(self, model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
        return model.forward_features(x)

    def head(self, model: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
        raise ConfigError("this encoder has no pooling head of its own; use cls, mean or cls+mean")

    def intermediates(self, model: torch.nn.Module, x: torch.Tensor, idx: list[int]) -> list[torch.Tensor]:
        return model.forward_intermediates(x, indices=idx, norm=True, output_fmt="NCHW", intermediates_only=True)


class ConvNeXtOps(TimmViTOps):
    def head(self, model: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
        # Global average pool + the model's final LayerNorm: DINOv3 ConvNeXt's embedding.
        return model.forward_head(tokens, pre_logits=True)


class TruncatedResNetOps(TimmViTOps):
    """timm `features_only` ResNet cut after layer3 (stride 16, 1024 channels), average-pooled."""

    def tokens(self, model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
        return model(x)[-1]

    def head(self, model: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
        return tokens.mean(dim=(2, 3))


def timm_builder(timm_name: str, **kwargs: Any) -> Callable[..., torch.nn.Module]:
    """The timm architecture with random init and no classifier; `overrides` (tests: a narrower,
    shallower copy of the same design) replace its arguments."""

    def build(**overrides: Any) -> torch.nn.Module:
        import timm

        return timm.create_model(timm_name, pretrained=False, num_classes=0, **{**kwargs, **overrides})

    return build


def _dinov3_vit(name: str, timm_name: str, n_blocks: int, dim: int, size: str, tag: str | None = DINOV3_TAG,
                **kwargs: Any) -> EncoderSpec:
    # CLS + mean patch token: DINOv3's linear eval; timm's own default (avg) would silently differ.
    # DINOv3 ViTs: 256 px (timm pretrained cfg; the paper's Table 2 evaluates at 256x256 too).
    return EncoderSpec(
        name, "timm", "dinov3" if tag else "test", "vit", timm_name, 16, 5, dim, n_blocks, size, "cls+mean",
        token_poolings(dim), timm_builder(timm_name, **kwargs), TimmViTOps(),
        pretrain_resolution=DINOV3_PRETRAIN_RESOLUTION if tag else None,
        licence=DINOV3_LICENCE if tag else "-", gated=bool(tag),
        hf_hub_id=f"timm/{timm_name}.{tag}" if tag else None, pretrained_tag=tag, filter_checkpoint=eva_filter)


def _dinov3_convnext(name: str, dim: int, size: str) -> EncoderSpec:
    timm_name = f"convnext_{name.rsplit('_', 1)[1]}"
    tag = f"dinov3_{DINOV3_TAG}"
    return EncoderSpec(
        name, "timm", "dinov3", "convnet", timm_name, 32, 0, dim, 4, size, "mean", {"mean": dim},
        timm_builder(timm_name), ConvNeXtOps(), pretrain_resolution=CONVNEXT_PRETRAIN_RESOLUTION,
        licence=DINOV3_LICENCE, gated=True, hf_hub_id=f"timm/{timm_name}.{tag}", pretrained_tag=tag)


def resnet_filter(state: StateDict, model: torch.nn.Module) -> StateDict:
    """A whole ResNet50 checkpoint -> the truncated trunk: layer4 and the classifier are not built."""
    return {k: v for k, v in state.items() if not k.startswith(("layer4.", "fc."))}


def eva_filter(state: StateDict, model: torch.nn.Module) -> StateDict:
    """timm's own filter for its Eva/DINOv3 checkpoints (what `pretrained=True` applies before its
    strict load): drops RoPE buffers and pretraining-only tensors, renames DINOv3-repository names."""
    from timm.models.eva import checkpoint_filter_fn

    return checkpoint_filter_fn(state, model)


def meddinov3_filter(state: StateDict, model: torch.nn.Module) -> StateDict:
    """MedDINOv3's teacher (`backbone.*` in the DINOv3 repository's names, plus dino/ibot heads) ->
    timm's DINOv3 ViT names, through timm's own DINOv3 checkpoint filter."""
    if any(k.startswith("backbone.") for k in state):
        state = {k[len("backbone."):]: v for k, v in state.items() if k.startswith("backbone.")}
    return eva_filter(state, model)


def _uni2_builder(**overrides: Any) -> torch.nn.Module:
    # UNI2-h's published timm arguments (model card): ViT-H/14, SwiGLU, 8 registers.
    import timm

    return timm_builder("vit_giant_patch14_224", img_size=224, patch_size=14, depth=24, num_heads=24,
                        init_values=1e-5, embed_dim=1536, mlp_ratio=2.66667 * 2,
                        mlp_layer=timm.layers.SwiGLUPacked, act_layer=torch.nn.SiLU, reg_tokens=8,
                        no_embed_class=True, dynamic_img_size=True)(**overrides)


def _layernorm_eps6() -> Any:
    from timm.layers import LayerNorm

    return partial(LayerNorm, eps=1e-6)


def _meddinov3_builder(**overrides: Any) -> torch.nn.Module:
    # LayerNorm eps 1e-6 as MedDINOv3 trained with (timm's DINOv3 default 1e-5 moves the features).
    return timm_builder("vit_base_patch16_dinov3", norm_layer=_layernorm_eps6())(**overrides)


register(
    _dinov3_vit("dinov3_vits16", "vit_small_patch16_dinov3", 12, 384, "small"),
    _dinov3_vit("dinov3_vitsp16", "vit_small_plus_patch16_dinov3", 12, 384, "small"),
    _dinov3_vit("dinov3_vitb16", "vit_base_patch16_dinov3", 12, 768, "base"),
    _dinov3_vit("dinov3_vitl16", "vit_large_patch16_dinov3", 24, 1024, "large"),
    _dinov3_vit("dinov3_vithp16", "vit_huge_plus_patch16_dinov3", 32, 1280, "huge"),
    _dinov3_vit("dinov3_vit7b16", "vit_7b_patch16_dinov3", 40, 4096, "giant"),
    _dinov3_convnext("dinov3_convnext_tiny", 768, "small"),
    _dinov3_convnext("dinov3_convnext_small", 768, "small"),
    _dinov3_convnext("dinov3_convnext_base", 1024, "base"),
    _dinov3_convnext("dinov3_convnext_large", 1536, "large"),
    # The DINOv3 ViT architecture (RoPE, 4 registers) at toy width, for tests and CPU benchmarks.
    _dinov3_vit("test_vit_tiny16", "vit_small_patch16_dinov3", 2, 64, "tiny", tag=None,
                embed_dim=64, depth=2, num_heads=2),
    EncoderSpec(
        "meddinov3_vitb16", "timm", "meddinov3", "vit", "vit_base_patch16_dinov3", 16, 5, 768, 12, "base",
        "cls+mean", token_poolings(768), _meddinov3_builder, TimmViTOps(), MEDDINOV3_CT,
        licence="DINOv3 License (derivative); checkpoint from the MedDINOv3 release",
        filter_checkpoint=meddinov3_filter),
    EncoderSpec(
        "resnet50_trunc", "timm", "resnet", "convnet", "resnet50", 16, 0, 1024, 3, "small", "mean",
        {"mean": 1024}, timm_builder("resnet50", features_only=True, out_indices=[3]), TruncatedResNetOps(),
        Preprocessing(interpolation="bilinear"), pretrain_resolution=224, licence="BSD-3-Clause (torchvision)",
        hf_hub_id="timm/resnet50.tv_in1k", filter_checkpoint=resnet_filter, pretrained_tag="tv_in1k"),
    EncoderSpec(
        "uni", "timm", "uni", "vit", "vit_large_patch16_224", 16, 1, 1024, 24, "large", "cls",
        token_poolings(1024), timm_builder("vit_large_patch16_224", init_values=1e-5, dynamic_img_size=True),
        TimmViTOps(), Preprocessing(), pretrain_resolution=224, licence="CC-BY-NC-ND-4.0",
        gated=True, hf_hub_id="MahmoodLab/uni", hub_files=("model.safetensors", "pytorch_model.bin")),
    EncoderSpec(
        "uni2_h", "timm", "uni", "vit", "vit_giant_patch14_224", 14, 9, 1536, 24, "huge", "cls",
        token_poolings(1536), _uni2_builder, TimmViTOps(), Preprocessing(), pretrain_resolution=224,
        licence="CC-BY-NC-ND-4.0", gated=True, hf_hub_id="MahmoodLab/UNI2-h"),
)
