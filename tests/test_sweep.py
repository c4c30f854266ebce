"""End-to-end sweeps on a real local Ray cluster with MLflow on sqlite."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml
from mlflow.tracking import MlflowClient

from orchestrator.grid.config import parse_config
from orchestrator.plan.build import plan_sweep
from orchestrator.store.cache import FeatureCache
from orchestrator.sweep.driver import run_sweep
from orchestrator.tracking import CELL_TAG
from tasks.encoders import get_encoder_spec
from tasks.errors import ConfigError

from .conftest import REPO, TINY, sweep_config

pytestmark = pytest.mark.slow


def _runs(cfg) -> pd.DataFrame:
    client = MlflowClient(cfg.resolved_tracking_uri)
    exp = client.get_experiment_by_name(cfg.name)
    runs = client.search_runs([exp.experiment_id], filter_string="tags.`medscale.kind` = 'cell'")
    return pd.DataFrame([{"cell": r.data.tags[CELL_TAG], "status": r.info.status, "run": r,
                          "artifact_uri": r.info.artifact_uri} for r in runs])


def test_sweep_records_one_finished_run_per_cell(ray_session, synth_roots, tmp_path):
    cfg = parse_config(sweep_config(tmp_path, synth_roots))
    before = {(e.encoder, e.resolution, e.dataset): e for e in plan_sweep(cfg).extractions}
    assert {e.cached for e in before.values()} == {"unknown"}  # no weights digest yet
    outcome = run_sweep(cfg)
    _check_the_plan_against_what_was_written(cfg, before, outcome)
    assert sorted(set(outcome.cells.values())) == ["FINISHED"] and len(outcome.cells) == 8
    assert outcome.n_encoded == 2 * 2 * 200  # 2 resolutions x 2 datasets x 200 images, once each

    runs = _runs(cfg)
    assert len(runs) == 8 and set(runs["status"]) == {"FINISHED"} and runs["cell"].is_unique
    for r in runs["run"]:
        p, m = r.data.params, r.data.metrics
        res = int(p["resolution"])
        assert p["encoder"] == TINY and p["weights_kind"] == "random" and len(p["weights_digest"]) == 64
        assert int(p["params"]) == get_encoder_spec(TINY).params
        assert float(p["gflops"]) == pytest.approx(get_encoder_spec(TINY).gflops(res), rel=1e-3)
        assert p["pooling"] == "cls+mean" and p["git_commit"] and p["medscale_version"]
        assert {"cache_key_train", "cache_key_val", "cache_key_test", "dataset_fingerprint"} <= set(p)
        assert 0.0 <= m["test_auc"] <= 1.0 and 0.0 <= m["val_auc"] <= 1.0
        assert {"test_acc", "test_precision", "test_recall", "test_f1_macro", "test_f1_weighted"} <= set(m)
        assert r.data.tags["medscale.weights"] == "random"
        art = Path(r.info.artifact_uri.removeprefix("file://"))
        preds = pd.read_parquet(art / "predictions.parquet")
        assert set(preds["split"]) == {"val", "test"} and preds["case_id"].is_unique
        assert (art / "per_class_test.csv").exists()
    # The learnable signal shows through a random tiny encoder + linear probe (AUC above chance).
    lp = [r.data.metrics["test_auc"] for r in runs["run"] if r.data.params["protocol"] == "linear_probe"]
    assert sum(lp) / len(lp) > 0.6

    # Rerunning a finished sweep says so; --rerun recomputes heads but re-encodes nothing.
    assert run_sweep(cfg).already_done
    again = run_sweep(cfg, rerun=True)
    assert again.n_encoded == 0 and set(again.cells.values()) == {"FINISHED"}
    runs = _runs(cfg)
    assert len(runs) == 8 and set(runs["status"]) == {"FINISHED"} and runs["cell"].is_unique


def _entry_bytes(cache: FeatureCache, key) -> int:
    d = Path(cache.entry_path(key))
    return sum(f.stat().st_size for f in d.rglob("*") if f.is_file())


def _check_the_plan_against_what_was_written(cfg, before: dict, outcome) -> None:
    """`medscale plan` made before the sweep: items exact, cache bytes within 5% of the Parquet
    written (in at most 2 files per entry), the cache seen after the run, the plan saved and logged."""
    cache = FeatureCache(cfg.cache_root)
    for ex in outcome.extractions:
        j = ex.job
        planned = before[(j.encoder, j.resolution, j.dataset)]
        written = sum(_entry_bytes(cache, k) for k in ex.keys.values())
        assert planned.items == ex.n_encoded  # exact: every indexed image, once
        assert abs(planned.cache_bytes - written) <= 0.05 * written, (planned.cache_bytes, written)
        for k in ex.keys.values():  # few large files: Ray's one file per block is compacted at commit
            files = [f for f in Path(cache.entry_path(k)).rglob("*.parquet")]
            assert len(files) <= 2 and cache.meta(k)["files"] == [f.name for f in files], files
    # after the run the weights digests are known: the plan sees the cache
    assert {e.cached for e in plan_sweep(cfg).extractions} == {"yes"}
    # printed and saved before the sweep, and logged as the sweep's plan run
    saved = json.loads((cfg.output_path / "plan" / "plan.json").read_text())
    assert saved["totals"]["cells"] == 8 and (cfg.output_path / "plan" / "plan.md").exists()
    client = MlflowClient(cfg.resolved_tracking_uri)
    exp = client.get_experiment_by_name(cfg.name)
    runs = client.search_runs([exp.experiment_id], "tags.`medscale.kind` = 'plan'")
    assert runs and runs[0].data.metrics["cells"] == 8
    art = Path(runs[0].info.artifact_uri.removeprefix("file://"))
    assert (art / "plan.json").exists() and (art / "plan.md").exists()


def _count(db: Path, status: str) -> int:
    if not db.exists():
        return 0
    try:
        with sqlite3.connect(db, timeout=1) as con:
            return con.execute("select count(*) from runs r join tags t on r.run_uuid = t.run_uuid "
                               "where t.key = 'medscale.kind' and t.value = 'cell' and r.status = ? "
                               "and r.lifecycle_stage = 'active'", (status,)).fetchone()[0]
    except sqlite3.OperationalError:
        return 0


def test_kill_driver_then_resume_completes_only_the_rest(joined_env, synth_roots, tmp_path):
    """The driver (`python sweep.py` on a running cluster, as `ray job submit` starts it) is killed
    mid-sweep; its Ray job ends with it. A plain rerun refuses, --resume runs only what is left."""
    raw = sweep_config(tmp_path, synth_roots, grid={"resolutions": [32, 48, 64]},
                       protocols={"linear_probe": {"epochs": 1500}})
    cfg_path = tmp_path / "sweep.yaml"
    cfg_path.write_text(yaml.safe_dump(raw))
    cfg = parse_config(raw)
    db = cfg.output_path / "mlflow.db"
    env = joined_env
    cmd = [sys.executable, str(REPO / "sweep.py"), "--config", str(cfg_path)]
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        deadline = time.time() + 300
        # Kill with a cell in flight: two finished and one running (between two trials no cell is
        # started, and a rerun then only sees cells that never ran, which it may run without --resume).
        while time.time() < deadline and proc.poll() is None and (_count(db, "FINISHED") < 2
                                                                   or _count(db, "RUNNING") < 1):
            time.sleep(0.2)
        assert proc.poll() is None, f"sweep ended before it could be killed:\n{proc.stdout.read().decode()}"
        done_before = _count(db, "FINISHED")
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the driver: Ray ends its job (trials, actors)
        proc.wait()
    assert 2 <= done_before < 12

    # Without --resume the sweep refuses to start over silently (a ConfigError: `sweep.py` exits 2
    # with it, as tests/test_identity.py checks of a CLI sweep). Asked here of run_sweep in this
    # process, on the same cluster: a third driver process would cost ~8 s of CPU to say the same.
    with pytest.raises(ConfigError, match=r"finished \d+/12 cells and left \d+ unfinished; pass --resume"):
        run_sweep(cfg)

    resumed = subprocess.run(cmd + ["--resume"], cwd=tmp_path, env=env, capture_output=True, text=True,
                             timeout=600)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    import re

    already = int(re.search(r"--resume: (\d+) cell\(s\) already finished", resumed.stdout).group(1))
    assert already >= done_before  # a cell may finish between the count and the kill
    runs = _runs(cfg)
    assert len(runs) == 12 and runs["cell"].is_unique
    assert set(runs["status"]) == {"FINISHED"}
    assert _count(db, "RUNNING") == 0
