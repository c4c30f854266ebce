"""The live adaptive sweep (`medscale sweep --adaptive`, orchestrator/sweep/adaptive.py).

The bookkeeping without Ray (candidates from the plan, the budget in device-hours, the round
record, points of the chosen cells, rounds re-derived identically in another process), and one
real sweep on Ray Tune + MLflow on a tiny grid.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pandas as pd
import pytest
import yaml

from analysis.adaptive.policy import AdaptivePolicy
from orchestrator.grid.adaptive import AdaptiveSettings
from orchestrator.grid.cells import plan_cells
from orchestrator.grid.config import parse_config
from orchestrator.plan.build import build_plan
from orchestrator.plan.model import Counts
from orchestrator.sweep.rounds import RoundLog, budget_share, candidates, points_of, policy_settings
from tasks.encoders import get_encoder_spec
from tasks.errors import ConfigError

from .conftest import REPO, TINY, sweep_config

RES = [32, 48, 64]


def _cfg(tmp_path, **grid):
    roots = {"nih14": tmp_path / "nih14"}
    return parse_config(sweep_config(tmp_path, roots, grid={"resolutions": RES, "seeds": [0, 1, 2], **grid}))


def _plan(cfg, counts):
    cells, skipped = plan_cells(cfg)
    gathered = {"extractions": sorted({c.extraction for c in cells}), "counts": counts, "cached": {},
                "free_bytes": None}
    return cells, build_plan(cfg, cells, skipped, gathered, "cpu-2core")


def test_candidates_are_every_grid_cell_with_the_plans_cost(tmp_path):
    cfg = _cfg(tmp_path)
    cells, plan = _plan(cfg, {"nih14": Counts("image", {"train": 150, "val": 20, "test": 30})})
    cands = candidates(cfg, cells, plan)
    # linear_probe: 3 resolutions x 3 seeds; kNN ignores the seed: one seed-free cell per resolution
    assert len(cands) == len(cells) == 12 and cands["prefix"].is_unique
    assert set(cands["prefix"]) == {c.prefix for c in cells}
    knn = cands[cands["protocol"] == "knn"]
    assert len(knn) == 3 and set(knn["seed"]) == {0}
    # the values `medscale analyze` reads back from a run: weights kind, whole split, shots 0
    assert set(cands["weights"]) == {"random"} and set(cands["train_fraction"]) == {1.0}
    assert set(cands["train_shots"]) == {0}
    for _, r in cands.iterrows():
        assert r["gflops"] == pytest.approx(get_encoder_spec(TINY).gflops(r["resolution"]), rel=1e-6)
        # priced by extraction (the default): the cell's features cost GFLOPs x items, paid once
        # per extraction; the cell itself, its head, 0.05 of the dataset's mean extraction
        assert r["items"] == 200 and r["extraction_cost"] == pytest.approx(r["gflops"] * 200)
        assert r["cost"] == pytest.approx(0.05 * cands.drop_duplicates("resolution")["extraction_cost"].mean())
    by_cell = candidates(cfg, cells, plan, AdaptiveSettings(pricing="cell"))
    assert "extraction_cost" not in by_cell and list(by_cell["cost"]) == pytest.approx(list(by_cell["gflops"] * 200))
    # round 0 of the policy on it: the corners of the resolution axis with 2 seeds (kNN: its one)
    from analysis.adaptive.policy import AdaptivePolicy

    r0 = AdaptivePolicy(budget=1.0).initial_cells(cands).cells
    assert set(r0["resolution"]) == {32, 64} and len(r0) == 2 * 2 + 2


def test_budget_hours_convert_by_the_plans_hours_or_say_why_not(tmp_path):
    cfg = _cfg(tmp_path)
    _, plan = _plan(cfg, {"nih14": Counts("image", {"train": 150, "val": 20, "test": 30})})
    cells, _ = plan_cells(cfg)
    total = sum(e.device_hours for e in plan.extractions)
    assert total > 0
    share, note = budget_share(AdaptiveSettings(budget_hours=total / 4), plan)
    assert share == pytest.approx(0.25) and "device-hours" in note
    # counted as the cells are priced: each extraction once plus a head per cell (0.05 of the
    # dataset's mean extraction), or, priced per cell, each cell's extraction in full (12 cells
    # share 3 extractions)
    hours = {(e.encoder, e.resolution): e.device_hours for e in plan.extractions}
    per_cell = sum(hours[(c.encoder, c.resolution)] for c in cells)
    assert per_cell == pytest.approx(4 * total) and len(hours) == 3
    for settings, grid in ((AdaptiveSettings(budget_hours=1.0), total + 12 * 0.05 * total / 3),
                           (AdaptiveSettings(budget_hours=1.0, pricing="cell"), per_cell)):
        cands = candidates(cfg, cells, plan, settings)
        assert budget_share(settings, plan, cands)[0] == pytest.approx(1.0 / grid)
    assert budget_share(AdaptiveSettings(), plan)[0] == 0.5
    assert budget_share(AdaptiveSettings(budget=0.3), plan)[0] == 0.3
    # without an item count the plan knows no hours (nih14's published size fills in for missing
    # data, so drop the hours by hand): the error says so and what to give instead
    blind = plan
    blind.extractions[0].device_hours = None
    with pytest.raises(ConfigError, match=r"item counts unknown.*--budget F"):
        budget_share(AdaptiveSettings(budget_hours=1.0), blind)
    with pytest.raises(ValueError):
        AdaptiveSettings(budget=0.5, budget_hours=2.0)
    assert AdaptiveSettings(budget=0.5).with_overrides(budget_hours=2.0).budget is None


def test_a_config_adaptive_block_validates_and_stays_out_of_the_cells_identity(tmp_path):
    from orchestrator.grid.cells import config_identities

    raw = sweep_config(tmp_path, {"nih14": tmp_path / "nih14"}, grid={"resolutions": RES})
    plain = parse_config(raw)
    adaptive = parse_config({**raw, "adaptive": {"budget": 0.4, "max_rounds": 3}})
    assert adaptive.adaptive.budget == 0.4 and plain.adaptive is None
    assert config_identities(plain) == config_identities(adaptive)
    with pytest.raises(ConfigError, match="adaptive"):
        parse_config({**raw, "adaptive": {"budget": 0}})


def test_the_cli_takes_a_budget_only_for_an_adaptive_sweep(tmp_path, capsys):
    from orchestrator.cli import build_parser, main

    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(sweep_config(tmp_path, {"nih14": tmp_path / "nih14"})))
    assert main(["sweep", str(path), "--budget", "0.3"]) == 2
    assert "add --adaptive" in capsys.readouterr().err
    args = build_parser().parse_args(["sweep", str(path), "--adaptive", "--budget-hours", "2.5"])
    assert args.adaptive is True and args.budget_hours == 2.5 and args.budget is None
    assert build_parser().parse_args(["sweep", str(path), "--no-adaptive"]).adaptive is False


def test_the_round_record_resumes_and_refuses_a_different_round(tmp_path):
    cfg = _cfg(tmp_path)
    cells, plan = _plan(cfg, {"nih14": Counts("image", {"train": 150, "val": 20, "test": 30})})
    cands = candidates(cfg, cells, plan).assign(reason="corner")
    log = RoundLog(tmp_path)
    r0, r1 = cands.iloc[:4], cands.iloc[4:6]
    log.start(0, r0)
    assert not log.finished(0)
    log.finish({"round": 0, "cells": 4, "failed": 0, "cost": 1.0, "cost_share": 0.1, "spent_share": 0.1,
                "settled": 0, "open": 5})
    log.start(1, r1)  # killed during round 1: recorded, not finished
    again = RoundLog(tmp_path)
    assert again.finished(0) and not again.finished(1)
    again.start(1, r1)  # the same round re-derived: accepted, not recorded twice
    assert len(again.cells) == 6 and list(again.rounds["round"]) == [0]
    with pytest.raises(ConfigError, match="round 1 was recorded with other cells"):
        again.start(1, cands.iloc[6:8])
    again.clear()
    assert again.rounds.empty and again.cells.empty


def test_a_resume_with_other_adaptive_settings_names_them(tmp_path):
    cfg = _cfg(tmp_path)
    cells, plan = _plan(cfg, {"nih14": Counts("image", {"train": 150, "val": 20, "test": 30})})
    cands = candidates(cfg, cells, plan).assign(reason="corner")
    first = policy_settings(AdaptivePolicy(budget=0.5, max_rounds=8, round_share=0.08), AdaptiveSettings())
    log = RoundLog(tmp_path)
    log.check_settings(first)  # no round yet: recorded
    log.start(0, cands.iloc[:4])
    log.check_settings(first)  # the same settings: a resume goes on
    now = policy_settings(AdaptivePolicy(budget=0.5), AdaptiveSettings())  # today's defaults: 12 rounds of 5%
    with pytest.raises(ConfigError) as e:
        RoundLog(tmp_path).check_settings(now)
    assert "max_rounds 8 -> 12" in str(e.value) and "round_share 0.08 -> 0.05" in str(e.value)
    assert "budget 0.5" not in str(e.value) and "--rerun" in str(e.value)  # only what changed
    coded = policy_settings(AdaptivePolicy(budget=0.5, stability_z=1.5), AdaptiveSettings())  # a new code default
    with pytest.raises(ConfigError, match="stability_z 2.0 -> 1.5"):
        RoundLog(tmp_path).check_settings(coded)
    log.clear()  # --rerun: the rounds start afresh with the settings given now
    log.check_settings(now)
    log.start(0, cands.iloc[:4])
    log.check_settings(now)


def test_rounds_derived_afresh_drop_the_round_runs_of_the_removed_record(tmp_path):
    """The way out the settings error names: remove rounds.csv and adaptive_cells.csv, --resume. The
    MLflow runs of the old rounds would otherwise pass for the new rounds' (a round is logged once)."""
    from orchestrator.sweep.adaptive import ROUND_KIND, ROUND_TAG, _open_record
    from orchestrator.tracking import Tracker

    cfg = _cfg(tmp_path)
    tracker = Tracker(cfg.resolved_tracking_uri, cfg.name)
    tracker.log_sweep_run("round 0", {"round": 0}, {"cells": 4.0}, kind=ROUND_KIND, tags={ROUND_TAG: "0"})
    log = RoundLog(cfg.output_path)
    log.start(0, candidates(cfg, *_plan(cfg, {"nih14": Counts("image", {"train": 150, "val": 20, "test": 30})}))
              .assign(reason="corner").iloc[:4])
    with pytest.raises(ConfigError, match="--resume"):
        _open_record(log, tracker, resume=False, rerun=False)
    _open_record(log, tracker, resume=True, rerun=False)  # a record: its round runs are kept
    assert len(tracker.sweep_runs(ROUND_KIND)) == 1
    log.clear()
    _open_record(log, tracker, resume=True, rerun=False)
    assert tracker.sweep_runs(ROUND_KIND) == {}


