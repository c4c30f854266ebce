"""The console is medscale's: a sweep run as a user runs it (a subprocess, no TTY) prints medscale's
progress and summary, and Ray's and Tune's own output goes to the log file it names."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from .conftest import REPO, TINY

# Ray's and Tune's own lines ("2026-... INFO streaming_executor.py:215 -- ..."), the C++ core
# worker, Tune's boxes and hints, torch warnings; medscale's own "WARNING:" lines are allowed.
RAY_NOISE = re.compile(r"\s(INFO|WARNING|ERROR)\s+\S+\.py:\d+ --|core_worker|Configuration for experiment|"
                       r"tensorboard|UserWarning")


def _sweep(cfg: dict, tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(cfg))
    env = {**os.environ, "PYTHONPATH": str(REPO), "TQDM_DISABLE": "1"}
    return subprocess.run([sys.executable, "-m", "orchestrator.cli", "sweep", str(path), *args],
                          capture_output=True, text=True, timeout=900, env=env, cwd=tmp_path)


def _config(tmp_path: Path, roots: dict[str, Path]) -> dict:
    return {"name": "quiet", "weights": "random", "output": str(tmp_path / "out"),
            "grid": {"encoders": [TINY], "resolutions": [32], "datasets": list(roots),
                     "protocols": ["linear_probe", "knn"], "seeds": [0]},
            "data": {k: str(v) for k, v in roots.items()},
            "protocols": {"linear_probe": {"epochs": 5}},
            "resources": {"extract_batch_size": 64, "torch_threads": 1, "cell_cpus": 2}}


@pytest.mark.slow
def test_sweep_console_is_medscales_and_ray_goes_to_the_log(synth_roots, tmp_path):
    roots = {"nih14": synth_roots["nih14"], "rsna_pneumonia": tmp_path / "not_downloaded"}
    cfg = _config(tmp_path, roots)

    # A missing dataset is reported once, before anything starts: no Ray, no MLflow runs.
    r = _sweep(cfg, tmp_path)
    assert r.returncode == 2, r.stdout + r.stderr
    assert "rsna_pneumonia" in r.stderr and "does not exist" in r.stderr and "nothing was run" in r.stderr
    assert r.stderr.count("does not exist") == 1
    assert not (tmp_path / "out" / "mlflow.db").exists() and not (tmp_path / "out" / "ray.log").exists()

    # --allow-missing: nih14's cells run, rsna's fail with the reason; the console stays ours.
    r = _sweep(cfg, tmp_path, "--allow-missing")
    out = r.stdout
    assert r.returncode == 1, out + r.stderr  # cells failed: a non-zero exit, after the summary
    for stream in (r.stdout, r.stderr):
        noise = [ln for ln in stream.splitlines() if RAY_NOISE.search(ln)]
        assert not noise, noise
    assert "FINISHED nih14__linear_probe" in out and "FINISHED nih14__knn" in out
    assert "FAILED   rsna_pneumonia__" in out and "does not exist" in out
    assert "2 finished, 2 failed" in out
    log = tmp_path / "out" / "ray.log"
    assert f"Ray and Tune log: {log}" in out and log.stat().st_size > 0
    assert re.search(r"\bINFO\b|\bWARNING\b", log.read_text())  # Ray's own lines went there

    # MLflow opens on the runs table: the experiment is tagged as model development and the
    # printed URL points at its runs.
    client = MlflowClient(f"sqlite:///{tmp_path / 'out' / 'mlflow.db'}")
    exp = client.get_experiment_by_name("quiet")
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"
    assert f"http://127.0.0.1:5000/#/experiments/{exp.experiment_id}/runs" in out


def test_each_cell_line_leads_with_its_own_task_metric():
    """A segmentation cell's line shows its mean Dice, not `test_auc=-`; the choice is the report's."""
    from orchestrator.console import headline

    assert headline({"test_auc": 0.7, "val_auc": 0.9, "test_acc": 0.5}) == ("test_auc", 0.7)
    seg2d = {"test_dice_kidney": 0.3, "test_mdice": 0.6, "test_miou": 0.5, "test_iou_instrument": 0.4}
    assert headline(seg2d) == ("test_mdice", 0.6)
    assert headline({"test_dice": 0.8, "test_hd95": 3.0}) == ("test_dice", 0.8)
    assert headline({"test_voi": 1.2, "test_arand": 0.1}) == ("test_voi", 1.2)
    assert headline({}) == ("test_auc", None)  # a failed cell: no metrics, printed as "-"
