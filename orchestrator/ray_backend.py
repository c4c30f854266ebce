"""Every Ray call medscale makes lives here: Ray's APIs move between releases
(docs/libraries.md).

- `start`: join a cluster (`--address`, RAY_ADDRESS, or one `ray start` runs on this machine, as
  under `ray submit`), else start a private local one.
- `run_remote`: one function as a Ray task (loading weights to digest them, off the driver).
- `run_dataset`: Ray Data, rows -> the caller's steps (CPU tasks, an actor pool) -> Parquet or rows
  (orchestrator/extraction/pipelines.py builds the extraction pipelines from it).
- `run_cells`: a Ray Tune grid, one trial per cell, per-cell resources and retries; a callback
  hands trial events to a plain listener (the MLflow side never sees Ray objects).
- `is_system_error`, `error_text`: what Ray's wrapped exceptions mean to a user.

This module imports no medscale code: the decode functions, encoder classes and the cell runner
come in as arguments, so the domain code never depends on Ray's API and Ray's never on the domain.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import ray
from ray import tune
from ray.data import ActorPoolStrategy, TaskPoolStrategy


def resolve_address(address: str | None = None) -> str:
    """The cluster a sweep joins: `address` if given ("local" forces a private cluster, "auto"
    any running one); else RAY_ADDRESS (set by `ray job submit` and KubeRay); else the cluster
    that `ray start` runs on this machine, if alive (`ray submit` runs the sweep on the head with
    no RAY_ADDRESS: starting a private cluster there would leave the real one idle); else "local".
    """
    if address:
        return address
    if os.environ.get("RAY_ADDRESS"):
        return os.environ["RAY_ADDRESS"]
    from ray._private import services, utils

    # `ray start` records its GCS address in <temp dir>/ray_current_cluster; a crashed cluster
    # leaves the file behind, so it counts only while a raylet on this machine still serves it.
    recorded = utils.read_ray_address()
    services.find_gcs_addresses.cache_clear()
    if recorded and recorded in services.find_gcs_addresses():
        return recorded
    return "local"


def start(address: str | None = None, *, num_cpus: int | None = None,
          object_store_memory: int | None = None) -> dict[str, float]:
    """Start or join Ray (see `resolve_address`); return the cluster's total resources."""
    if not ray.is_initialized():
        address = resolve_address(address)
        kwargs: dict[str, Any] = {"address": address, "include_dashboard": False,
                                  "logging_level": logging.WARNING, "configure_logging": True}
        if address == "local":
            kwargs.update(num_cpus=num_cpus, object_store_memory=object_store_memory,
                          _system_config={"num_workers_soft_limit": _soft_limit(num_cpus)})
        ray.init(**kwargs)
        ctx = ray.data.DataContext.get_current()
        # medscale draws its own progress (orchestrator/console/progress.py); Ray Data's bars and its
        # progress INFO lines would interleave with it.
        ctx.enable_progress_bars = False
        ctx.print_on_execution_start = False
    return {k: float(v) for k, v in ray.cluster_resources().items()}


def _soft_limit(num_cpus: int | None) -> int:
    """How many worker processes a private cluster keeps before it kills idle ones. Ray's default
    is its CPU count, and it counts actors: Ray Data's two service actors and a Tune trial already
    fill a 2-CPU machine, so every idle task process (each with torch, timm and an encoder
    imported) was killed a second after each extraction and the next one paid ~10 s of CPU to
    start again (docs/libraries.md). Idle processes hold memory, not CPU."""
    return (num_cpus or os.cpu_count() or 1) + 4


def is_system_error(e: BaseException) -> bool:
    """True when `e` (or what it wraps) is Ray losing a node, worker or object, not the work's own
    error: such work is worth retrying elsewhere; a corrupt image is not."""
    lost = (ray.exceptions.NodeDiedError, ray.exceptions.WorkerCrashedError, ray.exceptions.ActorDiedError,
            ray.exceptions.ObjectLostError, ray.exceptions.OwnerDiedError, ray.exceptions.RaySystemError,
            ray.exceptions.ActorUnavailableError)
    seen: set[int] = set()
    err: BaseException | None = e
    while err is not None and id(err) not in seen:
        if isinstance(err, lost):
            return True
        seen.add(id(err))
        err = getattr(err, "cause", None) or err.__cause__
    return False


