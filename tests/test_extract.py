"""Feature extraction on Ray Data into the cache: once per key, equal to the bare encoder, atomic."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from orchestrator.extraction.jobs import ExtractionJob
from orchestrator.extraction.phase import extract_one
from orchestrator.extraction.shared import extract_group, shared_decode_groups
from orchestrator.extraction.weights import DigestMemo
from orchestrator.grid.config import parse_config
from orchestrator.store.cache import FeatureCache
from tasks.datasets import get_dataset
from tasks.device_resize import as_chw, resize_on_device
from tasks.encoders import create_encoder

from .conftest import REPO, TINY, sweep_config

pytestmark = pytest.mark.slow


def _extract(tmp_path: Path, roots: dict, resolution: int = 32, encoder: str = TINY):
    cfg = parse_config(sweep_config(tmp_path, roots))
    ds = get_dataset("nih14", str(roots["nih14"]))
    cache = FeatureCache(str(tmp_path / "cache"))
    memo = DigestMemo(tmp_path / "digests.json")
    job = ExtractionJob(encoder, "random", resolution, "cls+mean", "nih14", str(roots["nih14"]))
    return extract_one(job, cache, memo, cfg, 0.0, ds, ds.fingerprint()), cache, ds


def test_second_extraction_encodes_nothing_and_matches_bare_encoder(ray_session, synth_roots, tmp_path):
    first, cache, ds = _extract(tmp_path, synth_roots)
    index = ds.index()
    assert first.n_encoded == len(index)
    assert first.cached_splits == []
    second, _, _ = _extract(tmp_path, synth_roots)
    assert second.n_encoded == 0
    assert second.cached_splits == ["train", "val", "test"]
    assert {s: k.digest for s, k in first.keys.items()} == {s: k.digest for s, k in second.keys.items()}

    # Every case is in its split's entry, once, with the target of the index.
    for split, key in first.keys.items():
        ids, X, Y, _ = cache.read_arrays(key)
        sub = index[index["split"] == split].sort_values("case_id")
        assert ids == list(sub["case_id"])
        np.testing.assert_array_equal(Y, np.stack(sub["target"].to_numpy()))
        assert X.shape == (len(sub), 2 * 64) and X.dtype == np.float32

    # The pipeline's features equal the bare encoder's on the same images, resized as the actor
    # does it (on its device; tests/test_device_resize.py compares that with PIL's resize).
    enc = create_encoder(TINY, weights="random", device="cpu")
    assert enc.weights.digest == first.weights_digest
    ids, X, _, _ = cache.read_arrays(first.keys["test"])
    rows = index.set_index("case_id").loc[ids[:8]]
    pixels = resize_on_device([as_chw(ds.read_image(p)) for p in rows["path"]], 32, "bicubic", enc.io)
    np.testing.assert_allclose(enc.embed(pixels, pooling="cls+mean"), X[:8], rtol=1e-4, atol=1e-5)


def test_a_new_resolution_is_a_new_key_and_one_decode_for_both_gives_the_same_entries(
        ray_session, synth_roots, tmp_path):
    a, cache, ds = _extract(tmp_path, synth_roots, resolution=32)
    b, _, _ = _extract(tmp_path, synth_roots, resolution=48)
    assert b.n_encoded == a.n_encoded > 0
    assert a.keys["train"].digest != b.keys["train"].digest

    # Both resolutions from one decode (extraction.shared), into a second cache: what the sweep
    # does when a grid asks one encoder for several resolutions of a dataset.
    needed = [(TINY, 48, "nih14"), (TINY, 32, "nih14")]
    results = {(TINY, 32, "nih14"): replace(a, failed={}), (TINY, 48, "nih14"): replace(b, failed={})}
    datasets = {"nih14": (ds, ds.fingerprint())}
    assert shared_decode_groups(needed, results, datasets, cache, set()) == []  # cached: nothing to share
    assert shared_decode_groups(needed, results, datasets, cache, {(TINY, 48, "nih14")}) == []
    other = FeatureCache(str(tmp_path / "cache2"))
    groups = shared_decode_groups(needed, results, datasets, other, set())
    assert groups == [[(TINY, 32, "nih14"), (TINY, 48, "nih14")]]
    cfg = parse_config(sweep_config(tmp_path, synth_roots))
    done = extract_group([results[e] for e in groups[0]], other, cfg, 0.0, ds)
    assert [r.n_encoded for r in done] == [a.n_encoded, b.n_encoded]
    assert [r.shared_decode for r in done] == [[32, 48], [32, 48]]
    for alone in (a, b):
        for key in alone.keys.values():
            ids, X, Y, _ = cache.read_arrays(key)
            ids2, X2, Y2, _ = other.read_arrays(key)
            assert ids2 == ids and other.meta(key)["shared_decode"] == [32, 48]
            np.testing.assert_array_equal(Y2, Y)
            np.testing.assert_allclose(X2, X, rtol=1e-5, atol=1e-6)


def test_a_shared_decode_that_fails_runs_its_resolutions_one_by_one(ray_session, synth_roots, tmp_path, monkeypatch):
    """One resolution that cannot run (out of device memory, say) must not take the others down
    with it: a failed group is tried again member by member, each a lone extraction."""
    from orchestrator.extraction import pipelines
    from orchestrator.extraction.phase import extract_all, plan_extractions
    from orchestrator.grid.cells import plan_cells

    cfg = parse_config({**sweep_config(tmp_path, {"nih14": synth_roots["nih14"]}, grid={"protocols": ["knn"]}),
                        "protocols": {}})
    cells, _ = plan_cells(cfg)
    memo = DigestMemo(tmp_path / "digests.json")
    plan = plan_extractions(cfg, cells, memo, "fp32")

    def out_of_memory(*args, **kwargs):
        raise RuntimeError("CUDA out of memory at 48 px")

    monkeypatch.setattr(pipelines, "run_shared_decode_pipeline", out_of_memory)
    results, failures = extract_all(cfg, cells, FeatureCache(str(tmp_path / "cache")), memo, 0.0, plan)
    assert failures == {} and sorted(results) == [(TINY, 32, "nih14"), (TINY, 48, "nih14")]
    assert all(r.shared_decode == [] and r.n_encoded == 200 for r in results.values())


KILL_SCRIPT = """
import sys
from pathlib import Path
from orchestrator import ray_backend
from orchestrator.store.cache import FeatureCache
from orchestrator.grid.config import parse_config
from orchestrator.extraction.jobs import ExtractionJob
from orchestrator.extraction.weights import DigestMemo
from orchestrator.extraction.phase import extract_one
from orchestrator.extraction.shared import extract_group, shared_decode_groups
from tasks.datasets import get_dataset
root, out = sys.argv[1], Path(sys.argv[2])
ray_backend.start()  # joins the session cluster (RAY_ADDRESS), as under `ray job submit`
cfg = parse_config({"name": "k", "grid": {"encoders": ["dinov3_vits16"], "resolutions": [112],
    "datasets": ["nih14"], "protocols": ["knn"]}, "data": {"nih14": root}, "output": str(out),
    "resources": {"extract_batch_size": 8, "torch_threads": 1}})
