"""What a cell is: a digest of everything that determines its result.

A cell's spec (`cells.cell_spec`, or any runner's spec built the same way) is plain data: the
feature cache keys (encoder, weights digest, resolution, pooling, layers, precision, preprocessing
version, dataset fingerprint and split), the resolved protocol hyperparameters, the seed, the
dataset's reading options and split scheme (fold), the out-of-domain test sets and their keys.
`cell_identity(spec)` hashes all of it except the fields that only say where things live
(`RUNTIME_FIELDS`), plus `RESULT_FORMAT`. So a runner that puts a new ingredient into its spec gets
it into the identity for free, and an unknown field errs towards a new cell, never towards reusing
a stale result.

Two digests come out:
- `digest`: the whole identity. The cell id is a readable prefix plus its first 10 hex digits, so
  a changed ingredient is a new cell (a new MLflow run, a new result directory).
- `config_digest`: the part a sweep config decides on its own (`spec["config"]`, the protocol and
  its hyperparameters, encoder, resolution, dataset, seed), computable without reading data or
  weights. `medscale analyze --config` uses it to read only the cells of the config as it is now.

A protocol that does not use the seed (`Protocol.uses_seed` False, on a split the seed does not
choose) runs once per (encoder, resolution, dataset): its spec says `seed_free`, and the seed is
left out of both digests.
"""

from __future__ import annotations

import functools
import hashlib
import json
from dataclasses import dataclass
from typing import Any

# Bump when what a cell writes (metrics names, files) changes meaning: every cell runs anew.
RESULT_FORMAT = 1

# Where things live or how much of a GPU a cell asks for: never part of what a cell computes.
# `dense`: the feature source the cached/online rule picks when extracting (cached fp16 maps or the
# encoder in the trial); the layers (hyperparameters), weights, precision and data are in the identity.
# `runner`: the head family that runs the cell, derived from the protocol and the dataset's kind.
RUNTIME_FIELDS = frozenset({"cell_id", "cache_root", "results_dir", "coords_uri", "size", "identity", "root",
                            "gpu_share", "dense", "runner"})
# The config-level ingredients (no data, no weights read): see `config_part`.
CONFIG_FIELDS = ("encoder", "resolution", "dataset", "protocol", "seed", "seed_free", "train_fraction", "train_shots",
                 "hparams", "config")
ID_DIGITS = 10


@dataclass(frozen=True)
class Identity:
    digest: str  # sha256 hex of every ingredient
    config_digest: str  # sha256 hex of the config-level ingredients

    @property
    def short(self) -> str:
        return self.digest[:ID_DIGITS]

    def as_dict(self) -> dict[str, str]:
        return {"identity": self.digest, "config_identity": self.config_digest, "result_format": str(RESULT_FORMAT)}


def _digest(obj: Any) -> str:
    blob = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str).encode()
    return hashlib.sha256(blob).hexdigest()


def _drop_seed(d: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in d.items() if k != "seed"} if d.get("seed_free") else d


def cell_identity(spec: dict[str, Any]) -> Identity:
    """The identity of the cell a spec describes (see the module docstring)."""
    everything = _drop_seed({k: v for k, v in spec.items() if k not in RUNTIME_FIELDS})
    config = _drop_seed({k: spec.get(k) for k in CONFIG_FIELDS})
    return Identity(_digest({"format": RESULT_FORMAT, **everything}), _digest({"format": RESULT_FORMAT, **config}))


def identify(spec: dict[str, Any], prefix: str) -> dict[str, Any]:
    """Give a runner's spec its identity: `spec["identity"]` (digests) and `spec["cell_id"]` =
    prefix + short digest. Every cell runner's spec goes through here (`cells.cell_spec` does)."""
    spec = {k: v for k, v in spec.items() if k not in ("identity", "cell_id")}
    ident = cell_identity(spec)
    return {**spec, "identity": ident.as_dict(), "cell_id": f"{prefix}__{ident.short}"}


def cell_prefix(encoder: str, resolution: int, dataset: str, protocol: str, seed: int, seed_free: bool) -> str:
    """The readable part of a cell id."""
    return f"{dataset}__{protocol}__{encoder}__{resolution}px__{'seedfree' if seed_free else f's{seed}'}"


def prefix_of(cell_id: str) -> str:
    """The readable part of a cell id (an id of an older release has no digest: all of it)."""
    head, sep, tail = cell_id.rpartition("__")
    return head if sep and len(tail) == ID_DIGITS and all(c in "0123456789abcdef" for c in tail) else cell_id


def config_part(cfg: Any, encoder: str, dataset: str, pooling: str) -> dict[str, Any]:
    """What the sweep config says about a cell beyond its grid coordinates and hyperparameters:
    the encoder's weights as written (their content enters through the cache keys; with a mapping,
    this encoder's entry only, so another encoder's weights never change this cell), the resolved
    pooling, the dataset's reading options, how val is carved, and the out-of-domain test sets."""
    return {"weights": cfg.weights_of(encoder), "pooling": pooling, "dataset_options": cfg.options_for(dataset),
            "val_fraction": cfg.val_fraction, "split_seed": cfg.split_seed,
            "evaluate_on": list(cfg.evaluate_on.get(dataset, []))}


def resolved_hparams(protocol: str, task: str, seed: int, given: dict[str, Any]) -> dict[str, Any]:
    """Every hyperparameter of the protocol as it will run (defaults included, task and seed out):
    a changed default in the code is a changed cell, as a changed value in the config is."""
    from tasks.protocols import create_protocol

    hp = create_protocol(protocol, task=task, seed=seed, **given)
    return {k: v for k, v in hp.get_params().items() if k not in ("task", "seed")}


@functools.lru_cache(maxsize=256)
def resolved_pooling(encoder: str, pooling: str) -> str:
    """The config's pooling for this encoder ("auto" resolved), without loading any weights."""
    from tasks.encoders import get_encoder_spec

    return get_encoder_spec(encoder).resolve_pooling(pooling)
