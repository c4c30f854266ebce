"""A cell is what produced it: identity digests, superseded runs, seed-free cells, the weights memo,
scratch clean-up, the tracking index and the sweep's exit status."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from orchestrator.cells.spec import cell_spec
from orchestrator.grid.cells import Cell, config_identities, plan_cells, split_uses_seed
from orchestrator.grid.config import load_config, parse_config
from orchestrator.grid.identity import cell_identity, prefix_of
from orchestrator.store.cache import CacheKey, FeatureCache
from orchestrator.sweep.driver import run_sweep
from orchestrator.tracking import (
    CELL_TAG,
    CONFIG_IDENTITY_TAG,
    IDENTITY_TAG,
    SUPERSEDED_TAG,
    Tracker,
    load_points,
)

from .conftest import REPO, TINY, sweep_config

KEY = CacheKey(encoder=TINY, weights_kind="random", weights_digest="w" * 64, resolution=32, pooling="cls+mean",
               preprocess_version="1", dataset="nih14", dataset_fingerprint="f" * 64, split="train")


# -- identity (pure logic) ---------------------------------------------------------------------------
def _spec(cell: Cell | None = None, key: CacheKey = KEY, **kw) -> dict:
    args = {"cache_root": "/c", "results_dir": "/r", "task": "multilabel", "classes": ["a"], "size": "tiny",
            "hparams": {"k": 20, "temperature": 0.07}, "config": {"pooling": "cls+mean", "dataset_options": {}},
            **kw}
    return cell_spec(cell or Cell(TINY, 32, "nih14", "knn", 0), keys={"train": key}, **args)


def test_every_ingredient_changes_the_identity_and_nothing_else_does():
    base = _spec()
    assert base["cell_id"].startswith("nih14__knn__test_vit_tiny16__32px__s0__")
    assert prefix_of(base["cell_id"]) == "nih14__knn__test_vit_tiny16__32px__s0"
    changed = {
        "pooling": _spec(key=CacheKey(**{**KEY.__dict__, "pooling": "cls"})),
        "precision": _spec(key=CacheKey(**{**KEY.__dict__, "precision": "bf16"})),
        "weights": _spec(key=CacheKey(**{**KEY.__dict__, "weights_digest": "v" * 64})),
        "fingerprint": _spec(key=CacheKey(**{**KEY.__dict__, "dataset_fingerprint": "g" * 64})),
        "hparam": _spec(hparams={"k": 10, "temperature": 0.07}),
        "options": _spec(config={"pooling": "cls+mean", "dataset_options": {"hu_window": [-1000, 400]}}),
        "fold": _spec(split_scheme="cv fold 2/5"),
        "ood": _spec(ood=[{"dataset": "camelyon17", "keys": {}, "cases": []}]),
        "seed": _spec(Cell(TINY, 32, "nih14", "knn", 1)),
    }
    ids = {name: s["cell_id"] for name, s in changed.items()}
    assert len(set(ids.values()) | {base["cell_id"]}) == len(ids) + 1, ids
    # Where things live is not what a cell computes.
    assert _spec(cache_root="/elsewhere", results_dir="s3://b/r")["cell_id"] == base["cell_id"]
    # The config digest moves with the config, not with what data and weights resolve to.
    for name in ("pooling", "precision", "weights", "fingerprint", "fold"):
        assert changed[name]["identity"]["config_identity"] == base["identity"]["config_identity"], name
    for name in ("hparam", "options", "seed"):
        assert changed[name]["identity"]["config_identity"] != base["identity"]["config_identity"], name
    # A seed-free cell is the same cell whatever seed it runs with.
    free = [_spec(Cell(TINY, 32, "nih14", "knn", s, seed_free=True)) for s in (0, 3)]
    assert free[0]["cell_id"] == free[1]["cell_id"] and "__seedfree__" in free[0]["cell_id"]
    assert cell_identity(free[0]).digest == free[0]["identity"]["identity"]


def test_paper_config_plans_one_knn_cell_per_encoder_resolution_dataset():
    cfg = load_config(REPO / "configs" / "paper.yaml")
    cells, skipped = plan_cells(cfg)
    g = cfg.grid
    knn = [c for c in cells if c.protocol == "knn"]
    assert not skipped
    assert len(knn) == len(g.encoders) * len(g.resolutions) * len(g.datasets) == 36
    assert len({(c.encoder, c.resolution, c.dataset) for c in knn}) == 36 and all(c.seed_free for c in knn)
    lp = [c for c in cells if c.protocol == "linear_probe"]
    assert len(lp) == 36 * len(g.seeds) and not any(c.seed_free for c in lp)
    # The config alone gives every planned cell a distinct config digest (what analyze keeps).
    assert len(config_identities(cfg)) == len(cells)


def test_a_seed_that_picks_a_fold_keeps_seed_free_protocols_per_seed(tmp_path):
    raw = sweep_config(tmp_path, {"camelyon16": tmp_path, "nih14": tmp_path},
                       grid={"protocols": ["abmil"], "seeds": [0, 1]},
                       dataset_options={"camelyon16": {"cv_folds": 5}})
    cfg = parse_config({**raw, "protocols": {}})
    assert split_uses_seed(cfg, "camelyon16") and not split_uses_seed(cfg, "nih14")


# -- precision -------------------------------------------------------------------------------------
def test_precision_is_planned_from_the_cluster_and_checked_by_the_encoder(one_torch_thread):
    from orchestrator.extraction.images import EncoderUDF
    from orchestrator.extraction.weights import planned_precision
    from tasks.encoders import create_encoder
    from tasks.errors import WeightsError

    assert planned_precision(0, 1) == "fp32" and planned_precision(4, 0) == "fp32"
    assert planned_precision(8, 1) == "bf16"
    digest = create_encoder(TINY, "random", device="cpu").weights.digest
    assert EncoderUDF(TINY, "random", "cls", digest, 1, expected_precision="fp32").pooling == "cls"
    with pytest.raises(WeightsError, match="runs in fp32 .* planned bf16"):
        EncoderUDF(TINY, "random", "cls", digest, 1, expected_precision="bf16")


def test_online_cells_hold_their_encoder_to_the_planned_precision_and_weights(one_torch_thread):
    """Cells that encode inside the trial (dense online, seg3d, registration) go through the same
    check as the extraction actors: a planned fp32 turns a GPU's bf16 autocast off, and an encoder
    that would compute in another precision or with other weights is refused."""
    from orchestrator.extraction.weights import check_planned, encoder_precision
    from tasks.encoders import create_encoder
    from tasks.errors import WeightsError

    enc = create_encoder(TINY, "random", device="cpu")
    enc.autocast = True  # what a CUDA device turns on
    assert check_planned(enc, enc.weights.digest, "fp32") is enc and encoder_precision(enc) == "fp32"
    with pytest.raises(WeightsError, match="runs in fp32 .* planned bf16"):
        check_planned(enc, enc.weights.digest, "bf16")
    with pytest.raises(WeightsError, match="differs from the planned 000000000000"):
        check_planned(enc, "0" * 64, "fp32")


# -- weights memo ----------------------------------------------------------------------------------
def _write_weights(path: Path, seed: int) -> Path:
    import torch
    from safetensors.torch import save_file

    from tasks.encoders import create_encoder

    state = create_encoder(TINY, "random", device="cpu").model.state_dict()
    g = torch.Generator().manual_seed(seed)
    save_file({k: (v + 0.01 * torch.randn(v.shape, generator=g)).contiguous() for k, v in state.items()}, str(path))
    return path


def _fake_snapshot(cache: Path, repo: str, revision: str, payload: bytes) -> None:
    """A Hugging Face hub cache in its on-disk layout: refs/main -> snapshots/<rev>/file -> blob."""
    base = cache / f"models--{repo.replace('/', '--')}"
    (base / "refs").mkdir(parents=True, exist_ok=True)
    (base / "refs" / "main").write_text(revision)
    blob = base / "blobs" / f"blob-{revision}"
    blob.parent.mkdir(parents=True, exist_ok=True)
    blob.write_bytes(payload)
    snap = base / "snapshots" / revision
    snap.mkdir(parents=True, exist_ok=True)
    (snap / "model.safetensors").symlink_to(blob)


def test_weights_memo_key_is_the_resolved_source(tmp_path, monkeypatch):
    from orchestrator.extraction.weights import weights_memo_key
    from tasks.encoders import get_encoder_spec

    enc = "dinov3_vits16"
    repo = get_encoder_spec(enc).hf_hub_id
    hub = tmp_path / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(hub))
    assert weights_memo_key(enc, "hub") is None  # nothing cached: nothing may be memoised
    _fake_snapshot(hub, repo, "a" * 40, b"weights of snapshot a")
    key_a = weights_memo_key(enc, "hub")
    assert key_a is not None and "a" * 40 in key_a
    _fake_snapshot(hub, repo, "b" * 40, b"weights of snapshot b")  # a new snapshot: refs/main moves
    key_b = weights_memo_key(enc, "hub")
    assert key_b != key_a and "b" * 40 in key_b
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "other-hf-home"))  # another HF_HOME
    assert weights_memo_key(enc, "hub") is None

    a, b = _write_weights(tmp_path / "a.safetensors", 1), _write_weights(tmp_path / "b.safetensors", 2)
    ka, kb = weights_memo_key(TINY, f"file:{a}"), weights_memo_key(TINY, f"file:{b}")
    assert ka and kb and ka != kb
    st = a.stat()
    os.utime(a, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # the same path, replaced a second later
    assert weights_memo_key(TINY, f"file:{a}") != ka
    assert weights_memo_key(TINY, f"file:{tmp_path / 'missing.safetensors'}") is None


def test_a_stale_memo_is_replanned_never_trusted(ray_session, tmp_path):
    from orchestrator.extraction.weights import DigestMemo, weights_info
    from tasks.encoders import create_encoder

    wdir = tmp_path / "weights"  # `file:<dir>` holding <encoder>.safetensors
    wdir.mkdir()
    memo = DigestMemo(tmp_path / "memo.json")
    _write_weights(wdir / f"{TINY}.safetensors", 1)
    first = weights_info(TINY, f"file:{wdir}", memo)
    assert first["digest"] == create_encoder(TINY, f"file:{wdir}", device="cpu").weights.digest
    assert weights_info(TINY, f"file:{wdir}", memo) == first  # the memo, while the file is unchanged
    time.sleep(0.01)
    _write_weights(wdir / f"{TINY}.safetensors", 2)  # replaced in place: same path, same size
    second = weights_info(TINY, f"file:{wdir}", memo)
    assert second["digest"] != first["digest"]
    assert second["digest"] == create_encoder(TINY, f"file:{wdir}", device="cpu").weights.digest
    assert len(DigestMemo(tmp_path / "memo.json").data) == 2


# -- scratch clean-up ------------------------------------------------------------------------------
def test_a_killed_extractions_scratch_is_removed_when_the_cache_is_next_opened(tmp_path):
    from orchestrator.store.scratch import LEASE_SUFFIX

    root = tmp_path / "cache"
    code = ("import sys, time; from orchestrator.store.cache import FeatureCache; "
            "d = FeatureCache(sys.argv[1]).scratch_dir(); open(d + '/part.parquet', 'wb').write(b'x'); "
            "print(d, flush=True); time.sleep(600)")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    writer = subprocess.Popen([sys.executable, "-c", code, str(root)], stdout=subprocess.PIPE, text=True, env=env)
    dead = writer.stdout.readline().strip()
    live = FeatureCache(str(root)).scratch_dir()  # this process: alive
    assert Path(dead).is_dir() and FeatureCache(str(root), clean=True).cleaned == []  # the writer still lives
    tmp = root / "tmp"
    # Another node's writer, heartbeat fresh (alive) and one whose heartbeat stopped long ago.
    for name, beat in (("other-live", time.time()), ("other-dead", time.time() - 7200)):
        (tmp / name).mkdir()
        (tmp / f"{name}{LEASE_SUFFIX}").write_text(json.dumps({"host": "node-b", "pid": 1, "heartbeat": beat}))
    (tmp / "stale-0123abcd").mkdir()  # moved aside by a commit: garbage at once
    (tmp / "old-unleased").mkdir()
    os.utime(tmp / "old-unleased", (time.time() - 7200, time.time() - 7200))
    (tmp / "new-unleased").mkdir()
    writer.send_signal(signal.SIGKILL)
    writer.wait()
    cache = FeatureCache(str(root), clean=True)
    removed = {Path(p).name for p in cache.cleaned}
    assert removed == {Path(dead).name, "other-dead", "stale-0123abcd", "old-unleased"}
    assert not Path(dead).exists() and not Path(dead + LEASE_SUFFIX).exists()
    left = {p.name for p in tmp.iterdir()}
    assert left == {Path(live).name, Path(live).name + LEASE_SUFFIX, "other-live", "other-live" + LEASE_SUFFIX,
                    "new-unleased"}
    assert socket.gethostname() in (Path(live + LEASE_SUFFIX)).read_text()


# -- tracking index --------------------------------------------------------------------------------
def test_a_500_cell_resume_searches_the_experiment_once(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracker = Tracker(uri, "big", artifact_root=str(tmp_path / "art"))
    client = tracker.client
    cells = [f"c{i:03d}" for i in range(500)]
    for i, cid in enumerate(cells):  # what a killed sweep leaves: 450 finished, 50 running
        run = client.create_run(tracker.experiment_id, run_name=cid,
                                tags={CELL_TAG: cid, "medscale.kind": "cell", "medscale.sweep": "big"})
        if i < 450:
            client.set_terminated(run.info.run_id, "FINISHED")

    resumed = Tracker(uri, "big")  # a new driver
    calls = {"n": 0}
    search = resumed.client.search_runs

    def counting(*args, **kwargs):
        calls["n"] += 1
        return search(*args, **kwargs)

    resumed.client.search_runs = counting
    finished = resumed.finished_cells()
    assert len(finished) == 450
    todo = [c for c in cells if c not in finished]
    ids = {cid: resumed.open_run(cid, {"seed": 0}, {"medscale.weights": "random"}) for cid in todo}
    for rid in ids.values():
        resumed.finish(rid, {"test_auc": 0.5})
    assert resumed.finished_cells() == set(cells)
    assert resumed.mark_superseded(set(cells[:499]), "config x") == (1, 0)
    assert calls["n"] == 1  # one paged query for the whole resume, not one per cell
    runs = client.search_runs([tracker.experiment_id], max_results=1000)
    assert len(runs) == 500 and {r.info.status for r in runs} == {"FINISHED"}
    assert [r.data.tags[CELL_TAG] for r in runs if SUPERSEDED_TAG in r.data.tags] == ["c499"]


# -- sweeps ----------------------------------------------------------------------------------------
def _cell_runs(cfg) -> list:
    client = MlflowClient(cfg.resolved_tracking_uri)
    exp = client.get_experiment_by_name(cfg.name)
    return client.search_runs([exp.experiment_id], filter_string="tags.`medscale.kind` = 'cell'", max_results=1000)


def _current(cfg) -> dict[str, list]:
    out: dict[str, list] = {}
    for r in _cell_runs(cfg):
        if SUPERSEDED_TAG not in r.data.tags:
            out.setdefault(r.data.tags[CELL_TAG], []).append(r)
    return out


def test_config_changes_run_only_the_changed_cells_and_resume_after_a_kill(ray_session, synth_roots, tmp_path):
    wa, wb = _write_weights(tmp_path / "a.safetensors", 1), _write_weights(tmp_path / "b.safetensors", 2)
    raw = sweep_config(tmp_path, synth_roots, grid={"resolutions": [32]}, weights=f"file:{wa}",
                       protocols={"linear_probe": {"epochs": 20}})

    def sweep(**changes):
        raw.update(changes)
        cfg = parse_config(raw)
        return cfg, run_sweep(cfg)

    cfg, first = sweep()
    ids0 = set(first.cells)
    assert set(first.cells.values()) == {"FINISHED"} and len(ids0) == 4
    run = _cell_runs(cfg)[0]
    assert run.data.params["precision"] == "fp32" and run.data.tags[IDENTITY_TAG]
    res_dir = Path(cfg.sweep_root) / "cells" / run.data.tags[CELL_TAG]
    assert json.loads((res_dir / "identity.json").read_text())["identity"] == run.data.tags[IDENTITY_TAG]
    knn = [r for r in _cell_runs(cfg) if r.data.params["protocol"] == "knn"]
    assert {r.data.params["seed_free"] for r in knn} == {"true"} and all("__seedfree__" in r.data.tags[CELL_TAG]
                                                                          for r in knn)

    # pooling: every cell is new; the old runs stay, superseded.
    cfg, pooled = sweep(pooling="cls")
    ids1 = set(pooled.cells)
    assert not ids1 & ids0 and set(pooled.cells.values()) == {"FINISHED"} and pooled.n_encoded == 400
    assert set(_current(cfg)) == ids1 and len(_cell_runs(cfg)) == 8

    # a protocol hyperparameter: only that protocol's cells run again.
    knn_runs = {r.data.tags[CELL_TAG]: r.info.run_id for r in _cell_runs(cfg) if r.data.tags[CELL_TAG] in ids1
                and r.data.params["protocol"] == "knn"}
    cfg, tuned = sweep(protocols={"linear_probe": {"epochs": 10}})
    ids2 = set(tuned.cells)
    assert ids2 & ids1 == set(knn_runs) and len(ids2 - ids1) == 2 and tuned.n_encoded == 0
    assert {c for c in ids2 - ids1} == {c for c in ids2 if "__linear_probe__" in c}
    assert {c: rs[0].info.run_id for c, rs in _current(cfg).items() if c in knn_runs} == knn_runs  # not rerun

    # weights: another file, every cell new.
    cfg, reweighted = sweep(weights=f"file:{wb}")
    ids3 = set(reweighted.cells)
    assert not ids3 & (ids0 | ids1 | ids2) and set(reweighted.cells.values()) == {"FINISHED"}
    assert len(_cell_runs(cfg)) == 4 + 4 + 2 + 4
    current = _current(cfg)
    assert set(current) == ids3 and all(len(rs) == 1 for rs in current.values())

    # analyze --config reads the cells of the config as it is now, and only those.
    cfg_path = tmp_path / "sweep.yaml"
    cfg_path.write_text(yaml.safe_dump(raw))
    points = load_points(cfg.resolved_tracking_uri, [cfg.name], config_identities=set(config_identities(cfg)))
    now = {r.info.run_id for rs in current.values() for r in rs}
    assert set(points["run_id"]) == now and len(now) == 4
    assert points.groupby("protocol")["seed_free"].first().to_dict() == {"knn": True, "linear_probe": False}
    from orchestrator.analyze import analyze

    result = analyze(config=str(cfg_path), n_boot=0, log=False)
    assert set(result["study"].agg["encoder"]) == {TINY}
    assert set(pd_read(result["summary"])["n"]) == {1}

    # Back to weights A: those cells exist (superseded, now current again): nothing runs.
    cfg, back = sweep(weights=f"file:{wa}")
    assert back.already_done and set(back.cells) == ids2
    assert set(_current(cfg)) == ids2

    # A driver killed mid-sweep: one cell's run left RUNNING without a result, another's result
    # written but never logged. A plain rerun refuses; --resume ends with one FINISHED run each.
    client = MlflowClient(cfg.resolved_tracking_uri)
    runs = {c: rs[0] for c, rs in _current(cfg).items()}
    lost, unlogged = sorted(c for c in runs if "linear_probe" in c)[0], sorted(c for c in runs if "knn" in c)[0]
    from orchestrator.store.results import ResultStore

    ResultStore(f"{cfg.sweep_root}/cells").delete(lost)
    for c in (lost, unlogged):
        client.update_run(runs[c].info.run_id, status="RUNNING")
    with pytest.raises(Exception, match="--resume"):
        run_sweep(cfg)
    resumed = run_sweep(cfg, resume=True)
    assert set(resumed.cells) == ids2 and set(resumed.cells.values()) == {"FINISHED"}
    current = _current(cfg)
    assert set(current) == ids2 and all(len(rs) == 1 and rs[0].info.status == "FINISHED" for rs in current.values())
    assert current[unlogged][0].info.run_id == runs[unlogged].info.run_id
    assert {r.info.status for r in _cell_runs(cfg)} == {"FINISHED"}


def pd_read(path):
    import pandas as pd

    return pd.read_csv(path)


def test_a_broken_dataset_root_exits_nonzero_and_names_the_failed_cells(joined_env, synth_roots, tmp_path):
    """`python sweep.py` (what `ray job submit` runs) as a subprocess: exit 1 after the summary when
    a cell failed, naming it; 0 with --allow-failures; 2 when a dataset root is missing outright."""
    import shutil

    broken = tmp_path / "rsna_broken"
    shutil.copytree(synth_roots["rsna_pneumonia"], broken)
    # Present (the pre-flight layout check passes) but unreadable: found when the sweep plans it.
    (broken / "stage_2_train_labels.csv").write_text("not,the,label,file\n")
    raw = {**sweep_config(tmp_path, {"nih14": synth_roots["nih14"], "rsna_pneumonia": broken},
                          grid={"resolutions": [32], "protocols": ["knn"]}), "protocols": {}}
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(raw))
    cmd = [sys.executable, str(REPO / "sweep.py"), "--config", str(path)]
    env = {**joined_env, "PYTHONPATH": str(REPO)}  # joins this session's cluster, as under `ray job submit`

    def sweep(*flags: str) -> subprocess.CompletedProcess:
        return subprocess.run([*cmd, *flags], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)

    first = sweep("--allow-failures")
    assert first.returncode == 0, first.stdout + first.stderr
    failed = [line for line in first.stdout.splitlines() if line.startswith("FAILED rsna_pneumonia__knn__")]
    assert len(failed) == 1 and "stage_2_train_labels.csv" in failed[0]
    assert "1 cell(s) FAILED: rsna_pneumonia__knn__test_vit_tiny16__32px__seedfree__" in first.stderr

    again = sweep("--resume")  # the same failure, the default exit status
    assert again.returncode == 1, again.stdout + again.stderr
    assert "1 cell(s) FAILED: rsna_pneumonia__knn__" in again.stderr and "1 finished, 1 failed" in again.stdout
    runs = _cell_runs(parse_config(raw))
    assert sorted(r.info.status for r in runs) == ["FAILED", "FINISHED"]
    assert all(r.data.tags.get(CONFIG_IDENTITY_TAG) for r in runs)
    # The failed cell's MLflow run names the file and the problem; nih14's cell is untouched by it.
    failed_run = next(r for r in runs if r.info.status == "FAILED")
    assert failed_run.data.params["dataset"] == "rsna_pneumonia"
    assert "stage_2_train_labels.csv" in failed_run.data.tags["medscale.error"]

    path.write_text(yaml.safe_dump({**raw, "data": {**raw["data"], "rsna_pneumonia": str(tmp_path / "nowhere")}}))
    missing = sweep("--resume")
    assert missing.returncode == 2 and "nowhere" in missing.stderr


def test_the_repository_stands_on_its_own():
    """No file of the repository points outside it (the study is cited by title and arXiv id)."""
    outside = ("../" + "shared", "NOTES" + ".md")
    hits = [f"{p.relative_to(REPO)}: {needle}" for p in REPO.rglob("*") if p.suffix in (".py", ".md", ".yaml")
            and ".venv" not in p.parts and p.is_file() for needle in outside if needle in p.read_text(errors="ignore")]
    assert hits == []
    assert "2509.06467" in (REPO / "README.md").read_text()
