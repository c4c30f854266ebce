"""Shared fixtures: one local Ray cluster per test session (~3 s to start), synthetic datasets."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("TQDM_DISABLE", "1")
# Sweeps fall back to MLFLOW_TRACKING_URI (a cluster head's server): tests pick their own stores.
os.environ.pop("MLFLOW_TRACKING_URI", None)

REPO = Path(__file__).resolve().parents[1]
TINY = "test_vit_tiny16"


def pytest_collection_modifyitems(config, items):
    """Every test that needs a Ray cluster is `slow` (a marker `make test-fast` leaves out): the
    inner loop runs the pure logic, the contracts and the file formats, not the sweeps."""
    for item in items:
        if "ray_session" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def ray_session():
    from orchestrator import ray_backend

    resources = ray_backend.start("local", num_cpus=2, object_store_memory=256 * 1024**2)
    yield resources
    ray_backend.stop()


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
        "resources": {"extract_batch_size": 64, "torch_threads": 1},
    }
    for k, v in overrides.items():
        cfg[k] = {**cfg[k], **v} if isinstance(v, dict) and isinstance(cfg.get(k), dict) else v
    return cfg
