"""The training-data axis: nested, stratified, patient-level subsets (pure), cells that train on
them from cached features (each image embedded once), and the analysis of metric vs training cases."""

from __future__ import annotations

import re

import numpy as np
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from analysis.curves import CurveKey
from analysis.data_axis import DataCurve, cases_to_reach, labels_saved
from orchestrator.grid.cells import Cell, plan_cells
from orchestrator.grid.config import parse_config
from orchestrator.sweep.driver import run_sweep
from tasks.errors import ConfigError
from tasks.subsets import TrainSize, subset_ids, train_subset

from .conftest import sweep_config

FRACTIONS = [0.1, 0.5, 1.0]


def _train_rows(root, name="nih14"):
    from tasks.datasets import get_dataset

    idx = get_dataset(name, root).index()
    tr = idx[idx["split"] == "train"].reset_index(drop=True)
    return tr, np.array(tr["target"].tolist(), dtype=np.int64)


def test_subsets_are_nested_stratified_and_patient_level(synth_roots):
    from tasks.datasets.nih14 import NIH14

    tr, Y = _train_rows(synth_roots["nih14"])
    pats = tr["patient_id"].tolist()
    for seed in (0, 1):
        masks = [train_subset(pats, Y, TrainSize(f), seed, NIH14.classes, "multilabel").mask for f in FRACTIONS]
        for small, big in zip(masks, masks[1:], strict=False):
            assert not (small & ~big).any()  # nested
        assert masks[-1].all()
        for m in masks:  # patient-level: a patient's cases are all in, or all out
            assert tr.assign(m=m).groupby("patient_id")["m"].nunique().max() == 1
        # stratified: each class's share of positive patients is near the fraction
        n_pat = tr["patient_id"].nunique()
        half = train_subset(pats, Y, TrainSize(0.5), seed, NIH14.classes)
        assert half.n_patients == round(0.5 * n_pat)
        pos = tr.assign(y=list(Y > 0), m=half.mask).groupby("patient_id").agg(
            m=("m", "first"), y=("y", lambda v: np.any(np.stack(v.tolist()), axis=0)))
        Yp, mp = np.stack(pos["y"].tolist()), pos["m"].to_numpy()
        for j in np.flatnonzero(Yp.sum(0) >= 10):
            assert abs(Yp[mp, j].sum() / Yp[:, j].sum() - 0.5) < 0.2, NIH14.classes[j]
    # another seed draws another subset; the row order of the input does not matter
    a = train_subset(pats, Y, TrainSize(0.1), 0, NIH14.classes)
    assert not np.array_equal(a.mask, train_subset(pats, Y, TrainSize(0.1), 1, NIH14.classes).mask)
    rev = train_subset(pats[::-1], Y[::-1], TrainSize(0.1), 0, NIH14.classes)
    assert np.array_equal(a.mask, rev.mask[::-1])
    # a small fraction still sees one positive patient of every class present
    assert all(v > 0 for c, v in a.positives.items() if Y[:, NIH14.classes.index(c)].any())


def test_shots_per_class_are_nested():
    rng = np.random.default_rng(0)
    pats = [f"p{i // 2}" for i in range(300)]
    Y = (rng.random((300, 1)) < 0.3).astype(int)
    masks = [train_subset(pats, Y, TrainSize(shots=k), 0, ["pos"], "binary").mask for k in (1, 4, 16)]
    for small, big in zip(masks, masks[1:], strict=False):
        assert not (small & ~big).any()
    one = train_subset(pats, Y, TrainSize(shots=4), 0, ["pos"], "binary")
    assert one.n_patients == 8 and one.positives["pos"] >= 4  # 4 positive and 4 negative patients
    ids = [f"c{i}" for i in range(300)]
    assert subset_ids(ids, pats, Y, TrainSize(shots=4), 0, ["pos"], "binary") == [
        c for c, k in zip(ids, one.mask, strict=True) if k]


def test_grid_and_cell_ids(synth_roots, tmp_path):
    cfg = parse_config(sweep_config(tmp_path, synth_roots, grid={"train_fractions": FRACTIONS}))
    cells, _ = plan_cells(cfg)
    assert cfg.n_cells() == len(cells) == 8 * 3
    ids = {c.cell_id for c in cells}
    assert "nih14__linear_probe__test_vit_tiny16__32px__s0" in ids  # the whole split keeps the old id
    # kNN ignores the seed on the whole split (one seed-free cell), not on a subset drawn by the seed.
    assert "nih14__knn__test_vit_tiny16__32px__seedfree" in ids
    assert "nih14__knn__test_vit_tiny16__32px__s0__f0.1" in ids
    assert Cell("e", 1, "d", "p", 0, train_shots=4).cell_id.endswith("__k4")
    with pytest.raises(ConfigError, match="one data axis"):
        parse_config(sweep_config(tmp_path, synth_roots, grid={"train_fractions": [0.5, 1.0], "train_shots": [4]}))
    with pytest.raises(ConfigError, match=r"\(0, 1\]"):
        parse_config(sweep_config(tmp_path, synth_roots, grid={"train_fractions": [0.0, 1.0]}))


