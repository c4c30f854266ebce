"""analysis/: points CSV validation, aggregation, plots, report; `medscale analyze --points` end to end.

Fast: points are built by hand (no Ray, no MLflow). Expected values are recomputed from the data.
The verdicts, fits and the MLflow and reference inputs are tested in test_analysis_pipeline.py.
"""

from __future__ import annotations

import math
import re
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from scipy import stats

from analysis.figures import DPI, forest_size, grid_size
from analysis.points import POINT_COLUMNS, aggregate, read_points_csv
from analysis.report import analyze_points
from tasks.errors import ConfigError

ENCODERS = {"dinov3_vits16": 21_600_000, "dinov3_vitb16": 85_600_000, "dinov3_vitl16": 303_100_000}
KINDS = ("fig1", "params", "heatmap", "gflops")
KEY = ["dataset", "protocol", "metric", "encoder", "resolution"]


def make_points(seeds=(0, 1, 2), weights: str = "hub", metrics=("auc", "acc", "fit_s"),
                datasets=("nih14",), protocols=("linear_probe",), resolutions=(224, 512), seed: int = 0) -> pd.DataFrame:
    """A grid of points with a clear but noisy trend, as load_points returns them."""
    rng = np.random.default_rng(seed)
    rows = []
    for ds in datasets:
        for proto in protocols:
            for enc, p in ENCODERS.items():
                for res in resolutions:
                    for s in seeds:
                        for m in metrics:
                            base = 0.7 + 0.01 * math.log(p / 2e7) - 0.00002 * abs(res - 400)
                            rows.append({"experiment": "t", "run_id": f"{ds}-{proto}-{enc}-{res}-{s}",
                                         "dataset": ds, "protocol": proto, "metric": m, "encoder": enc,
                                         "params": p, "gflops": p * 2 * (res / 16) ** 2 / 1e9,
                                         "resolution": res, "seed": s, "weights": weights,
                                         "value": base + rng.normal(0, 0.01)})
    return pd.DataFrame(rows)


@pytest.fixture(scope="module")
def analysed(tmp_path_factory):
    # Names as tasks.metrics and cells.py log them: main metrics, a secondary one, bookkeeping.
    df = make_points(metrics=("auc", "acc", "precision_macro", "n_cases", "fit_s"))
    out = tmp_path_factory.mktemp("analysis")
    return df, out, analyze_points(df, out, title="test analysis")


# -- plots -------------------------------------------------------------------------------------------
def test_every_plot_decodes_at_the_expected_size(analysed):
    _, out, res = analysed
    plots = [Path(p) for p in res["plots"]]
    # One figure per kind for the one protocol, with a panel for auc and one for acc (precision_macro
    # is secondary, n_cases / fit_s bookkeeping: not plotted), and the forest plot; PNG + SVG each.
    stems = [f"{k}__linear_probe" for k in KINDS] + ["forest"]
    assert sorted(p.name for p in plots) == sorted(f"{s}.{ext}" for s in stems for ext in ("png", "svg"))
    n_curves = len(res["study"].curves)  # per metric: 2 params (one per resolution) + 3 resolution + 1 GFLOPs
    assert n_curves == 2 * 6
    sizes = {s: grid_size(2) for s in stems[:-1]} | {"forest": forest_size(n_curves)}
    for p in plots:
        assert p.is_file() and p.parent == out / "plots"
        w, h = sizes[p.stem]
        if p.suffix == ".png":
            with Image.open(p) as im:
                im.verify()
            with Image.open(p) as im:
                assert im.format == "PNG" and im.size == (round(w * DPI), round(h * DPI))
        else:
            root = ET.parse(p).getroot()
            assert root.tag.endswith("svg")
            assert root.get("width") == f"{w * 72:g}pt"
            text = p.read_text()
            assert "RANDOM-INIT" not in text
    text = {p.stem: p.read_text() for p in plots if p.suffix == ".svg"}
    assert "input resolution (px)" in text["fig1__linear_probe"] and "dinov3_vitb16" in text["fig1__linear_probe"]
    assert "parameters" in text["params__linear_probe"] and "vitb16" in text["params__linear_probe"]
    assert "Pareto frontier" in text["gflops__linear_probe"]


