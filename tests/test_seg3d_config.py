"""configs/seg3d.yaml (the paper's 3D segmentation grid) and the planned GPU-hours printed before it."""

from __future__ import annotations

import pytest

from orchestrator.grid.config import load_config
from orchestrator.plan.seg3d import format_plan, plan_for_config, plan_text, planned_gpu_hours
from tests.conftest import REPO


def test_paper_grid_loads():
    cfg = load_config(REPO / "configs" / "seg3d.yaml")
    g = cfg.grid
    assert g.encoders == ["dinov3_vits16", "dinov3_vitb16", "dinov3_vitl16"]
    assert len([d for d in g.datasets if d.startswith("msd_")]) == 10 and {"autopet2", "hecktor22"} <= set(g.datasets)
    assert g.protocols == ["seg3d_decoder"] and g.seeds == [0, 1, 2, 3, 4]  # MSD: the five folds
    assert cfg.options_for("hecktor22") == {"modality": "ct+pet"}
    hp = cfg.protocols["seg3d_decoder"]
    assert hp["lr"] == 1e-4 and hp["layers"] == [-4, -3, -2, -1]


def test_plan_counts_encoder_work_once_per_group():
    cfg = load_config(REPO / "configs" / "seg3d.yaml")
    plan = plan_for_config(cfg)
    assert len(plan) == 3 * 6 * 12 and (plan["heads"] == 5).all()
    row = plan[(plan["encoder"] == "dinov3_vitl16") & (plan["resolution"] == 1024) & (plan["dataset"] == "msd_spleen")]
    # train 2000 x 2 x 16 slices; val 4 rounds x 80% of 41 cases x 90 slices; test 41 x 90 (each slice
    # once per volume: overlapping windows carry shared slices)
    slices = 2000 * 2 * 16 + (4 * 0.8 + 1.0) * 41 * 90
    assert row["slices_encoded"].iloc[0] == int(slices)
    from tasks.encoders import get_encoder_spec

    g = get_encoder_spec("dinov3_vitl16").gflops(1024)
    assert row["gpu_hours"].iloc[0] == pytest.approx(slices * g / 300e3 / 3600)
    text = format_plan(plan)
    assert text.startswith("seg3d plan: 216 groups") and "GPU-hours planned" in text
    assert plan_text(cfg) == text  # what the sweep prints before it starts
    assert plan_text(load_config(REPO / "configs" / "paper.yaml")) is None
    # ct+pet encodes two images per slice: twice the work of ct alone
    one = planned_gpu_hours(["dinov3_vits16"], [224], ["autopet2"], modalities={"autopet2": 1})
    two = planned_gpu_hours(["dinov3_vits16"], [224], ["autopet2"], modalities={"autopet2": 2})
    assert two["gpu_hours"].iloc[0] == pytest.approx(2 * one["gpu_hours"].iloc[0])
