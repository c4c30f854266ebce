"""The extraction pipelines, built from `ray_backend.run_dataset` steps: what runs where (decode
on CPU tasks, encoders in an actor pool) is decided here; how Ray runs it, in ray_backend.

- `run_embedding_pipeline`: index rows -> `decode_batch` (decode only) -> `EncoderUDF` (resize on
  its device, embed) -> Parquet by split;
- `run_shared_decode_pipeline`: the same for several resolutions of one encoder: one decode,
  `ResolutionsEncoderUDF` embeds each batch at every resolution -> Parquet by resolution and split;
- `run_slice_pipeline` (CT volumes): one decode task per volume -> slice embeddings by split;
- `run_slide_pipeline` (whole slides): slide -> tile coordinates -> tiles -> `TileEncoderUDF` ->
  Parquet by slide;
- `run_dense_pipeline`: cases -> `decode_cases` -> `DenseEncoderUDF` (one fp16 map file a case) ->
  index rows back to the driver.
"""

from __future__ import annotations

from typing import Any

from orchestrator import ray_backend
from orchestrator.extraction.decode import decode_batch, decode_volumes
from orchestrator.extraction.dense import DenseEncoderUDF, decode_cases
from orchestrator.extraction.images import EncoderUDF, ResolutionsEncoderUDF
from orchestrator.extraction.jobs import ExtractionJob
from orchestrator.extraction.slides import TileEncoderUDF, decode_tiles, expand_slide
from orchestrator.ray_backend import Step

# Half a CPU per CT volume-decoding task. A volume's decode is a long generator (read forward once,
# window, resize) that is light next to encoding its slices, so two may share a core; and a
# reservation unlike the encoder actor's (1 CPU) keeps Ray Data from fusing it into the actor,
# where on a CPU node it runs serially with the encoder instead of beside it (on GPU nodes the
# actors' GPU reservation prevents fusion anyway). Quiet 2-core VM, alternating runs of
# ct_throughput: fused 0.953, 1.019; unfused 1.056, 1.098. The other pipelines stay fused on CPU:
# unfusing dense_throughput's per-case decode cost more than it gained (0.73, 0.84, 0.80 against
# 0.78-0.91 fused): each extra decode worker pays its imports against a few cheap batches.
SLICE_DECODE_CPUS = 0.5


def _encode(udf: type, job: ExtractionJob, *, expected_digest: str, batch_size: int, actors: int,
            gpus_per_actor: float, torch_threads: int | None, resize: str | None = None) -> Step:
    """The encoder actor pool's step: one frozen encoder per actor; `resize` (an interpolation):
    the actor resizes decoded images to the job's resolution on its device."""
    extra = {"resolution": job.resolution, "interpolation": resize} if resize else {}
    return Step(udf, {"encoder": job.encoder, "weights": job.weights, "pooling": job.pooling,
                      "expected_digest": expected_digest, "torch_threads": torch_threads,
                      "expected_precision": job.precision, "compile": job.compile, "batch_size": batch_size,
                      **extra},
                batch_size=batch_size, actors=actors, num_gpus=gpus_per_actor)


def run_embedding_pipeline(rows: list[dict[str, Any]], job: ExtractionJob, *, interpolation: str,
                           expected_digest: str, out_dir: str, filesystem: Any, batch_size: int,
                           actors: int, gpus_per_actor: float, torch_threads: int | None) -> None:
    """Embed `rows` and write Parquet partitioned by split under `out_dir`."""
    decode = Step(decode_batch, {"dataset": job.dataset, "root": job.root, "val_fraction": job.val_fraction,
                                 "split_seed": job.split_seed, "options": job.options}, batch_size=batch_size)
    encode = _encode(EncoderUDF, job, expected_digest=expected_digest, batch_size=batch_size, actors=actors,
                     gpus_per_actor=gpus_per_actor, torch_threads=torch_threads, resize=interpolation)
    ray_backend.run_dataset(rows, [decode, encode], blocks=len(rows) // batch_size, out_dir=out_dir,
                            filesystem=filesystem)


def run_shared_decode_pipeline(rows: list[dict[str, Any]], jobs: list[ExtractionJob], *, interpolation: str,
                               expected_digest: str, out_dir: str, filesystem: Any, batch_sizes: dict[int, int],
                               actors: int, gpus_per_actor: float, torch_threads: int | None) -> None:
    """Embed `rows` once decoded at every job's resolution (the jobs differ only in resolution) and
    write Parquet partitioned by resolution and split under `out_dir`. The pipeline's batch is the
    largest of the jobs' batches; each resolution is embedded in pieces of its own."""
    job, batch = jobs[0], max(batch_sizes.values())
    decode = Step(decode_batch, {"dataset": job.dataset, "root": job.root, "val_fraction": job.val_fraction,
                                 "split_seed": job.split_seed, "options": job.options}, batch_size=batch)
    # A compiled forward gets one fixed batch: the smallest (the largest resolution's), so it fits.
    encode = Step(ResolutionsEncoderUDF, {
        "encoder": job.encoder, "weights": job.weights, "pooling": job.pooling, "expected_digest": expected_digest,
        "torch_threads": torch_threads, "expected_precision": job.precision, "compile": job.compile,
        "batch_size": min(batch_sizes.values()), "interpolation": interpolation,
        "resolutions": [j.resolution for j in jobs], "batch_sizes": batch_sizes},
        batch_size=batch, actors=actors, num_gpus=gpus_per_actor)
    ray_backend.run_dataset(rows, [decode, encode], blocks=len(rows) // batch, out_dir=out_dir,
                            filesystem=filesystem, partition_cols=["resolution", "split"])