# -- summary -----------------------------------------------------------------------------------------
def test_summary_equals_groupby_over_seeds(analysed):
    df, _, res = analysed
    summary = pd.read_csv(res["summary"])
    g = df.groupby(KEY)["value"]
    expect = pd.DataFrame({"mean": g.mean(), "std": g.std(), "n": g.size()}).reset_index()
    merged = summary.merge(expect, on=KEY, suffixes=("", "_expect"), validate="one_to_one")
    assert len(merged) == len(expect) == len(summary)
    np.testing.assert_allclose(merged["mean"], merged["mean_expect"], rtol=0, atol=1e-12)
    np.testing.assert_allclose(merged["std"], merged["std_expect"], rtol=1e-9)
    assert (merged["n"] == merged["n_expect"]).all() and (merged["n"] == 3).all()
    # metrics that get curves carry the bootstrap's interval, the others a t-interval over seeds
    boot = merged["metric"].isin(["auc", "acc"]).to_numpy()
    assert (merged.loc[boot, "ci_method"] == "bootstrap seeds-parametric").all()
    assert (merged.loc[~boot, "ci_method"] == "t over seeds").all()
    assert ((merged["ci_lo"] < merged["mean"]) & (merged["mean"] < merged["ci_hi"])).all()
    t = merged[~boot]
    half = stats.t.ppf(0.975, 2) * t["std"] / math.sqrt(3)
    np.testing.assert_allclose(t["ci_lo"], t["mean"] - half, rtol=1e-9)
    np.testing.assert_allclose(t["ci_hi"], t["mean"] + half, rtol=1e-9)
    assert set(summary["metric"]) == {"auc", "acc", "precision_macro", "n_cases", "fit_s"}  # all kept


def test_aggregate_counts_seeds_not_duplicate_rows():
    df = make_points(seeds=(0,), metrics=("auc",))
    agg = aggregate(pd.concat([df, df.assign(experiment="again")]))
    assert (agg["n"] == 1).all() and agg["std"].isna().all() and agg["ci_lo"].isna().all()
    assert len(agg) == len(df)


def test_aggregate_keeps_weights_kinds_apart():
    df = pd.concat([make_points(weights="hub", metrics=("auc",)),
                    make_points(weights="random", metrics=("auc",), seed=1)])
    agg = aggregate(df)
    assert len(agg) == len(df.drop_duplicates(KEY + ["weights"]))
    assert set(agg["weights"]) == {"hub", "random"}


# -- report ------------------------------------------------------------------------------------------
def _table(report: str, heading: str) -> dict[tuple[str, int], str]:
    """The markdown table after `heading` as {(encoder, resolution): cell text}."""
    lines = report.split(heading, 1)[1].strip().splitlines()
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    resolutions = [int(c.removesuffix(" px")) for c in header[2:]]
    cells = {}
    for line in lines[2:]:
        if not line.startswith("|"):
            break
        parts = [c.strip() for c in line.strip("|").split("|")]
        for r, text in zip(resolutions, parts[2:], strict=True):
            cells[(parts[0], r)] = text
    return cells


def test_report_table_marks_best_bold_and_second_underlined(analysed):
    df, out, res = analysed
    report = Path(res["report"]).read_text()
    assert "**18 runs** (90 metric values)" in report
    cells = _table(report, "### nih14 / linear_probe: AUC")
    means = df[df["metric"] == "auc"].groupby(["encoder", "resolution"])["value"].mean().round(4)
    order = means.sort_values(ascending=False).index
    assert len(cells) == len(means) == 6
    for key, text in cells.items():
        if key == order[0]:
            assert re.fullmatch(r"\*\*0\.\d{4} ± 0\.\d{4}\*\*", text), text
        elif key == order[1]:
            assert re.fullmatch(r"<u>0\.\d{4} ± 0\.\d{4}</u>", text), text
        else:
            assert "**" not in text and "<u>" not in text
        assert f"{means[key]:.4f}" in text
    # What was read, other metrics, embedded plots with links relative to the report.
    assert "**18 runs**" in report and "dinov3_vitl16 (303.1M params)" in report
    assert "input resolutions (px): 224, 512" in report and "seeds: 0, 1, 2" in report
    assert "Also judged and plotted (below and in `summary.csv`): `acc`." in report
    # every metric without curves is named, with why
    assert "- `nih14 / linear_probe / precision_macro`: not a headline metric" in report
    assert "- `nih14 / linear_probe / fit_s`: bookkeeping" in report and "/ n_cases`: bookkeeping" in report
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", report)
    assert links == [f"plots/{k}__linear_probe.png" for k in KINDS] + ["plots/forest.png"]
    assert all((out / link).is_file() for link in links)
    assert "RANDOM-INIT" not in report and "one seed: no spread is available" not in report