def _curve(enc, params, x, y, reps=None):
    key = CurveKey("d", "p", "auc", "", "train cases", f"{enc} @ 32 px")
    n = len(x)
    return DataCurve(key, enc, 32, params, ["s"] * n, np.array(x, float), np.array(y, float), reps,
                     np.full(n, np.nan), np.full(n, np.nan), 1)


def test_labels_saved_is_the_horizontal_distance_between_data_curves():
    assert cases_to_reach(np.array([10.0, 100.0]), np.array([0.6, 0.8]), 0.7) == pytest.approx((10 ** 1.5, ""))
    small = _curve("s", 1, [10, 100, 1000], [0.60, 0.70, 0.80])
    large = _curve("l", 2, [10, 100, 1000], [0.70, 0.80, 0.85])
    r = labels_saved(small, large)  # the large one reaches 0.80 at 100 cases: 900 saved, 10x fewer
    assert r["labels_saved"] == pytest.approx(900) and r["ratio"] == pytest.approx(10) and r["bound"] == ""
    assert labels_saved(small, _curve("l", 2, [10, 100, 1000], [0.85, 0.9, 0.9]))["bound"] == ">="
    assert labels_saved(small, _curve("l", 2, [10, 100, 1000], [0.5, 0.6, 0.7]))["bound"] == "none"


def test_a_data_axis_sweep_embeds_once_and_is_analysed(ray_session, synth_roots, tmp_path, one_torch_thread):
    from orchestrator.analyze import analyze
    from tasks.datasets.nih14 import NIH14

    raw = sweep_config(tmp_path, {"nih14": synth_roots["nih14"]},
                       grid={"protocols": ["linear_probe"], "seeds": [0, 1], "train_fractions": FRACTIONS})
    cfg = parse_config(raw)
    outcome = run_sweep(cfg)
    assert len(outcome.cells) == 2 * 2 * 3 and set(outcome.cells.values()) == {"FINISHED"}
    assert outcome.n_encoded == 2 * 200  # two resolutions x 200 images: each image embedded once

    client = MlflowClient(cfg.resolved_tracking_uri)
    exp = client.get_experiment_by_name(cfg.name)
    runs = client.search_runs([exp.experiment_id], "tags.`medscale.kind` = 'cell'")
    tr, Y = _train_rows(synth_roots["nih14"])
    n_by = {}
    for r in runs:
        p = r.data.params
        f, seed = float(p["train_fraction"]), int(p["seed"])
        expect = train_subset(tr["patient_id"].tolist(), Y, TrainSize(f), seed, NIH14.classes)
        assert int(p["n_train_cases"]) == expect.n_cases == int(r.data.metrics["n_train"])
        assert int(p["n_train_pos_Effusion"]) == expect.positives["Effusion"]
        n_by[(int(p["resolution"]), seed, f)] = expect.n_cases
    for (res, seed, f), n in n_by.items():  # fewer cases for a smaller fraction, the same at each resolution
        assert n == n_by[(32, seed, f)]
        if f < 1.0:
            assert n < n_by[(res, seed, FRACTIONS[FRACTIONS.index(f) + 1])]

    out = tmp_path / "analysis"
    result = analyze(config=None, tracking_uri=cfg.resolved_tracking_uri, experiments=[cfg.name], out=str(out),
                     n_boot=200, log=False)
    dx = result["data_axis"]
    assert {(c.encoder, c.resolution) for c in dx["curves"] if c.key.metric == "auc"} == {
        ("test_vit_tiny16", 32), ("test_vit_tiny16", 48)}
    v = pd.read_csv(out / "data_verdicts.csv")
    assert len(v) == len(dx["curves"]) and v["verdict"].notna().all()
    auc = v[v["metric"] == "auc"]
    assert (auc["sizes"] == "f0.1 f0.5 all").all()
    assert dx["plots"] and all((out / "plots" / p.split("/")[-1]).exists() for p in dx["plots"])
    assert "Training-set size" in (out / "report.md").read_text()
    # the other axes see only the full-data cells: resolution curves of two points, not six
    main = pd.read_csv(result["verdicts"])
    assert (main["x"].str.split().str.len() <= 2).all()


