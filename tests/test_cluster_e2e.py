"""Opt-in end to end (`make test-cluster`, marker `cluster_e2e`, not part of `make test`):

    ray up clusters/onprem.yaml (against 127.0.0.1 over SSH)
    ray submit ... sweep.py -- --config <a tiny sweep>
    the runs are in the head's MLflow server
    ray down

It needs an SSH server on 127.0.0.1 that takes a key. Environment:
  MEDSCALE_E2E_SSH_USER  the SSH user (default: the current user). Use a DEDICATED user: the
                         launcher runs `ray stop`, which stops every Ray process of that user.
  MEDSCALE_E2E_SSH_KEY   its private key (default ~/.ssh/id_ed25519)
  MEDSCALE_E2E_VENV      a venv on this machine with medscale installed, put on the user's PATH
                         instead of onprem.yaml's install commands (which build ~/medscale-venv
                         with pip: minutes, and a package index).
The data and the sweep config go to a world-readable temporary directory; outputs to the SSH
user's home (the working directory of `ray submit`).

On a shared machine, tests/cluster_e2e_sshd.sh starts an isolated sshd for this (its own PID
namespace, so the launcher's `ray stop` cannot reach anyone else's Ray) and prints the variables:

    eval "$(sudo tests/cluster_e2e_sshd.sh start)" && make test-cluster; sudo tests/cluster_e2e_sshd.sh stop
"""

from __future__ import annotations

import getpass
import os
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

from .conftest import REPO, TINY

pytestmark = pytest.mark.cluster_e2e

USER = os.environ.get("MEDSCALE_E2E_SSH_USER") or getpass.getuser()
KEY = os.path.expanduser(os.environ.get("MEDSCALE_E2E_SSH_KEY", "~/.ssh/id_ed25519"))
VENV = os.environ.get("MEDSCALE_E2E_VENV")
RAY = str(Path(sys.executable).parent / "ray")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ssh_works() -> bool:
    if not (shutil.which("ssh") and shutil.which("rsync") and os.path.exists(KEY)):
        return False
    r = subprocess.run(["ssh", "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=no", "-o", "ConnectTimeout=5",
                        "-i", KEY, f"{USER}@127.0.0.1", "true"], capture_output=True, timeout=30)
    return r.returncode == 0


def _run(cmd: list[str], work: Path, timeout: int) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_ADDRESS", "MLFLOW_TRACKING"))}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    (work / "launcher.log").open("a").write(f"$ {' '.join(cmd)}\n{proc.stdout}\n{proc.stderr}\n")
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return proc


def _cluster_config(work: Path, ray_port: int, mlflow_port: int) -> Path:
    """clusters/onprem.yaml pointed at 127.0.0.1 alone, with free ports (this machine may run
    other Ray clusters) and, if given, an existing venv instead of the install commands."""
    cfg = yaml.safe_load((REPO / "clusters" / "onprem.yaml").read_text())
    cfg["cluster_name"] = f"medscale-e2e-{os.getpid()}"
    cfg["provider"] = {"type": "local", "head_ip": "127.0.0.1", "worker_ips": []}
    cfg["auth"] = {"ssh_user": USER, "ssh_private_key": KEY}
    token = work / "auth_token"
    token.write_text(os.urandom(16).hex())
    cfg["file_mounts"] = {"~/medscale": str(REPO), "~/.ray/auth_token": str(token)}
    if VENV:
        cfg["setup_commands"] = [c for c in cfg["setup_commands"] if "pip install" not in c and "venv" not in c]
        cfg["setup_commands"].insert(0, f"grep -qs '{VENV}/bin' ~/.bashrc || "
                                        f"echo 'export PATH=\"{VENV}/bin:$PATH\"' >> ~/.bashrc")
    head = []
    for c in cfg["head_start_ray_commands"]:
        c = c.replace("--port=6379", f"--port={ray_port}")
        if "start_mlflow.sh" in c:
            c = f"MEDSCALE_MLFLOW_PORT={mlflow_port} bash ~/medscale/clusters/start_mlflow.sh 127.0.0.1"
        head.append(c)
    cfg["head_start_ray_commands"] = head
    path = work / "onprem-e2e.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def test_ray_up_submit_tracks_into_the_head_mlflow_then_down():
    if not _ssh_works():
        pytest.skip(f"no SSH to {USER}@127.0.0.1 with {KEY} (and rsync): see this file's docstring")
    from mlflow.tracking import MlflowClient

    from tasks.datasets import dataset_class

    work = Path(tempfile.mkdtemp(prefix="medscale-e2e-"))
    work.chmod(stat.S_IRWXU | stat.S_IRGRP | stat.S_IXGRP | stat.S_IROTH | stat.S_IXOTH)  # the SSH user reads it
    root = work / "nih14"
    dataset_class("nih14").synth(root, n=120, seed=0)
    for p in [root, *root.rglob("*")]:
        p.chmod(p.stat().st_mode | stat.S_IROTH | (stat.S_IXOTH if p.is_dir() else 0))
    name = f"e2e-{os.getpid()}"
    sweep = {"name": name, "weights": "random", "output": f"medscale-e2e/{name}",
             "grid": {"encoders": [TINY], "resolutions": [32], "datasets": ["nih14"],
                      "protocols": ["linear_probe", "knn"], "seeds": [0]},
             "data": {"nih14": str(root)}, "protocols": {"linear_probe": {"epochs": 20}},
             "resources": {"extract_batch_size": 64, "torch_threads": 1}}
    (work / "sweep.yaml").write_text(yaml.safe_dump(sweep))
    (work / "sweep.yaml").chmod(0o644)
    mlflow_port = _free_port()
    cluster = _cluster_config(work, _free_port(), mlflow_port)
    try:
        _run([RAY, "up", "-y", "--no-config-cache", str(cluster)], work, timeout=1800)
        t0 = time.time()
        out = _run([RAY, "submit", "--no-config-cache", str(cluster), str(REPO / "sweep.py"), "--",
                    "--config", str(work / "sweep.yaml"), "--strict"], work, timeout=1800)
        assert "joining the Ray cluster" in out.stdout + out.stderr  # the head's cluster, not a new one
        client = MlflowClient(f"http://127.0.0.1:{mlflow_port}")
        exp = client.get_experiment_by_name(name)
        runs = client.search_runs([exp.experiment_id], "tags.`medscale.kind` = 'cell'")
        assert len(runs) == 2 and {r.info.status for r in runs} == {"FINISHED"}, time.time() - t0
        assert all(r.data.tags.get("medscale.node_id") for r in runs)
    finally:
        # `ray down` stops Ray; the MLflow server on an on-prem head is ours to stop.
        _run([RAY, "exec", str(cluster), "bash ~/medscale/clusters/start_mlflow.sh --stop"], work, timeout=300)
        _run([RAY, "down", "-y", str(cluster)], work, timeout=600)
