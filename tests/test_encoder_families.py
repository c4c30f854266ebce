"""Encoder families beyond DINOv3: each builds with random weights and no network, embeds, gives
dense maps where it has patch tokens, loads its own checkpoint formats, and refuses wrong sizes.

Real forwards use the real architecture where it is small enough to draw on 2 cores (ResNet50
truncated, ViT-B sized BiomedCLIP, RAD-DINO, MedDINOv3); the larger designs (UNI ViT-L, UNI2-h,
MedSigLIP so400m) run through the very same builder with narrower arguments, and are checked at
full size on the meta device (shapes, parameters) where nothing is drawn.
"""

from __future__ import annotations

import dataclasses
from functools import partial

import numpy as np
import pytest
import torch

from tasks.encoders import build_encoder, create_encoder, get_encoder_spec, list_encoders
from tasks.errors import ConfigError, WeightsError
from tasks.weights import weights_for

# Published parameter counts (model cards, CLAM's baseline, DINOv3-B for MedDINOv3; no classifier head).
PUBLISHED_PARAMS = {"resnet50_trunc": 8_543_296, "uni": 303_350_784, "rad_dino": 86_580_480, "uni2_h": 681e6,
                    "meddinov3_vitb16": 85_641_216}


def _pixels(b: int, r: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (b, 3, r, r), dtype=np.uint8)


def narrow(name: str, **overrides) -> object:
    """The family's own builder with narrower arguments: same code path, a few thousand parameters."""
    spec = get_encoder_spec(name)
    dim = overrides.get("embed_dim", overrides.get("hidden_size", 64))
    # Widths that follow the trunk shrink with it; a fixed head width (a 512-d projection) stays.
    dims = {k: (dim if v == spec.embed_dim else 2 * dim if v == 2 * spec.embed_dim else v)
            for k, v in spec.pooling_dims.items()}
    return dataclasses.replace(spec, name=f"{name}_narrow", embed_dim=dim, depth=2, pooling_dims=dims,
                               build=partial(spec.build, **overrides))


NARROW = {
    "uni": dict(embed_dim=64, depth=2, num_heads=2),
    "uni2_h": dict(embed_dim=96, depth=2, num_heads=2),  # SwiGLU needs an even hidden width
    "medsiglip_448": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2),
}


@pytest.mark.parametrize("name", sorted(PUBLISHED_PARAMS))
def test_parameters_are_computed_from_the_architecture(name):
    spec = get_encoder_spec(name)
    assert spec.params == pytest.approx(PUBLISHED_PARAMS[name], rel=1e-3)
    meta = create_encoder(name, device="meta")
    assert sum(p.numel() for p in meta.model.parameters()) == spec.params


@pytest.mark.parametrize("name", ["biomedclip", "conch", "medsiglip_448", "rad_dino", "resnet50_trunc", "uni2_h"])
def test_gflops_grow_with_resolution_and_count_attention(name):
    spec = get_encoder_spec(name)
    g, g2 = spec.gflops(224), spec.gflops(448)
    assert g > 0 and g2 > 3.9 * g  # at least the pixel count's growth
    if spec.arch == "vit":  # attention is quadratic in tokens: counted (meta device), so faster than pixels
        assert g2 > 4.05 * g


def test_biomedclip_tower_is_its_trunk_plus_a_bias_free_projection():
    import timm

    with torch.device("meta"):
        trunk = timm.create_model("vit_base_patch16_224", num_classes=0)
    assert get_encoder_spec("biomedclip").params == sum(p.numel() for p in trunk.parameters()) + 768 * 512


def test_resnet50_baseline_matches_the_published_compute_and_pools_its_map():
    spec = get_encoder_spec("resnet50_trunc")
    assert spec.gflops(224) == pytest.approx(6.56, rel=0.01)  # CLAM/TRIDENT's baseline at 224 px
    enc = create_encoder("resnet50_trunc")
    x = _pixels(2, 64)
    dense = enc.dense(x)
    assert tuple(dense.shape) == (2, 1024, 4, 4) and enc.resolve_pooling("auto") == "mean"
    np.testing.assert_allclose(enc.embed(x), dense.mean(dim=(2, 3)).numpy(), rtol=1e-5, atol=1e-6)
    with pytest.raises(ConfigError, match="not a multiple of 16 .the output stride of resnet50_trunc"):
        enc.embed(_pixels(1, 40))
    with pytest.raises(ConfigError, match="intermediate layers are available for ViT encoders only"):
        enc.dense(x, layers=[1])


