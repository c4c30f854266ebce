"""The adaptive round policy (analysis/adaptive): guarantees of docs/analysis.md, "Adaptive sweeps"."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from analysis.adaptive.cells import axis_ends, candidates_from_points, planned_curves
from analysis.adaptive.policy import CLAIMS, OPEN, AdaptivePolicy
from analysis.adaptive.replay import full_grid_verdicts, replay
from analysis.adaptive.synthetic import generate_study
from analysis.study import build_study
from analysis.verdict import analyse_curve

RES = (224, 1024)


@pytest.fixture(scope="module")
def small():
    """1 dataset x 1 protocol x 2 metrics x S/B/L x 2 resolutions x 5 seeds: 12 curves."""
    df, truths = generate_study(seed=3, n_datasets=1, protocols=("linear_probe",), metrics=("auc", "acc"),
                                resolutions=RES)
    return df, truths, full_grid_verdicts(df)


def test_round_zero_is_the_corners_with_two_seeds(small):
    df, _, _ = small
    cands = candidates_from_points(df)
    ends = axis_ends(cands, 2)
    assert set(zip(ends["encoder"], ends["resolution"], strict=True)) == {
        (e, r) for e in ("dinov3_vits16", "dinov3_vitl16") for r in (224, 1024)}
    assert sorted(ends["seed"].unique()) == [0, 1] and len(ends) == 8  # 4 corners x 2 seeds
    # the cost of a cell is GFLOPs x items (the n_test rows the study logged)
    row = cands.iloc[0]
    assert row["cost"] == pytest.approx(row["gflops"] * row["items"]) and row["items"] > 1
    assert len(planned_curves(cands)) == 6  # 2 params + 3 resolution + 1 gflops curve per metric


@pytest.mark.parametrize("names", [("ViT-S/16", "ViT-B/16", "ViT-L/16"), ("ViTS", "ViTB", "ViTL")])
def test_round_zero_ends_do_not_depend_on_how_encoders_are_named(small, names):
    df, _, _ = small
    renamed = df.assign(encoder=df["encoder"].map(dict(zip(("dinov3_vits16", "dinov3_vitb16", "dinov3_vitl16"),
                                                           names, strict=True))))
    ends = axis_ends(candidates_from_points(renamed), 2)
    # one family (a shared prefix, or no prefix shared at all): its smallest and largest, not all three
    assert set(ends["encoder"]) == {names[0], names[2]} and len(ends) == 8


def test_round_zero_runs_both_ends_of_every_registered_family(small):
    df, _, _ = small
    # three domain models of three families (the registry's): each is its own smallest and largest
    renamed = df.assign(encoder=df["encoder"].map({"dinov3_vits16": "uni", "dinov3_vitb16": "conch",
                                                   "dinov3_vitl16": "biomedclip"}))
    ends = axis_ends(candidates_from_points(renamed), 2)
    assert set(zip(ends["encoder"], ends["resolution"], strict=True)) == {
        (e, r) for e in ("uni", "conch", "biomedclip") for r in (224, 1024)}


def test_budget_one_equals_the_full_grid(small):
    df, _, full = small
    policy = AdaptivePolicy(budget=1.0, round_share=0.5, draws=2)
    res = replay(df, policy, full=full)
    assert res.cost_share == pytest.approx(1.0)
    assert policy.final_alpha == policy.alpha and not policy.frozen  # nothing frozen, nothing spent
    assert res.agreement == 1.0, res.curves[~res.curves["same"]]
    assert (res.curves["adaptive_verdict"] == res.curves["full_verdict"]).all() and len(res.curves) == 12
    assert len(res.rounds) >= 2  # it still went round by round


def test_budget_one_equals_the_full_grid_with_two_encoder_families(small):
    df, _, _ = small
    # DINOv3 S and L beside one domain model: parameter and GFLOPs curves are drawn per family,
    # and the policy must plan (and settle) those same curves
    mixed = df.assign(encoder=df["encoder"].replace({"dinov3_vitb16": "uni"}))
    full = full_grid_verdicts(mixed)
    assert {k.fixed for k in full if k.axis == "params"} == {"224 px, dinov3", "1024 px, dinov3"}
    assert {(pc.axis, pc.fixed) for pc in planned_curves(candidates_from_points(mixed))} == {
        (k.axis, k.fixed) for k in full}
    res = replay(mixed, AdaptivePolicy(budget=1.0, round_share=0.5, draws=2), full=full)
    assert res.agreement == 1.0 and (res.curves["status"] == "settled").all(), res.curves[~res.curves["same"]]


def test_a_curve_whose_every_seed_ran_is_frozen_only_with_a_claim_at_the_interim_level():
    # noisy enough that some claims hold at 5% but not at the interim level (adjusted p ~0.001-0.005)
    df, _ = generate_study(seed=3, n_datasets=1, protocols=("linear_probe",), metrics=("auc", "acc"),
                           resolutions=RES, seed_sd=0.006)
    cands = candidates_from_points(df)
    policy = AdaptivePolicy(budget=0.5)
    policy.initial_cells(cands)
    status, study = policy.settled(df, cands), policy.judge(df)  # every cell and seed has run
    assert all(s.settled for s in status.values())
    interim = {k for k, v in study.verdicts.items() if v.verdict in CLAIMS and v.p_adj <= policy.look_alpha}
    late = {k for k, v in study.verdicts.items() if v.verdict in CLAIMS and k not in interim}
    assert late, "the study should hold claims short of the interim level"
    # frozen claims are those that spent interim alpha; the rest wait for the final look's level
    assert set(policy.frozen) == interim


def test_small_budget_reports_open_curves_and_never_guesses(small):
    df, _, full = small
    res = replay(df, AdaptivePolicy(budget=0.15, draws=2), full=full)
    assert res.cost_share <= 0.15 + 1e-9
    c = res.curves
    few = c[(c["n_points"] < 2) | (c["reason"].str.contains("an end of the curve"))]
    assert len(few) > 0, "a budget this small cannot reach every curve"
    assert (few["adaptive_verdict"] == OPEN).all() and (few["status"] == "open").all()
    assert (c.loc[c["adaptive_verdict"] == OPEN, "status"] == "open").all()
    # every open curve says why
    assert c.loc[c["status"] == "open", "reason"].str.len().gt(0).all()


def test_interim_looks_spend_their_level_and_freeze_only_strong_claims(small):
    df, _, full = small
    policy = AdaptivePolicy(budget=0.5, max_rounds=6, confidence=0.999, draws=2)
    assert policy.final_alpha + 5 * policy.look_alpha == pytest.approx(policy.alpha)
    res = replay(df, policy, full=full)
    assert res.cost_share <= 0.5 + 1e-9
    assert policy.frozen, "the power-law metric's clear claims settle before the grid is full"
    for key, s in policy.frozen.items():
        assert s.settled and s.verdict in ("scales", "saturates", "peaks", "inverse")
        assert "interim level" in s.reason and s.settled_round is not None
        row = res.curves[(res.curves["metric"] == key.metric) & (res.curves["axis"] == key.axis)
                         & (res.curves["fixed"] == key.fixed)]
        assert row["adaptive_verdict"].iloc[0] == s.verdict  # a frozen claim is reported as frozen
    with pytest.raises(ValueError):
        AdaptivePolicy(confidence=0.99, max_rounds=8)  # 7 looks x 0.01 would spend more than alpha


def test_flat_truth_gets_no_false_claims_across_rounds():
    """FDR across rounds on a null study: flat truth everywhere, so every claim is false; the
    adaptive run (interim looks included) may make at most alpha of its curves' claims."""
    df, _ = generate_study(seed=5, n_datasets=1, protocols=("linear_probe",), metrics=("auc",),
                           resolutions=RES, case_sd=0.0)
    df.loc[df["metric"] == "auc", "value"] = 0.8 + 0.003 * np.random.default_rng(1).normal(
        size=int((df["metric"] == "auc").sum()))
    res = replay(df, AdaptivePolicy(budget=0.5, draws=2))
    claims = res.curves["adaptive_verdict"].isin(["scales", "saturates", "peaks", "inverse", "mixed"])
    assert claims.sum() == 0, res.curves[claims]


