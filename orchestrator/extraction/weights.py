"""Weights identity and precision, shared by the extraction actors, the cells that encode online
and the planner: the digest of the loaded state dict (memoised per resolved source: file path +
size + mtime, hub snapshot revision), the precision a sweep plans (bf16 on GPU actors, fp32 on
CPU), and `check_planned`, which holds a loaded encoder to both."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from tasks.errors import WeightsError


def usable_cpus() -> int:
    """CPUs this process may run on: its affinity mask where the OS has one (Linux), else all."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def planned_precision(n_gpus: float, extract_gpus: float, requested: str = "auto") -> str:
    """What the encoder actors of a sweep run in: with `requested` "auto" (resources.precision),
    bf16 autocast when they get a GPU (the cluster has GPUs and resources.extract_gpus > 0), fp32
    on CPU; "fp32" forces full precision on GPUs too. Decided when the sweep is planned, because it
    is part of every feature cache key and every cell's identity."""
    if requested == "fp32":
        return "fp32"
    return "bf16" if n_gpus > 0 and extract_gpus > 0 else "fp32"


def planned_compile(precision: str, requested: str = "auto") -> bool:
    """Whether the encoder actors compile their forward (resources.compile): with "auto", when they
    run bf16 on GPUs, where eager launch overhead leaves the chip idle (docs/gpu.md); never on CPU,
    where compiling costs minutes and gains little."""
    return requested == "auto" and precision == "bf16"


def encoder_precision(encoder: Any) -> str:
    """The precision a loaded FrozenEncoder computes in (bf16 autocast on CUDA, else fp32)."""
    return "bf16" if getattr(encoder, "autocast", False) else "fp32"


def check_planned(encoder: Any, expected_digest: str, precision: str | None) -> Any:
    """Hold a loaded FrozenEncoder to what the sweep planned: full precision when `precision` is
    "fp32" (autocast off, GPU or not), and refuse an encoder whose precision or weights digest
    differ from the plan, since the plan is in the cache keys and the cells' identities. Used by
    the extraction actors and by every cell that encodes online (dense, seg3d, registration)."""
    if precision == "fp32":
        encoder.autocast = False
    actual = encoder_precision(encoder)
    if precision and actual != precision:
        # Features of another precision must not be filed under this key (bf16 != fp32).
        raise WeightsError(
            f"{encoder.spec.name}: the encoder runs in {actual} on {encoder.device}, but the sweep planned "
            f"{precision} (resources.extract_gpus, resources.precision and the cluster's GPUs decide it: a node "
            "that offers a GPU Ray cannot use with CUDA?); rerun to re-plan.")
    if expected_digest and encoder.weights.digest != expected_digest:
        # The weights changed since the keys were computed: refuse to file or report features
        # under an identity that does not describe them.
        raise WeightsError(
            f"{encoder.weights.source}: weights digest {encoder.weights.digest[:12]} differs from the planned "
            f"{expected_digest[:12]}; were the weights replaced during the sweep? Rerun to re-plan.")
    return encoder




def hf_cache_dir() -> str:
    """The Hugging Face hub cache a worker started now would read (huggingface_hub's precedence:
    HF_HUB_CACHE, HF_HOME/hub, XDG_CACHE_HOME/huggingface/hub, ~/.cache/huggingface/hub); read
    from the environment at call time, not at import time."""
    env = os.environ
    if env.get("HF_HUB_CACHE") or env.get("HUGGINGFACE_HUB_CACHE"):
        return str(Path(env.get("HF_HUB_CACHE") or env["HUGGINGFACE_HUB_CACHE"]).expanduser())
    if env.get("HF_HOME"):
        return str(Path(env["HF_HOME"]).expanduser() / "hub")
    xdg = Path(env["XDG_CACHE_HOME"]).expanduser() if env.get("XDG_CACHE_HOME") else Path.home() / ".cache"
    return str(xdg / "huggingface" / "hub")