ds = get_dataset("nih14", root)
job = ExtractionJob("dinov3_vits16", "random", 112, "cls+mean", "nih14", root)
extract_one(job, FeatureCache(str(out / "cache")), DigestMemo(out / "d.json"), cfg, 0.0, ds, ds.fingerprint())
print("FINISHED")
"""


def test_killed_extraction_leaves_no_complete_entry(joined_env, synth_roots, tmp_path):
    """The driver is killed mid-extraction (its Ray job dies with it): no cache entry is complete."""
    script = tmp_path / "kill.py"
    script.write_text(KILL_SCRIPT)
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, str(script), str(synth_roots["nih14"]), str(out)], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True, env=joined_env)
    try:
        deadline = time.time() + 240
        while time.time() < deadline and proc.poll() is None:
            if list((out / "cache" / "tmp").glob("*/split=*/*.parquet")):
                break  # some features are written, the rest are not: kill now
            time.sleep(0.05)
        assert proc.poll() is None, f"extraction ended before it could be killed:\n{proc.stdout.read().decode()}"
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    entries = list((out / "cache" / "features").glob("*"))
    assert all(not (e / "_medscale.json").exists() for e in entries), entries
    # What was half-written sits in scratch only, where no reader looks.
    assert list((out / "cache" / "tmp").glob("*/split=*/*.parquet"))