def test_analysis_of_points_compares_two_encoders_data_curves(tmp_path):
    from analysis.data_axis import analyze_data_axis

    rng = np.random.default_rng(0)
    rows = []
    for enc, params, lift in (("small", 2e7, 0.0), ("large", 3e8, 0.04)):
        for f, n in ((0.1, 20), (0.5, 100), (1.0, 200)):
            for seed in range(4):
                auc = 0.6 + 0.05 * np.log10(n) + lift + rng.normal(0, 0.003)
                rows.append({"dataset": "d", "protocol": "linear_probe", "metric": "auc", "encoder": enc,
                             "params": params, "gflops": 1.0, "resolution": 224, "seed": seed, "value": auc,
                             "weights": "hub", "task": "binary", "train_fraction": f, "train_shots": 0,
                             "n_train": float(n)})
    res = analyze_data_axis(pd.DataFrame(rows), tmp_path, n_boot=200)
    v = res["verdict_table"]
    assert len(v) == 2 and set(v["verdict"]) == {"scales"}  # each curve rises with the data
    s = res["savings"].iloc[0]
    assert (s["smaller"], s["larger"]) == ("small", "large") and s["bound"] == ""
    # the large encoder reaches the small one's full-data AUC at 200 / 10**(0.04/0.05) = 32 cases
    assert s["labels_saved"] == pytest.approx(168, abs=15) and s["saved_lo"] <= s["labels_saved"] <= s["saved_hi"]
    assert (tmp_path / "labels_saved.csv").exists() and "cases saved" in res["markdown"]


def _subset_rows(train_col: str) -> pd.DataFrame:
    """Two encoders x 3 seeds x train sizes 40/100/200 cases; the AUC rises with the cases."""
    rows = []
    for enc, params in (("vit_s", 2e7), ("vit_l", 3e8)):
        for n in (40, 100, 200):
            size = n if train_col == "train_size" else n / 200
            for seed in range(3):
                base = {"dataset": "d", "protocol": "linear_probe", "encoder": enc, "params": params, "gflops": "",
                        "resolution": 224, "seed": seed, train_col: size}
                rows += [{**base, "metric": "auc", "value": 0.6 + 0.05 * np.log10(n) + 0.001 * seed},
                         {**base, "metric": "n_train", "value": float(n)}]
    return pd.DataFrame(rows)


@pytest.mark.parametrize("train_col", ["train_size", "train_fraction"])
def test_a_points_csv_keeps_its_train_sizes_apart(tmp_path, train_col):
    from analysis.data_axis import analyze_data_axis, full_data, has_data_axis
    from analysis.points import aggregate, read_points_csv

    path = tmp_path / "points.csv"
    _subset_rows(train_col).to_csv(path, index=False)
    df = read_points_csv(path)
    assert has_data_axis(df)
    assert df.groupby("train_fraction")["n_train"].first().to_dict() == {0.2: 40.0, 0.5: 100.0, 1.0: 200.0}
    # the whole-split point is its own seeds' mean, not averaged with the subsets'
    auc = aggregate(full_data(df)).query("metric == 'auc'")
    assert np.allclose(auc["mean"], 0.6 + 0.05 * np.log10(200) + 0.001)
    v = analyze_data_axis(df, tmp_path / "out", n_boot=50)["verdict_table"]
    assert len(v) == 2 and set(v["verdict"]) == {"scales"}
    # without counts there is no x: no curve, and the report says why
    uncounted = df[df["metric"] != "n_train"].drop(columns="n_train")
    res = analyze_data_axis(uncounted, tmp_path / "none", n_boot=50)
    assert not res["curves"] and "no training-case counts" in res["markdown"]


@pytest.mark.parametrize(("column", "value", "why"), [("train_fraction", "1.5", "in (0, 1]"),
                                                       ("train_shots", "2.5", "whole number"),
                                                       ("train_size", "-3", "must be")])
def test_a_points_csv_with_a_bad_train_size_is_refused_by_file_column_and_row(tmp_path, column, value, why):
    from analysis.points import read_points_csv

    df = _subset_rows("train_fraction")
    if column == "train_size":
        df = df.rename(columns={"train_fraction": "train_size"})
    df[column] = df[column].astype(object) if column in df.columns else pd.Series(0, index=df.index, dtype=object)
    df.loc[3, column] = value
    path = tmp_path / "bad.csv"
    df.to_csv(path, index=False)
    with pytest.raises(ConfigError, match=rf"bad.csv: column '{column}'.*{re.escape(why)}.*row 4 \(line 5\)"):
        read_points_csv(path)
