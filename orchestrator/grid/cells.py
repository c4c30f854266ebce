"""The grid: its points (`Cell`) and which of them a sweep config plans (`plan_cells`).

Below the cell runners and the sweep driver: it needs only the config, the identity rules
(orchestrator.grid.identity) and the task registries, so the planner, the report (`medscale analyze
--config`: `config_identities`) and the runners share one definition of the grid.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import TYPE_CHECKING

from orchestrator.grid.identity import (
    cell_identity,
    cell_prefix,
    config_part,
    resolved_hparams,
    resolved_pooling,
)
from tasks.subsets import TrainSize

if TYPE_CHECKING:
    from orchestrator.grid.config import SweepConfig


@dataclass(frozen=True)
class Cell:
    """A point of the grid. Its id (`cell_id` in a spec) is `prefix` plus a digest of everything that
    determines its result (orchestrator.grid.identity); `seed_free`: the protocol ignores the seed, so one
    cell stands for every seed of the grid."""

    encoder: str
    resolution: int
    dataset: str
    protocol: str
    seed: int
    # The data axis (tasks/subsets.py): the whole training split unless told otherwise.
    train_fraction: float = 1.0
    train_shots: int | None = None
    seed_free: bool = False

    @property
    def train_size(self) -> TrainSize:
        return TrainSize(self.train_fraction, self.train_shots)

    @property
    def prefix(self) -> str:
        """The readable part of the cell's id; the train size shows only when it is not the whole split."""
        tail = f"__{self.train_size.label}" if not self.train_size.is_full else ""
        return cell_prefix(self.encoder, self.resolution, self.dataset, self.protocol, self.seed, self.seed_free) + tail

    @property
    def cell_id(self) -> str:
        """The readable id, before planning adds its identity digest (the id of a run and a result
        directory is `spec["cell_id"]`, from `cell_spec`)."""
        return self.prefix

    @property
    def extraction(self) -> tuple[str, int, str]:
        return (self.encoder, self.resolution, self.dataset)


def split_uses_seed(cfg: SweepConfig, dataset: str) -> bool:
    """Whether a grid seed chooses the dataset's split (a CV fold): then even a protocol that
    ignores the seed gives a different result per seed. Slide datasets with `cv_folds`, and dense
    datasets that override `cell_splits`, do; image datasets split once (`split_seed`)."""
    from tasks.datasets import dataset_class

    cls = dataset_class(dataset)
    if hasattr(cls, "cell_cases"):
        try:
            return bool(getattr(cls(".", **cfg.options_for(dataset)), "cv_folds", 0))
        except Exception:  # noqa: BLE001 - cannot tell: per seed is always right
            return True
    try:
        from tasks.datasets.dense_base import DenseDataset
    except ImportError:  # pragma: no cover - older contract
        return False
    return isinstance(cls, type) and issubclass(cls, DenseDataset) and cls.cell_splits is not DenseDataset.cell_splits


def plan_cells(cfg: SweepConfig) -> tuple[list[Cell], dict[str, str]]:
    """The grid's cells, minus those that make no sense (returned by cell prefix, with the reason).
    A protocol that does not use the seed (`uses_seed` False), on a dataset whose split the seed
    does not choose, is one cell per (encoder, resolution, dataset), `seed_free`, run with the
    grid's first seed: five identical kNN runs would pose as five seeds."""
    from tasks.datasets import dataset_class
    from tasks.protocols import PROTOCOLS

    cells, skipped = [], {}
    g = cfg.grid
    seeded = {ds: split_uses_seed(cfg, ds) for ds in g.datasets}
    for enc, res, ds, proto, size in itertools.product(g.encoders, g.resolutions, g.datasets, g.protocols,
                                                       g.train_sizes):
        training_free = PROTOCOLS[proto].family == "training_free"
        if training_free and size != g.train_sizes[0]:
            continue  # nothing is trained or drawn: one cell, on the first seed and training-set size
        # A training subset smaller than the split is drawn with the cell's seed: then the seed counts.
        free = training_free or (not PROTOCOLS[proto].uses_seed and not seeded[ds] and size.is_full)
        reason = PROTOCOLS[proto].accepts(dataset_class(ds))
        for seed in g.seeds[:1] if free else g.seeds:
            cell = Cell(enc, res, ds, proto, seed, size.fraction, size.shots, free)
            if reason:
                skipped[cell.prefix] = reason
            else:
                cells.append(cell)
    return cells, skipped


def config_identities(cfg: SweepConfig) -> dict[str, str]:
    """{config digest: cell prefix} of every cell the config plans, computed from the config alone
    (what `medscale analyze --config` keeps)."""
    from tasks.datasets import dataset_class

    cells, _ = plan_cells(cfg)
    out = {}
    for c in cells:
        task = dataset_class(c.dataset).task
        spec = {"encoder": c.encoder, "resolution": c.resolution, "dataset": c.dataset, "protocol": c.protocol,
                "seed": c.seed, "seed_free": c.seed_free, "train_fraction": c.train_fraction,
                "train_shots": c.train_shots,
                "hparams": resolved_hparams(c.protocol, task, c.seed, cfg.protocols.get(c.protocol, {})),
                "config": config_part(cfg, c.encoder, c.dataset, resolved_pooling(c.encoder, cfg.pooling))}
        out[cell_identity(spec).config_digest] = c.prefix
    return out
