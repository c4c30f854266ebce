"""The encoder registry: every frozen backbone medscale can sweep, with its metadata beside it.

One registry (`ENCODERS`), one entry point (`create_encoder`). Each spec carries what the scaling
analysis needs without loading a model: the published parameter count (backbone, no head) and an
analytic GFLOPs-per-image function of the input resolution (docs/libraries.md: inference FLOPs are the
compute axis, since all DINOv3 students are distilled from one 7B teacher).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from tasks.errors import ConfigError, WeightsError
from tasks.frozen_encoder import FrozenEncoder
from tasks.weights import (
    RANDOM_SEED,
    WeightsInfo,
    hub_help,
    load_file_weights,
    parse_weights,
    resolve_file,
    state_dict_digest,
)

DINOV3_TAG = "lvd1689m"
N_PREFIX_TOKENS = 5  # DINOv3 ViTs: 1 CLS + 4 register tokens
# Pretraining input sizes as timm's pretrained configs of the DINOv3 weights state them.
DINOV3_PRETRAIN_RESOLUTION = 256
CONVNEXT_PRETRAIN_RESOLUTION = 224


def vit_gflops(params: int, patch_params: int, depth: int, dim: int, patch: int = 16) -> Callable[[int], float]:
    """FLOPs(r) = 2 P_blocks T + 4 depth d T^2 + 2 P_patch (r/p)^2, T = (r/p)^2 + 5 (docs/libraries.md).

    Matmul FLOPs (2 per multiply-add) of the backbone: every block weight is used once per token,
    attention scores and their weighted sum cost 2 T^2 d each per block, the patch embedding runs once
    per patch. RoPE, norms and softmax are ignored (< 1%).
    """

    def gflops(resolution: int) -> float:
        n = (resolution // patch) ** 2
        t = n + N_PREFIX_TOKENS
        return (2 * (params - patch_params) * t + 4 * depth * dim * t * t + 2 * patch_params * n) / 1e9

    return gflops


def convnext_gflops(dims: tuple[int, ...], depths: tuple[int, ...]) -> Callable[[int], float]:
    """Every ConvNeXt weight is used once per output position of its stage (stride 4, 8, 16, 32).

    Block: depthwise 7x7 (49d + d), LayerNorm (2d), MLP d -> 4d -> d (8d^2 + 5d), layer scale (d);
    downsampling: LayerNorm + 2x2 stride-2 conv; stem: 4x4 stride-4 conv + LayerNorm. Matches timm's
    profiled 4.47 GMACs for ConvNeXt-T at 224 px.
    """
    stem = 4 * 4 * 3 * dims[0] + dims[0] + 2 * dims[0]
    stage_params = []
    for i, (d, n) in enumerate(zip(dims, depths, strict=True)):
        down = 0 if i == 0 else 2 * dims[i - 1] + 4 * dims[i - 1] * d + d
        stage_params.append(down + n * (8 * d * d + 58 * d))

    def gflops(resolution: int) -> float:
        macs = stem * (resolution / 4) ** 2
        macs += sum(p * (resolution / (4 * 2**i)) ** 2 for i, p in enumerate(stage_params))
        return 2 * macs / 1e9

    return gflops


@dataclass(frozen=True)
class EncoderSpec:
    name: str
    timm_name: str
    pretrained_tag: str | None  # timm pretrained tag; None: no published weights (test encoder)
    family: str  # "vit" | "convnext"
    patch_size: int  # ViT patch; ConvNeXt: output stride (32), the resolution granularity
    embed_dim: int  # width of the final features
    depth: int
    params: int  # backbone parameters, no head (timm definition; matches the model cards)
    size: str  # tiny | small | base | large | huge | giant: resource planning (config.cell_gpus)
    default_pooling: str
    gflops: Callable[[int], float] = field(compare=False, repr=False)
    timm_kwargs: dict[str, Any] = field(default_factory=dict, compare=False)
    # Input side the published weights were trained at (timm's pretrained cfg input_size): above it
    # a ViT sees more patches than in pretraining. None: no published weights (test encoder).
    pretrain_resolution: int | None = None

    @property
    def hf_hub_id(self) -> str | None:
        return f"timm/{self.timm_name}.{self.pretrained_tag}" if self.pretrained_tag else None

    @property
    def pooling_options(self) -> tuple[str, ...]:
        return ("cls", "mean", "cls+mean") if self.family == "vit" else ("mean",)


def _vit(name: str, timm_name: str, params: int, patch_params: int, depth: int, dim: int, size: str,
         tag: str | None = DINOV3_TAG, timm_kwargs: dict[str, Any] | None = None) -> EncoderSpec:
    # CLS + mean patch token: DINOv3's linear eval; timm's own default (avg) would silently differ.
    # DINOv3 ViTs: 256 px (timm pretrained cfg; the paper's Table 2 evaluates at 256x256 too).
    return EncoderSpec(name, timm_name, tag, "vit", 16, dim, depth, params, size, "cls+mean",
                       vit_gflops(params, patch_params, depth, dim), timm_kwargs or {},
                       DINOV3_PRETRAIN_RESOLUTION if tag else None)


def _convnext(name: str, params: int, dims: tuple[int, ...], depths: tuple[int, ...], size: str) -> EncoderSpec:
    return EncoderSpec(name, f"convnext_{name.rsplit('_', 1)[1]}", f"dinov3_{DINOV3_TAG}", "convnext", 32,
                       dims[-1], sum(depths), params, size, "mean", convnext_gflops(dims, depths),
                       pretrain_resolution=CONVNEXT_PRETRAIN_RESOLUTION)


ENCODERS: dict[str, EncoderSpec] = {s.name: s for s in [
    _vit("dinov3_vits16", "vit_small_patch16_dinov3", 21_586_944, 295_296, 12, 384, "small"),
    _vit("dinov3_vitsp16", "vit_small_plus_patch16_dinov3", 28_683_264, 295_296, 12, 384, "small"),
    _vit("dinov3_vitb16", "vit_base_patch16_dinov3", 85_641_216, 590_592, 12, 768, "base"),
    _vit("dinov3_vitl16", "vit_large_patch16_dinov3", 303_079_424, 787_456, 24, 1024, "large"),
    _vit("dinov3_vithp16", "vit_huge_plus_patch16_dinov3", 840_509_440, 984_320, 32, 1280, "huge"),
    _vit("dinov3_vit7b16", "vit_7b_patch16_dinov3", 6_716_030_976, 3_149_824, 40, 4096, "giant"),
    _convnext("dinov3_convnext_tiny", 27_820_128, (96, 192, 384, 768), (3, 3, 9, 3), "small"),
    _convnext("dinov3_convnext_small", 49_454_688, (96, 192, 384, 768), (3, 3, 27, 3), "small"),
    _convnext("dinov3_convnext_base", 87_566_464, (128, 256, 512, 1024), (3, 3, 27, 3), "base"),
    _convnext("dinov3_convnext_large", 196_230_336, (192, 384, 768, 1536), (3, 3, 27, 3), "large"),
    # The DINOv3 ViT architecture (RoPE, 4 registers) at toy width, for tests and CPU benchmarks.
    _vit("test_vit_tiny16", "vit_small_patch16_dinov3", 149_504, 49_216, 2, 64, "tiny", tag=None,
         timm_kwargs={"embed_dim": 64, "depth": 2, "num_heads": 2}),
]}


def list_encoders() -> list[str]:
    return list(ENCODERS)


def get_encoder_spec(name: str) -> EncoderSpec:
    try:
        return ENCODERS[name]
    except KeyError:
        raise ConfigError(f"unknown encoder {name!r}; known: {', '.join(ENCODERS)}") from None


def _build(spec: EncoderSpec, pretrained: bool = False) -> torch.nn.Module:
    import timm

    name = f"{spec.timm_name}.{spec.pretrained_tag}" if spec.pretrained_tag else spec.timm_name
    return timm.create_model(name, pretrained=pretrained, num_classes=0, **spec.timm_kwargs)


def _hub_source(repo_id: str) -> str:
    """`hf-hub:<repo>@<snapshot>`: the cached revision that was loaded, for provenance."""
    from huggingface_hub import try_to_load_from_cache

    path = try_to_load_from_cache(repo_id, "model.safetensors")
    rev = Path(path).parent.name if isinstance(path, str) else "unknown-revision"
    return f"hf-hub:{repo_id}@{rev}"


def _resolve_device(device: str | torch.device) -> torch.device:
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def create_encoder(name: str, weights: str = "random", device: str | torch.device = "auto") -> FrozenEncoder:
    """A frozen encoder in eval mode. `weights`: random | hub | file:PATH (module docstring of weights)."""
    spec = get_encoder_spec(name)
    kind, path = parse_weights(weights)
    dev = _resolve_device(device)
    if dev.type == "meta":  # shapes and metadata only: nothing is allocated or loaded
        with torch.device("meta"):
            model = _build(spec)
        return FrozenEncoder(spec, model, WeightsInfo("none", "meta-device", ""), dev)
    if kind == "random":
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(RANDOM_SEED)
            model = _build(spec)
        source = f"random(seed={RANDOM_SEED})"
    elif kind == "hub":
        if spec.hf_hub_id is None:
            raise WeightsError(f"{name} has no published weights; use weights: random or file:<path>")
        try:
            model = _build(spec, pretrained=True)
        except Exception as e:  # noqa: BLE001 - hub/network/cache errors come in many types
            raise WeightsError(f"{hub_help(spec)} (cause: {type(e).__name__}: {str(e).splitlines()[0]})") from e
        source = _hub_source(spec.hf_hub_id)
    else:
        file = resolve_file(path, name)
        model = _build(spec)
        load_file_weights(model, file)
        source = str(file.resolve())
    info = WeightsInfo(kind, source, state_dict_digest(model.state_dict()))
    return FrozenEncoder(spec, model, info, dev)


def encoder_table() -> list[dict[str, Any]]:
    return [{"name": s.name, "timm_model": s.timm_name, "params": s.params, "size": s.size,
             "gflops_224": s.gflops(224), "gflops_512": s.gflops(512), "pretrain_resolution": s.pretrain_resolution,
             "pretrained": s.hf_hub_id or "-"} for s in ENCODERS.values()]


__all__ = ["ENCODERS", "EncoderSpec", "FrozenEncoder", "create_encoder", "encoder_table", "get_encoder_spec",
           "list_encoders"]
