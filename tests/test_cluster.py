"""Cluster mode: launcher configs, and sweeps on a real multi-node Ray cluster with a real MLflow
server (both on this machine, CPU only, fake GPUs).

The cluster runs in a process of its own (tests/cluster_scenario.py, see its docstring); its
sweeps track into the `mlflow server` started here, and the assertions read that server back.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections import Counter, defaultdict
from pathlib import Path

import jsonschema
import pyarrow.parquet as pq
import pytest
import yaml

from .conftest import REPO, TINY

CLUSTERS = REPO / "clusters"
LAUNCHER_CONFIGS = sorted(CLUSTERS.glob("*.yaml"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_http(url: str, proc: subprocess.Popen, timeout: float) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"mlflow server exited ({proc.returncode}):\n{proc.stdout.read()}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"{url} did not answer in {timeout} s")


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    """A real tracking server on loopback (sqlite in tmp, artifacts served by the server)."""
    root = tmp_path_factory.mktemp("mlflow-server")
    port = _free_port()
    cmd = [str(Path(sys.executable).parent / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port),
           "--workers", "1", "--backend-store-uri", f"sqlite:///{root}/mlflow.db",
           "--artifacts-destination", str(root / "artifacts")]
    proc = subprocess.Popen(cmd, cwd=root, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true",
                                 # no server-side job runner: a pool of extra processes we do not use
                                 "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}, start_new_session=True)
    try:
        _wait_http(f"http://127.0.0.1:{port}/health", proc, timeout=120)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def scenario(mlflow_server, synth_roots, tmp_path_factory) -> dict:
    work = tmp_path_factory.mktemp("cluster")
    args = {"mlflow_uri": mlflow_server, "work": str(work), "roots": {k: str(v) for k, v in synth_roots.items()}}
    (work / "args.json").write_text(json.dumps(args))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_ADDRESS", "RAY_AUTH"))}
    proc = subprocess.run([sys.executable, str(REPO / "tests" / "cluster_scenario.py"), str(work / "args.json"),
                           str(work / "report.json")], cwd=work, env={**env, "PYTHONUNBUFFERED": "1"},
                          capture_output=True, text=True, timeout=900)
    log = proc.stdout[-6000:] + proc.stderr[-6000:]
    assert proc.returncode == 0, log
    report = json.loads((work / "report.json").read_text())
    report["log"] = log
    return report


def encoded_extractions(scenario: dict) -> list[dict]:
    return [e for s in ("a", "b") for e in scenario[s]["extractions"] if e["n_encoded"] > 0]


def _runs(uri: str, experiment: str) -> list:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    return client.search_runs([exp.experiment_id], "tags.`medscale.kind` = 'cell'", max_results=1000)


# -- launcher configs (fast) ----------------------------------------------------------------------

def test_cluster_configs_exist():
    assert {p.name for p in LAUNCHER_CONFIGS} == {"aws.yaml", "gcp.yaml", "onprem.yaml"}
    assert (CLUSTERS / "kuberay" / "rayjob.yaml").is_file()


@pytest.mark.parametrize("path", LAUNCHER_CONFIGS, ids=lambda p: p.name)
def test_launcher_config_passes_rays_own_validation(path):
    """What `ray up` does before touching a cloud: defaults filled in, then the launcher schema."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = yaml.safe_load(path.read_text())
    validate_config(prepare_config(raw))
    with pytest.raises(jsonschema.ValidationError):  # the validator bites: a typo is refused
        validate_config(prepare_config({**raw, "setup_command": raw["setup_commands"]}))
    text = path.read_text()
    assert "RAY_AUTH_MODE=token" in text and "auth_token" in text  # the same token on every node
    assert "pip install" in " ".join(raw["setup_commands"])      # medscale installed on every node
    assert "start_mlflow.sh" in " ".join(raw["head_start_ray_commands"])
    assert "0.0.0.0" not in json.dumps(raw)  # nothing bound to every interface (comments aside)


