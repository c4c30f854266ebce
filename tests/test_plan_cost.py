"""`medscale plan`: counts from the index (unknown without data), the pretraining-resolution
warning, the throughput model. The plan against what a sweep writes (cache bytes within 5%, items,
cached state after the run, the plan as files and as an MLflow run) is checked on the sweep of
tests/test_sweep.py::test_sweep_records_one_finished_run_per_cell."""

from __future__ import annotations

import pytest

from orchestrator.grid.cells import plan_cells
from orchestrator.grid.config import load_config, parse_config
from orchestrator.plan.build import build_plan, gather, plan_sweep
from orchestrator.plan.throughput import (
    H200_ACTOR,
    MEASURED,
    UTIL_FIT,
    decode_rate,
    fit_utilisation,
    items_per_second,
    utilisation,
)
from tasks.encoders import ENCODERS

from .conftest import REPO, sweep_config

PAPER = REPO / "configs" / "paper.yaml"


def test_plan_of_the_paper_grid_runs_without_data(tmp_path):
    cfg = load_config(PAPER, {"output": str(tmp_path / "out"), "storage": None,
                              "data": {"nih14": str(tmp_path / "none1"), "rsna_pneumonia": str(tmp_path / "none2")}})
    plan = plan_sweep(cfg)
    # 360 grid points; kNN ignores the seed: one cell per (encoder, resolution, dataset), not five.
    assert len(plan.extractions) == 3 * 6 * 2 and cfg.n_cells() == 360 and len(plan.cells) == 36 * 5 + 36
    # no data on disk: each dataset's published size, marked as such, so every row has hours
    assert all(e.cached == "unknown" and e.device_hours is not None for e in plan.extractions)
    assert {e.items for e in plan.extractions if e.dataset == "nih14"} == {112_120}
    assert {e.items for e in plan.extractions if e.dataset == "rsna_pneumonia"} == {26_684}
    assert all("published size" in e.note for e in plan.extractions)
    assert sum("item counts unknown" in w for w in plan.warnings) == 2
    # 384-1024 px are above DINOv3's 256 px pretraining input: one warning per encoder
    above = [w for w in plan.warnings if "pretraining resolution (256 px)" in w]
    assert len(above) == 3 and all("384, 512, 768, 1024 px" in w for w in above)
    # GFLOPs per item are the registry's; on H100 (nothing measured) the utilisation is the fitted
    # function of GFLOPs: larger encoders keep the chip busier
    e = next(e for e in plan.extractions if e.encoder == "dinov3_vitl16" and e.resolution == 512)
    assert e.gflops_per_item == pytest.approx(ENCODERS["dinov3_vitl16"].gflops(512))
    assert e.throughput == "estimated" and e.items_per_s == pytest.approx(utilisation(e.gflops_per_item) * 989e3
                                                                          / e.gflops_per_item)
    assert utilisation(9.4) < utilisation(125.7) < utilisation(4137)
    # on H200 the S/B/L rows at 224/512/1024 px are measured; each row names its bound
    h200 = plan_sweep(cfg, accelerator="H200")
    for e in h200.extractions:
        assert (e.throughput == "measured") == (e.resolution in (224, 512, 1024)), e
        assert e.bound in ("gpu", "decode", "disk") and e.device_hours is not None
    s224 = next(e for e in h200.extractions if e.encoder == "dinov3_vits16" and e.resolution == 224)
    # one decode feeds ViT-S's 6 resolutions of a dataset (extraction/shared.py), each row paying a
    # sixth of it: ViT-S @ 224 px is bound by its measured actor rate, not by decode ...
    assert s224.bound == "gpu" and s224.items_per_s == pytest.approx(H200_ACTOR[("dinov3_vits16", 224)][0])
    # ... which bounds it when every extraction decodes the dataset again
    apart = load_config(PAPER, {"output": str(tmp_path / "out"), "storage": None, "data": cfg.data,
                                "resources": {**cfg.resources.model_dump(), "shared_decode": False}})
    s224 = next(e for e in plan_sweep(apart, accelerator="H200").extractions
                if e.encoder == "dinov3_vits16" and e.resolution == 224)
    assert s224.bound == "decode" and s224.items_per_s == pytest.approx(decode_rate("H200", 224))
    # decode workers only decode (the actor resizes on the GPU): one decode rate for every resolution
    assert decode_rate("H200", 224) == decode_rate("H200", 1024) == pytest.approx(16 * 1000 / 4.5)


