"""The dense cache: the pipeline's maps equal the online source's within fp16 tolerance, are read
memory-mapped one case at a time, and the source rule picks and explains; every registered
protocol family has a cell runner and honours its contract."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from orchestrator.extraction.dense import DenseExtractResult, source_for
from orchestrator.extraction.weights import DigestMemo
from orchestrator.grid.config import parse_config
from orchestrator.store.cache import FeatureCache
from orchestrator.store.dense_maps import CachedFeatures
from tasks.dense import FAMILIES, SourceChoice, choose_source, planned_bytes

from . import dense_toy
from .conftest import TINY, sweep_config


def _extract(tmp: Path, root: Path, **resources) -> tuple[DenseExtractResult, FeatureCache, object]:
    from orchestrator.extraction.phase import extract_all, plan_extractions
    from orchestrator.grid.cells import plan_cells

    raw = sweep_config(tmp, {"toy_dense": root}, grid={"resolutions": [64], "protocols": ["toy_seg"]},
                       resources={"extract_batch_size": 3, **resources})
    raw["protocols"] = {}
    cfg = parse_config(raw)
    cells, _ = plan_cells(cfg)
    cache = FeatureCache(cfg.cache_root)
    memo = DigestMemo(tmp / "memo.json")
    plan = plan_extractions(cfg, cells, memo, "fp32")
    results, failures = extract_all(cfg, cells, cache, memo, 0.0, plan)
    assert not failures
    return results[(TINY, 64, "toy_dense")], cache, cfg


def test_cached_maps_equal_online_maps_and_are_memory_mapped(ray_session, tmp_path, monkeypatch, one_torch_thread):
    from tasks.encoders import create_encoder
    from tasks.features import OnlineFeatures

    dense_toy.register(monkeypatch)
    root = dense_toy.ToyDense.synth(tmp_path / "toy", n=8)
    dense_toy.corrupt(root, "case002")
    ex, cache, _ = _extract(tmp_path, root)
    assert ex.choices[""].kind == "cached" and ex.n_encoded == 7 and list(ex.failed) == ["case002"]
    assert "case002.png" in ex.failed["case002"]

    ds = dense_toy.ToyDense(root)
    cached = CachedFeatures(cache, ex.dense_keys[""], ds)
    online = OnlineFeatures(create_encoder(TINY), ds, 64)
    assert (cached.channels, cached.grid, cached.kind) == (online.channels, online.grid, "cached") == (64, 4, "cached")
    assert "case002" not in cached.case_ids() and cached.case_ids("test") == ["case003", "case007"]
    for cid in cached.case_ids():
        f = cached.features(cid)
        assert isinstance(f, np.memmap) and f.dtype == np.float16 and f.shape == (1, 64, 4, 4)
        ref = online.features(cid)
        np.testing.assert_allclose(f.astype(np.float32), ref, rtol=2e-3, atol=2e-3 * np.abs(ref).max())
    with pytest.raises(KeyError, match="case002.*cannot decode image"):
        cached.features("case002")

    # A second extraction of the same key is a cache hit: nothing is encoded again.
    again, _, _ = _extract(tmp_path, root)
    assert again.n_encoded == 0 and again.cached_splits and list(again.failed) == ["case002"]


def test_source_rule_chooses_and_says_why():
    b = planned_bytes(100, 14, 384)
    assert b == 100 * 14 * 14 * 384 * 2
    assert choose_source(100, 14, 384, b / 1e9, False).kind == "cached"  # exactly fits
    over = choose_source(100, 14, 384, b / 1e9 * 0.99, False)
    assert over.kind == "online" and "> resources.dense_cache_max_gb" in over.reason
    aug = choose_source(1, 14, 384, 1000, True)
    assert aug.kind == "online" and "augmentation" in aug.reason
    # Per cell: the extraction's choice for its layers, unless its head augments.
    ex = DenseExtractResult(None, {}, "", "", choices={"": SourceChoice("cached", "fits", b)})
    assert source_for(ex, "", False, 200).kind == "cached"
    cell = source_for(ex, "", True, 200)
    assert cell.kind == "online" and cell.planned_bytes == b and "augmentation" in cell.reason


def test_every_protocol_family_has_a_runner_and_honours_its_contract(monkeypatch, tmp_path, one_torch_thread):
    """Over every registered protocol: its family is known, cells.run_cell finds its runner, and
    the family's contract holds on tiny data (feature: fit(X, Y)/predict_proba; bag: bags;
    dense: fit(source, train, val)/predict at the case's size)."""
    from orchestrator.cells.features import run_feature_cell
    from orchestrator.cells.run import RUNNERS
    from orchestrator.cells.spec import head_family
    from tasks.encoders import create_encoder
    from tasks.features import OnlineFeatures
    from tasks.protocols import PROTOCOLS

    dense_toy.register(monkeypatch)
    root = dense_toy.ToyDense.synth(tmp_path / "toy", n=8)
    source = OnlineFeatures(create_encoder(TINY), dense_toy.ToyDense(root), 32, keep=8)
    rng = np.random.default_rng(0)
    seen = set()
    for name, cls in sorted(PROTOCOLS.items()):
        assert cls.family in FAMILIES, name
        seen.add(cls.family)
        runner = RUNNERS[head_family(name, "image")]
        assert (runner is run_feature_cell) == (cls.family == "feature"), name
        prefer = dense_toy.ToyDense.task if cls.family == "dense" else "binary"
        task = prefer if prefer in cls.supports else sorted(cls.supports)[0]
        small = {k: v for k, v in (("epochs", 2), ("max_steps", 20), ("val_every", 10))
                 if k in cls.param_names()}
        head = cls(task=task, seed=0, **small)
        if cls.family == "feature":
            X, Y = rng.normal(size=(12, 4)).astype(np.float32), np.eye(2, dtype=int)[np.arange(12) % 2]
            Y = Y if task == "multiclass" else Y[:, :1]
            assert head.fit(X, Y).predict_proba(X).shape == Y.shape
        elif cls.family == "bag":
            bags = [rng.normal(size=(3 + i % 3, 4)).astype(np.float32) for i in range(6)]
            Y = (np.arange(6) % 2)[:, None]
            assert head.fit(bags, Y).predict_proba(bags).shape == (6, 1)
        elif cls.family == "dense" and cls.accepts(dense_toy.ToyDense) is None:  # heads for 2D masks
            ids = source.case_ids()
            head.fit(source, ids[:4], ids[4:6])
            pred = head.predict(source, ids[6])
            assert pred.shape == source.sample(ids[6]).target.shape
    assert {"feature", "bag", "dense"} <= seen