def _check_vit(enc, r: int) -> None:
    """Pooled embeddings of every pooling, the dense grid, and the last layer's map agree."""
    spec, x = enc.spec, _pixels(2, r)
    grid = r // spec.patch_size
    for pooling, dim in spec.pooling_dims.items():
        out = enc.embed(x, pooling)
        assert out.shape == (2, dim) and out.dtype == np.float32 and np.isfinite(out).all(), pooling
    dense = enc.dense(x)
    assert tuple(dense.shape) == (2, spec.embed_dim, grid, grid)
    np.testing.assert_allclose(enc.embed(x, "mean"), dense.mean(dim=(2, 3)).numpy(), rtol=1e-4, atol=1e-5)
    both = enc.dense(x, layers=[0, -1])
    assert tuple(both.shape) == (2, 2 * spec.embed_dim, grid, grid)
    torch.testing.assert_close(both[:, spec.embed_dim:], dense, rtol=1e-4, atol=1e-4)


@pytest.fixture(scope="module")
def biomedclip():
    return create_encoder("biomedclip")  # a ViT-B drawn once for the tests below (~5 s here)


def test_biomedclip_tower_embeds_through_its_projection_and_matches_open_clip(biomedclip):
    from open_clip.timm_model import TimmModel

    enc = biomedclip
    assert enc.resolve_pooling("auto") == "head" and enc.embedding_dim("auto") == 512
    _check_vit(enc, 32)
    # At its pretraining size the tower is open_clip's own TimmModel with the same weights.
    with torch.device("meta"):  # built without drawing weights; they all come from the encoder
        ref = TimmModel("vit_base_patch16_224", embed_dim=512, image_size=224, pool="", proj="linear",
                        proj_bias=False)
    ref.load_state_dict(enc.model.state_dict(), strict=True, assign=True)
    x = _pixels(1, 224)
    with torch.no_grad():
        expect = ref.eval()(enc._normalised(x)).numpy()
    np.testing.assert_allclose(enc.embed(x), expect, rtol=1e-4, atol=1e-5)


def test_biomedclip_loads_a_whole_open_clip_checkpoint_with_its_text_tower(tmp_path, biomedclip):
    enc = biomedclip
    state = {f"visual.{k}": v + 0.01 for k, v in enc.model.state_dict().items()}
    state |= {"text.transformer.embeddings.word_embeddings.weight": torch.zeros(4, 8), "logit_scale": torch.ones(())}
    torch.save(state, tmp_path / "open_clip_pytorch_model.bin.pt")
    loaded = create_encoder("biomedclip", weights=f"file:{tmp_path / 'open_clip_pytorch_model.bin.pt'}")
    torch.testing.assert_close(loaded.model.head.proj.weight, state["visual.head.proj.weight"])


def test_rad_dino_is_a_14_pixel_patch_model():
    enc = create_encoder("rad_dino")
    assert enc.resolve_pooling("auto") == "cls" and enc.spec.pretrain_resolution == 518
    _check_vit(enc, 28)
    with pytest.raises(ConfigError, match=r"resolution 256 is not a multiple of 14 \(the patch size of rad_dino\); "
                                          r"use 252 or 266"):
        enc.embed(_pixels(1, 256))
    assert enc.check_resolution(224) == 224  # 16 x 14: the paper's 224 px grid works for /14 models


@pytest.mark.parametrize("name", sorted(NARROW))
def test_large_families_embed_through_their_own_builder(name):
    enc = build_encoder(narrow(name, **NARROW[name]))
    r = 2 * enc.spec.patch_size
    _check_vit(enc, r)
    full = create_encoder(name, device="meta")  # the real size: the same code, shapes only
    assert full.embedding_dim("auto") == get_encoder_spec(name).pooling_dims[full.resolve_pooling("auto")]
    if name == "medsiglip_448":  # its embedding is the attention pool's output, L2-normalised
        np.testing.assert_allclose(np.linalg.norm(enc.embed(_pixels(2, r)), axis=1), 1.0, rtol=1e-5)
        assert full.resolve_pooling("auto") == "head" and "cls" not in enc.spec.pooling_dims
    if name == "uni2_h":  # 1 CLS + 8 registers ahead of the patches; 32 px is not a multiple of 14
        assert enc.model.num_prefix_tokens == enc.spec.prefix_tokens == 9
        with pytest.raises(ConfigError, match="not a multiple of 14.*use 28 or 42"):
            enc.embed(_pixels(1, 32))