def test_utilisation_fit_follows_the_measured_rows():
    a, b = fit_utilisation(H200_ACTOR, 989.0)
    assert (a, b) == pytest.approx(UTIL_FIT) and b > 0
    for rate, gf in H200_ACTOR.values():  # one curve in GFLOPs misses resolution: ViT-S @ 512 is 39% off
        assert utilisation(gf) * 989e3 / gf == pytest.approx(rate, rel=0.45)


def test_plan_of_the_paper_grid_counts_a_synthetic_dataset_exactly(synth_roots, tmp_path):
    from tasks.datasets import get_dataset

    cfg = load_config(PAPER, {"output": str(tmp_path / "out"), "storage": None,
                              "data": {k: str(v) for k, v in synth_roots.items()}})
    plan = plan_sweep(cfg)
    for e in plan.extractions:
        n = len(get_dataset(e.dataset, synth_roots[e.dataset]).index())
        assert e.items == e.cases == n and e.cache_bytes > n * ENCODERS[e.encoder].embed_dim * 2 * 4
        assert e.device_hours == pytest.approx(n / e.items_per_s / 3600)
    assert not any("unknown" in w for w in plan.warnings)


def test_measured_throughput_wins_over_the_estimate():
    assert items_per_second("cpu-2core", "dinov3_vits16", 224, 9.4) == (MEASURED[("cpu-2core", "dinov3_vits16", 224)],
                                                                         "measured")
    assert items_per_second("cpu-2core", "dinov3_vits16", 256, 12.5)[1] == "estimated"


def test_a_cell_whose_features_exceed_its_gpu_share_is_warned(synth_roots, tmp_path):
    raw = sweep_config(tmp_path, synth_roots, resources={"cell_gpus": {"tiny": 0.0}})
    cfg = parse_config(raw)
    cells, skipped = plan_cells(cfg)
    plan = build_plan(cfg, cells, skipped, gather(cfg, cells), accelerator="T4")
    assert sum("exceed the cell's GPU share" in w for w in plan.warnings) == 8  # dataset x protocol x res
    assert all(c.gpu_share == 0.0 and c.memory_bytes == 200 * 128 * 4 for c in plan.cells)


def test_pretraining_resolutions_are_timms_pretrained_input_sizes():
    import timm

    for spec in ENCODERS.values():
        if spec.hf_hub_id is None and spec.family in ("dinov3", "test"):  # the test encoder: no weights
            assert spec.pretrain_resolution is None
        if spec.library != "timm" or spec.pretrained_tag is None:
            continue  # other families: their model cards' sizes (docs/encoders.md)
        cfg = timm.models.get_pretrained_cfg(f"{spec.timm_name}.{spec.pretrained_tag}")
        assert cfg.input_size[-1] == spec.pretrain_resolution, spec.name


def test_a_dense_grid_plans_slices_and_dense_cache_bytes(tmp_path):
    import yaml

    from tasks.datasets import dataset_class, get_dataset
    from tasks.dense import planned_bytes

    root = tmp_path / "ac3ac4"
    dataset_class("ac3ac4").synth(root, seed=0)
    raw = yaml.safe_load((REPO / "configs" / "em.yaml").read_text())
    raw["grid"].update(datasets=["ac3ac4"], resolutions=[224])
    raw.update(data={"ac3ac4": str(root)}, output=str(tmp_path / "out"), storage=None)
    cfg = parse_config(raw)
    ds = get_dataset("ac3ac4", root, **cfg.options_for("ac3ac4"))
    slices = sum(ds.n_slices(c) for c in ds.index()["case_id"])
    for e in plan_sweep(cfg).extractions:
        assert e.feature == "dense" and e.item == "slice" and e.items == slices
        assert e.cache_bytes == planned_bytes(slices, 224 // 16, ENCODERS[e.encoder].embed_dim)
