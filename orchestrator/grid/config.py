"""Sweep configuration: a YAML file validated with pydantic.

Every problem is reported with the dotted path of the offending key (`grid.resolutions.1`), so a
user can find it in the file. Relative paths are taken relative to the working directory, which is
where `make demo` and `ray submit` run.
"""

from __future__ import annotations

import itertools
import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from orchestrator.grid.adaptive import AdaptiveSettings
from orchestrator.grid.checks import (
    check_dataset_options,
    check_evaluate_on,
    check_known,
    check_layers,
    format_errors,
)
from tasks.errors import ConfigError, MedscaleError

# GPU share of one cell (a head trained on cached features) by encoder size class. Heads are light;
# the share grows with the feature width because kNN keeps the train bank on the GPU. A size may
# instead map to resolution bands {lowest resolution: share}: pooled features do not grow with the
# input, but dense-feature protocols (tokens ~ (r/16)^2) do, so big inputs may need a bigger share.
DEFAULT_CELL_GPUS = {"tiny": 0.05, "small": 0.1, "base": 0.1, "large": 0.2, "huge": 0.25, "giant": 0.5}


# Where shared storage may live: pyarrow filesystems (the feature cache, cell results, Tune).
STORAGE_SCHEMES = ("file", "s3", "gs", "gcs", "hdfs", "viewfs", "abfs", "abfss")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Grid(_Strict):
    encoders: list[str] = Field(min_length=1)
    resolutions: list[int] = Field(min_length=1)
    datasets: list[str] = Field(min_length=1)
    protocols: list[str] = Field(min_length=1)
    seeds: list[int] = Field(default=[0], min_length=1)
    # The data axis (tasks/subsets.py): each cell trains on a nested, stratified, patient-level
    # subset of its training split; val and test stay whole. Fractions or shots per class, not both.
    train_fractions: list[float] = Field(default=[1.0], min_length=1)
    train_shots: list[int] = Field(default_factory=list)

    @field_validator("encoders")
    @classmethod
    def _known_encoders(cls, v: list[str]) -> list[str]:
        from tasks.encoders import list_encoders

        return check_known(v, list_encoders(), "encoder")

    @field_validator("datasets")
    @classmethod
    def _known_datasets(cls, v: list[str]) -> list[str]:
        from tasks.datasets import list_datasets

        return check_known(v, list_datasets(), "dataset")

    @field_validator("protocols")
    @classmethod
    def _known_protocols(cls, v: list[str]) -> list[str]:
        from tasks.protocols import list_protocols

        return check_known(v, list_protocols(), "protocol")

    @field_validator("train_fractions")
    @classmethod
    def _fractions(cls, v: list[float]) -> list[float]:
        bad = [f for f in v if not 0 < f <= 1]
        if bad:
            raise ValueError(f"train fractions must be in (0, 1], got {bad}")
        if len(set(v)) != len(v):
            raise ValueError(f"duplicate train fractions in {v}")
        return v

    @field_validator("train_shots")
    @classmethod
    def _shots(cls, v: list[int]) -> list[int]:
        bad = [k for k in v if k < 1]
        if bad:
            raise ValueError(f"train shots (patients per class) must be >= 1, got {bad}")
        if len(set(v)) != len(v):
            raise ValueError(f"duplicate train shots in {v}")
        return v

    @model_validator(mode="after")
    def _one_data_axis(self) -> Grid:
        if self.train_shots and self.train_fractions != [1.0]:
            raise ValueError("train_fractions and train_shots: give one data axis, not both")
        return self

    @property
    def train_sizes(self) -> list:
        from tasks.subsets import train_sizes

        return train_sizes(self.train_fractions, self.train_shots)

    @field_validator("resolutions")
    @classmethod
    def _positive(cls, v: list[int]) -> list[int]:
        bad = [r for r in v if r <= 0]
        if bad:
            raise ValueError(f"resolutions must be positive, got {bad}")
        return v


