"""open_clip encoders: BiomedCLIP's and CONCH's image towers.

Only the vision tower is built: open_clip's `TimmModel` (a timm ViT-B/16 trunk + a 768 -> 512
linear projection, no bias), the tower BiomedCLIP's open_clip config names. Building the whole CLIP
model would build the PubMedBERT text tower and fetch its config from the hub; neither is needed
for image embeddings. The trunk is timm's `vit_base_patch16_224` made with `dynamic_img_size=True`
so that any multiple of 16 is accepted (position embeddings interpolated); at 224 px it is the
same network with the same parameter names as open_clip's own trunk.
"""

from __future__ import annotations

from typing import Any

import torch

from tasks.encoders.spec import EncoderSpec, Preprocessing, register, token_poolings
from tasks.encoders.timm_family import TimmViTOps
from tasks.weights import StateDict, strip_prefix

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
BIOMEDCLIP_HUB = "microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224"
CONCH_EMBED = 512  # CoCa's contrastive width: the attentional pooler's output


def build_biomedclip_tower(**trunk_overrides: Any) -> torch.nn.Module:
    import timm
    from open_clip.timm_model import TimmModel

    # Its open_clip config: timm_model_name vit_base_patch16_224, timm_pool "" (CLS), timm_proj
    # linear, embed_dim 512, image_size 224.
    tower = TimmModel("vit_base_patch16_224", embed_dim=512, image_size=224, pool="", proj="linear",
                      proj_bias=False, pretrained=False)
    tower.trunk = timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=0,
                                    dynamic_img_size=True, **trunk_overrides)
    if trunk_overrides:  # a narrower test trunk: the projection follows its width
        tower.head.proj = torch.nn.Linear(tower.trunk.num_features, 512, bias=False)
    return tower


class OpenClipTimmOps(TimmViTOps):
    """A `TimmModel` tower: tokens and maps from its timm trunk, `head` = CLS through the projection."""

    def tokens(self, model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
        return model.trunk.forward_features(x)

    def head(self, model: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
        return model.head(model.trunk.forward_head(tokens))

    def intermediates(self, model: torch.nn.Module, x: torch.Tensor, idx: list[int]) -> list[torch.Tensor]:
        return super().intermediates(model.trunk, x, idx)


def visual_filter(state: StateDict, model: torch.nn.Module) -> StateDict:
    """A whole open_clip checkpoint (`visual.*`, `text.*`, `logit_scale`) -> the image tower."""
    return strip_prefix(state, "visual.") if any(k.startswith("visual.") for k in state) else state


class ConchTower(torch.nn.Module):
    """CONCH's image tower up to the embedding its authors use for linear probes and MIL
    (`encode_image(proj_contrast=False, normalize=False)`), from the CONCH repository's CoCa config
    (`conch_ViT-B-16`): a timm `VisionTransformer` (width 768, 12 blocks, 12 heads, MLP ratio 4,
    patch 16, 448 px, `dynamic_img_size`, no classifier) whose normed tokens go through the
    contrastive attentional pooler (1 query, width 512, 8 heads, keys/values 768) and a LayerNorm.
    open_clip's `AttentionalPooler` has the same parameters and computes the same function (batch-
    first instead of sequence-first); the caption pooler and the contrastive projection are not
    part of this embedding and are not built (docs/encoders.md)."""

    def __init__(self, **trunk_overrides: Any):
        from open_clip.transformer import AttentionalPooler
        from timm.models.vision_transformer import VisionTransformer

        super().__init__()
        args = {"embed_dim": 768, "depth": 12, "num_heads": 12, "mlp_ratio": 4, "img_size": 448, "patch_size": 16,
                "num_classes": 0, "dynamic_img_size": True}
        self.trunk = VisionTransformer(**{**args, **trunk_overrides})
        self.attn_pool_contrast = AttentionalPooler(d_model=CONCH_EMBED, context_dim=self.trunk.num_features,
                                                    n_head=8, n_queries=1)
        self.ln_contrast = torch.nn.LayerNorm(CONCH_EMBED)


class ConchOps(OpenClipTimmOps):
    def head(self, model: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
        return model.ln_contrast(model.attn_pool_contrast(tokens)[:, 0])


def conch_filter(state: StateDict, model: torch.nn.Module) -> StateDict:
    """CONCH's released CoCa checkpoint -> the tower: `visual.*` kept (text tower and decoder
    dropped), without the parts this embedding does not use (caption pooler, contrastive projection)."""
    state = visual_filter(state, model)
    return {k: v for k, v in state.items() if not k.startswith(("attn_pool_caption.", "ln_caption.", "proj_contrast"))}


register(
    EncoderSpec(
        "biomedclip", "open_clip", "biomedclip", "vit", "TimmModel:vit_base_patch16_224", 16, 1, 768,
        12, "base", "head", token_poolings(768, head=512), build_biomedclip_tower, OpenClipTimmOps(),
        Preprocessing(mean=OPENAI_MEAN, std=OPENAI_STD, interpolation="bicubic"), pretrain_resolution=224,
        licence="MIT", hf_hub_id=BIOMEDCLIP_HUB, hub_files=("open_clip_model.safetensors", "open_clip_pytorch_model.bin"),
        filter_checkpoint=visual_filter),
    EncoderSpec(
        "conch", "open_clip", "conch", "vit", "CoCa conch_ViT-B-16 tower", 16, 1, 768, 12, "base", "head",
        token_poolings(768, head=CONCH_EMBED), ConchTower, ConchOps(),
        Preprocessing(mean=OPENAI_MEAN, std=OPENAI_STD, interpolation="bicubic"), pretrain_resolution=448,
        licence="CC-BY-NC-ND-4.0", gated=True, hf_hub_id="MahmoodLab/conch",
        hub_files=("pytorch_model.bin",), filter_checkpoint=conch_filter),
)
