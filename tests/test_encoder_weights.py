"""Weights of the encoder families: MedDINOv3's released checkpoint format through `file:`, its CT
normalisation, hub weights of a non-timm family read offline from the cache, gated-model errors,
and the computed DINOv3 counts against the hand-entered numbers and analytic formula they replace."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from tasks.encoders import create_encoder, get_encoder_spec
from tasks.errors import WeightsError

from .conftest import REPO

MED = "meddinov3_vitb16"


def _pixels(b: int, r: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (b, 3, r, r), dtype=np.uint8)


def to_dinov3_repo_names(state: dict[str, torch.Tensor], depth: int) -> dict[str, torch.Tensor]:
    """timm's DINOv3 names -> the DINOv3 repository's (what MedDINOv3 saves), with the extras its
    training checkpoints carry: zero qkv biases and their mask, RoPE periods, the mask token."""
    ren = {"reg_token": "storage_tokens", ".gamma_1": ".ls1.gamma", ".gamma_2": ".ls2.gamma"}
    out = {}
    for k, v in state.items():
        for a, b in ren.items():
            k = k.replace(a, b)
        out[k] = v
    dim = state["cls_token"].shape[-1]
    for i in range(depth):
        out[f"blocks.{i}.attn.qkv.bias"] = torch.zeros(3 * dim)
        out[f"blocks.{i}.attn.qkv.bias_mask"] = torch.ones(3 * dim)
    out["rope_embed.periods"] = torch.ones(dim // 16)
    out["mask_token"] = torch.zeros(1, dim)
    return out


def meddinov3_checkpoint(state: dict[str, torch.Tensor], drop: str | None = None) -> dict:
    """MedDINOv3's `model.pth` layout: {'teacher': {'backbone.*': ..., 'dino_head.*', 'ibot_head.*'}}."""
    teacher = {f"backbone.{k}": v for k, v in to_dinov3_repo_names(state, 12).items() if k != drop}
    teacher |= {"dino_head.mlp.0.weight": torch.zeros(8, 768), "ibot_head.last_layer.weight": torch.zeros(8, 8)}
    return {"teacher": teacher, "iteration": 1000}


@pytest.fixture(scope="module")
def med_random():
    return create_encoder(MED)


def test_meddinov3_checkpoint_loads_through_file_to_identical_outputs(tmp_path, med_random):
    state = {k: v + 0.02 * torch.randn_like(v) for k, v in med_random.model.state_dict().items()}
    torch.save(meddinov3_checkpoint(state), tmp_path / "model.pth")
    enc = create_encoder(MED, weights=f"file:{tmp_path / 'model.pth'}")
    assert enc.weights.kind == "file" and enc.weights.source.endswith("model.pth")
    for k, v in enc.model.state_dict().items():
        torch.testing.assert_close(v, state[k], msg=k)
    med_random.model.load_state_dict(state)  # the same tensors put in directly
    x = _pixels(2, 32)
    np.testing.assert_array_equal(enc.embed(x), med_random.embed(x))
    torch.testing.assert_close(enc.dense(x, layers=[3, -1]), med_random.dense(x, layers=[3, -1]))
    # MedDINOv3's LayerNorms use eps 1e-6 (timm's DINOv3 default is 1e-5).
    assert enc.model.norm.eps == enc.model.blocks[0].norm1.eps == 1e-6


def test_meddinov3_checkpoint_with_missing_keys_names_them(tmp_path, med_random):
    state = dict(med_random.model.state_dict())
    torch.save(meddinov3_checkpoint(state, drop="blocks.3.norm1.weight"), tmp_path / "model.pth")
    with pytest.raises(WeightsError, match=r"model.pth: does not fit this encoder: 1 missing keys "
                                           r"\['blocks.3.norm1.weight'\]"):
        create_encoder(MED, weights=f"file:{tmp_path / 'model.pth'}")


def test_meddinov3_normalises_hounsfield_units(med_random):
    # uint8 0..255 stands for the CT window [-1000, 1000] HU; MedDINOv3 z-scores HU (65.108, 178.017).
    x = np.zeros((1, 3, 32, 32), np.uint8)
    x[..., 16:] = 255
    norm = med_random._normalised(x).cpu()
    assert norm[0, 0, 0, 0].item() == pytest.approx((-1000 - 65.108) / 178.017, rel=1e-5)
    assert norm[0, 2, 0, 31].item() == pytest.approx((1000 - 65.108) / 178.017, rel=1e-5)
    assert med_random.preprocess_info()["value_range"] == [-1000.0, 1000.0]
    with pytest.raises(WeightsError, match="meddinov3_vitb16 has no published weights"):
        create_encoder(MED, weights="hub")


