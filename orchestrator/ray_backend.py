"""Every Ray call medscale makes lives here: Ray's APIs move between releases (NOTES.md).

- `start`: a local cluster by default, or join one (`--address` / RAY_ADDRESS).
- `run_remote`: one function as a Ray task (loading weights to digest them, off the driver).
- `run_embedding_pipeline`: Ray Data, rows -> CPU decode tasks -> encoder actor pool -> Parquet.
- `run_cells`: a Ray Tune grid, one trial per cell, per-cell resources and retries; a callback
  hands trial events to a plain listener (the MLflow side never sees Ray objects).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import Any, Protocol

import ray
from ray import tune
from ray.data import ActorPoolStrategy

from orchestrator.extract import EncoderUDF, ExtractionJob, decode_batch

log = logging.getLogger("medscale")


def start(address: str | None = None, *, num_cpus: int | None = None,
          object_store_memory: int | None = None) -> dict[str, float]:
    """Start or join Ray; return the cluster's total resources."""
    if not ray.is_initialized():
        address = address or os.environ.get("RAY_ADDRESS") or "local"
        kwargs: dict[str, Any] = {"address": address, "include_dashboard": False,
                                  "logging_level": logging.WARNING, "configure_logging": True}
        if address == "local":
            kwargs.update(num_cpus=num_cpus, object_store_memory=object_store_memory)
        ray.init(**kwargs)
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = True
    return {k: float(v) for k, v in ray.cluster_resources().items()}


def stop() -> None:
    if ray.is_initialized():
        ray.shutdown()


def run_remote(fn: Callable[..., Any], *args: Any, num_cpus: float = 1, num_gpus: float = 0,
               memory: int | None = None) -> Any:
    opts: dict[str, Any] = {"num_cpus": num_cpus, "num_gpus": num_gpus, "max_retries": 0}
    if memory:
        opts["memory"] = memory
    return ray.get(ray.remote(fn).options(**opts).remote(*args))


def run_embedding_pipeline(rows: list[dict[str, Any]], job: ExtractionJob, *, interpolation: str,
                           expected_digest: str, out_dir: str, filesystem: Any, batch_size: int,
                           actors: int, gpus_per_actor: float, torch_threads: int | None) -> None:
    """Embed `rows` and write Parquet partitioned by split under `out_dir`."""
    n_blocks = max(1, min(len(rows) // batch_size, 4096))
    ds = ray.data.from_items(rows).repartition(n_blocks)
    ds = ds.map_batches(
        decode_batch, batch_size=batch_size, batch_format="numpy", num_cpus=1,
        fn_kwargs={"dataset": job.dataset, "root": job.root, "resolution": job.resolution,
                   "interpolation": interpolation, "val_fraction": job.val_fraction,
                   "split_seed": job.split_seed},
    )
    ds = ds.map_batches(
        EncoderUDF, batch_size=batch_size, batch_format="numpy",
        fn_constructor_kwargs={"encoder": job.encoder, "weights": job.weights, "pooling": job.pooling,
                               "expected_digest": expected_digest, "torch_threads": torch_threads},
        compute=ActorPoolStrategy(size=actors), num_gpus=gpus_per_actor or None, num_cpus=1,
    )
    ds.write_parquet(out_dir, filesystem=filesystem, partition_cols=["split"])


class CellListener(Protocol):
    def on_start(self, cell_id: str) -> None: ...
    def on_result(self, cell_id: str, result: dict[str, Any]) -> None: ...
    def on_error(self, cell_id: str, message: str) -> None: ...


class _TuneBridge(tune.Callback):
    """Runs in the driver: the single place trial events turn into tracking calls."""

    def __init__(self, listener: CellListener, error_reader: Callable[[str], str | None]):
        self.listener = listener
        self.error_reader = error_reader

    @staticmethod
    def _cell_id(trial: Any) -> str:
        return trial.config["cell"]["cell_id"]

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.listener.on_start(self._cell_id(trial))

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.listener.on_result(self._cell_id(trial), dict(trial.last_result or {}))

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        cell_id = self._cell_id(trial)
        message = self.error_reader(cell_id)
        if not message and trial.error_file and os.path.exists(trial.error_file):
            with open(trial.error_file) as f:
                lines = [ln for ln in f.read().strip().splitlines() if ln.strip()]
            message = lines[-1] if lines else "trial failed"
        self.listener.on_error(cell_id, message or "trial failed without an error message")


def _trainable(config: dict[str, Any]) -> None:
    from orchestrator.cells import run_cell

    tune.report(run_cell(config["cell"]))


def run_cells(cells: list[dict[str, Any]], listener: CellListener, *, name: str, storage_path: str,
              resources: Callable[[dict[str, Any]], dict[str, float]], max_failures: int,
              error_reader: Callable[[str], str | None]) -> None:
    """Run every cell as a Tune trial. Failures end as errored trials, never as an exception here."""
    if not cells:
        return

    def pgf(config: dict[str, Any]) -> tune.PlacementGroupFactory:
        return tune.PlacementGroupFactory([resources(config["cell"])])

    tuner = tune.Tuner(
        tune.with_resources(_trainable, pgf),
        param_space={"cell": tune.grid_search(cells)},
        tune_config=tune.TuneConfig(
            reuse_actors=True,
            trial_dirname_creator=lambda t: t.config["cell"]["cell_id"][:120],
            trial_name_creator=lambda t: t.config["cell"]["cell_id"],
        ),
        run_config=tune.RunConfig(
            name=name, storage_path=storage_path, verbose=0,
            failure_config=tune.FailureConfig(max_failures=max_failures),
            callbacks=[_TuneBridge(listener, error_reader)],
        ),
    )
    tuner.fit()
