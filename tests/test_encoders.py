"""Encoders: registry metadata, frozen forward, pooling, resolutions, and every source of weights."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from orchestrator.cli import main as cli_main
from tasks.encoders import ENCODERS, create_encoder, get_encoder_spec, list_encoders
from tasks.errors import ConfigError, WeightsError
from tasks.preprocess import prepare_image

from .conftest import REPO, TINY

# Backbone parameters (no head) of the real models: DINOv3 model cards via timm (docs/libraries.md), and
# timm's ConvNeXt definitions (published with-head counts minus the 1000-class head).
PUBLISHED_PARAMS = {
    "dinov3_vits16": 21.6e6, "dinov3_vitsp16": 28.7e6, "dinov3_vitb16": 85.6e6, "dinov3_vitl16": 303.1e6,
    "dinov3_vithp16": 840.5e6, "dinov3_vit7b16": 6716e6, "dinov3_convnext_tiny": 28.59e6 - 0.769e6,
    "dinov3_convnext_small": 50.22e6 - 0.769e6, "dinov3_convnext_base": 88.59e6 - 1.025e6,
    "dinov3_convnext_large": 197.77e6 - 1.537e6,
}
# The parameter counts the registry used to have typed in (timm, no head); now computed on the meta
# device, they must come out the same.
HAND_TYPED_PARAMS = {
    "dinov3_vits16": 21_586_944, "dinov3_vitsp16": 28_683_264, "dinov3_vitb16": 85_641_216,
    "dinov3_vitl16": 303_079_424, "dinov3_vithp16": 840_509_440, "dinov3_vit7b16": 6_716_030_976,
    "dinov3_convnext_tiny": 27_820_128, "dinov3_convnext_small": 49_454_688,
    "dinov3_convnext_base": 87_566_464, "dinov3_convnext_large": 196_230_336, TINY: 149_504,
}
# Backbone GFLOPs per image at 224 px (docs/libraries.md; ConvNeXt: timm's profiled GMACs x 2).
PUBLISHED_GFLOPS_224 = {"dinov3_vits16": 9.4, "dinov3_vitb16": 35.9, "dinov3_vitl16": 125.7,
                        "dinov3_vithp16": 344.2, "dinov3_vit7b16": 2725.5, "dinov3_convnext_tiny": 2 * 4.47}
# Random init of more than this many parameters takes over 10 s on 2 cores (ViT-L: ~15 s, H+ and 7B
# need 3.4 and 27 GB): those are built on the meta device, which has the same parameters.
REAL_BUILD_MAX = 100e6


def _pixels(b: int, h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (b, 3, h, w), dtype=np.uint8)


FAMILY_ENCODERS = {"resnet50_trunc", "uni", "uni2_h", "biomedclip", "conch", "rad_dino", "medsiglip_448",
                   "meddinov3_vitb16"}


def test_registry_covers_every_dinov3_backbone_and_the_other_families():
    assert set(PUBLISHED_PARAMS) | {TINY} | FAMILY_ENCODERS == set(list_encoders())
    with pytest.raises(ConfigError, match="unknown encoder 'vit_giant'; known: dinov3_vits16"):
        get_encoder_spec("vit_giant")


@pytest.mark.parametrize("name", sorted(PUBLISHED_PARAMS))
def test_every_encoder_builds_with_the_real_parameter_count(name, capsys):
    spec = get_encoder_spec(name)
    device = "cpu" if spec.params <= REAL_BUILD_MAX else "meta"
    if device == "meta":
        print(f"{name}: {spec.params / 1e6:.0f}M parameters, built on the meta device (random init too slow here)")
    enc = create_encoder(name, weights="random", device=device)
    built = sum(p.numel() for p in enc.model.parameters())
    assert built == spec.params
    assert abs(built - PUBLISHED_PARAMS[name]) / PUBLISHED_PARAMS[name] < 0.01
    assert not any(p.requires_grad for p in enc.model.parameters()) and not enc.model.training
    if device == "cpu":
        assert enc.weights.kind == "random" and len(enc.weights.digest) == 64
        r = 64
        assert enc.embed(_pixels(1, r, r)).shape == (1, enc.embedding_dim("auto"))
    else:
        assert enc.weights.kind == "none"


@pytest.mark.parametrize("name", sorted(PUBLISHED_GFLOPS_224))
def test_analytic_gflops_match_the_published_numbers(name):
    spec = get_encoder_spec(name)
    assert spec.gflops(224) == pytest.approx(PUBLISHED_GFLOPS_224[name], rel=0.01)
    # Compute grows with resolution, faster than the pixel count for ViTs (attention is quadratic).
    assert spec.gflops(512) > (512 / 224) ** 2 * spec.gflops(224) * (0.99 if spec.arch == "convnet" else 1.0)


@pytest.mark.parametrize("resolution", [32, 48])
def test_embedding_and_dense_shapes(resolution):
    enc = create_encoder(TINY)
    x = _pixels(3, resolution, resolution)
    grid = resolution // 16
    assert enc.embed(x, "cls+mean").shape == (3, 128)
    assert enc.embed(x, "cls").shape == enc.embed(x, "mean").shape == (3, 64)
    assert enc.embed(x).dtype == np.float32
    dense = enc.dense(x)
    assert dense.shape == (3, 64, grid, grid) and dense.dtype == torch.float32
    # The mean pooling is the mean of the dense grid; cls+mean is the concatenation.
    np.testing.assert_allclose(enc.embed(x, "mean"), dense.mean(dim=(2, 3)).numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(enc.embed(x, "cls+mean"), np.hstack([enc.embed(x, "cls"), enc.embed(x, "mean")]))


def test_convnext_shapes_and_pooling():
    enc = create_encoder("dinov3_convnext_tiny")
    x = _pixels(2, 64, 96)
    assert enc.embed(x).shape == (2, 768) and enc.resolve_pooling("auto") == "mean"
    assert tuple(enc.dense(x).shape) == (2, 768, 2, 3)
    with pytest.raises(ConfigError, match="pooling 'cls' is not available for dinov3_convnext_tiny"):
        enc.embed(x, "cls")
    with pytest.raises(ConfigError, match="not a multiple of 32"):
        enc.embed(_pixels(1, 48, 48))


def test_resolution_must_be_a_multiple_of_the_patch():
    enc = create_encoder(TINY)
    with pytest.raises(ConfigError, match=r"resolution 100 is not a multiple of 16 .*use 96 or 112"):
        enc.check_resolution(100)
    with pytest.raises(ConfigError, match="not a multiple of 16"):
        enc.embed(_pixels(1, 40, 40))
    with pytest.raises(ValueError, match="uint8 batch"):
        enc.embed(np.zeros((1, 3, 32, 32), np.float32))


def test_normalisation_uses_the_pretrained_statistics():
    enc = create_encoder(TINY)
    x = _pixels(2, 32, 32)
    mean = torch.tensor(enc.model.pretrained_cfg["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(enc.model.pretrained_cfg["std"]).view(1, 3, 1, 1)
    with torch.no_grad():
        tokens = enc.model.forward_features((torch.from_numpy(x).float() / 255 - mean) / std)
    np.testing.assert_allclose(enc.embed(x, "cls"), tokens[:, 0].numpy(), rtol=1e-4, atol=1e-5)
    assert enc.preprocess_info()["interpolation"] == "bicubic"


def test_random_weights_are_deterministic():
    a, b = create_encoder(TINY), create_encoder(TINY)
    assert a.weights.digest == b.weights.digest and a.weights.source == "random(seed=0)"
    x = _pixels(2, 32, 32)
    np.testing.assert_array_equal(a.embed(x), b.embed(x))


def test_file_weights_round_trip_and_change_the_features(tmp_path):
    rnd = create_encoder(TINY)
    state = {k: v + 0.05 * torch.randn_like(v) for k, v in rnd.model.state_dict().items()}
    save_file(state, str(tmp_path / f"{TINY}.safetensors"))
    for spec in (f"file:{tmp_path / TINY}.safetensors", f"file:{tmp_path}"):  # a file, or a directory
        enc = create_encoder(TINY, weights=spec)
        assert enc.weights.kind == "file" and enc.weights.source.endswith(f"{TINY}.safetensors")
        for k, v in enc.model.state_dict().items():
            torch.testing.assert_close(v, state[k])
        assert enc.weights.digest != rnd.weights.digest
        x = _pixels(2, 32, 32)
        assert not np.allclose(enc.embed(x), rnd.embed(x))
    # .pt through torch.load(weights_only=True), wrapped as training checkpoints often are.
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}}, tmp_path / "ckpt.pt")
    assert create_encoder(TINY, weights=f"file:{tmp_path / 'ckpt.pt'}").weights.digest == enc.weights.digest


def test_bad_weight_files_are_errors_that_name_the_file(tmp_path):
    with pytest.raises(WeightsError, match="weights file not found"):
        create_encoder(TINY, weights=f"file:{tmp_path / 'nope.safetensors'}")
    with pytest.raises(WeightsError, match=f"no weights for {TINY} in this directory"):
        create_encoder(TINY, weights=f"file:{tmp_path}")
    wrong = create_encoder("dinov3_vits16", device="meta")
    save_file({k: torch.zeros(v.shape) for k, v in list(wrong.model.state_dict().items())[:5]},
              str(tmp_path / "wrong.safetensors"))
    with pytest.raises(WeightsError, match=r"wrong.safetensors: does not fit this encoder"):
        create_encoder(TINY, weights=f"file:{tmp_path / 'wrong.safetensors'}")
    (tmp_path / "junk.safetensors").write_bytes(b"not a tensor file")
    with pytest.raises(WeightsError, match="junk.safetensors: not a readable safetensors file"):
        create_encoder(TINY, weights=f"file:{tmp_path / 'junk.safetensors'}")


class _Payload:
    """Unpickling this runs code: it is what a malicious checkpoint looks like."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_a_pickle_checkpoint_carrying_code_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    state = dict(create_encoder(TINY).model.state_dict())
    with open(tmp_path / "evil.pth", "wb") as f:
        torch.save({"state_dict": state, "extra": _Payload(str(marker))}, f, pickle_module=pickle)
    with pytest.raises(WeightsError, match=r"evil.pth: refused: this checkpoint holds Python objects"):
        create_encoder(TINY, weights=f"file:{tmp_path / 'evil.pth'}")
    assert not marker.exists()  # the payload never ran


