"""Encoder weights: where they come from, how they load, and a digest that identifies them.

Three sources, chosen by the user, never by fallback:
- `hub`: the family's own published weights (`EncoderSpec.hf_hub_id`: timm/..., MahmoodLab/...,
  microsoft/..., google/...) through the Hugging Face hub or its local cache (`HF_HOME`; works
  offline once the cache is populated). Only weight files are read: the architecture always comes
  from this repository, so no hub code or config runs (never `trust_remote_code`);
- `file:PATH`: a safetensors file, or `.pt/.pth` loaded with `torch.load(weights_only=True)` so a
  pickle carrying code is refused; PATH may be a directory holding `<encoder>.<ext>`;
- `random`: seeded random init, an explicit opt-in for tests and demos.
A sweep may mix sources per encoder: `weights_for(encoder, setting)` reads a mapping such as
`{default: hub, meddinov3_vitb16: "file:/ckpt/model.pth"}`.
The digest (sha256 over sorted names, dtypes, shapes and bytes of the loaded state dict) goes into
every feature-cache key and every recorded result, so a result always names its weights.
"""

from __future__ import annotations

import hashlib
import pickle
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch

from tasks.errors import WeightsError


class HubModel(Protocol):
    """What the hub loader needs of an encoder spec (tasks.encoders.spec.HubModel is one): a
    structural type, so this module stays below the encoder registry that imports it."""

    name: str
    hf_hub_id: str | None
    hub_files: tuple[str, ...]
    gated: bool
    licence: str

StateDict = dict[str, torch.Tensor]
WEIGHT_KINDS = ("random", "hub", "file")
FILE_SUFFIXES = (".safetensors", ".pt", ".pth")
RANDOM_SEED = 0  # every `random` encoder of a given name is the same network


@dataclass(frozen=True)
class WeightsInfo:
    kind: str  # random | hub | file | none (meta device: nothing loaded)
    source: str  # what was loaded: "random(seed=0)", "hf-hub:timm/...", a file path
    digest: str  # sha256 hex of the state dict


def parse_weights(spec: str) -> tuple[str, str]:
    """'random' | 'hub' | 'file:PATH' -> (kind, path or '')."""
    if spec in ("random", "hub"):
        return spec, ""
    if spec.startswith("file:") and len(spec) > 5:
        return "file", spec[5:]
    raise WeightsError(f"weights {spec!r}: use 'hub', 'random' or 'file:<path>'")


def weights_for(encoder: str, setting: str | Mapping[str, str], encoders: Collection[str] = ()) -> str:
    """The weights spec one encoder uses: `setting` itself when a string, else the mapping's entry
    for the encoder, else its `default` (an error when neither is there). Validated either way;
    `encoders`: the registry's names, which a mapping's keys must be (see check_weights_mapping)."""
    if isinstance(setting, str):
        parse_weights(setting)
        return setting
    check_weights_mapping(setting, encoders)
    if encoder in setting:
        return setting[encoder]
    if "default" in setting:
        return setting["default"]
    raise WeightsError(f"weights: no entry for {encoder} and no `default`; add `{encoder}: hub|random|file:<path>`"
                       f" or `default: ...`")


def check_weights_mapping(setting: Mapping[str, str], encoders: Collection[str] = ()) -> None:
    """Every value a valid spec, every key `default` or one of `encoders` (when given: the
    registry's names, passed in by the config so this module never imports the registry)."""
    for key, value in setting.items():
        if key != "default" and encoders and key not in encoders:
            raise WeightsError(f"weights.{key}: not an encoder; keys are `default` or encoder names")
        if not isinstance(value, str):
            raise WeightsError(f"weights.{key}: {value!r} is not a string")
        try:
            parse_weights(value)
        except WeightsError as e:
            raise WeightsError(f"weights.{key}: {e}") from None