def error_text(e: BaseException) -> str:
    """The message a user needs from an exception Ray raised for a task or actor: the innermost
    one (which names the file at fault)."""
    # Ray wraps worker exceptions; the user needs the innermost message (which names the file).
    # Ray Data's UserCodeException drops the UDF's exception object and keeps only its traceback
    # text in the outer RayTaskError: take the dataset error's line from there.
    err: BaseException | None = e
    while err is not None:
        lines = [ln for ln in str(err).splitlines() if ln.startswith("tasks.errors.DatasetError: ")]
        if lines:
            return lines[-1].removeprefix("tasks.errors.")
        err = getattr(err, "cause", None) or err.__cause__
    cause = getattr(e, "cause", None) or e.__cause__
    while cause is not None and (getattr(cause, "cause", None) or cause.__cause__) is not None:
        cause = getattr(cause, "cause", None) or cause.__cause__
    err = cause or e
    return f"{type(err).__name__}: {err}".strip()


def stop() -> None:
    if ray.is_initialized():
        ray.shutdown()


def run_remote(fn: Callable[..., Any], *args: Any, num_cpus: float = 1, num_gpus: float = 0,
               memory: int | None = None) -> Any:
    opts: dict[str, Any] = {"num_cpus": num_cpus, "num_gpus": num_gpus, "max_retries": 0}
    if memory:
        opts["memory"] = memory
    return ray.get(ray.remote(fn).options(**opts).remote(*args))


@dataclass(frozen=True)
class Step:
    """One Ray Data step over batches of rows. `fn` is a function of a batch, or, with `actors`
    > 0, a class whose instances (one per actor, built with `kwargs`) are called on batches;
    `flat`: a function of one row returning many (`flat_map`); `rows_per_block`: repartition to
    blocks of that many rows after the step. The steps' code is the caller's: this module knows
    Ray, not what is decoded or encoded.

    A class step that asks for no GPU runs as `actors` concurrent tasks instead of actors, its
    instance kept by each worker process (`_call_kept`): Ray reuses a job's worker processes for
    tasks but gives every actor a new one, which on a CPU node pays the imports (torch, timm) and
    the model's construction again for every extraction, ~5 s of CPU each (docs/testing.md).
    GPU steps stay actors: their device memory and compiled graphs belong to one process."""

    fn: Any
    kwargs: dict[str, Any] = field(default_factory=dict)
    batch_size: int | None = None
    num_cpus: float = 1
    actors: int = 0
    num_gpus: float = 0
    flat: bool = False
    rows_per_block: int | None = None


# This worker process's instance of a CPU class step (`Step`): one at a time, so a process never
# holds the models of earlier extractions; rebuilt when the class or its arguments change.
_KEPT: dict[str, Any] = {}


def _call_kept(batch: dict[str, Any], *, cls: type, kwargs: dict[str, Any]) -> Any:
    key = f"{cls.__module__}.{cls.__qualname__}({sorted(kwargs.items())!r})"
    if _KEPT.get("key") != key:
        _KEPT.clear()  # drop the old instance before building the new one
        _KEPT.update(key=key, instance=cls(**kwargs))
    return _KEPT["instance"](batch)


def run_dataset(rows: list[dict[str, Any]], steps: list[Step], *, blocks: int, out_dir: str | None = None,
                filesystem: Any = None, partition_cols: list[str] | None = None) -> list[dict[str, Any]]:
    """Rows -> `blocks` blocks -> each step in turn -> Parquet partitioned by `partition_cols` under
    `out_dir`, or, without `out_dir`, the output rows gathered on the driver (small index rows)."""
    # Blocks cut on the driver: a `repartition` after `from_items` is a shuffle stage of its own.
    ds = ray.data.from_items(rows, override_num_blocks=max(1, min(blocks, len(rows), 4096)))
    for st in steps:
        if st.flat:
            ds = ds.flat_map(st.fn, fn_kwargs=st.kwargs, num_cpus=st.num_cpus)
        elif st.actors and not st.num_gpus:
            ds = ds.map_batches(_call_kept, batch_size=st.batch_size, batch_format="numpy",
                                fn_kwargs={"cls": st.fn, "kwargs": st.kwargs},
                                compute=TaskPoolStrategy(size=st.actors), num_cpus=st.num_cpus)
        elif st.actors:
            ds = ds.map_batches(st.fn, batch_size=st.batch_size, batch_format="numpy",
                                fn_constructor_kwargs=st.kwargs, compute=ActorPoolStrategy(size=st.actors),
                                num_gpus=st.num_gpus or None, num_cpus=st.num_cpus)
        else:
            ds = ds.map_batches(st.fn, batch_size=st.batch_size, batch_format="numpy", num_cpus=st.num_cpus,
                                fn_kwargs=st.kwargs)
        if st.rows_per_block:
            ds = ds.repartition(target_num_rows_per_block=st.rows_per_block)
    if out_dir is None:
        return [{k: (v.item() if hasattr(v, "item") else v) for k, v in r.items()} for r in ds.iter_rows()]
    ds.write_parquet(out_dir, filesystem=filesystem, partition_cols=partition_cols or ["split"])
    return []


