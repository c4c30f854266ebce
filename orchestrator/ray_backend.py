"""Every Ray call medscale makes lives here: Ray's APIs move between releases
(docs/libraries.md).

- `start`: join a cluster (`--address`, RAY_ADDRESS, or one `ray start` runs on this machine, as
  under `ray submit`), else start a private local one.
- `run_remote`: one function as a Ray task (loading weights to digest them, off the driver).
- `run_embedding_pipeline`: Ray Data, rows -> CPU decode tasks -> encoder actor pool -> Parquet;
  `run_slice_pipeline` (CT volumes) and `run_slide_pipeline` (whole slides) expand items first;
  `run_dense_pipeline`: cases -> Samples decoded on CPU -> encoder pool -> one fp16 map file a case.
- `run_cells`: a Ray Tune grid, one trial per cell, per-cell resources and retries; a callback
  hands trial events to a plain listener (the MLflow side never sees Ray objects).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from typing import Any, Protocol

import ray
from ray import tune
from ray.data import ActorPoolStrategy

from orchestrator import console
from orchestrator.decode import decode_batch, decode_volumes
from orchestrator.extract import EncoderUDF, ExtractionJob
from orchestrator.extract_dense import DenseEncoderUDF, decode_cases
from orchestrator.extract_slides import decode_tiles, expand_slide

# Half a CPU per CT volume-decoding task. A volume's decode is a long generator (read forward once,
# window, resize) that is light next to encoding its slices, so two may share a core; and a
# reservation unlike the encoder actor's (1 CPU) keeps Ray Data from fusing it into the actor,
# where on a CPU node it runs serially with the encoder instead of beside it (on GPU nodes the
# actors' GPU reservation prevents fusion anyway). Quiet 2-core VM, alternating runs of
# ct_throughput: fused 0.953, 1.019; unfused 1.056, 1.098. The other pipelines stay fused on CPU:
# unfusing dense_throughput's per-case decode cost more than it gained (0.73, 0.84, 0.80 against
# 0.78-0.91 fused): each extra decode worker pays its imports against a few cheap batches.
SLICE_DECODE_CPUS = 0.5


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
            kwargs.update(num_cpus=num_cpus, object_store_memory=object_store_memory)
        else:
            console.note(f"joining the Ray cluster at {address}")
        ray.init(**kwargs)
        ctx = ray.data.DataContext.get_current()
        # medscale draws its own progress (orchestrator/progress.py); Ray Data's bars and its
        # progress INFO lines would interleave with it.
        ctx.enable_progress_bars = False
        ctx.print_on_execution_start = False
    return {k: float(v) for k, v in ray.cluster_resources().items()}


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
                   "split_seed": job.split_seed, "options": job.options},
    )
    _encode_and_write(ds, job, expected_digest=expected_digest, out_dir=out_dir, filesystem=filesystem,
                      batch_size=batch_size, actors=actors, gpus_per_actor=gpus_per_actor,
                      torch_threads=torch_threads)


def run_slice_pipeline(rows: list[dict[str, Any]], job: ExtractionJob, *, interpolation: str,
                       expected_digest: str, out_dir: str, filesystem: Any, batch_size: int,
                       actors: int, gpus_per_actor: float, torch_threads: int | None) -> None:
    """Volumes -> `decode_volumes` in CPU tasks (each volume read once, its slices windowed, resized
    and batched as they come) -> encoder actor pool -> slice embeddings as Parquet partitioned by split under
    `out_dir` (the caller pools them per volume). Volume rows carry slope/intercept/window."""
    # One task per volume, which reads it forward once and emits batches of its slices as they are
    # decoded: batches of (volume, z) items made by a repartition straddle volumes and made every
    # batch re-open and re-decompress its .nii.gz from the start up to its slices.
    ds = ray.data.from_items(rows).repartition(max(1, min(len(rows), 4096)))
    ds = ds.map_batches(
        decode_volumes, batch_size=1, batch_format="numpy", num_cpus=SLICE_DECODE_CPUS,
        fn_kwargs={"resolution": job.resolution, "interpolation": interpolation, "batch_size": batch_size},
    )
    _encode_and_write(ds, job, expected_digest=expected_digest, out_dir=out_dir, filesystem=filesystem,
                      batch_size=batch_size, actors=actors, gpus_per_actor=gpus_per_actor,
                      torch_threads=torch_threads)


def run_slide_pipeline(rows: list[dict[str, Any]], job: ExtractionJob, *, tiling: str, coords_uri: str,
                       interpolation: str, expected_digest: str, out_dir: str, filesystem: Any, batch_size: int,
                       actors: int, gpus_per_actor: float, torch_threads: int | None) -> None:
    """Slides -> `flat_map` to tile coordinates (tiled once per slide, kept under `coords_uri`) ->
    batches of neighbouring tiles -> lazy tile reads in CPU tasks -> encoder actor pool -> Parquet
    partitioned by `case_id` under `out_dir` (one directory = one slide's bag). Memory is a few
    batches per worker whatever the slide count: nothing holds a slide or a dataset whole."""
    ds = ray.data.from_items(rows).repartition(max(1, min(len(rows), 4096)))
    ds = ds.flat_map(expand_slide, fn_kwargs={"tiling": tiling, "coords_uri": coords_uri}, num_cpus=1)
    ds = ds.repartition(target_num_rows_per_block=batch_size)
    ds = ds.map_batches(decode_tiles, batch_size=batch_size, batch_format="numpy", num_cpus=1,
                        fn_kwargs={"resolution": job.resolution, "interpolation": interpolation})
    _encode_and_write(ds, job, expected_digest=expected_digest, out_dir=out_dir, filesystem=filesystem,
                      batch_size=batch_size, actors=actors, gpus_per_actor=gpus_per_actor,
                      torch_threads=torch_threads, partition_cols=["case_id"])


def run_dense_pipeline(rows: list[dict[str, Any]], *, dataset: str, job: ExtractionJob, layers: str, precision: str,
                       interpolation: str, expected_digest: str, out_uri: str, batch_size: int, cases_per_batch: int,
                       actors: int, gpus_per_actor: float, torch_threads: int | None) -> list[dict[str, Any]]:
    """Dense maps of `rows` (one per case): `decode_cases` on CPU tasks (`dataset`: the JSON that
    rebuilds the dataset there) -> `DenseEncoderUDF` in the actor pool, which writes one fp16 `.npy`
    file per case under `out_uri` -> the small index rows (case_id, file, n_slices, channels, grid,
    error), gathered on the driver. `cases_per_batch` keeps a batch near `batch_size` slices."""
    n_blocks = max(1, min(len(rows) // cases_per_batch, 4096))
    ds = ray.data.from_items(rows).repartition(n_blocks)
    ds = ds.map_batches(decode_cases, batch_size=cases_per_batch, batch_format="numpy", num_cpus=1,
                        fn_kwargs={"dataset": dataset, "resolution": job.resolution, "interpolation": interpolation})
    ds = ds.map_batches(
        DenseEncoderUDF, batch_size=cases_per_batch, batch_format="numpy",
        fn_constructor_kwargs={"encoder": job.encoder, "weights": job.weights, "expected_digest": expected_digest,
                               "layers": layers, "out_uri": out_uri, "precision": precision,
                               "torch_threads": torch_threads, "batch_size": batch_size},
        compute=ActorPoolStrategy(size=actors), num_gpus=gpus_per_actor or None, num_cpus=1,
    )
    return [{k: (v.item() if hasattr(v, "item") else v) for k, v in r.items()} for r in ds.iter_rows()]


def _encode_and_write(ds: Any, job: ExtractionJob, *, expected_digest: str, out_dir: str, filesystem: Any,
                      batch_size: int, actors: int, gpus_per_actor: float, torch_threads: int | None,
                      partition_cols: list[str] | None = None) -> None:
    """Decoded uint8 batches -> encoder actor pool -> Parquet partitioned by split (or by slide)."""
    ds = ds.map_batches(
        EncoderUDF, batch_size=batch_size, batch_format="numpy",
        fn_constructor_kwargs={"encoder": job.encoder, "weights": job.weights, "pooling": job.pooling,
                               "expected_digest": expected_digest, "torch_threads": torch_threads,
                               "expected_precision": job.precision},
        compute=ActorPoolStrategy(size=actors), num_gpus=gpus_per_actor or None, num_cpus=1,
    )
    ds.write_parquet(out_dir, filesystem=filesystem, partition_cols=partition_cols or ["split"])


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


def _trainable(config: dict[str, Any]) -> None:
    from orchestrator.cells import run_cell

    # Where the cell runs and what Ray granted it: recorded with its results (and so in MLflow),
    # the evidence that cells spread over nodes with the GPU share their table asks for.
    ctx = ray.get_runtime_context()
    t_start = time.time()
    placement = {"node_id": ctx.get_node_id(), "node_ip": ray.util.get_node_ip_address(),
                 "resources": ctx.get_assigned_resources(), "t_start": t_start}
    metrics = run_cell(config["cell"], placement)
    tune.report({**metrics, "node_id": placement["node_id"], "t_start": t_start, "t_end": time.time()})


def run_cells(cells: list[dict[str, Any]], listener: CellListener, *, name: str, storage_path: str,
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
