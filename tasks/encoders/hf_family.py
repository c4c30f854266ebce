"""transformers encoders: RAD-DINO (Dinov2Model) and MedSigLIP-448 (SiglipVisionModel).

The architectures come from the configs below, kept in this repository: the hub's config of
MedSigLIP is gated, and reading a config from the hub at build time would make building need the
network. Only the weight file is read from the hub, and never with `trust_remote_code`.
"""

from __future__ import annotations

from typing import Any

import torch

from tasks.encoders.spec import EncoderSpec, Preprocessing, register, token_poolings
from tasks.errors import ConfigError
from tasks.weights import StateDict, strip_prefix

# microsoft/rad-dino config.json: DINOv2 ViT-B/14 at 518 px, 1 CLS, no registers.
RAD_DINO_CONFIG: dict[str, Any] = {
    "hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12, "mlp_ratio": 4,
    "patch_size": 14, "image_size": 518, "layerscale_value": 1.0, "layer_norm_eps": 1e-6,
    "hidden_act": "gelu", "qkv_bias": True, "use_swiglu_ffn": False, "num_channels": 3,
}
# google/medsiglip-448 vision_config: SigLIP so400m/14 at 448 px, no CLS, attention-pool head.
MEDSIGLIP_VISION_CONFIG: dict[str, Any] = {
    "hidden_size": 1152, "intermediate_size": 4304, "num_hidden_layers": 27, "num_attention_heads": 16,
    "patch_size": 14, "image_size": 448, "hidden_act": "gelu_pytorch_tanh", "layer_norm_eps": 1e-6,
    "num_channels": 3,
}


def build_rad_dino(**overrides: Any) -> torch.nn.Module:
    from transformers import Dinov2Config, Dinov2Model

    return Dinov2Model(Dinov2Config(**{**RAD_DINO_CONFIG, **overrides}))


def build_medsiglip(**overrides: Any) -> torch.nn.Module:
    from transformers import SiglipVisionConfig, SiglipVisionModel

    return SiglipVisionModel(SiglipVisionConfig(**{**MEDSIGLIP_VISION_CONFIG, **overrides}))


class HFViTOps:
    """A transformers ViT: `last_hidden_state` is the final-normed token sequence."""

    def __init__(self, norm: str, prefix: int, head: str | None = None, interpolate_arg: bool = False):
        self.norm, self.prefix, self.head_attr, self.interpolate_arg = norm, prefix, head, interpolate_arg

    def _run(self, model: torch.nn.Module, x: torch.Tensor, hidden: bool = False) -> Any:
        # SigLIP interpolates its learned position grid only when asked (identity at 448 px);
        # DINOv2 always interpolates.
        kw = {"interpolate_pos_encoding": True} if self.interpolate_arg else {}
        return model(pixel_values=x, output_hidden_states=hidden, **kw)

    def tokens(self, model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
        return self._run(model, x).last_hidden_state

    def head(self, model: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
        if self.head_attr is None:
            raise ConfigError("this encoder has no pooling head of its own; use cls, mean or cls+mean")
        # MedSigLIP's image embedding: the attention-pool head's output, L2-normalised.
        return torch.nn.functional.normalize(getattr(_inner(model), self.head_attr)(tokens), dim=-1)

    def intermediates(self, model: torch.nn.Module, x: torch.Tensor, idx: list[int]) -> list[torch.Tensor]:
        states = self._run(model, x, hidden=True).hidden_states  # embeddings, then each block
        norm = getattr(_inner(model), self.norm)
        p = model.config.patch_size
        h, w = x.shape[2] // p, x.shape[3] // p
        out = []
        for i in idx:
            t = norm(states[i + 1])[:, self.prefix:]
            out.append(t.transpose(1, 2).reshape(t.shape[0], t.shape[2], h, w))
        return out


def _inner(model: torch.nn.Module) -> torch.nn.Module:
    """transformers < 5 nests SiglipVisionModel's layers under `.vision_model`; 5 does not."""
    return getattr(model, "vision_model", model)


def siglip_filter(state: StateDict, model: torch.nn.Module) -> StateDict:
    """A whole SigLIP checkpoint (`vision_model.*`, `text_model.*`, `logit_*`) or a vision model's
    own (with or without `vision_model.`, as transformers 4 and 5 name it) -> this model's names."""
    if any(k.startswith("vision_model.") for k in state):
        state = strip_prefix(state, "vision_model.")
    nested = any(k.startswith("vision_model.") for k in model.state_dict())
    return {f"vision_model.{k}": v for k, v in state.items()} if nested else state


register(
    EncoderSpec(
        "rad_dino", "transformers", "rad_dino", "vit", "Dinov2Model", 14, 1, 768, 12, "base", "cls",
        token_poolings(768), build_rad_dino, HFViTOps("layernorm", 1),
        Preprocessing(mean=(0.5307,) * 3, std=(0.2583,) * 3, interpolation="bicubic", channels="grey->rgb"),
        pretrain_resolution=518, licence="MSRLA (Microsoft Research License Agreement)",
        hf_hub_id="microsoft/rad-dino"),
    EncoderSpec(
        "medsiglip_448", "transformers", "medsiglip", "vit", "SiglipVisionModel", 14, 0, 1152, 27, "large", "head",
        token_poolings(1152, head=1152, cls=False), build_medsiglip,
        HFViTOps("post_layernorm", 0, head="head", interpolate_arg=True),
        Preprocessing(mean=(0.5,) * 3, std=(0.5,) * 3, interpolation="bilinear"), pretrain_resolution=448,
        licence="Health AI Developer Foundations terms of use", gated=True, hf_hub_id="google/medsiglip-448",
        filter_checkpoint=siglip_filter),
)