class Resources(_Strict):
    """What each piece of work asks Ray for. GPU requests apply only where the cluster has GPUs."""

    cell_cpus: float = Field(default=1.0, gt=0)
    cell_gpus: dict[str, float | dict[int, float]] = Field(
        default_factory=lambda: dict(DEFAULT_CELL_GPUS),
        description="GPU share of one cell by encoder size: a number, or {lowest resolution: share}")
    extract_gpus: float = Field(default=1.0, ge=0, description="whole GPUs per encoder actor (0: CPU)")
    extract_actors: int | None = Field(default=None, ge=1, description="default: one per GPU, else 1")
    extract_batch_size: int | Literal["auto"] = Field(
        default="auto", description="images per encoder batch; auto: the largest that fits extract_memory_gb "
                                    "per (encoder, resolution) on GPU actors, 32 on CPU")
    extract_memory_gb: float = Field(default=40.0, gt=0, description="device memory an encoder actor's batch may fill")
    compile: Literal["auto", "off"] = Field(
        default="auto", description="auto: torch.compile the encoder forward on GPU actors (bf16); off: eager")
    precision: Literal["auto", "fp32"] = Field(
        default="auto", description="encoder precision: auto = bf16 autocast on GPUs, fp32 on CPU; fp32 everywhere")
    torch_threads: int | None = Field(default=None, ge=1, description="CPU encoder threads")
    shared_decode: bool = Field(default=True, description="one decode feeds every resolution of an encoder")
    # Dense features (docs/dense.md): an extraction goes to the cache when its planned fp16 maps fit
    # this budget (and the head does not augment), else the encoder runs inside each trial, and
    # such an online cell asks for `online_encoder_gpus` more of a GPU than its head alone.
    dense_cache_max_gb: float = Field(default=200.0, ge=0, description="largest dense cache entry (GB)")
    online_encoder_gpus: float = Field(default=0.5, ge=0, le=1,
                                       description="GPU share added to a cell that runs its encoder online")

    @field_validator("cell_gpus")
    @classmethod
    def _fractions(cls, v: dict[str, float | dict[int, float]]) -> dict[str, float | dict[int, float]]:
        unknown = set(v) - set(DEFAULT_CELL_GPUS)
        if unknown:
            raise ValueError(f"unknown size classes {sorted(unknown)}; use {sorted(DEFAULT_CELL_GPUS)}")
        for size, spec in v.items():
            bands = spec if isinstance(spec, dict) else {0: spec}
            if not bands:
                raise ValueError(f"{size}: an empty resolution table; give a share or {{0: share}}")
            bad = {k: f for k, f in bands.items() if not 0 <= f <= 1}
            if bad:
                raise ValueError(f"GPU fractions must be in [0, 1], got {size}: {bad}")
            if any(k < 0 for k in bands):
                raise ValueError(f"{size}: resolution bands must be >= 0, got {sorted(bands)}")
            shares = [bands[k] for k in sorted(bands)]
            if shares != sorted(shares):
                # A larger input never needs less memory: a shrinking table is a typo.
                raise ValueError(f"{size}: the GPU share must not shrink as the resolution grows, got {bands}")
        return {**DEFAULT_CELL_GPUS, **v}

    @field_validator("extract_gpus")
    @classmethod
    def _whole_gpus(cls, v: float) -> float:
        # Encoder actors hold a whole model and its activations: two actors sharing one GPU would
        # fight over its memory, so an actor takes whole GPUs (or none: CPU).
        if v != int(v):
            raise ValueError(f"encoder actors take whole GPUs (0, 1, 2, ...), got {v}")
        return v

    @field_validator("extract_batch_size")
    @classmethod
    def _positive_batch(cls, v: int | str) -> int | str:
        if v != "auto" and int(v) < 1:
            raise ValueError(f"extract_batch_size must be >= 1 or auto, got {v}")
        return v

    def extract_batch(self, encoder: str, resolution: int, gpu: bool) -> int:
        """Images per encoder batch for one (encoder, resolution): the configured number, or with
        `auto` the largest power of two <= 256 whose activations fit `extract_memory_gb` on a GPU
        actor (docs/gpu.md), 32 on CPU."""
        if self.extract_batch_size != "auto":
            return int(self.extract_batch_size)
        from orchestrator.grid.batching import auto_batch

        return auto_batch(encoder, resolution, gpu, self.extract_memory_gb)

    def cell_gpu_share(self, size: str, resolution: int) -> float:
        """The GPU share a cell of this encoder size and resolution asks for."""
        spec = self.cell_gpus[size]
        if not isinstance(spec, dict):
            return float(spec)
        below = [b for b in sorted(spec) if b <= resolution]
        # Config validation guarantees a band covers every grid resolution; below all bands (a
        # caller outside the grid) the lowest band applies.
        return float(spec[below[-1] if below else min(spec)])


