"""open_clip encoders: BiomedCLIP's image tower.

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


register(
    EncoderSpec(
        "biomedclip", "open_clip", "biomedclip", "vit", "TimmModel:vit_base_patch16_224", 16, 1, 768,
        12, "base", "head", token_poolings(768, head=512), build_biomedclip_tower, OpenClipTimmOps(),
        Preprocessing(mean=OPENAI_MEAN, std=OPENAI_STD, interpolation="bicubic"), pretrain_resolution=224,
        licence="MIT", hf_hub_id=BIOMEDCLIP_HUB, hub_files=("open_clip_model.safetensors", "open_clip_pytorch_model.bin"),
        filter_checkpoint=visual_filter),
)