@pytest.mark.parametrize("name, gpu_types", [("aws.yaml", {"g5", "p4d", "p5"}), ("gcp.yaml", {"a2", "g2"})])
def test_cloud_configs_declare_gpu_workers(name, gpu_types):
    raw = yaml.safe_load((CLUSTERS / name).read_text())
    workers = {k: v for k, v in raw["available_node_types"].items() if k != raw["head_node_type"]}
    assert {k.split(".")[0] for k in workers} >= gpu_types
    for spec in workers.values():
        assert spec["resources"]["GPU"] >= 1 and spec["max_workers"] >= spec.get("min_workers", 0)
    assert raw["available_node_types"][raw["head_node_type"]]["resources"].get("GPU", 0) == 0
    text = json.dumps(raw)
    assert ("spot" in text.lower()) or ("preemptible" in text.lower())


def test_onprem_config_declares_gpus_in_ray_start():
    raw = yaml.safe_load((CLUSTERS / "onprem.yaml").read_text())
    assert raw["provider"]["type"] == "local" and "available_node_types" not in raw
    assert all("--num-gpus" in " ".join(raw[k]) for k in ("head_start_ray_commands", "worker_start_ray_commands"))


def test_kuberay_rayjob_manifest_is_well_formed():
    """A Kubernetes object, not a launcher config (Ray's launcher schema does not apply, so it lives
    in clusters/kuberay/ and is checked for the fields KubeRay and medscale need)."""
    docs = [d for d in yaml.safe_load_all((CLUSTERS / "kuberay" / "rayjob.yaml").read_text()) if d]
    job = next(d for d in docs if d["kind"] == "RayJob")
    assert job["apiVersion"] == "ray.io/v1"
    spec = job["spec"]
    assert "sweep.py --config" in spec["entrypoint"] and spec["shutdownAfterJobFinishes"] is True
    cluster = spec["rayClusterSpec"]
    assert cluster["authOptions"]["mode"] == "token"
    head = cluster["headGroupSpec"]["template"]["spec"]["containers"]
    assert any("mlflow" in " ".join(c.get("command", []) + c.get("args", [])) for c in head)
    for group in cluster["workerGroupSpecs"]:
        limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
        assert int(limits["nvidia.com/gpu"]) >= 1
    assert "MLFLOW_TRACKING_URI" in json.dumps(spec)


def test_address_resolution_joins_only_a_live_cluster(monkeypatch, tmp_path):
    from orchestrator.ray_backend import resolve_address

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setenv("RAY_TMPDIR", str(tmp_path))  # where `ray start` records its address
    assert resolve_address(None) == "local"  # nothing recorded: a private cluster (a laptop)
    (tmp_path / "ray").mkdir()
    (tmp_path / "ray" / "ray_current_cluster").write_text("127.0.0.1:1")
    assert resolve_address(None) == "local"  # recorded, but no raylet serves it: a stale file
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")
    assert resolve_address(None) == "10.0.0.1:6379"  # `ray job submit`, KubeRay
    assert resolve_address("local") == "local"  # explicit always wins


# -- a real multi-node cluster (slow) ------------------------------------------------------------

@pytest.mark.slow
def test_sweep_joins_the_running_cluster_and_token_auth_is_enforced(scenario):
    assert scenario["resolved_none"] == scenario["address"]  # `ray submit`: join, do not start another
    assert scenario["resolved_local"] == "local"
    assert scenario["a"]["tracking_uri"].startswith("http://127.0.0.1:")
    wrong = scenario["wrong_token"]
    assert wrong["returncode"] != 0 and "CONNECTED" not in wrong["output"], wrong["output"]
    assert scenario["cluster_resources"]["GPU"] == 3.0