def test_points_of_the_chosen_cells_in_a_fixed_order(tmp_path):
    cfg = _cfg(tmp_path)
    cells, plan = _plan(cfg, {"nih14": Counts("image", {"train": 150, "val": 20, "test": 30})})
    cands = candidates(cfg, cells, plan)
    rows = []
    for i, r in cands.iterrows():
        if i in (0, 1, 2, 5):  # cells with runs; 5 was not chosen
            for metric in ("auc", "acc"):
                rows.append({**r[["dataset", "protocol", "weights", "encoder", "resolution", "train_fraction",
                                  "seed", "params", "gflops"]].to_dict(), "train_shots": 0, "metric": metric,
                             "value": 0.5 + i / 100, "seed_free": r["protocol"] == "knn"})
    points = pd.DataFrame(rows)
    got, drawn = points_of(points, cands, chosen={0, 1, 2, 3})
    assert drawn == {0, 1, 2} and len(got) == 6  # cell 3 was chosen but has no points: it failed
    shuffled, _ = points_of(points.sample(frac=1, random_state=1), cands, chosen={0, 1, 2, 3})
    pd.testing.assert_frame_equal(got, shuffled)


def test_the_policy_asks_for_the_interior_point_of_a_grid_with_train_size_columns(tmp_path):
    """Candidates from a config carry train_fraction / train_shots (the points do): the asks must
    still find the curves' sites."""
    from analysis.adaptive.policy import AdaptivePolicy

    cfg = _cfg(tmp_path)
    cells, plan = _plan(cfg, {"nih14": Counts("image", {"train": 150, "val": 20, "test": 30})})
    cands = candidates(cfg, cells, plan, AdaptiveSettings(pricing="cell"))
    policy = AdaptivePolicy(budget=0.8)
    r0 = policy.initial_cells(cands).cells
    rows = [{**r[["dataset", "protocol", "weights", "encoder", "resolution", "train_fraction", "train_shots",
                  "seed", "params", "gflops"]].to_dict(), "metric": "auc", "seed_free": r["protocol"] == "knn",
             "value": 0.7 + r["resolution"] / 1000 + 0.003 * r["seed"]} for _, r in r0.iterrows()]
    nxt = policy.next_cells(pd.DataFrame(rows), cands)
    assert not nxt.empty and set(nxt.cells["resolution"]) == {48}