def test_analysis_bootstraps_dense_metrics_over_cases_from_per_case_tables():
    """`medscale analyze` reads dense runs' per_case.parquet: the point estimate is the handler's
    aggregate (per class the mean over cases, NaN skipped, then the mean over classes), and
    replicates resample the cases (paired across cells)."""
    import pandas as pd

    from analysis.curves import make_group

    rng = np.random.default_rng(0)
    preds, pts = {}, []
    for enc, base in (("s", 0.6), ("b", 0.7), ("l", 0.8)):
        for seed in (0, 1):
            dice = np.clip(base + rng.normal(0, .1, 60), 0, 1)
            dice[[31, 40, 55]] = np.nan  # class b absent from both masks in three cases
            df = pd.DataFrame({"case_id": [f"c{i}" for i in range(30)] * 2, "split": "test",
                               "class": ["a"] * 30 + ["b x"] * 30, "kind": "class", "dice": dice})
            preds[f"{enc}{seed}"] = df
            logged = np.mean([np.nanmean(dice[:30]), np.nanmean(dice[30:])])
            pts.append({"run_id": f"{enc}{seed}", "encoder": enc, "resolution": 224, "seed": seed,
                        "value": logged, "class_b": np.nanmean(dice[30:])})
    pts = pd.DataFrame(pts)
    cells = pts.groupby(["encoder", "resolution"], as_index=False, sort=False).agg(
        mean=("value", "mean"), b=("class_b", "mean"))
    cells["dataset"], cells["protocol"] = "d", "p"
    g = make_group(cells.assign(metric="mdice"), pts.assign(metric="mdice"), predictions=preds, task="multiclass",
                   n_boot=200)
    assert g.method == "cases+seeds" and g.replicates.shape == (200, 3)
    np.testing.assert_allclose(g.estimate, cells["mean"], rtol=1e-12)
    # One class (its name slugged as in metric names): that class's rows only.
    g_b = make_group(cells.assign(metric="dice_b_x"), pts.assign(metric="dice_b_x"), predictions=preds,
                     task="multiclass", n_boot=200)
    np.testing.assert_allclose(g_b.estimate, cells["b"], rtol=1e-12)