HUB_SCRIPT = textwrap.dedent("""
    import os
    from pathlib import Path
    from safetensors.torch import save_file
    from tasks.encoders import create_encoder, get_encoder_spec
    from tasks.errors import WeightsError
    for name in ("uni", "rad_dino"):
        try:
            create_encoder(name, weights="hub", device="cpu")
            print("LOADED-WITHOUT-CACHE", name)
        except WeightsError as e:
            print("ERROR:", name, e)
    spec = get_encoder_spec("rad_dino")
    rnd = create_encoder("rad_dino", weights="random", device="cpu")
    repo = Path(os.environ["HF_HOME"]) / "hub" / ("models--" + spec.hf_hub_id.replace("/", "--"))
    rev = "fedcba9876543210fedcba9876543210fedcba98"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(rev)
    (repo / "snapshots" / rev).mkdir(parents=True)
    save_file({k: v + 0.01 for k, v in rnd.model.state_dict().items()}, str(repo / "snapshots" / rev / "model.safetensors"))
    hub = create_encoder("rad_dino", weights="hub", device="cpu")
    print("SOURCE:", hub.weights.source, "DIFFERS:", hub.weights.digest != rnd.weights.digest)
""")


def test_family_hub_weights_load_offline_and_gated_ones_say_how_to_get_them(tmp_path):
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-c", HUB_SCRIPT], cwd=REPO, env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "LOADED-WITHOUT-CACHE" not in out.stdout
    assert ("ERROR: uni pretrained weights for uni (MahmoodLab/uni) are not in the local Hugging Face cache"
            in out.stdout)
    assert "gated: accept the licence (CC-BY-NC-ND-4.0) on https://huggingface.co/MahmoodLab/uni" in out.stdout
    assert "huggingface-cli login" in out.stdout and "HF_HOME" in out.stdout
    assert "SOURCE: hf-hub:microsoft/rad-dino@fedcba9876543210" in out.stdout and "DIFFERS: True" in out.stdout


# -- computed counts against what used to be typed in -------------------------------------------
def vit_gflops_formula(params: int, patch_params: int, depth: int, dim: int, r: int, patch: int = 16) -> float:
    """The registry's former analytic count: 2 P_blocks T + 4 depth d T^2 + 2 P_patch (r/p)^2, T = (r/p)^2 + 5."""
    n = (r // patch) ** 2
    t = n + 5
    return (2 * (params - patch_params) * t + 4 * depth * dim * t * t + 2 * patch_params * n) / 1e9


def convnext_gflops_formula(dims: tuple[int, ...], depths: tuple[int, ...], r: int) -> float:
    """The former ConvNeXt count: every weight once per output position of its stage (timm: 4.47 GMACs)."""
    stem = 4 * 4 * 3 * dims[0] + 3 * dims[0]
    macs = stem * (r / 4) ** 2
    for i, (d, n) in enumerate(zip(dims, depths, strict=True)):
        down = 0 if i == 0 else 2 * dims[i - 1] + 4 * dims[i - 1] * d + d
        macs += (down + n * (8 * d * d + 58 * d)) * (r / (4 * 2**i)) ** 2
    return 2 * macs / 1e9


VIT_TYPED = {  # name: (params, patch-embedding params, depth, width): the former hand-entered values
    "dinov3_vits16": (21_586_944, 295_296, 12, 384), "dinov3_vitsp16": (28_683_264, 295_296, 12, 384),
    "dinov3_vitb16": (85_641_216, 590_592, 12, 768), "dinov3_vitl16": (303_079_424, 787_456, 24, 1024),
    "dinov3_vithp16": (840_509_440, 984_320, 32, 1280), "dinov3_vit7b16": (6_716_030_976, 3_149_824, 40, 4096),
    "test_vit_tiny16": (149_504, 49_216, 2, 64),
}
CONVNEXT_TYPED = {
    "dinov3_convnext_tiny": (27_820_128, (96, 192, 384, 768), (3, 3, 9, 3)),
    "dinov3_convnext_small": (49_454_688, (96, 192, 384, 768), (3, 3, 27, 3)),
    "dinov3_convnext_base": (87_566_464, (128, 256, 512, 1024), (3, 3, 27, 3)),
    "dinov3_convnext_large": (196_230_336, (192, 384, 768, 1536), (3, 3, 27, 3)),
}


@pytest.mark.parametrize("name", sorted(VIT_TYPED) + sorted(CONVNEXT_TYPED))
@pytest.mark.parametrize("r", [224, 512])
def test_computed_counts_equal_the_former_hand_entered_ones(name, r):
    spec = get_encoder_spec(name)
    if name in VIT_TYPED:
        params, patch_params, depth, dim = VIT_TYPED[name]
        formula = vit_gflops_formula(params, patch_params, depth, dim, r)
    else:
        params, dims, depths = CONVNEXT_TYPED[name]
        formula = convnext_gflops_formula(dims, depths, r)
    assert spec.params == params
    assert spec.gflops(r) == pytest.approx(formula, rel=0.03)