def test_one_seed_random_init_report_says_so(tmp_path):
    df = make_points(seeds=(0,), weights="random", metrics=("auc",), datasets=("nih14", "rsna_pneumonia"))
    res = analyze_points(df, tmp_path, title="demo")
    report = Path(res["report"]).read_text()
    assert "RANDOM-INIT weights" in report and "**RANDOM**" in report
    assert "one seed: no spread is available" in report
    for ds in ("nih14", "rsna_pneumonia"):
        cells = _table(report, f"### {ds} / linear_probe: AUC")
        assert not any("±" in c for c in cells.values())
        assert sum(c.startswith("**") for c in cells.values()) == 1
    svgs = [p for p in res["plots"] if Path(p).suffix == ".svg"]
    assert len(svgs) == 5 and all("RANDOM-INIT weights" in Path(p).read_text() for p in svgs)
    # one seed, no predictions: nothing to bootstrap, so every verdict says it has no interval
    assert all(v.no_ci for v in res["study"].verdicts.values())


def test_lower_is_better_metric_flips_best():
    from analysis.report import rank_marks

    marks = rank_marks(pd.Series([3.0, 1.0, 2.0]), higher=False)
    assert list(marks) == ["", "best", "second"]


# -- points CSV ---------------------------------------------------------------------------------------
def test_read_points_csv_round_trip(tmp_path):
    df = make_points(seeds=(0, 1), metrics=("auc",))
    path = tmp_path / "points.csv"
    df.to_csv(path, index=False)
    back = read_points_csv(path)
    assert list(back.columns[: len(POINT_COLUMNS)]) == POINT_COLUMNS
    assert back["params"].dtype == "int64" and back["resolution"].dtype == "int64"
    np.testing.assert_allclose(back["value"], df["value"])
    assert set(back["weights"]) == {"hub"}


@pytest.mark.parametrize(("mutate", "column", "row"), [
    (lambda d: d.drop(columns=["value"]), "value", None),
    (lambda d: d.drop(columns=["seed", "gflops"]), "gflops", None),
    (lambda d: d.astype({"value": object}).assign(value=lambda x: x["value"].where(x.index != 2, "n/a")),
     "value", "row 3 (line 4)"),
    (lambda d: d.astype({"resolution": object}).assign(
        resolution=lambda x: x["resolution"].where(x.index != 0, "224px")), "resolution", "row 1 (line 2)"),
    (lambda d: d.assign(seed=lambda x: x["seed"] + 0.5), "seed", "row 1"),
    (lambda d: d.assign(encoder=lambda x: x["encoder"].where(x.index != 1, "")), "encoder", "row 2"),
])
def test_read_points_csv_rejects_bad_files(tmp_path, mutate, column, row):
    path = tmp_path / "bad.csv"
    mutate(make_points(seeds=(0,), metrics=("auc",))).to_csv(path, index=False)
    with pytest.raises(ConfigError) as e:
        read_points_csv(path)
    msg = str(e.value)
    assert str(path) in msg and f"'{column}'" in msg
    if row:
        assert row in msg


def test_read_points_csv_reads_headers_as_people_write_them(tmp_path):
    df = make_points(seeds=(0, 1), metrics=("auc",))
    path = tmp_path / "headers.csv"
    df.rename(columns={"gflops": "GFLOPs", "params": "Params", "resolution": " Resolution "}).to_csv(path, index=False)
    back = read_points_csv(path)
    np.testing.assert_allclose(back["gflops"], df["gflops"])
    assert list(back.columns[: len(POINT_COLUMNS)]) == POINT_COLUMNS
    # two headers that read as one column: refused, naming it
    df.assign(GFLOPS=df["gflops"]).to_csv(path, index=False)
    with pytest.raises(ConfigError, match=r"headers\.csv: more than one column reads as 'gflops'"):
        read_points_csv(path)