def state_dict_digest(state: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        # Flattened, then viewed as bytes: works for bf16 (numpy has none) and for 0-d tensors
        # (BatchNorm's num_batches_tracked); the same bytes as before for every other tensor.
        t = t.contiguous().cpu().reshape(-1)
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def resolve_file(path: str, encoder: str) -> Path:
    """A file, or `<dir>/<encoder>.{safetensors,pt,pth}` for a directory."""
    p = Path(path).expanduser()
    if p.is_dir():
        for suffix in FILE_SUFFIXES:
            if (p / f"{encoder}{suffix}").is_file():
                return p / f"{encoder}{suffix}"
        raise WeightsError(f"{p}: no weights for {encoder} in this directory; expected "
                           f"{' or '.join(encoder + s for s in FILE_SUFFIXES)}")
    if not p.is_file():
        raise WeightsError(f"{p}: weights file not found")
    if p.suffix not in FILE_SUFFIXES:
        raise WeightsError(f"{p}: unsupported weights format {p.suffix!r}; use {', '.join(FILE_SUFFIXES)}")
    return p


def read_state_dict(path: Path) -> StateDict:
    """Tensors of a safetensors file, else of a torch checkpoint (.pt/.pth/.bin) read with
    `weights_only=True`, unwrapped from the usual training wrappers."""
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except (SafetensorError, OSError, ValueError) as e:
            raise WeightsError(f"{path}: not a readable safetensors file ({e})") from None
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise WeightsError(
            f"{path}: refused: this checkpoint holds Python objects beyond tensors, and loading it "
            f"would run code. Convert it to safetensors on a trusted machine. ({str(e).splitlines()[0]})"
        ) from None
    except (RuntimeError, EOFError, OSError) as e:
        raise WeightsError(f"{path}: not a readable torch checkpoint ({e})") from None
    for key in ("state_dict", "model", "teacher"):  # common wrappers of training checkpoints
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise WeightsError(f"{path}: expected a state dict of tensors")
    return obj


def strip_prefix(state: StateDict, prefix: str) -> StateDict:
    """Keep the keys under `prefix` (e.g. `visual.` of a whole CLIP model), without it."""
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def fit_state_dict(model: torch.nn.Module, state: StateDict, source: str,
                   family_filter: Callable[[StateDict, torch.nn.Module], StateDict] | None = None) -> None:
    """Load `state` into `model` strictly: every tensor of the model, none left over, same shapes.

    The family's filter first (its checkpoint's names -> the model's), then the generic clean-up:
    a prefix every key shares (DDP `module.`, `backbone.`, `model.`) and classifier heads."""
    if family_filter is not None:
        state = family_filter(state, model)
    for prefix in ("module.", "backbone.", "model."):  # DDP / training-wrapper prefixes
        if state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items()}
    state = {k: v for k, v in state.items() if not k.startswith(("head.", "fc.")) or k in model.state_dict()}
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        raise WeightsError(
            f"{source}: does not fit this encoder: {len(missing)} missing keys {missing[:5]}, "
            f"{len(unexpected)} unexpected keys {unexpected[:5]}; is it the right model?"
        )
    bad = [k for k in own if tuple(own[k].shape) != tuple(state[k].shape)]
    if bad:
        k = bad[0]
        raise WeightsError(f"{source}: shape of {k} is {tuple(state[k].shape)}, the encoder has "
                           f"{tuple(own[k].shape)} ({len(bad)} tensors differ); is it the right model?")
    model.load_state_dict(state, strict=True)


def load_file_weights(model: torch.nn.Module, path: Path,
                      family_filter: Callable[[StateDict, torch.nn.Module], StateDict] | None = None) -> None:
    fit_state_dict(model, read_state_dict(path), str(path), family_filter)


def hub_state_dict(spec: HubModel) -> tuple[StateDict, str]:
    """The first of the spec's weight files in its hub repository (the local cache when offline),
    read as plain tensors, and `hf-hub:<repo>@<revision>` for provenance. Errors say what to do."""
    from huggingface_hub import hf_hub_download

    if spec.hf_hub_id is None:
        raise WeightsError(f"{spec.name} has no published weights; use weights: random or file:<path>")
    causes = []
    for name in spec.hub_files:
        try:
            path = Path(hf_hub_download(spec.hf_hub_id, name))
        except Exception as e:  # noqa: BLE001 - missing file, gated repo, no network, no cache: all "not here"
            causes.append(f"{name}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
            continue
        state = read_state_dict(path)
        return state, f"hf-hub:{spec.hf_hub_id}@{path.parent.name}"
    raise WeightsError(f"{hub_help(spec)} (tried {'; '.join(causes)})")


def hub_help(spec: HubModel) -> str:
    gated = (f"its weights are gated: accept the licence ({spec.licence}) on "
             f"https://huggingface.co/{spec.hf_hub_id} and `huggingface-cli login` first, then "
             if spec.gated else "")
    return (f"pretrained weights for {spec.name} ({spec.hf_hub_id}) are not in the local Hugging Face cache "
            f"and could not be downloaded. On a machine with internet access ({gated}run "
            f"`huggingface-cli download {spec.hf_hub_id}`) with HF_HOME pointing at a cache every node "
            f"can read, or save the weights and use `weights: file:<dir>` holding "
            f"{spec.name}.safetensors (or .pt/.pth). For a run without pretrained weights say `weights: random`.")