def hub_snapshot(encoder: str) -> dict[str, Any] | None:
    """The cached hub snapshot timm would load for `encoder`: cache dir, revision (the commit
    refs/main points at), file, size and mtime. None when nothing is cached (then the weights
    would be downloaded, and no memo can vouch for them)."""
    from huggingface_hub import try_to_load_from_cache

    from tasks.encoders import get_encoder_spec

    spec = get_encoder_spec(encoder)
    repo = spec.hf_hub_id
    if repo is None:
        return None
    cache = hf_cache_dir()
    for name in spec.hub_files:  # the files its family's loader reads, in its order
        path = try_to_load_from_cache(repo, name, cache_dir=cache)
        if isinstance(path, str) and Path(path).is_file():
            st = Path(path).stat()  # the blob behind the snapshot's symlink
            return {"repo": repo, "cache": cache, "revision": Path(path).parent.name, "file": name,
                    "size": st.st_size, "mtime_ns": st.st_mtime_ns}
    return None


def weights_memo_key(encoder: str, weights: str) -> str | None:
    """The resolved source of a weights spec, without loading the weights: the key of the digest
    memo. `file:` -> the file the loader would pick, with its size and mtime; `hub` -> the cached
    snapshot (revision, file, size, mtime); `random` -> the library versions that draw it. None
    when the source cannot be resolved locally (missing file, nothing cached): nothing is memoised
    then, so a memo can never vouch for weights it has not seen."""
    import timm
    import torch

    from tasks.weights import parse_weights, resolve_file

    ident: dict[str, Any] = {"encoder": encoder, "weights": weights}
    kind, path = parse_weights(weights)
    if kind == "file":
        try:
            f = resolve_file(path, encoder).resolve()
        except WeightsError:
            return None
        st = f.stat()
        ident["source"] = {"path": str(f), "size": st.st_size, "mtime_ns": st.st_mtime_ns}
    elif kind == "hub":
        ident["source"] = hub_snapshot(encoder)
        if ident["source"] is None:
            return None
    else:
        # Random init depends on the library code that draws it.
        ident["versions"] = [timm.__version__, torch.__version__.split("+")[0]]
    return json.dumps(ident, sort_keys=True)


def compute_weights_info(encoder: str, weights: str) -> dict[str, str]:
    """Load the weights once and return their kind, source and digest (run as a Ray task)."""
    from tasks.encoders import create_encoder

    enc = create_encoder(encoder, weights=weights, device="cpu")
    return {"kind": enc.weights.kind, "source": enc.weights.source, "digest": enc.weights.digest,
            "interpolation": enc.preprocess_info().get("interpolation", "bicubic")}


class DigestMemo:
    """Weights digests remembered across runs, so planning a sweep does not reload every model."""

    def __init__(self, path: Path):
        self.path = path
        self.data: dict[str, dict[str, str]] = json.loads(path.read_text()) if path.exists() else {}

    def get(self, key: str | None) -> dict[str, str] | None:
        return self.data.get(key) if key is not None else None

    def put(self, key: str | None, info: dict[str, str]) -> None:
        if key is None:  # an unresolvable source: never memoised
            return
        self.data[key] = info
        self._save()

    def drop(self, key: str | None) -> None:
        """Forget an entry the weights contradicted (the digest differed at extraction)."""
        if key is not None and self.data.pop(key, None) is not None:
            self._save()

    def _save(self) -> None:
        tmp = self.path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(self.data, indent=1, sort_keys=True))
        tmp.replace(self.path)


# Rough host-memory need of loading an encoder to digest its weights (fp32 params x 2.5).
_BYTES_PER_PARAM = 10


def weights_info(encoder: str, weights: str, memo: DigestMemo) -> dict[str, str]:
    """Kind, source and digest of the weights, from the memo when its key (the resolved source:
    file path + size + mtime, hub snapshot revision) still matches, else by loading them once."""
    from orchestrator import ray_backend
    from tasks.encoders import get_encoder_spec

    key = weights_memo_key(encoder, weights)
    info = memo.get(key)
    if info is None:
        mem = get_encoder_spec(encoder).params * _BYTES_PER_PARAM
        info = ray_backend.run_remote(compute_weights_info, encoder, weights, memory=mem)
        memo.put(key, info)
    return info
