"""A multi-node sweep on one machine, run by tests/test_cluster.py in a process of its own.

Why a separate process: the test session already runs a private local Ray (conftest's
`ray_session`), and one process can be the driver of only one cluster. Here a 3-node
`ray.cluster_utils.Cluster` (head + 2 workers, one fake GPU each, token auth on every node) runs:

  A. a sweep over the cluster (joined through RAY_ADDRESS, as under `ray job submit`), with the
     cache, cell results and Tune state on shared storage given as a file:// URI (NIH-14 only,
     2 CPUs per cell: one cell per node at a time);
  B. a second sweep sharing that cache (both datasets, 1 CPU per cell: two cells per node, their
     GPU shares adding up), during which a worker node is killed while it runs a cell (seen from
     the cell's running mark on the shared storage).

Both track into the real `mlflow server` the test started (MLFLOW_TRACKING_URI, as the cluster
configs set it on the head). The test asserts on MLflow and on the JSON report written here.

    python tests/cluster_scenario.py ARGS.json REPORT.json
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

TINY = "test_vit_tiny16"
NODE = {"num_cpus": 2, "num_gpus": 1, "object_store_memory": 128 * 1024**2}
# Notice a dead node in ~3 s instead of ~30 s, so its cells are rescheduled quickly.
FAST_HEALTH = {"health_check_initial_delay_ms": 1000, "health_check_period_ms": 1000,
               "health_check_failure_threshold": 3}
GPU_TABLE = {"tiny": {0: 0.25, 48: 0.5}}  # 32 px cells ask for 1/4 GPU, 48 px and up for 1/2
CONNECT = "import ray; ray.init(address='{address}'); print('CONNECTED')"


def sweep_raw(name: str, args: dict[str, Any], resolutions: list[int], seeds: list[int],
              epochs: int, actors: int | None = None, datasets: list[str] | None = None,
              cell_cpus: int = 1) -> dict[str, Any]:
    return {
        "name": name,
        "grid": {"encoders": [TINY], "resolutions": resolutions, "datasets": datasets or list(args["roots"]),
                 "protocols": ["linear_probe", "knn"], "seeds": seeds},
        "weights": "random",
        "data": args["roots"],
        "output": f"{args['work']}/out-{name}",
        "storage": f"file://{args['work']}/shared",
        "protocols": {"linear_probe": {"epochs": epochs}},
        "resources": {"cell_cpus": cell_cpus, "cell_gpus": GPU_TABLE, "extract_gpus": 1, "extract_actors": actors,
                      # fake GPUs (no CUDA behind them): the actors compute in fp32, planned so
                      "precision": "fp32",
                      "extract_batch_size": 64, "torch_threads": 1},
        "max_failures": 2,
    }


def extractions(cfg: Any) -> list[dict[str, Any]]:
    path = cfg.output_path / "extractions.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def summary(cfg: Any, outcome: Any) -> dict[str, Any]:
    return {"cells": outcome.cells, "errors": outcome.errors, "n_encoded": outcome.n_encoded,
            "retries": outcome.retries, "extractions": extractions(cfg),
            "tracking_uri": cfg.resolved_tracking_uri}


def kill_when_busy(cluster: Any, workers: list[Any], results: Any, out: dict[str, Any]) -> None:
    """Kill the first worker node seen running one of sweep B's linear-probe cells, 0.5 s into it
    (imports, reading the cache and 300 epochs take seconds more): a node dying mid-cell."""
    deadline = time.time() + 300
    by_id = {w.node_id: w for w in workers}
    while time.time() < deadline:
        for cell_id, mark in results.running().items():
            victim = by_id.get(mark["node_id"])
            if victim is not None and "linear_probe" in cell_id and time.time() - mark["t_start"] > 0.5:
                out.update(victim=victim.node_id, cell=cell_id, t_kill=time.time())
                cluster.remove_node(victim, allow_graceful=False)
                out["killed"] = victim.node_id
                return
        time.sleep(0.2)


def main(args_path: str, report_path: str) -> None:
    args = json.loads(Path(args_path).read_text())
    # Token auth, the same on every node and on the driver: the node processes started below
    # inherit this environment (docs/libraries.md: a node without it cannot join).
    os.environ.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(16))
    os.environ["MLFLOW_TRACKING_URI"] = args["mlflow_uri"]

    import ray
    from ray._common.utils import reset_ray_address
    from ray.cluster_utils import Cluster

    from orchestrator import ray_backend
    from orchestrator.grid.config import parse_config
    from orchestrator.store.results import ResultStore
    from orchestrator.sweep.driver import run_sweep

    report: dict[str, Any] = {"work": args["work"]}
    t0 = time.time()
    cluster = Cluster(initialize_head=True, head_node_args={**NODE, "include_dashboard": False,
                                                           "_system_config": FAST_HEALTH})
    workers = [cluster.add_node(**NODE) for _ in range(2)]
    cluster.wait_for_nodes()
    report["nodes"] = {"head": cluster.head_node.node_id, "workers": [w.node_id for w in workers]}
    report["t_cluster"] = time.time() - t0
    try:
        # `ray submit` runs the sweep on the head with no RAY_ADDRESS: it must find this cluster
        # (recorded by `ray start`, here by Cluster) instead of starting a private one.
        report["resolved_none"] = ray_backend.resolve_address(None)
        report["resolved_local"] = ray_backend.resolve_address("local")
        report["address"] = cluster.address
        reset_ray_address()  # keep other processes on this machine from joining it

        wrong = subprocess.Popen([sys.executable, "-c", CONNECT.format(address=cluster.address)],
                                 env={**os.environ, "RAY_AUTH_TOKEN": "not-the-token"}, text=True,
                                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        os.environ["RAY_ADDRESS"] = cluster.address  # as `ray job submit` sets it for the driver

        # A: one dataset, three cells, each asking a node's 2 CPUs: one cell per node at a time,
        # so every node must run one (and a trial process per node, not two: CPU on a CI machine).
        cfg_a = parse_config(sweep_raw("spread", args, [32], seeds=[0, 1], epochs=20, datasets=["nih14"],
                                       cell_cpus=2))
        t = time.time()
        report["a"] = summary(cfg_a, run_sweep(cfg_a))
        report["a"]["seconds"] = time.time() - t
        report["cluster_resources"] = ray.cluster_resources()

        cfg_b = parse_config(sweep_raw("fault", args, [32, 48], seeds=[0], epochs=300, actors=1))
        kill: dict[str, Any] = {}
        killer = threading.Thread(target=kill_when_busy, daemon=True, args=(
            cluster, workers, ResultStore(f"{cfg_b.sweep_root}/cells"), kill))
        killer.start()
        t = time.time()
        report["b"] = summary(cfg_b, run_sweep(cfg_b))
        report["b"]["seconds"] = time.time() - t
        report["b"]["kill"] = kill
        killer.join(timeout=5)

        out, _ = wrong.communicate(timeout=120)
        report["wrong_token"] = {"returncode": wrong.returncode, "output": out[-2000:]}
        report["t_total"] = time.time() - t0
    finally:
        Path(report_path).write_text(json.dumps(report, indent=1, default=str))
        ray.shutdown()
        cluster.shutdown()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