def test_points_without_gflops_cost_by_the_vit_estimate_and_plan_no_gflops_curve(small):
    """Empty GFLOPs: the cost falls back to 2 x params x tokens, and, as in `medscale analyze`, no
    GFLOPs curve is planned (a planned curve the analysis never makes would stay open forever)."""
    df, _, _ = small
    d = df.assign(gflops=float("nan"))
    cands = candidates_from_points(d)
    big = cands[(cands["encoder"] == "dinov3_vitl16") & (cands["resolution"] == 1024)].iloc[0]
    assert big["cost"] == pytest.approx(2 * big["params"] * 64**2 / 1e9 * big["items"])
    assert {pc.axis for pc in planned_curves(cands)} == {"params", "resolution"}
    res = replay(d[d["metric"] != "acc"], AdaptivePolicy(budget=1.0, round_share=0.5, draws=2))
    assert res.agreement == 1.0 and set(res.curves["axis"]) == {"params", "resolution"}


def _knife_edge_study(fall: float) -> pd.DataFrame:
    """S/B/L x 224/512/1024 px x 5 seeds, one metric; every resolution curve rises 0.03 to 512 px
    and falls ``fall`` at 1024; seeds 0 and 1 sit at +-0.0003 around each cell's value (the sign
    alternating between cells: seed noise, not a seed shift), so with those two seeds the
    estimates are exact (the other seeds: random)."""
    rng = np.random.default_rng(0)
    rows, sign = [], 1.0
    for e, (enc, params) in enumerate((("dinov3_vits16", 2.2e7), ("dinov3_vitb16", 8.6e7), ("dinov3_vitl16", 3.0e8))):
        for res, base in ((224, 0.80), (512, 0.83), (1024, 0.83 - fall)):
            sign = -sign
            for s in range(5):
                noise = sign * (0.0003, -0.0003)[s] if s < 2 else 0.0004 * rng.normal()
                rows.append(("ds", "linear_probe", "auc", enc, params, float("nan"), res, s,
                             base + 0.02 * e + noise))
    cols = ["dataset", "protocol", "metric", "encoder", "params", "gflops", "resolution", "seed", "value"]
    return pd.DataFrame(rows, columns=cols)