HUB_SCRIPT = textwrap.dedent("""
    import os, sys
    from pathlib import Path
    import torch
    from safetensors.torch import save_file
    from tasks.encoders import create_encoder, get_encoder_spec
    from tasks.errors import WeightsError
    try:
        create_encoder("dinov3_vits16", weights="hub", device="cpu")
        print("LOADED-WITHOUT-CACHE")
    except WeightsError as e:
        print("ERROR:", e)
    spec = get_encoder_spec("dinov3_vits16")
    rnd = create_encoder("dinov3_vits16", weights="random", device="cpu")
    repo = Path(os.environ["HF_HOME"]) / "hub" / ("models--" + spec.hf_hub_id.replace("/", "--"))
    rev = "0123456789abcdef0123456789abcdef01234567"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(rev)
    (repo / "snapshots" / rev).mkdir(parents=True)
    save_file({k: v + 0.01 for k, v in rnd.model.state_dict().items()}, str(repo / "snapshots" / rev / "model.safetensors"))
    hub = create_encoder("dinov3_vits16", weights="hub", device="cpu")
    print("SOURCE:", hub.weights.source, "DIFFERS:", hub.weights.digest != rnd.weights.digest)
""")


def test_hub_weights_load_offline_from_the_cache_and_never_fall_back(tmp_path):
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-c", HUB_SCRIPT], cwd=REPO, env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "LOADED-WITHOUT-CACHE" not in out.stdout
    assert "ERROR: pretrained weights for dinov3_vits16 (timm/vit_small_patch16_dinov3.lvd1689m) are not" in out.stdout
    assert "huggingface-cli download timm/vit_small_patch16_dinov3.lvd1689m" in out.stdout
    assert "SOURCE: hf-hub:timm/vit_small_patch16_dinov3.lvd1689m@0123456789abcdef" in out.stdout
    assert "DIFFERS: True" in out.stdout


def test_the_test_encoder_has_no_hub_weights():
    with pytest.raises(WeightsError, match="has no published weights"):
        create_encoder(TINY, weights="hub")


def test_prepare_image_replicates_grey_and_resizes():
    grey = np.tile(np.arange(64, dtype=np.uint8), (64, 1))
    out = prepare_image(grey, 32)
    assert out.shape == (3, 32, 32) and out.dtype == np.uint8
    np.testing.assert_array_equal(out[0], out[1])
    np.testing.assert_array_equal(out[0], out[2])
    assert out[0, 0, 0] < out[0, 0, -1]  # the left-to-right ramp survives
    rgba = np.zeros((20, 30, 4), np.uint8)
    rgba[..., 0] = 200
    assert prepare_image(rgba, 16)[0].min() == 200 and prepare_image(rgba, 16)[1].max() == 0
    with pytest.raises(ValueError, match="expected a uint8 image"):
        prepare_image(grey.astype(np.uint16), 32)


def test_cli_lists_every_encoder(capsys):
    assert cli_main(["encoders"]) == 0
    out = capsys.readouterr().out
    for name in ENCODERS:
        assert name in out
    assert "vit_large_patch16_dinov3" in out and "303.1M" in out