class CellListener(Protocol):
    def on_start(self, cell_id: str) -> None: ...
    def on_result(self, cell_id: str, result: dict[str, Any]) -> None: ...
    def on_error(self, cell_id: str, message: str) -> None: ...
    def on_retry(self, cell_id: str, message: str) -> None: ...


class _TuneBridge(tune.Callback):
    """Runs in the driver: the single place trial events turn into tracking calls."""

    def __init__(self, listener: CellListener, error_reader: Callable[[str], str | None]):
        self.listener = listener
        self.error_reader = error_reader

    @staticmethod
    def _cell_ids(trial: Any) -> list[str]:
        """The cells a trial runs: one, or a group's members (each reported as its own cell)."""
        cell = trial.config["cell"]
        return [m["cell_id"] for m in cell["members"]] if cell.get("members") else [cell["cell_id"]]

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        for cid in self._cell_ids(trial):
            self.listener.on_start(cid)

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        for cid in self._cell_ids(trial):  # each member's result directory decides its own status
            self.listener.on_result(cid, dict(trial.last_result or {}))

    def _message(self, trial: Any, cell_id: str) -> str:
        message = self.error_reader(cell_id)
        if not message and trial.error_file and os.path.exists(trial.error_file):
            with open(trial.error_file) as f:
                lines = [ln for ln in f.read().strip().splitlines() if ln.strip()]
            message = lines[-1] if lines else "trial failed"
        return message or "trial failed without an error message (its worker or node died?)"

    def on_trial_recover(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        # Tune retries the trial (FailureConfig.max_failures) wherever resources are free.
        for cid in self._cell_ids(trial):
            self.listener.on_retry(cid, self._message(trial, cid))

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        for cid in self._cell_ids(trial):
            self.listener.on_error(cid, self._message(trial, cid))


def _trainable(config: dict[str, Any], run_cell: Callable[..., dict[str, float]]) -> None:
    # Where the cell runs and what Ray granted it: recorded with its results (and so in MLflow),
    # the evidence that cells spread over nodes with the GPU share their table asks for.
    ctx = ray.get_runtime_context()
    t_start = time.time()
    placement = {"node_id": ctx.get_node_id(), "node_ip": ray.util.get_node_ip_address(),
                 "resources": ctx.get_assigned_resources(), "t_start": t_start}
    metrics = run_cell(config["cell"], placement)
    tune.report({**metrics, "node_id": placement["node_id"], "t_start": t_start, "t_end": time.time()})


def run_cells(cells: list[dict[str, Any]], listener: CellListener, run_cell: Callable[..., dict[str, float]], *,
              name: str, storage_path: str,
              resources: Callable[[dict[str, Any]], dict[str, float]], max_failures: int,
              error_reader: Callable[[str], str | None]) -> None:
    """Run every cell as a Tune trial. Failures end as errored trials, never as an exception here."""
    if not cells:
        return
    # Tune's default TensorBoard/CSV/JSON loggers (and their "run tensorboard" hint): we log to MLflow.
    os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")

    def pgf(config: dict[str, Any]) -> tune.PlacementGroupFactory:
        return tune.PlacementGroupFactory([resources(config["cell"])])

    tuner = tune.Tuner(
        # The runner travels as a parameter (a function pickles by reference to its module), so
        # this module imports no cell code.
        tune.with_resources(tune.with_parameters(_trainable, run_cell=run_cell), pgf),
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
