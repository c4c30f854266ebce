"""Shared fixtures: one local Ray cluster per test session (~3 s to start), synthetic datasets."""

from __future__ import annotations

import functools
import gc
import os
import shutil
from pathlib import Path

import pytest

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("TQDM_DISABLE", "1")
# Ray's log monitor (one per cluster the tests start, 4-5 in a run) lists the session's log folder
# on every pass of its loop, ten times a second, while it holds fewer files than this threshold;
# above it, every 0.5 s (LOG_NAME_UPDATE_INTERVAL_S). Lines of files it already follows are still
# forwarded as they come; a new worker's file is found within 0.5 s. ~12 s of CPU in a run -> ~3.
os.environ.setdefault("RAY_LOG_MONITOR_MANY_FILES_THRESHOLD", "0")
# One OpenMP/torch thread per process: two xdist workers already fill the two cores, and a trial
# that asks 2 CPUs would otherwise get OMP_NUM_THREADS=2 from Ray (workers inherit this instead),
# whose threads spin-wait for a core the other worker holds: the seg3d sweep's trial took 3.5 min
# of CPU that way instead of well under one.
os.environ.setdefault("OMP_NUM_THREADS", "1")
# Sweeps fall back to MLFLOW_TRACKING_URI (a cluster head's server): tests pick their own stores.
os.environ.pop("MLFLOW_TRACKING_URI", None)

# The test processes allocate millions of objects (imports, pandas, matplotlib, MLflow): Python's
# default first-generation threshold (700) runs a young collection every few hundred allocations.
# At 100 000, and with what collection imported frozen out of later full collections, the
# analysis and fits files take ~7% less CPU (56 -> 52 s, twice each). Only these processes:
# Ray's workers, the CLI sweeps and the trials keep Python's defaults.
gc.set_threshold(100_000, 50, 100)


def pytest_collection_finish(session):
    gc.collect()
    gc.freeze()


REPO = Path(__file__).resolve().parents[1]
TINY = "test_vit_tiny16"


# Tests that need no Ray but take tens of seconds: a CLI sweep in a subprocess (its own Ray), a
# decoder trained to a learning threshold, a paper-sized bootstrap, a hub download faked in a
# subprocess. `make test-fast` leaves them out with the Ray tests; `make test` runs them all.
SLOW_FILES = ("test_seg3d_learn.py", "test_analysis_pipeline.py")
SLOW_TESTS = ("test_a_broken_dataset_root_exits_nonzero_and_names_the_failed_cells",
              "test_a_500_cell_resume_searches_the_experiment_once",
              "test_paper_sized_study_finds_peaks_and_power_laws_and_holds_flat_curves",
              "test_family_hub_weights_load_offline_and_gated_ones_say_how_to_get_them",
              "test_hub_weights_load_offline_from_the_cache_and_never_fall_back",
              "test_decoder_beats_linear_on_context_endovis",
              "test_plan_counts_encoder_work_once_per_group",
              # 7-20 s each in `make test-fast` (every encoder's GFLOPs on the meta device, a replay in
              # a second process, fresh interpreters importing the entry points, trained heads)
              "test_cli_lists_every_encoder",
              "test_rounds_are_re_derived_identically_in_another_process",
              "test_abmil_with_the_tiny_encoder_on_real_tiles",
              "test_round_share_caps_each_later_round_and_is_checked",
              "test_plan_of_the_paper_grid_runs_without_data",
              "test_family_comes_from_the_logged_column_else_the_registry",
              "test_entry_points_import_in_a_fresh_process",
              "test_meddinov3_checkpoint_loads_through_file_to_identical_outputs",
              "test_isotonic_test_holds_its_level_with_five_seeds",
              "test_head_learns_on_synthetic_ac3ac4_and_never_looks_at_test",
              "test_a_resumed_part_of_a_group_draws_the_same_crops",
              "test_synth_is_deterministic_and_refuses_a_used_directory",
              "test_plan_of_the_paper_grid_counts_a_synthetic_dataset_exactly",
              "test_biomedclip_loads_a_whole_open_clip_checkpoint_with_its_text_tower",
              "test_every_metric_of_a_points_file_is_judged_or_named")