def test_medsiglip_loads_a_whole_siglip_checkpoint(tmp_path):
    from safetensors.torch import save_file

    spec = narrow("medsiglip_448", **NARROW["medsiglip_448"])
    enc = build_encoder(spec)
    state = {f"vision_model.{k}": v + 0.01 for k, v in enc.model.state_dict().items()}
    state["text_model.embeddings.token_embedding.weight"] = torch.zeros(4, 8)
    save_file(state, str(tmp_path / "siglip.safetensors"))
    loaded = build_encoder(spec, weights=f"file:{tmp_path / 'siglip.safetensors'}")
    assert loaded.weights.digest != enc.weights.digest
    x = _pixels(1, 28)
    assert not np.allclose(loaded.embed(x), enc.embed(x))


def test_conch_tower_pools_as_conch_does_and_loads_its_coca_checkpoint(tmp_path):
    spec = narrow("conch", embed_dim=64, depth=2, num_heads=2)
    enc = build_encoder(spec)
    assert enc.resolve_pooling("auto") == "head" and enc.embedding_dim("auto") == 512
    _check_vit(enc, 32)
    # CONCH's own pooler runs sequence-first: the same weights in torch's MultiheadAttention laid
    # out that way give the same embedding (ln_contrast(attn_pool_contrast(tokens)[:, 0])).
    x = _pixels(2, 32)
    pool = enc.model.attn_pool_contrast
    with torch.no_grad():
        tokens = enc.model.trunk.forward_features(enc._normalised(x))
        mha = torch.nn.MultiheadAttention(512, 8, kdim=64, vdim=64)
        mha.load_state_dict(pool.attn.state_dict())
        k = pool.ln_k(tokens).permute(1, 0, 2)
        q = pool.ln_q(pool.query).unsqueeze(1).repeat(1, 2, 1)
        expect = enc.model.ln_contrast(mha(q, k, k, need_weights=False)[0].permute(1, 0, 2)[:, 0])
    np.testing.assert_allclose(enc.embed(x), expect.numpy(), rtol=1e-4, atol=1e-5)
    # The released checkpoint is the whole CoCa model: text tower, caption pooler, projection.
    state = {f"visual.{k}": v + 0.01 for k, v in enc.model.state_dict().items()}
    state |= {"visual.attn_pool_caption.query": torch.zeros(256, 768), "visual.ln_caption.weight": torch.ones(768),
              "visual.proj_contrast": torch.zeros(512, 512), "text.token_embedding.weight": torch.zeros(4, 8),
              "logit_scale": torch.ones(())}
    torch.save(state, tmp_path / "conch.bin.pt")
    loaded = build_encoder(spec, weights=f"file:{tmp_path / 'conch.bin.pt'}")
    torch.testing.assert_close(loaded.model.ln_contrast.weight, state["visual.ln_contrast.weight"])
    assert get_encoder_spec("conch").pretrain_resolution == 448


def test_weights_mapping_picks_each_encoders_source():
    setting = {"default": "hub", "meddinov3_vitb16": "file:/ckpt/model.pth"}
    assert weights_for("meddinov3_vitb16", setting) == "file:/ckpt/model.pth"
    assert weights_for("dinov3_vits16", setting) == "hub"
    assert weights_for("uni", "random") == "random"
    with pytest.raises(WeightsError, match="no entry for uni and no `default`"):
        weights_for("uni", {"rad_dino": "hub"})
    with pytest.raises(WeightsError, match="weights.vit_huge: not an encoder"):
        weights_for("uni", {"vit_huge": "hub"}, list_encoders())
    with pytest.raises(WeightsError, match="weights.uni: weights 'hf': use 'hub'"):
        weights_for("uni", {"uni": "hf"})
    assert create_encoder("test_vit_tiny16", weights={"default": "hub", "test_vit_tiny16": "random"}).weights.kind == "random"


def test_an_unavailable_entry_says_why_instead_of_building():
    spec = dataclasses.replace(get_encoder_spec("biomedclip"), name="needs_a_package",
                               unavailable="its tower lives in a package no registry carries")
    with pytest.raises(ConfigError, match="needs_a_package is not available: its tower lives in a package"):
        build_encoder(spec)
    with pytest.raises(ConfigError, match="needs_a_package is not available"):
        spec.gflops(224)
