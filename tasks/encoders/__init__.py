"""The encoder registry: every frozen backbone medscale can sweep, with its metadata beside it.

One registry (`ENCODERS`, filled by the family modules imported below: timm, open_clip,
transformers), one entry point (`create_encoder`). Each spec carries what the scaling analysis needs
without loading weights; parameters and GFLOPs are computed from the architecture on the meta device
(`tasks.encoders.flops`; inference FLOPs are the compute axis, docs/encoders.md).
"""

from __future__ import annotations

from typing import Any

import torch

# Registration order is listing order (`medscale encoders`, error messages): DINOv3 first.
# isort: off
from tasks.encoders import timm_family  # noqa: F401 - registers the family
from tasks.encoders import open_clip_family  # noqa: F401
from tasks.encoders import hf_family  # noqa: F401
# isort: on
from tasks.encoders.frozen import FrozenEncoder
from tasks.encoders.spec import ENCODERS, EncoderSpec, Preprocessing, get_encoder_spec, list_encoders
from tasks.errors import ConfigError
from tasks.weights import (
    RANDOM_SEED,
    WeightsInfo,
    fit_state_dict,
    hub_state_dict,
    load_file_weights,
    parse_weights,
    resolve_file,
    state_dict_digest,
    weights_for,
)


def _resolve_device(device: str | torch.device) -> torch.device:
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def build_encoder(spec: EncoderSpec, weights: str = "random", device: str | torch.device = "auto") -> FrozenEncoder:
    """`create_encoder` for a spec object (tests build narrower copies of a family's design)."""
    if spec.unavailable:
        raise ConfigError(f"{spec.name} is not available: {spec.unavailable}")
    kind, path = parse_weights(weights)
    dev = _resolve_device(device)
    if dev.type == "meta":  # shapes and metadata only: nothing is allocated or loaded
        with torch.device("meta"):
            model = spec.build()
        return FrozenEncoder(spec, model, WeightsInfo("none", "meta-device", ""), dev)
    # Hub weights are fetched before anything is built: a missing or gated file fails fast,
    # without first drawing a random ViT-L on the CPU.
    hub = hub_state_dict(spec) if kind == "hub" else None
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(RANDOM_SEED)  # `random` is deterministic; other sources overwrite it all
        model = spec.build()
    source = f"random(seed={RANDOM_SEED})"
    if hub is not None:
        state, source = hub
        fit_state_dict(model, state, source, spec.filter_checkpoint)
    elif kind == "file":
        file = resolve_file(path, spec.name)
        load_file_weights(model, file, spec.filter_checkpoint)
        source = str(file.resolve())
    info = WeightsInfo(kind, source, state_dict_digest(model.state_dict()))
    return FrozenEncoder(spec, model, info, dev)


def create_encoder(name: str, weights: str | dict[str, str] = "random",
                   device: str | torch.device = "auto") -> FrozenEncoder:
    """A frozen encoder in eval mode. `weights`: random | hub | file:PATH, or a mapping
    {default: ..., <encoder>: ...} (tasks.weights)."""
    return build_encoder(get_encoder_spec(name), weights_for(name, weights, ENCODERS), device)


def _gflops_or_none(spec: EncoderSpec, resolution: int) -> float | None:
    return spec.gflops(resolution) if resolution % spec.patch_size == 0 else None


def encoder_table() -> list[dict[str, Any]]:
    """One row per registered encoder for `medscale encoders` (computed counts; None if unbuildable)."""
    rows = []
    for s in ENCODERS.values():
        ok = s.unavailable is None
        pp = s.preprocess
        prep = (f"{pp.interpolation}, mean {'/'.join(f'{v:g}' for v in pp.mean)}, "
                f"std {'/'.join(f'{v:g}' for v in pp.std)}"
                + (f", values {pp.value_range[0]:g}..{pp.value_range[1]:g}" if pp.value_range != (0.0, 1.0) else "")
                + (f", {pp.channels}" if pp.channels != "rgb" else ""))
        rows.append({
            "name": s.name, "family": s.family, "library": s.library, "arch": s.arch, "timm_model": s.timm_name,
            "patch": s.patch_size, "prefix_tokens": s.prefix_tokens, "size": s.size,
            "params": s.params if ok else None, "gflops_224": _gflops_or_none(s, 224) if ok else None,
            "gflops_512": _gflops_or_none(s, 512) if ok else None,
            "pooling": f"{s.default_pooling} ({s.pooling_dims[s.default_pooling]}-d)",
            "preprocessing": prep, "pretrain_resolution": s.pretrain_resolution, "licence": s.licence,
            "gated": s.gated, "pretrained": s.hf_hub_id or "-", "unavailable": s.unavailable or "",
        })
    return rows


__all__ = ["ENCODERS", "EncoderSpec", "FrozenEncoder", "Preprocessing", "build_encoder", "create_encoder",
           "encoder_table", "get_encoder_spec", "list_encoders"]