def test_a_verdict_on_a_knife_edge_stays_open():
    """A peak whose fall (0.0052) passes the margin (0.005) by less than one SD of what the three
    unseen seeds can move it: the current estimates, and a few random draws, say `peaks` at the full
    grid's precision too, but the shift of 2 SDs along the fall does not, so the curve stays open
    (no claim is frozen that more seeds would likely undo). The same curve with a fall of 0.012
    is frozen as a peak."""
    for fall, settles in ((0.0052, False), (0.012, True)):
        df = _knife_edge_study(fall)
        cands = candidates_from_points(df)
        two = df[df["seed"] < 2]
        for z, expect in ((0.0, True), (2.0, settles)):
            policy = AdaptivePolicy(budget=0.5, stability_z=z, draws=0)
            status = policy.settled(two, cands)
            peaks = [s for k, s in status.items() if k.axis == "resolution"]
            assert len(peaks) == 3 and all(s.verdict == "peaks" for s in peaks), [s.reason for s in peaks]
            assert all(s.settled == expect for s in peaks), (fall, z, [s.reason for s in peaks])


@pytest.mark.parametrize("resolutions", [RES, (224, 384, 512, 768, 1024)])
def test_undescribed_analysis_decides_as_the_described_one(resolutions):
    """The policy judges curves with ``describe=False`` (no fitted forms, no shape shares, the
    isotonic test only for the claims that read it): the claim, its p-value, flat_ok and the verdict
    must be those of the full analysis, the whole study's BH verdicts included."""
    # truths flat, power, saturating and (precision) a peak
    df, _ = generate_study(seed=3, n_datasets=1, protocols=("linear_probe",),
                           metrics=("auc", "acc", "f1_macro", "precision"), resolutions=resolutions)
    study = build_study(df, n_boot=20, every_metric=True)
    fast = build_study(df, n_boot=20, every_metric=True, describe=False)
    checked, iso = 0, 0
    for key in study.verdicts:
        c = study.curve(key)
        full = analyse_curve(c.replicates, min_effect=c.margin)
        light = analyse_curve(c.replicates, min_effect=c.margin, describe=False)
        assert (light.claim, light.verdict, light.flat_ok) == (full.claim, full.verdict, full.flat_ok), key
        assert light.p_claim == full.p_claim or (np.isnan(light.p_claim) and np.isnan(full.p_claim))
        assert not light.fit.fits
        assert (fast.verdicts[key].verdict, fast.verdicts[key].p_adj) == (study.verdicts[key].verdict,
                                                                          study.verdicts[key].p_adj), key
        checked += bool(full.fit.fits)  # what describe=False skips
        iso += full.claim in ("peaks", "mixed") and np.isfinite(full.iso_p)
    assert checked >= 3 and (iso >= 1 or resolutions == RES)  # the 5-px grid has a peak or mixed claim