def test_read_points_csv_reads_params_in_millions(tmp_path):
    df = make_points(seeds=(0, 1), metrics=("auc",))
    path = tmp_path / "millions.csv"
    df.assign(params=df["params"] / 1e6).to_csv(path, index=False)
    back = read_points_csv(path)
    np.testing.assert_array_equal(back["params"], df["params"].round())
    assert back["params"].dtype == "int64" and "millions" in back.attrs["read_as"][0]
    counts = tmp_path / "counts.csv"
    df.to_csv(counts, index=False)
    assert read_points_csv(counts).attrs["read_as"] == []  # counts are read as they are


def test_read_points_csv_allows_empty_gflops_and_rejects_missing_file(tmp_path):
    path = tmp_path / "p.csv"
    make_points(seeds=(0,), metrics=("auc",)).assign(gflops="").drop(columns=["weights"]).to_csv(path, index=False)
    df = read_points_csv(path)
    assert df["gflops"].isna().all() and "weights" not in df
    with pytest.raises(ConfigError, match="no such points file"):
        read_points_csv(tmp_path / "absent.csv")


# -- end to end ---------------------------------------------------------------------------------------
def test_orchestrator_analyze_and_cli_on_a_points_csv(tmp_path, capsys):
    from orchestrator.analyze import analyze
    from orchestrator.cli import main

    path = tmp_path / "points.csv"
    make_points(seeds=(0, 1), metrics=("auc",)).to_csv(path, index=False)
    res = analyze(points=str(path), out=str(tmp_path / "a"))
    assert Path(res["report"]).is_file() and Path(res["summary"]).is_file() and len(res["plots"]) == 10
    assert "analysed 12 runs" in capsys.readouterr().out

    assert main(["analyze", "--points", str(path), "--out", str(tmp_path / "b")]) == 0
    assert (tmp_path / "b" / "report.md").is_file()
    assert (tmp_path / "b" / "plots" / "params__linear_probe.png").is_file()
    (tmp_path / "bad.csv").write_text("dataset,protocol\nnih14,knn\n")
    assert main(["analyze", "--points", str(tmp_path / "bad.csv"), "--out", str(tmp_path / "c")]) == 2
    assert "bad.csv" in capsys.readouterr().err


# -- edges (issue 16) ----------------------------------------------------------------------------------
def test_points_unit_column_sets_the_margin_and_bad_units_are_named(tmp_path):
    from orchestrator.analyze import analyze

    df = make_points(seeds=(0, 1, 2), metrics=("dice",)).assign(unit="percent")
    df["value"] = df["value"] * 100
    path = tmp_path / "p.csv"
    df.to_csv(path, index=False)
    back = read_points_csv(path)
    assert set(back["unit"]) == {"percent"}
    res = analyze(points=str(path), out=str(tmp_path / "out"), n_boot=200)
    v = pd.read_csv(res["verdicts"])
    assert (v["margin"] == 0.5).all() and (v["unit"] == "percent").all()
    df.assign(unit=lambda d: d["unit"].where(d.index != 3, "per-mille")).to_csv(path, index=False)
    with pytest.raises(ConfigError, match=r"'unit'.*row 4 \(line 5\)"):
        read_points_csv(path)


def test_every_metric_of_a_points_file_is_judged_or_named(tmp_path):
    from orchestrator.analyze import analyze

    path = tmp_path / "p.csv"
    make_points(seeds=(0, 1, 2), metrics=("auc", "accuracy", "dice", "hd95", "fit_s")).to_csv(path, index=False)
    res = analyze(points=str(path), out=str(tmp_path / "out"), n_boot=200)
    v = pd.read_csv(res["verdicts"])
    assert set(v["metric"]) == {"auc", "accuracy", "dice", "hd95"}
    assert (v.loc[v["metric"] == "hd95", "sign"] == -1).all()  # one direction table: HD95 is lower-is-better
    report = Path(res["report"]).read_text()
    assert "- `nih14 / linear_probe / fit_s`: bookkeeping" in report