@pytest.mark.slow
def test_cells_spread_over_nodes_with_their_gpu_share(scenario, mlflow_server):
    runs = _runs(mlflow_server, "spread")
    # NIH-14 x (linear probe x 2 seeds + one seed-free kNN cell), each cell a whole node's 2 CPUs
    errors = [r.data.tags.get("medscale.error", "") for r in runs if r.info.status != "FINISHED"]
    assert len(runs) == 3 and {r.info.status for r in runs} == {"FINISHED"}, errors
    nodes = {scenario["nodes"]["head"], *scenario["nodes"]["workers"]}
    assert {r.data.tags["medscale.node_id"] for r in runs} == nodes  # every node ran cells
    cpus = {r.info.run_id: 2.0 for r in runs}
    runs += [r for r in _runs(mlflow_server, "fault") if r.info.status == "FINISHED"]
    placements = [json.loads(r.data.tags["medscale.placement"]) for r in runs]
    assert {int(r.data.params["resolution"]) for r in runs} == {32, 48}  # both bands of the table
    for r, p in zip(runs, placements, strict=True):
        share = 0.25 if int(r.data.params["resolution"]) < 48 else 0.5
        assert p["resources"]["GPU"] == pytest.approx(share), p
        assert p["resources"]["CPU"] == pytest.approx(cpus.get(r.info.run_id, 1.0))
    # Never more GPU in use on a node than it has (1 fake GPU each); sweep B runs two cells per node.
    by_node = defaultdict(list)
    for p in placements:
        by_node[p["node_id"]].append(p)
    for cells in by_node.values():
        for p in cells:
            t = p["t_start"] + 1e-3
            assert sum(q["resources"]["GPU"] for q in cells if q["t_start"] <= t < q["t_end"]) <= 1.0 + 1e-9


@pytest.mark.slow
def test_each_cache_key_is_extracted_once(scenario):
    a, b = scenario["a"], scenario["b"]
    assert a["n_encoded"] == 1 * 1 * 200  # 1 resolution x NIH-14, every image once
    assert b["n_encoded"] == 3 * 200  # sweep B shares the cache: NIH-14 at 48 px, RSNA at 32 and 48
    encoded = [(e["job"]["resolution"], e["job"]["dataset"]) for e in a["extractions"] + b["extractions"]
               if e["n_encoded"] > 0]
    assert sorted(Counter(encoded).values()) == [1] * 4
    # Encoder actors take whole GPUs: by default one actor per (fake) GPU of the cluster (sweep A);
    # sweep B asks for one actor (fewer start-ups on a 2-core CI machine).
    assert [(e["actors"], e["gpus_per_actor"]) for e in encoded_extractions(scenario)] == [(3, 1.0)] + [(1, 1.0)] * 3
    keys = {k for e in a["extractions"] + b["extractions"] for k in e["keys"].values()}
    assert len(keys) == 4 * 3  # 4 extractions x 3 splits
    # On the shared storage: one complete entry per key, its rows written once (no duplicates).
    entries = sorted((Path(scenario["work"]) / "shared" / "cache" / "features").iterdir())
    assert len(entries) == 12 and {e.name.rsplit("-", 1)[1] for e in entries} == keys
    for entry in entries:
        meta = json.loads((entry / "_medscale.json").read_text())
        ids = pq.read_table([entry / f for f in meta["files"]]).column("case_id").to_pylist()
        assert len(ids) == len(set(ids)) == meta["n_rows"] > 0


@pytest.mark.slow
def test_a_worker_dying_mid_sweep_still_ends_with_one_finished_run_per_cell(scenario, mlflow_server):
    b = scenario["b"]
    # the killer looks for a sweep-B linear-probe cell running 0.5 s on a worker node; on a machine
    # too loaded for that window (seen once, with two other jobs on 2 cores) nothing is killed
    assert "victim" in b["kill"], ("no worker was killed: the killer saw no linear-probe cell running on a worker "
                                   f"node for 0.5 s (cells {b['cells']}):\n{scenario['log']}")
    victim = b["kill"]["victim"]
    assert b["kill"].get("killed") == victim, f"the worker was never killed:\n{scenario['log']}"
    assert set(b["cells"].values()) == {"FINISHED"} and len(b["cells"]) == 8, b["errors"]
    assert b["retries"].get(b["kill"]["cell"], 0) >= 1  # the cell it ran was retried ...
    runs = _runs(mlflow_server, "fault")
    assert len(runs) == 8 and Counter(r.data.tags["medscale.cell_id"] for r in runs).most_common(1)[0][1] == 1
    assert {r.info.status for r in runs} == {"FINISHED"}  # none RUNNING, none FAILED
    for r in runs:
        if "medscale.retries" in r.data.tags:  # ... elsewhere
            assert r.data.tags["medscale.node_id"] != victim
    assert all(r.data.params["encoder"] == TINY for r in runs)
