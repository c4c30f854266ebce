"""The adaptive policy on a grid with a data axis (train sizes): data curves - metric vs training
cases per encoder and resolution (`analysis.data_axis`) - are planned, judged, settled and asked
for like the other axes' curves."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from analysis.adaptive.cells import (
    axis_ends,
    candidates_from_points,
    planned_data_curves,
    site_rows,
)
from analysis.adaptive.policy import AdaptivePolicy
from analysis.adaptive.replay import full_grid_verdicts, replay
from analysis.adaptive.synthetic import generate_study
from analysis.data_axis import DATA_AXIS, data_curves, judge_data_curves, size_labels

FRACTIONS = (0.1, 0.3)


@pytest.fixture(scope="module")
def sized():
    """1 dataset x linear probe x auc, acc x S/B/L x 224/1024 px x 3 train sizes x 5 seeds (no
    test-set offsets, which the points cannot tell from the truth: verdicts can follow the truth)."""
    df, truths = generate_study(seed=18, n_datasets=1, protocols=("linear_probe",), metrics=("auc", "acc"),
                                resolutions=(224, 1024), train_fractions=FRACTIONS, case_sd=0.0)
    return df, truths, full_grid_verdicts(df)


def test_data_curves_are_planned_per_encoder_and_resolution_in_train_size_order(sized):
    df, _, full = sized
    cands = candidates_from_points(df)
    planned = planned_data_curves(cands)
    assert len(planned) == 3 * 2 and {pc.axis for pc in planned} == {DATA_AXIS}
    pc = next(p for p in planned if p.fixed == "dinov3_vitb16 @ 224 px")
    # the whole split is the site the other axes' curves share; the subsets are sites of their own
    assert pc.sites == (("dinov3_vitb16", 224, "f0.1"), ("dinov3_vitb16", 224, "f0.3"), ("dinov3_vitb16", 224))
    assert pc.x == (0.1, 0.3, 1.0)
    rows = site_rows(cands)
    assert len(rows[("ds0", "linear_probe", "", "dinov3_vitb16", 224, "f0.3")]) == 5  # its 5 seeds
    assert set(cands.loc[rows[("ds0", "linear_probe", "", "dinov3_vitb16", 224)], "train_fraction"]) == {1.0}
    # the full grid judges the same data curves (one per encoder and resolution and metric)
    assert {(k.axis, k.fixed) for k in full if k.axis == DATA_AXIS} == {(p.axis, p.fixed) for p in planned}
    # k-shot subsets come before fractions (x is then the rank: cases are known once a cell ran)
    shots = cands.assign(train_shots=np.where(cands["train_fraction"] == 0.1, 8, 0),
                         train_fraction=cands["train_fraction"].where(cands["train_fraction"] != 0.1, 1.0))
    pc = next(p for p in planned_data_curves(shots) if p.fixed == "dinov3_vitb16 @ 224 px")
    assert [s[2] if len(s) == 3 else "all" for s in pc.sites] == ["k8", "f0.3", "all"] and pc.x == (1.0, 2.0, 3.0)


@pytest.mark.parametrize("layout", ["shots", "blank_whole"])
def test_round_zero_takes_the_smallest_and_largest_train_size(sized, layout):
    df, _, _ = sized
    cands = candidates_from_points(df)
    if layout == "shots":  # 2 and 8 patients per class beside the whole split (shots 0)
        cands = cands.assign(train_shots=cands["train_fraction"].map({0.1: 2, 0.3: 8, 1.0: 0}), train_fraction=1.0)
        want = {"k2", "all"}
    else:  # the whole split left blank, as a points file may write it: its largest is still the whole
        cands = cands.assign(train_fraction=cands["train_fraction"].where(cands["train_fraction"] < 1))
        want = {"f0.1", "all"}
    r0 = axis_ends(cands, 2)
    assert set(size_labels(r0)) == want and len(r0) == 4 * 2 * 2  # 4 corners x 2 sizes x 2 seeds


def test_budget_one_equals_the_full_grid_with_a_data_axis(sized):
    df, truths, full = sized
    res = replay(df, AdaptivePolicy(budget=1.0, round_share=0.5, draws=2), full=full)
    data = res.curves[res.curves["axis"] == DATA_AXIS]
    assert len(data) == 6 * 2 and res.agreement == 1.0, res.curves[~res.curves["same"]]
    assert (res.curves["status"] == "settled").all() and res.cost_share == pytest.approx(1.0)
    # the verdicts follow the truth: auc loses 0.04 at a tenth of the split -> a gain with training
    # cases on every data curve; acc loses nothing -> no claim but by chance (BH at 5%: here 1 of 6;
    # over 30 such studies 5 of 114 null data curves got one)
    assert [truths[("ds0", "linear_probe", m)]["data_gain"] for m in ("auc", "acc")] == [0.04, 0.0]
    assert set(data.loc[data["metric"] == "auc", "full_verdict"]) <= {"scales", "saturates"}
    assert (~data.loc[data["metric"] == "acc", "full_verdict"].isin(["flat", "noisy"])).sum() <= 1


def test_an_open_data_curve_asks_for_its_interior_train_size(sized):
    df, _, _ = sized
    cands = candidates_from_points(df)
    policy = AdaptivePolicy(budget=0.9)
    r0 = policy.initial_cells(cands).cells
    # round 0: the corners at both train-size ends, so every corner's data curve lacks its middle
    assert sorted(r0["train_fraction"].unique()) == [0.1, 1.0]
    drawn = df.merge(r0[["encoder", "resolution", "train_fraction", "seed"]])
    nxt = policy.next_cells(drawn, cands)
    status = policy.last_status
    data = {k: s for k, s in status.items() if k.axis == DATA_AXIS}
    assert len(data) == 6 * 2 and not any(s.settled for s in data.values())  # every encoder x px x metric
    ends = [s for s in data.values() if s.n_points == 2]  # the corners' (4 x 2): ends run, middle not
    assert len(ends) == 4 * 2 and all("interior point(s) not run yet" in s.reason for s in ends)
    middle = nxt.cells[nxt.cells["train_fraction"] == 0.3]
    assert len(middle) and middle["reason"].str.contains(DATA_AXIS).all()
    corners = set(zip(r0["encoder"], r0["resolution"], strict=True))
    assert set(zip(middle["encoder"], middle["resolution"], strict=True)) & corners


def test_without_training_case_counts_no_data_curve_is_planned_or_bought(sized):
    df, _, _ = sized
    # a points file with train fractions but no case counts: the analysis draws no data curve
    bare = df.drop(columns="n_train")
    full = full_grid_verdicts(bare)
    assert not any(k.axis == DATA_AXIS for k in full)
    res = replay(bare, AdaptivePolicy(budget=0.7, draws=2), full=full)
    assert DATA_AXIS not in set(res.curves["axis"])
    # nothing asks for the middle subset; round 0 ran the two ends of the data axis, as the issue asks
    assert 0.3 not in set(res.cells["train_fraction"]) and 0.1 in set(res.cells["train_fraction"])


def test_data_curve_verdicts_read_analytic_tails_at_the_metrics_unit(sized):
    df, _, _ = sized
    a = judge_data_curves(data_curves(df, n_boot=20))
    b = judge_data_curves(data_curves(df, n_boot=400))
    assert a.keys() == b.keys() and len(a) == 12
    # the tests read the covariance parts, not the replicates: the number of replicates changes nothing
    for k in a:
        assert a[k].verdict == b[k].verdict and a[k].p_adj == pytest.approx(b[k].p_adj, rel=1e-9)
    # the same study in percent (unit column): judged at the x100 margin, so the same verdicts
    metric = df["metric"].isin(["auc", "acc"])
    pct = df.assign(value=df["value"].where(~metric, 100 * df["value"]), unit=np.where(metric, "percent", ""))
    c = judge_data_curves(data_curves(pd.DataFrame(pct), n_boot=20))
    assert {k: v.verdict for k, v in c.items()} == {k: v.verdict for k, v in a.items()}


def test_a_null_study_with_a_data_axis_gets_no_claim_across_rounds():
    """FDR across rounds covers the data curves' family too: pure noise at every train size, so any
    claim is false; the adaptive run, interim looks included, makes none."""
    df, _ = generate_study(seed=5, n_datasets=1, protocols=("linear_probe",), metrics=("auc",),
                           resolutions=(224, 1024), train_fractions=FRACTIONS, case_sd=0.0)
    auc = df["metric"] == "auc"
    df.loc[auc, "value"] = 0.8 + 0.003 * np.random.default_rng(1).normal(size=int(auc.sum()))
    res = replay(df, AdaptivePolicy(budget=0.5, draws=2))
    assert (res.curves["axis"] == DATA_AXIS).sum() == 6
    claims = res.curves["adaptive_verdict"].isin(["scales", "saturates", "peaks", "inverse", "mixed"])
    assert claims.sum() == 0, res.curves[claims]