# The files that take longest, slowest first (`--durations`, docs/testing.md). With two xdist
# workers each taking whole files (`--dist loadfile --no-loadscope-reorder`), starting the longest
# first keeps one worker from running a 4-minute file alone at the end while the other idles.
# The 3-node cluster file goes 4th, not 1st: started beside both session clusters' start-up it
# took ~15 s more CPU (one sitting, 2026-12-05).
LONGEST_FIRST = ("test_sweep.py", "test_identity.py", "test_wsi_sweep.py", "test_cluster.py",
                 "test_seg3d_sweep.py", "test_analysis_pipeline.py", "test_dense_sweep.py", "test_console.py",
                 "test_extract.py", "test_adaptive_sweep.py", "test_encoder_weights.py", "test_encoders.py",
                 "test_import_graph.py", "test_fits.py", "test_datasets_breadth.py", "test_encoder_families.py",
                 "test_seg2d_sweep.py", "test_seg3d_learn.py", "test_seg2d_heads.py", "test_datasets.py",
                 "test_data_axis.py", "test_registration_sweep.py", "test_wsi.py", "test_em_sweep.py")


def pytest_collection_modifyitems(config, items):
    """Every test that needs a Ray cluster is `slow` (a marker `make test-fast` leaves out), and so
    are the few above: the inner loop runs the pure logic, the contracts and the file formats.
    The longest files go first (a stable sort: the order inside a file is kept)."""
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))
    for item in items:
        if ("ray_session" in getattr(item, "fixturenames", ()) or item.path.name in SLOW_FILES
                or item.originalname in SLOW_TESTS):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def ray_session():
    from orchestrator import ray_backend

    resources = ray_backend.start("local", num_cpus=2, object_store_memory=256 * 1024**2)
    yield resources
    ray_backend.stop()


@pytest.fixture
def joined_env(ray_session) -> dict[str, str]:
    """The environment for a CLI sweep run as a subprocess that joins this session's cluster
    through RAY_ADDRESS, as a driver does under `ray job submit`, instead of starting its own (a
    second cluster per process costs seconds of CPU the other tests would wait for)."""
    import ray

    return {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address, "PYTHONUNBUFFERED": "1"}


@pytest.fixture
def one_torch_thread():
    """Torch on one thread for the test: the machine has 2 cores shared with other jobs, and
    small problems run fastest on one. Restores the caller's setting."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def synth_roots(tmp_path_factory) -> dict[str, Path]:
    """Small synthetic NIH-14 and RSNA sets in their official layouts, written once per session."""
    from tasks.datasets import dataset_class

    base = tmp_path_factory.mktemp("data")
    roots = {"nih14": base / "nih14", "rsna_pneumonia": base / "rsna"}
    for name, root in roots.items():
        dataset_class(name).synth(root, n=200, seed=0)
    return roots


def damaged(roots: dict[str, Path], name: str, tmp_path: Path) -> Path:
    """A copy of a synthetic dataset to break (the module's roots stay intact for other tests)."""
    dst = tmp_path / f"{name}_copy"
    shutil.copytree(roots[name], dst)
    return dst


def problem_paths(problems: list) -> str:
    """A dataset's check() problems as one text, one per line, to search for a file's message."""
    return "\n".join(str(p) for p in problems)


def sweep_config(tmp: Path, roots: dict[str, Path], **overrides) -> dict:
    """A tiny sweep config (tiny encoder, small images) as a dict, ready for parse_config."""
    cfg = {
        "name": "t",
        "grid": {"encoders": [TINY], "resolutions": [32, 48], "datasets": list(roots),
                 "protocols": ["linear_probe", "knn"], "seeds": [0]},
        "weights": "random",
        "data": {k: str(v) for k, v in roots.items()},
        "output": str(tmp / "out"),
        "protocols": {"linear_probe": {"epochs": 20}},
        # One trial at a time on the session's 2 CPUs: Tune then reuses one trial process per
        # sweep. Each new one pays ~5 s of CPU starting and importing (Ray, Tune, torch,
        # scikit-learn) against well under a second for a tiny cell (docs/testing.md);
        # concurrent trials are the cluster scenario's to check (tests/cluster_scenario.py).
        "resources": {"extract_batch_size": 64, "torch_threads": 1, "cell_cpus": 2},
    }
    for k, v in overrides.items():
        cfg[k] = {**cfg[k], **v} if isinstance(v, dict) and isinstance(cfg.get(k), dict) else v
    if not cfg.get("tracking_uri"):
        db = Path(cfg["output"]) / "mlflow.db"
        if not db.exists():
            db.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(_empty_mlflow_store(), db)
    return cfg


@functools.cache
def _empty_mlflow_store() -> Path:
    """An MLflow sqlite store with its schema made, once per test process. Making one runs MLflow's
    schema migrations, ~2 s of CPU that each of ~60 sweep tests would repeat; the copy is the file
    MLflow itself wrote. Tests whose configs do not come from `sweep_config` (the CLI sweeps, the
    demo config) still have MLflow create their store."""
    import tempfile

    from mlflow.tracking import MlflowClient

    path = Path(tempfile.mkdtemp(prefix="medscale-mlflow-")) / "mlflow.db"
    MlflowClient(f"sqlite:///{path}").search_experiments()
    return path
