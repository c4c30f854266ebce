"""Sweep configuration: a YAML file validated with pydantic.

Every problem is reported with the dotted path of the offending key (`grid.resolutions.1`), so a
user can find it in the file. Relative paths are taken relative to the working directory, which is
where `make demo` and `ray submit` run.
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from tasks.errors import ConfigError

# GPU share of one cell (a head trained on cached features) by encoder size class. Heads are light;
# the share grows with the feature width because kNN keeps the train bank on the GPU.
DEFAULT_CELL_GPUS = {"tiny": 0.05, "small": 0.1, "base": 0.1, "large": 0.2, "huge": 0.25, "giant": 0.5}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Grid(_Strict):
    encoders: list[str] = Field(min_length=1)
    resolutions: list[int] = Field(min_length=1)
    datasets: list[str] = Field(min_length=1)
    protocols: list[str] = Field(min_length=1)
    seeds: list[int] = Field(default=[0], min_length=1)

    @field_validator("encoders")
    @classmethod
    def _known_encoders(cls, v: list[str]) -> list[str]:
        from tasks.encoders import list_encoders

        return _known(v, list_encoders(), "encoder")

    @field_validator("datasets")
    @classmethod
    def _known_datasets(cls, v: list[str]) -> list[str]:
        from tasks.datasets import list_datasets

        return _known(v, list_datasets(), "dataset")

    @field_validator("protocols")
    @classmethod
    def _known_protocols(cls, v: list[str]) -> list[str]:
        from tasks.protocols import list_protocols

        return _known(v, list_protocols(), "protocol")

    @field_validator("resolutions")
    @classmethod
    def _positive(cls, v: list[int]) -> list[int]:
        bad = [r for r in v if r <= 0]
        if bad:
            raise ValueError(f"resolutions must be positive, got {bad}")
        return v


def _known(values: list[str], known: list[str], what: str) -> list[str]:
    for v in values:
        if v not in known:
            raise ValueError(f"unknown {what} {v!r}; known: {', '.join(sorted(known))}")
    if len(set(values)) != len(values):
        raise ValueError(f"duplicate {what} names in {values}")
    return values


class Resources(_Strict):
    """What each piece of work asks Ray for. GPU requests apply only where the cluster has GPUs."""

    cell_cpus: float = Field(default=1.0, gt=0)
    cell_gpus: dict[str, float] = Field(default_factory=lambda: dict(DEFAULT_CELL_GPUS))
    extract_gpus: float = Field(default=1.0, ge=0, description="GPUs per encoder actor")
    extract_actors: int | None = Field(default=None, ge=1, description="default: one per GPU, else 1")
    extract_batch_size: int = Field(default=32, ge=1)
    torch_threads: int | None = Field(default=None, ge=1, description="CPU encoder threads")

    @field_validator("cell_gpus")
    @classmethod
    def _fractions(cls, v: dict[str, float]) -> dict[str, float]:
        unknown = set(v) - set(DEFAULT_CELL_GPUS)
        if unknown:
            raise ValueError(f"unknown size classes {sorted(unknown)}; use {sorted(DEFAULT_CELL_GPUS)}")
        bad = {k: f for k, f in v.items() if not 0 <= f <= 1}
        if bad:
            raise ValueError(f"GPU fractions must be in [0, 1], got {bad}")
        return {**DEFAULT_CELL_GPUS, **v}


class SweepConfig(_Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    grid: Grid
    weights: str = "random"
    pooling: str = "auto"
    data: dict[str, str]
    output: str
    tracking_uri: str | None = None
    protocols: dict[str, dict[str, Any]] = Field(default_factory=dict)
    resources: Resources = Field(default_factory=Resources)
    max_failures: int = Field(default=1, ge=0, description="retries of a failed cell")
    val_fraction: float = Field(default=0.1, gt=0, lt=1)
    split_seed: int = 0

    @field_validator("weights")
    @classmethod
    def _weights(cls, v: str) -> str:
        if v in ("random", "hub") or (v.startswith("file:") and len(v) > 5):
            return v
        raise ValueError(f"weights must be 'hub', 'random' or 'file:<path>', got {v!r}")

    @field_validator("pooling")
    @classmethod
    def _pooling(cls, v: str) -> str:
        if v not in ("auto", "cls", "mean", "cls+mean"):
            raise ValueError(f"pooling must be auto, cls, mean or cls+mean, got {v!r}")
        return v

    @model_validator(mode="after")
    def _cross_checks(self) -> SweepConfig:
        from tasks.encoders import get_encoder_spec
        from tasks.protocols import create_protocol

        missing = [d for d in self.grid.datasets if d not in self.data]
        if missing:
            raise ValueError(f"data: no root given for dataset(s) {missing}")
        for enc in self.grid.encoders:
            p = get_encoder_spec(enc).patch_size
            for i, r in enumerate(self.grid.resolutions):
                if r % p:
                    lo, hi = max(p, r - r % p), r - r % p + p
                    raise ValueError(
                        f"grid.resolutions.{i}: {r} is not a multiple of {p} (patch size of {enc}); "
                        f"use {lo} or {hi}"
                    )
        for name, hp in self.protocols.items():
            if name not in self.grid.protocols:
                raise ValueError(f"protocols.{name}: hyperparameters for a protocol not in grid.protocols")
            fixed = sorted({"task", "seed"} & set(hp))
            if fixed:
                raise ValueError(f"protocols.{name}: {fixed} cannot be set here: the task comes from the "
                                 "dataset and the seed from grid.seeds")
            try:
                create_protocol(name, **hp)
            except ConfigError as e:
                raise ValueError(f"protocols.{name}: {e}") from None
        return self

    # -- derived -------------------------------------------------------------------------------
    @property
    def output_path(self) -> Path:
        return Path(self.output).expanduser().resolve()

    @property
    def resolved_tracking_uri(self) -> str:
        return self.tracking_uri or f"sqlite:///{self.output_path / 'mlflow.db'}"

    def data_root(self, dataset: str) -> Path:
        return Path(self.data[dataset]).expanduser().resolve()

    def n_cells(self) -> int:
        g = self.grid
        return len(list(itertools.product(g.encoders, g.resolutions, g.datasets, g.protocols, g.seeds)))


def _format_errors(err: ValidationError, source: str) -> str:
    lines = [f"{source}: invalid sweep config"]
    for e in err.errors():
        path = ".".join(str(p) for p in e["loc"]) or "(top level)"
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown key (typo?)"
        lines.append(f"  {path}: {msg}")
    return "\n".join(lines)


def parse_config(raw: dict[str, Any], source: str = "<config>") -> SweepConfig:
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: a sweep config must be a YAML mapping, got {type(raw).__name__}")
    try:
        return SweepConfig.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(_format_errors(e, source)) from None


def load_config(path: str | Path, overrides: dict[str, Any] | None = None) -> SweepConfig:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if overrides:
        raw = {**raw, **overrides}
    return parse_config(raw, str(path))