def test_a_study_without_curves_writes_csvs_with_headers(tmp_path):
    df = make_points(seeds=(0, 1), metrics=("auc",), resolutions=(224,))
    df = df[df["encoder"] == "dinov3_vits16"]  # one cell: nothing to compare
    res = analyze_points(df, tmp_path, title="empty")
    v, f = pd.read_csv(res["verdicts"]), pd.read_csv(res["fits"])
    assert v.empty and {"dataset", "metric", "axis", "verdict", "kind", "p_adj", "var_share_seeds"} <= set(v.columns)
    assert f.empty and "form" in f.columns
    assert "no curve" in Path(res["report"]).read_text()


def test_seed_free_column_makes_cells_one_value(tmp_path):
    df = make_points(seeds=(0, 1, 2), metrics=("auc",), resolutions=(224, 384, 512))
    df["seed_free"] = True  # e.g. kNN: the runs say the seed does not enter
    path = tmp_path / "p.csv"
    df.to_csv(path, index=False)
    back = read_points_csv(path)
    assert back["seed_free"].all()
    res = analyze_points(back, tmp_path / "out", title="knn", every_metric=True)
    v = pd.read_csv(res["verdicts"])
    assert (v["kind"] == "ordering").all() and v["label"].str.startswith("order: ").all()
    assert "gave one value for every seed" in Path(res["report"]).read_text()


def test_metric_table_is_one_place_for_direction_margin_and_label():
    from analysis.metric_table import axis_label, higher_is_better, margin_for

    for m in ("hd95", "asd", "voi", "voi_split", "voi_merge", "arand", "folding", "folding_share", "hd95_lv",
              "identity_hd95", "identity_folding_share"):
        assert not higher_is_better(m), m
    for m in ("dice", "auc", "binary_iou", "dice_polyp"):
        assert higher_is_better(m), m
    assert margin_for("dice", "percent") == 0.5 and margin_for("hd95", "percent") == 0.5
    assert margin_for("voi_split") == 0.05 and margin_for("folding_share") == 0.001
    assert axis_label("hd95", "mm") == "HD95 (mm)  ↓ lower is better"
    assert axis_label("dice", "percent") == "Dice (%)  ↑ higher is better"


def test_a_points_csv_in_percent_is_judged_as_the_same_study_in_fractions(tmp_path):
    from analysis.adaptive.replay import full_grid_verdicts
    from analysis.adaptive.synthetic import generate_study

    df, _ = generate_study(seed=0, n_datasets=1, protocols=("linear_probe",))
    pct = df.assign(value=df["value"].where(df["metric"] == "n_test", df["value"] * 100))
    paths = {name: tmp_path / f"{name}.csv" for name in ("fraction", "percent")}
    df.to_csv(paths["fraction"], index=False)
    pct.to_csv(paths["percent"], index=False)
    frac, per = read_points_csv(paths["fraction"]), read_points_csv(paths["percent"])
    assert frac.attrs["percent_metrics"] == [] and per.attrs["percent_metrics"] == ["acc", "auc", "f1_macro"]
    assert set(per.loc[per["metric"] == "n_test", "unit"]) == {""}  # a count is no percentage
    verdicts = full_grid_verdicts(frac)
    assert full_grid_verdicts(per) == verdicts and len(verdicts) == 30
    # judged at a fraction's margin instead, the same study reads differently
    assert full_grid_verdicts(per.drop(columns="unit")) != verdicts


@pytest.mark.parametrize(("name", "higher", "label"), [("AUROC", True, "AUC"), ("Accuracy", True, "accuracy"),
                                                        ("HD95", False, "HD95"), ("Val_Dice", True, "Val_Dice")])
def test_metric_names_are_read_case_blind_and_by_their_common_aliases(name, higher, label):
    from analysis.metric_table import margin_for, metric_info
    from analysis.points import headline_metric

    info = metric_info(name)
    assert (info.higher, info.label) == (higher, label)
    if label in ("AUC", "accuracy"):  # an alias leads a summary as its own name would
        assert headline_metric(["f1_macro", name, "precision"]) == name
        assert headline_metric([name, "auc", "acc"]) == "auc"
    # in percent: a fraction score's 0.005 x 100; HD95's 0.5 px is on its own scale, whatever the unit
    assert margin_for(name, "percent") == pytest.approx(0.5)
    assert margin_for(name) == pytest.approx(0.005 if higher else 0.5)