class SweepConfig(_Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    grid: Grid
    weights: str | dict[str, str] = "random"  # or per encoder: {default: hub, <encoder>: file:...}
    pooling: str = "auto"
    data: dict[str, str]
    output: str = Field(description="local directory of the driver: summary, logs, default mlflow.db")
    storage: str | None = Field(default=None, description="shared by every node: cache, cell results, "
                                "Tune state; a path (NFS) or s3://, gs://, ... (default: output)")
    tracking_uri: str | None = None
    protocols: dict[str, dict[str, Any]] = Field(default_factory=dict)
    dataset_options: dict[str, dict[str, Any]] = Field(
        default_factory=dict, description="per-dataset reading options, e.g. ct_rate: {hu_window: [-1000, 400]}")
    evaluate_on: dict[str, list[str]] = Field(
        default_factory=dict, description="out-of-domain test sets: models trained on a grid dataset are also "
        "scored on each listed dataset's test split, e.g. camelyon16: [camelyon17] (whole-slide datasets)")
    resources: Resources = Field(default_factory=Resources)
    max_failures: int = Field(default=1, ge=0, description="retries of a failed cell")
    adaptive: AdaptiveSettings | None = None  # `medscale sweep --adaptive` (orchestrator/sweep/adaptive.py)
    val_fraction: float = Field(default=0.1, gt=0, lt=1)
    split_seed: int = 0

    @field_validator("weights")
    @classmethod
    def _weights(cls, v: str | dict[str, str]) -> str | dict[str, str]:
        if isinstance(v, dict):
            from tasks.encoders import list_encoders
            from tasks.errors import WeightsError
            from tasks.weights import check_weights_mapping

            try:
                check_weights_mapping(v, list_encoders())
            except WeightsError as e:  # a ValueError is what pydantic reports under `weights`
                raise ValueError(str(e)) from None
            return v
        if v in ("random", "hub") or (v.startswith("file:") and len(v) > 5):
            return v
        raise ValueError(f"weights must be 'hub', 'random' or 'file:<path>', got {v!r}")

    def weights_of(self, encoder: str) -> str:
        """The weights spec of one encoder (`weights` itself, or its entry / `default` in a mapping)."""
        from tasks.encoders import list_encoders
        from tasks.weights import weights_for

        return weights_for(encoder, self.weights, list_encoders())

    @field_validator("output")
    @classmethod
    def _local_output(cls, v: str) -> str:
        if "://" in v:
            raise ValueError(f"{v!r}: output is a local directory of the machine running the sweep; "
                             "put what every node shares under storage: (s3://, gs://, NFS)")
        return v

    @field_validator("storage")
    @classmethod
    def _storage(cls, v: str | None) -> str | None:
        if v is not None and "://" in v:
            scheme = v.split("://", 1)[0]
            if scheme not in STORAGE_SCHEMES:
                raise ValueError(f"{v!r}: unknown scheme {scheme!r}; use a path or one of "
                                 f"{', '.join(s + '://' for s in STORAGE_SCHEMES)}")
        return v

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
        check_evaluate_on(self)
        ood = {d for v in self.evaluate_on.values() for d in v}
        for name, opts in self.dataset_options.items():
            if name not in self.grid.datasets and name not in ood:
                raise ValueError(f"dataset_options.{name}: options for a dataset not in grid.datasets or evaluate_on")
            check_dataset_options(name, opts)
        for enc in self.grid.encoders:
            try:
                self.weights_of(enc)  # a mapping without this encoder and without `default`
            except MedscaleError as e:
                raise ValueError(str(e)) from None
            p = get_encoder_spec(enc).patch_size
            for i, r in enumerate(self.grid.resolutions):
                if r % p:
                    lo, hi = max(p, r - r % p), r - r % p + p
                    raise ValueError(
                        f"grid.resolutions.{i}: {r} is not a multiple of {p} (patch size of {enc}); "
                        f"use {lo} or {hi}"
                    )
        sizes = {get_encoder_spec(e).size for e in self.grid.encoders}
        for size in sorted(sizes):
            spec = self.resources.cell_gpus[size]
            if isinstance(spec, dict) and min(spec) > min(self.grid.resolutions):
                raise ValueError(f"resources.cell_gpus.{size}: no band covers {min(self.grid.resolutions)} px "
                                 f"(the lowest band starts at {min(spec)}); add a band at 0")
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
        for name in self.grid.protocols:  # dense heads: the encoder blocks they read must exist
            try:
                layers = getattr(create_protocol(name, **self.protocols.get(name, {})), "layers", None)
            except ConfigError:  # e.g. a default task the head does not take: checked per cell
                continue
            if layers is not None:
                check_layers(name, layers, self.grid.encoders)
        return self

    # -- derived -------------------------------------------------------------------------------
    @property
    def output_path(self) -> Path:
        return Path(self.output).expanduser().resolve()

    @property
    def storage_root(self) -> str:
        """Root of what every node shares, as a URI or an absolute path."""
        if self.storage is None:
            return str(self.output_path)
        if "://" in self.storage:
            return self.storage.rstrip("/")
        return str(Path(self.storage).expanduser().resolve())

    @property
    def cache_root(self) -> str:
        # The cache is content-addressed, so sweeps sharing a storage root share their features.
        return f"{self.storage_root}/cache"

    @property
    def sweep_root(self) -> str:
        """Per-sweep shared state (cell results, Tune): under storage/<name>/ when storage is set,
        because cell ids repeat across sweeps; else output/ itself, as on one machine."""
        return self.storage_root if self.storage is None else f"{self.storage_root}/{self.name}"

    @property
    def resolved_tracking_uri(self) -> str:
        # MLflow's own convention: an explicit URI, else MLFLOW_TRACKING_URI (how a cluster's head
        # hands its tracking server to every sweep), else a sqlite file beside the outputs.
        return (self.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
                or f"sqlite:///{self.output_path / 'mlflow.db'}")

    def options_for(self, dataset: str) -> dict[str, Any]:
        """The dataset's reading options. An out-of-domain test set takes the options of the dataset
        its models train on (tiling must match) unless it sets them itself."""
        import inspect

        from tasks.datasets import dataset_class

        opts: dict[str, Any] = {}
        accepted = inspect.signature(dataset_class(dataset).__init__).parameters
        for train, targets in self.evaluate_on.items():
            if dataset in targets and dataset not in self.grid.datasets:
                opts.update({k: v for k, v in self.dataset_options.get(train, {}).items()
                             if k in accepted and k != "cv_folds"})
        return {**opts, **self.dataset_options.get(dataset, {})}

    def data_root(self, dataset: str) -> Path:
        return Path(self.data[dataset]).expanduser().resolve()

    def n_cells(self) -> int:
        g = self.grid
        return len(list(itertools.product(g.encoders, g.resolutions, g.datasets, g.protocols, g.seeds,
                                          g.train_sizes)))


def parse_config(raw: dict[str, Any], source: str = "<config>") -> SweepConfig:
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: a sweep config must be a YAML mapping, got {type(raw).__name__}")
    try:
        return SweepConfig.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(format_errors(e, source)) from None


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