def run_slice_pipeline(rows: list[dict[str, Any]], job: ExtractionJob, *, interpolation: str,
                       expected_digest: str, out_dir: str, filesystem: Any, batch_size: int,
                       actors: int, gpus_per_actor: float, torch_threads: int | None) -> None:
    """Volumes -> `decode_volumes` in CPU tasks (each volume read once, its slices windowed, resized
    and batched as they come) -> encoder actor pool -> slice embeddings as Parquet partitioned by
    split under `out_dir` (the caller pools them per volume). Volume rows carry slope/intercept/window."""
    # One task per volume, which reads it forward once and emits batches of its slices as they are
    # decoded: batches of (volume, z) items made by a repartition straddle volumes and made every
    # batch re-open and re-decompress its .nii.gz from the start up to its slices.
    decode = Step(decode_volumes, {"resolution": job.resolution, "interpolation": interpolation,
                                   "batch_size": batch_size}, batch_size=1, num_cpus=SLICE_DECODE_CPUS)
    encode = _encode(EncoderUDF, job, expected_digest=expected_digest, batch_size=batch_size, actors=actors,
                     gpus_per_actor=gpus_per_actor, torch_threads=torch_threads)
    ray_backend.run_dataset(rows, [decode, encode], blocks=len(rows), out_dir=out_dir, filesystem=filesystem)


def run_slide_pipeline(rows: list[dict[str, Any]], job: ExtractionJob, *, tiling: str, coords_uri: str,
                       interpolation: str, expected_digest: str, out_dir: str, filesystem: Any, batch_size: int,
                       actors: int, gpus_per_actor: float, torch_threads: int | None) -> None:
    """Slides -> `flat_map` to tile coordinates (tiled once per slide, kept under `coords_uri`) ->
    batches of neighbouring tiles -> lazy tile reads in CPU tasks -> encoder actor pool -> Parquet
    partitioned by `case_id` under `out_dir` (one directory = one slide's bag). Memory is a few
    batches per worker whatever the slide count: nothing holds a slide or a dataset whole."""
    expand = Step(expand_slide, {"tiling": tiling, "coords_uri": coords_uri}, flat=True, rows_per_block=batch_size)
    decode = Step(decode_tiles, {"resolution": job.resolution, "interpolation": interpolation},
                  batch_size=batch_size)
    encode = _encode(TileEncoderUDF, job, expected_digest=expected_digest, batch_size=batch_size, actors=actors,
                     gpus_per_actor=gpus_per_actor, torch_threads=torch_threads)
    ray_backend.run_dataset(rows, [expand, decode, encode], blocks=len(rows), out_dir=out_dir,
                            filesystem=filesystem, partition_cols=["case_id"])


def run_dense_pipeline(rows: list[dict[str, Any]], *, dataset: str, job: ExtractionJob, layers: str, precision: str,
                       interpolation: str, expected_digest: str, out_uri: str, batch_size: int, cases_per_batch: int,
                       actors: int, gpus_per_actor: float, torch_threads: int | None) -> list[dict[str, Any]]:
    """Dense maps of `rows` (one per case): `decode_cases` on CPU tasks (`dataset`: the JSON that
    rebuilds the dataset there) -> `DenseEncoderUDF` in the actor pool, which writes one fp16 `.npy`
    file per case under `out_uri` -> the small index rows (case_id, file, n_slices, channels, grid,
    error), gathered on the driver. `cases_per_batch` keeps a batch near `batch_size` slices."""
    decode = Step(decode_cases, {"dataset": dataset, "resolution": job.resolution, "interpolation": interpolation},
                  batch_size=cases_per_batch)
    encode = Step(DenseEncoderUDF, {"encoder": job.encoder, "weights": job.weights,
                                    "expected_digest": expected_digest, "layers": layers, "out_uri": out_uri,
                                    "precision": precision, "torch_threads": torch_threads,
                                    "batch_size": batch_size, "compile": job.compile},
                  batch_size=cases_per_batch, actors=actors, num_gpus=gpus_per_actor)
    return ray_backend.run_dataset(rows, [decode, encode], blocks=len(rows) // cases_per_batch)
