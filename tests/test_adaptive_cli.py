"""`medscale adaptive replay` end to end on a generated points CSV."""

from __future__ import annotations

import json

import pandas as pd
import pydantic
import pytest

from analysis.adaptive.synthetic import generate_study
from orchestrator.cli import main
from orchestrator.grid.adaptive import AdaptiveSettings


def test_replay_cli_writes_every_output_and_prints_agreement_last(tmp_path, capsys):
    df, _ = generate_study(seed=1, n_datasets=1, protocols=("linear_probe",), metrics=("auc",),
                           resolutions=(224, 1024))
    points = tmp_path / "points.csv"
    df.to_csv(points, index=False)
    out = tmp_path / "replay"
    assert main(["adaptive", "replay", "--points", str(points), "--out", str(out), "--budget", "0.6"]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    fields = dict(kv.split("=") for kv in last.split())
    assert set(fields) == {"agreement", "cost"}
    assert 0.0 <= float(fields["agreement"]) <= 1.0 and 0.0 < float(fields["cost"]) <= 0.6
    curves = pd.read_csv(out / "curves.csv")
    assert len(curves) == 6 and {"full_verdict", "adaptive_verdict", "status", "reason"} <= set(curves.columns)
    assert float(fields["agreement"]) == round(curves["same"].mean(), 3)
    rounds = pd.read_csv(out / "rounds.csv")
    assert rounds["round"].tolist() == list(range(len(rounds))) and rounds["spent_share"].is_monotonic_increasing
    assert abs(rounds["spent_share"].iloc[-1] - float(fields["cost"])) < 1e-3
    cells = pd.read_csv(out / "cells.csv")
    assert len(cells) == rounds["cells"].sum() and cells["reason"].notna().all()
    summary = json.loads((out / "summary.json").read_text())
    by_axis = summary["by_axis"]  # per axis: curves, agreement, and how many differing ones stayed open
    assert set(by_axis) == {"params", "resolution", "gflops"} and sum(a["curves"] for a in by_axis.values()) == 6
    for axis, a in by_axis.items():
        rows = curves[curves["axis"] == axis]
        assert a["agreement"] == pytest.approx(rows["same"].mean()) and a["differ"] == int((~rows["same"]).sum())
        assert a["differ_open"] == int((~rows["same"] & (rows["status"] == "open")).sum())
    # the figure: curves settled vs cost per round, and the full grid's verdicts against the adaptive ones
    from PIL import Image

    assert Image.open(out / "replay.png").size == (1260, 504) and (out / "replay.svg").is_file()
    text = capsys.readouterr().out
    assert main(["adaptive", "replay", "--points", str(points), "--out", str(tmp_path / "ext"), "--budget", "0.6",
                 "--pricing", "extraction"]) == 0
    text = capsys.readouterr().out
    # priced as a medscale sweep spends (features once per site, a head 0.05 of it): the grid costs
    # 1.25 x its encoding (5 seeds per site), and what was spent covers the encoding it needed
    encoding = float(text.split("extractions the chosen cells need: ")[1].split("%")[0]) / 100
    cost = float(text.strip().splitlines()[-1].split("cost=")[1])
    assert 0 < cost <= 0.6 and 0 < encoding <= cost * 1.25 + 1e-3
    assert main(["adaptive", "replay", "--points", str(points), "--out", str(tmp_path / "x"), "--pricing",
                 "extraction", "--head-share", "-1"]) == 2


def test_replay_cli_rejects_a_bad_budget(tmp_path, capsys):
    df, _ = generate_study(seed=1, n_datasets=1, protocols=("linear_probe",), metrics=("auc",),
                           resolutions=(224, 1024))
    df.to_csv(tmp_path / "p.csv", index=False)
    assert main(["adaptive", "replay", "--points", str(tmp_path / "p.csv"), "--out", str(tmp_path / "o"),
                 "--budget", "0"]) == 2
    assert "--budget" in capsys.readouterr().err


def test_round_share_caps_each_later_round_and_is_checked(tmp_path, capsys):
    df, _ = generate_study(seed=2, n_datasets=1, protocols=("linear_probe",), metrics=("auc",),
                           resolutions=(224, 512, 1024))
    df.to_csv(tmp_path / "p.csv", index=False)
    args = ["adaptive", "replay", "--points", str(tmp_path / "p.csv"), "--budget", "0.9"]
    assert main(args + ["--out", str(tmp_path / "o"), "--round-share", "0.05"]) == 0
    rounds = pd.read_csv(tmp_path / "o" / "rounds.csv")
    # A later round holds one ask whole (all seeds of a cell), so it may pass the cap by one ask only
    # when it is that round's single ask; the cap still shapes more, smaller rounds than 0.5 gives.
    assert main(args + ["--out", str(tmp_path / "wide"), "--round-share", "0.5"]) == 0
    wide = pd.read_csv(tmp_path / "wide" / "rounds.csv")
    assert rounds["cost_share"].iloc[1:].max() < wide["cost_share"].iloc[1:].max()
    assert len(rounds) >= len(wide)
    assert main(args + ["--out", str(tmp_path / "x"), "--round-share", "0"]) == 2
    assert "--round-share" in capsys.readouterr().err
    assert AdaptiveSettings(round_share=0.3).round_share == 0.3
    with pytest.raises(pydantic.ValidationError):
        AdaptiveSettings(round_share=1.5)


def test_replay_of_a_study_with_a_train_size_column_keeps_the_subsets_apart(tmp_path, capsys):
    df, _ = generate_study(seed=1, n_datasets=1, protocols=("linear_probe",), metrics=("auc",),
                           resolutions=(224, 1024))
    # a quarter of the training split: lower and seed-dependent, so averaging it in would show
    sub = df.assign(value=df["value"].where(df["metric"] != "auc", df["value"] - 0.05 + 0.01 * df["seed"]))
    paths = {name: tmp_path / f"{name}.csv" for name in ("whole", "both")}
    df.to_csv(paths["whole"], index=False)
    pd.concat([df.assign(train_size=400), sub.assign(train_size=100)]).to_csv(paths["both"], index=False)
    curves = {}
    for name, path in paths.items():
        out = tmp_path / name
        assert main(["adaptive", "replay", "--points", str(path), "--out", str(out), "--budget", "1"]) == 0
        assert capsys.readouterr().out.strip().splitlines()[-1] == "agreement=1.000 cost=1.000"
        curves[name] = pd.read_csv(out / "curves.csv")
    # the other axes are the whole split's: the same verdicts with or without the subsets beside them
    both = curves["both"]
    assert both.loc[both["axis"] != "train cases", "full_verdict"].tolist() == curves["whole"]["full_verdict"].tolist()
    # and a data curve per encoder and resolution (100 -> 400 cases, 0.02-0.05 better with all of them)
    data = both[both["axis"] == "train cases"]
    assert len(data) == 3 * 2 and set(data["full_verdict"]) == {"scales"} and data["same"].all()
    assert main(["adaptive", "replay", "--points", str(paths["both"]), "--out", str(tmp_path / "half"),
                 "--budget", "0.6"]) == 0
    cells = pd.read_csv(tmp_path / "half" / "cells.csv")
    first = cells[cells["round"] == 0]
    # round 0: both train sizes at each corner (smallest and largest encoder x resolution), 2 seeds
    assert sorted(first["train_fraction"].unique()) == [0.25, 1.0]
    assert len(first) == 2 * 4 * 2


def test_an_items_column_prices_each_cell_and_is_checked(tmp_path):
    from analysis.adaptive.cells import candidates_from_points
    from analysis.points import read_points_csv
    from tasks.errors import ConfigError

    df, _ = generate_study(seed=1, n_datasets=2, protocols=("linear_probe",), metrics=("auc",),
                           resolutions=(224, 1024))
    # items as a column instead of n_test rows: ds0 embeds 10x the images of ds1
    pts = df[df["metric"] != "n_test"].assign(items=lambda d: d["dataset"].map({"ds0": 5000, "ds1": 500}))
    pts.to_csv(tmp_path / "p.csv", index=False)
    cands = candidates_from_points(read_points_csv(tmp_path / "p.csv"))
    assert (cands["cost"] == cands["gflops"] * cands["items"]).all()
    one = cands[(cands["encoder"] == "dinov3_vits16") & (cands["resolution"] == 224) & (cands["seed"] == 0)]
    assert one.set_index("dataset")["cost"].pipe(lambda c: c["ds0"] / c["ds1"]) == pytest.approx(10.0)
    pts.assign(items=pts["items"].where(pts.index != pts.index[3], -3)).to_csv(tmp_path / "bad.csv", index=False)
    with pytest.raises(ConfigError, match=r"bad\.csv: column 'items' value must be > 0; row 4"):
        read_points_csv(tmp_path / "bad.csv")