def test_a_live_grid_with_train_fractions_plans_and_asks_for_its_data_curves(tmp_path):
    """Live candidates name the whole split as fraction 1.0 and shots 0 (as runs log it): the data
    curves (metric vs training cases) must find their sites, and ask for the middle train size."""
    from analysis.adaptive.cells import planned_data_curves
    from analysis.adaptive.policy import AdaptivePolicy

    cfg = _cfg(tmp_path, protocols=["linear_probe"], train_fractions=[0.2, 0.5, 1.0])
    cells, plan = _plan(cfg, {"nih14": Counts("image", {"train": 150, "val": 20, "test": 30})})
    cands = candidates(cfg, cells, plan, AdaptiveSettings(pricing="cell"))
    planned = planned_data_curves(cands)
    assert [pc.x for pc in planned] == [(0.2, 0.5, 1.0)] * 3  # one per resolution (one encoder)
    policy = AdaptivePolicy(budget=0.8, round_share=0.5)  # a round large enough to hold every ask
    r0 = policy.initial_cells(cands).cells
    assert sorted(r0["train_fraction"].unique()) == [0.2, 1.0]
    rows = [{**r[["dataset", "protocol", "weights", "encoder", "resolution", "train_fraction", "train_shots",
                  "seed", "params", "gflops"]].to_dict(), "metric": "auc", "n_train": round(150 * r["train_fraction"]),
             "value": 0.7 + 0.05 * r["train_fraction"] + 0.003 * r["seed"]} for _, r in r0.iterrows()]
    nxt = policy.next_cells(pd.DataFrame(rows), cands)
    data = {k: s for k, s in policy.last_status.items() if k.axis == "train cases"}
    assert {k.fixed for k in data} == {f"{TINY} @ {r} px" for r in RES}
    asked = nxt.cells[nxt.cells["train_fraction"] == 0.5]
    assert len(asked) and asked["reason"].str.contains("train cases").all()