def test_priced_by_extraction_pays_each_extraction_once(small):
    """Features are cached per dataset x weights x encoder x resolution: a site's seeds share one
    extraction, so the first cell there pays it and the others only their heads."""
    from analysis.adaptive.cells import cost_of, extractions_of, grid_cost, priced_by_extraction

    df, _, _ = small
    cells = candidates_from_points(df)
    priced = priced_by_extraction(cells, head_share=0.05)
    site = priced[(priced["encoder"] == "dinov3_vitl16") & (priced["resolution"] == 1024)]
    ext = float(cells.loc[site.index[0], "cost"])
    sites = cells.groupby(["encoder", "resolution"])["cost"].first()  # one dataset: 6 sites
    head = 0.05 * sites.mean()  # a head: 0.05 of the dataset's mean extraction, whichever site
    assert len(site) == 5 and (site["extraction_cost"] == ext).all()
    assert np.allclose(priced["cost"], head) and ext > 2 * sites.mean()
    assert cost_of(priced, site.index) == pytest.approx(ext + 5 * head)
    assert cost_of(priced, site.index[:1]) == pytest.approx(ext + head)
    paid = extractions_of(priced, site.index[:1])
    assert cost_of(priced, site.index[1:], paid) == pytest.approx(4 * head)  # heads only
    assert grid_cost(priced) == pytest.approx(sites.sum() + len(cells) * head)
    assert grid_cost(cells) == pytest.approx(cells["cost"].sum())  # per cell: every run pays in full
    assert cost_of(cells, site.index[1:], paid) == pytest.approx(4 * ext) and not extractions_of(cells, site.index)


def test_a_head_on_part_of_the_split_costs_its_share():
    """A head on a tenth of the training cases trains on a tenth of the cached features; a k-shot
    subset's cases are unknown before it runs, so it is priced as the whole split."""
    from analysis.adaptive.cells import priced_by_extraction

    cells = pd.DataFrame({"dataset": "d", "weights": "", "encoder": "e", "resolution": 224, "protocol": "p",
                          "seed": 0, "cost": 100.0, "train_fraction": [1.0, 0.1, 0.3, np.nan, 1.0],
                          "train_shots": [0, 0, 0, 0, 4]})
    priced = priced_by_extraction(cells, head_share=0.05)
    np.testing.assert_allclose(priced["cost"], [5.0, 0.5, 1.5, 5.0, 5.0])
    assert (priced["extraction_cost"] == 100.0).all()  # one extraction, whatever the heads train on
    counted = priced_by_extraction(cells.assign(train_share=[1.0, 0.1, 0.3, np.nan, 0.02]), head_share=0.05)
    np.testing.assert_allclose(counted["cost"], [5.0, 0.5, 1.5, 5.0, 0.1])  # a sweep's plan counts k-shot cases


