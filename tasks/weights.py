"""Encoder weights: where they come from, how they load, and a digest that identifies them.

Three sources, chosen by the user, never by fallback:
- `hub`: timm's pretrained DINOv3 weights through the Hugging Face hub or its local cache
  (`HF_HOME`; works offline once the cache is populated);
- `file:PATH`: a safetensors file, or `.pt/.pth` loaded with `torch.load(weights_only=True)` so a
  pickle carrying code is refused; PATH may be a directory holding `<encoder>.<ext>`;
- `random`: seeded random init, an explicit opt-in for tests and demos.
The digest (sha256 over sorted names, dtypes, shapes and bytes of the loaded state dict) goes into
every feature-cache key and every recorded result, so a result always names its weights.
"""

from __future__ import annotations

import hashlib
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from tasks.errors import WeightsError

if TYPE_CHECKING:
    from tasks.encoders import EncoderSpec

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


def state_dict_digest(state: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        t = t.contiguous().cpu()
        # View as bytes: works for bf16 too, which numpy cannot represent.
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


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
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


def load_file_weights(model: torch.nn.Module, path: Path) -> None:
    state = read_state_dict(path)
    for prefix in ("module.", "backbone.", "model."):  # DDP / training-wrapper prefixes
        if state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items()}
    state = {k: v for k, v in state.items() if not k.startswith(("head.", "fc."))}
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        raise WeightsError(
            f"{path}: does not fit this encoder: {len(missing)} missing keys {missing[:3]}, "
            f"{len(unexpected)} unexpected keys {unexpected[:3]}; is it the right model?"
        )
    bad = [k for k in own if tuple(own[k].shape) != tuple(state[k].shape)]
    if bad:
        k = bad[0]
        raise WeightsError(f"{path}: shape of {k} is {tuple(state[k].shape)}, the encoder has "
                           f"{tuple(own[k].shape)} ({len(bad)} tensors differ); is it the right model?")
    model.load_state_dict(state, strict=True)


def hub_help(spec: EncoderSpec) -> str:
    return (f"pretrained weights for {spec.name} ({spec.hf_hub_id}) are not in the local Hugging Face cache "
            f"and could not be downloaded. On a machine with internet access (DINOv3 weights are gated: "
            f"accept the licence on the hub and `huggingface-cli login` first) run "
            f"`huggingface-cli download {spec.hf_hub_id}` with HF_HOME pointing at a cache every node "
            f"can read, or save a safetensors state dict and use `weights: file:<dir>` holding "
            f"{spec.name}.safetensors. For a run without pretrained weights say `weights: random`.")