DERIVE = """
import sys
from analysis.adaptive.policy import AdaptivePolicy
from analysis.adaptive.replay import replay
from analysis.adaptive.synthetic import generate_study
df, _ = generate_study(seed=5, n_datasets=1, protocols=("linear_probe",), metrics=("auc",), resolutions=(224, 512, 1024))
res = replay(df, AdaptivePolicy(budget=0.6, draws=3), full={})
res.cells[["encoder", "resolution", "seed", "round"]].to_csv(sys.stdout, index=False)
"""


def test_rounds_are_re_derived_identically_in_another_process(capsys):
    """Resume re-derives the rounds from the finished cells' points in a new process: the policy
    must not depend on Python's per-process hash salt (its projections draw random numbers)."""
    env = {**os.environ, "PYTHONHASHSEED": "1", "PYTHONPATH": str(REPO)}
    r = subprocess.run([sys.executable, "-c", DERIVE], cwd=REPO, env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    exec(DERIVE, {})  # this process: another salt (pytest's is random, and not 1 but by a 2^-32 chance)
    here = capsys.readouterr().out
    assert r.stdout == here and len(here.splitlines()) > 9  # more rounds than round 0's 8 cells


def _round_runs(cfg) -> pd.DataFrame:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(cfg.resolved_tracking_uri)
    exp = client.get_experiment_by_name(cfg.name)
    runs = client.search_runs([exp.experiment_id], filter_string="tags.`medscale.kind` = 'adaptive_round'")
    return pd.DataFrame([{"round": int(r.data.tags["medscale.round"]), "params": r.data.params,
                          "artifacts": [a.path for a in client.list_artifacts(r.info.run_id)]} for r in runs])


def test_live_adaptive_sweep_runs_fewer_cells_and_settles_as_the_full_grid(ray_session, synth_roots, tmp_path):
    from analysis.adaptive.replay import full_grid_verdicts
    from orchestrator.sweep.adaptive import run_adaptive
    from orchestrator.sweep.driver import run_sweep
    from orchestrator.tracking import load_points

    # Two resolutions keep it to two extractions: round 0 is the corners (linear probe: 2 of 3
    # seeds; kNN ignores the seed, so its curves are complete and settle), paying both extractions
    # (priced by extraction, the default; a head is 0.05 of the mean extraction, so round 0 is
    # 1.15 of the two extractions' cost and the grid 1.2); round 1 a third seed where a linear-probe
    # curve is open, within the budget: 0.99 leaves room for one more head (0.025), not two.
    roots = {"nih14": synth_roots["nih14"]}
    raw = sweep_config(tmp_path, roots, grid={"resolutions": [32, 64], "seeds": [0, 1, 2]},
                       adaptive={"budget": 0.99, "max_rounds": 2})
    cfg = parse_config(raw)
    out = run_adaptive(cfg, accelerator="cpu-2core")
    grid = len(plan_cells(cfg)[0])
    assert out.grid_cells == grid == 8 and out.cells_chosen < grid
    ran = {c for c, s in out.sweep.cells.items() if s == "FINISHED"}
    assert len(ran) == out.cells_chosen and out.spent_share <= 0.99 + 1e-9

    rounds = pd.read_csv(cfg.output_path / "rounds.csv")
    assert list(rounds["round"]) == list(range(len(rounds))) and rounds["cells"].iloc[0] == 6
    assert rounds["cells"].sum() == out.cells_chosen and rounds["spent_share"].is_monotonic_increasing
    assert (rounds["settled"] + rounds["open"]).nunique() == 1  # every planned curve, every round
    mlruns = _round_runs(cfg)
    assert sorted(mlruns["round"]) == list(rounds["round"])
    for _, r in mlruns.iterrows():
        assert int(r["params"]["cells_added"]) == rounds.loc[r["round"], "cells"]
        assert {"cells.csv", "round.json"} <= set(r["artifacts"])

    curves = pd.read_csv(cfg.output_path / "adaptive_curves.csv")
    settled = curves[curves["status"] == "settled"]
    assert len(settled) and settled["settled_round"].notna().all()
    assert (cfg.output_path / "adaptive_rounds.png").stat().st_size > 0  # curves settled vs cost spent

    # Resume while the last round was in progress: its record is re-derived, its cells (all
    # finished) are not run again, and the round is recorded once more, in both places.
    pd.read_csv(cfg.output_path / "rounds.csv").iloc[:-1].to_csv(cfg.output_path / "rounds.csv", index=False)
    from orchestrator.tracking import Tracker

    tracker = Tracker(cfg.resolved_tracking_uri, cfg.name)
    last = [rid for rid, t in tracker.sweep_runs("adaptive_round").items() if t["medscale.round"] == str(len(rounds) - 1)]
    tracker.delete_runs(last)
    with pytest.raises(ConfigError, match="--resume"):
        run_adaptive(cfg, accelerator="cpu-2core")
    again = run_adaptive(cfg, resume=True, accelerator="cpu-2core")
    assert again.sweep.n_encoded == 0 and set(again.sweep.cells.values()) == {"FINISHED"}
    assert len(again.sweep.cells) == rounds["cells"].iloc[-1]
    pd.testing.assert_frame_equal(pd.read_csv(cfg.output_path / "rounds.csv"), rounds)
    assert sorted(_round_runs(cfg)["round"]) == list(rounds["round"])

    # The full grid: an ordinary resume runs only the cells the rounds left out (same identities).
    full = run_sweep(parse_config({k: v for k, v in raw.items() if k != "adaptive"}), resume=True)
    newly = [c for c, s in full.cells.items() if s == "FINISHED" and c not in ran]
    assert len(newly) == grid - out.cells_chosen and len(full.cells) == grid
    verdicts = full_grid_verdicts(load_points(cfg.resolved_tracking_uri, [cfg.name]))
    for _, r in settled.iterrows():
        key = next(k for k in verdicts if (k.dataset, k.protocol, k.metric, k.axis, k.fixed)
                   == (r["dataset"], r["protocol"], r["metric"], r["axis"], r["fixed"]))
        assert r["verdict"] == verdicts[key], key

    # The report of the sweep's runs shows, per curve, the round at which it settled.
    from orchestrator.analyze import analyze

    (tmp_path / "sweep.yaml").write_text(yaml.safe_dump(raw))
    report = analyze(config=str(tmp_path / "sweep.yaml"), n_boot=0, log=False)["report"].read_text()
    assert "## Adaptive sweep" in report and f"{len(settled)} of {len(curves)} curves settled" in report
    assert "](../adaptive_rounds.png)" in report  # the rounds' figure, beside the sweep's CSVs