def test_a_budget_larger_than_the_rounds_can_spend_at_round_share_widens_them():
    """Round 1 of 3 with budget 0.9 and round_share 0.05 could spend at most ~0.28 of the grid
    in all at that pace; each round takes instead what the budget left needs per round left."""
    df, _ = generate_study(seed=2, n_datasets=1, protocols=("linear_probe",), metrics=("auc",))
    r = replay(df, AdaptivePolicy(budget=0.9, max_rounds=3, round_share=0.05, draws=2)).rounds
    first = (0.9 - r["spent_share"].iloc[0]) / 2  # the room after round 0, over the 2 rounds left
    assert 0.1 < r["cost_share"].iloc[1] <= first + 1e-9
    assert r["spent_share"].iloc[-1] > 0.4


def test_round_0_under_a_short_budget_buys_the_cheapest_sites_first():
    """Priced by extraction, a subset's head is cheap on any site; round 0 must still order its
    corners by what they cost with nothing paid (the site's encoding), not by the head alone."""
    from analysis.adaptive.cells import EXTRACTION, priced_by_extraction

    df, _ = generate_study(seed=0, n_datasets=2, train_fractions=(0.1,))  # two test-set sizes: two head prices
    cands = priced_by_extraction(candidates_from_points(df), head_share=0.05)
    r0 = AdaptivePolicy(budget=0.15).initial_cells(cands)
    sites = axis_ends(cands, 2).drop_duplicates(EXTRACTION).set_index(EXTRACTION)["extraction_cost"]
    bought = set(map(tuple, r0.cells[EXTRACTION].itertuples(index=False)))
    assert 0 < len(bought) < len(sites)  # the budget binds
    left = sites[[k not in bought for k in sites.index]]
    assert sites[list(bought)].max() <= left.min()


def test_replay_priced_by_extraction_spends_within_budget_and_reports_encoding(small):
    df, _, full = small
    by_cell = replay(df, AdaptivePolicy(budget=0.5, draws=2), full=full)
    # per-cell pricing buys seeds at 2/5 of a site's cost, yet every cell touched needs the
    # site's whole extraction: the encoding it implies is at least the cost share
    assert by_cell.cost_share <= 0.5 + 1e-9 and by_cell.extraction_share >= by_cell.cost_share
    res = replay(df, AdaptivePolicy(budget=0.5, draws=2), full=full, pricing="extraction", head_share=0.05)
    assert res.cost_share <= 0.5 + 1e-9
    ran = res.cells.groupby(["encoder", "resolution"]).size()
    assert len(ran) < 6  # half the budget cannot buy every site of a 3 x 2 grid whose ViT-L@1024 is most of it
    sites = candidates_from_points(df).groupby(["encoder", "resolution"])["cost"].first()
    assert res.extraction_share == pytest.approx(sites[ran.index].sum() / sites.sum())
    # spent = the extractions touched + a head per cell run (0.05 of the mean extraction)
    spent = sites[ran.index].sum() + len(res.cells) * 0.05 * sites.mean()
    assert res.cost_share == pytest.approx(spent / (sites.sum() + len(df[df["metric"] == "auc"]) * 0.05 * sites.mean()))
    whole = replay(df, AdaptivePolicy(budget=1.0, round_share=0.5, draws=2), full=full, pricing="extraction")
    assert whole.cost_share == pytest.approx(1.0) and whole.agreement == 1.0
    with pytest.raises(ValueError, match="pricing"):
        replay(df, AdaptivePolicy(budget=0.5), full=full, pricing="seconds")
