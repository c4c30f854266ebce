"""`report.md`, `report.html`, `summary.csv`, `verdicts.csv`, `fits.csv` and the plots of one analysis.

The report says what was read, what it cannot show (spread with one seed, meaning with random-init
weights, intervals from a table), the verdict per curve with the numbers behind it, the results
in the paper's table style, the selected fits, the verdict rules quoted from `analysis.verdict`,
and the figures. `analyze_points` is the one entry point; `orchestrator.analyze` feeds it.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

import analysis.verdict as verdict_module
from analysis.document import Document
from analysis.figures import CAPTIONS, Plot, all_figures
from analysis.plots import metric_label
from analysis.points import check_points, is_performance_metric, metric_order, weights_kinds
from analysis.study import Study, build_study, fits_frame, verdict_frame
from analysis.tables import (  # noqa: F401  (rank_marks: part of this module's interface since v1)
    fits_table,
    headline_table,
    rank_marks,
    reference_table,
    verdict_table,
)
from analysis.verdict import VERDICTS
from tasks.errors import ConfigError


def analyze_points(df: pd.DataFrame, out_dir: Path, title: str, *, predictions: dict | None = None,
                   n_boot: int = 1000, seed: int = 0, reference: bool = False) -> dict:
    """Analyse points (per-case `predictions` by run id, if any) into `out_dir`.

    Returns {"report", "html", "summary", "verdicts", "fits": Path, "plots": [Path], "figures":
    [Plot], "study": Study}. `reference`: the points are a publication's tables (every metric
    judged, no intervals).
    """
    check_points(df)
    if df.empty:
        raise ConfigError("no points to analyse")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    study = build_study(df, predictions=predictions, n_boot=n_boot, seed=seed, reference=reference)
    paths = {"summary": out_dir / "summary.csv", "verdicts": out_dir / "verdicts.csv", "fits": out_dir / "fits.csv"}
    study.agg.to_csv(paths["summary"], index=False)
    verdict_frame(study).to_csv(paths["verdicts"], index=False)
    fits_frame(study).to_csv(paths["fits"], index=False)
    figures = all_figures(study, out_dir / "plots")
    doc = build_document(study, figures, out_dir, title)
    report, page = out_dir / "report.md", out_dir / "report.html"
    report.write_text(doc.markdown(), encoding="utf-8")
    page.write_text(doc.html(), encoding="utf-8")
    plots = [p for f in figures for p in (f.png, f.svg)]
    return {"report": report, "html": page, **paths, "plots": plots, "figures": figures, "study": study}


# -- sections --------------------------------------------------------------------------------------
def _n_runs(df: pd.DataFrame) -> int:
    if "run_id" in df.columns and df["run_id"].astype(str).str.len().gt(0).all():
        return int(df["run_id"].nunique())
    cols = ["dataset", "protocol", "encoder", "resolution", "seed"] + (["weights"] if "weights" in df else [])
    return len(df[cols].drop_duplicates())


def _read_section(doc: Document, study: Study) -> None:
    df, agg = study.points, study.agg
    kinds = weights_kinds(df)
    enc = agg[["encoder", "params"]].drop_duplicates().sort_values(["params", "encoder"])
    res = sorted(int(r) for r in df["resolution"].unique())
    doc.heading("What was read")
    if study.reference:
        tables = list(dict.fromkeys(df["table"])) if "table" in df.columns else []
        items = [f"**{len(df)} published values** from {', '.join(tables)} (DINOv3 rows; baselines are no "
                 "point on a DINOv3 scaling curve and were not transcribed)"]
    else:
        items = [f"**{_n_runs(df)} runs** ({len(df)} metric values)"]
        if "experiment" in df.columns:
            items.append(f"experiments: {', '.join(sorted(map(str, df['experiment'].unique())))}")
    items += [f"datasets: {', '.join(sorted(map(str, df['dataset'].unique())))}",
              f"protocols: {', '.join(sorted(map(str, df['protocol'].unique())))}",
              "encoders: " + ", ".join(f"{e} ({p / 1e6:.1f}M params)" for e, p in enc.itertuples(index=False)),
              "input resolutions (px): " + (", ".join(str(r) if r > 0 else "not stated" for r in res))]
    if not study.reference:
        items += [f"seeds: {', '.join(str(int(s)) for s in sorted(df['seed'].unique()))}",
                  "weights: " + (", ".join(f"**{k.upper()}**" if k == "random" else k for k in kinds)
                                 if kinds else "not recorded")]
    doc.bullets(items)


def _caveats(doc: Document, study: Study) -> None:
    df, agg = study.points, study.agg
    notes = []
    kinds = weights_kinds(df)
    if len(kinds) > 1:
        notes.append(f"The data mixes weights kinds ({', '.join(kinds)}); they are kept apart as separate "
                     "models, never averaged together.")
    methods = {g.method for g in study.groups}
    if study.reference:
        def tables(mask) -> str:
            return ", ".join(dict.fromkeys(df.loc[mask, "table"])) or "none"
        notes.append("Published numbers have **no intervals**: each curve is fitted as given and its verdict is "
                     "marked [no CI] (any change beyond the margin counts). Where a table prints ± "
                     f"({tables(df['spread'].notna())}) it is a standard deviation over cases, not the "
                     "uncertainty of a mean, so it is shown, not used. Input resolutions are known only where the "
                     f"paper states them ({tables(df['resolution'] > 0)}); resolution curves the paper gives only "
                     "as a figure (its Figure 1) cannot be read off the text and are not reproduced.")
    elif int(agg["n"].max()) == 1 and "cases+seeds" not in methods:
        notes.append("Every cell has **one seed: no spread is available**. Tables show single values without ±, "
                     "plots have no bands, and every verdict is marked [no CI].")
    elif methods <= {"none"}:
        notes.append("No bootstrap was run (--n-boot 0): ± in the tables is the std over seeds, the verdicts "
                     "are marked [no CI].")
    else:
        n_lo, n_hi = int(agg["n"].min()), int(agg["n"].max())
        seeds = f"{n_lo} seed(s) per cell" if n_lo == n_hi else f"{n_lo} to {n_hi} seeds per cell"
        if "cases+seeds" in methods:
            cases = "; ".join(sorted({n for g in study.groups for n in g.notes if n.endswith("test cases")}))
            how = f"a paired bootstrap of the test cases (one draw for every cell of a dataset; {cases})" + (
                ", then of the seeds" if n_hi > 1 else "; with one seed, seed-to-seed variation is not included")
        else:
            how = ("a bootstrap over seeds (paired across cells; test-set sampling error is not included: no "
                   "per-case predictions were read)")
        notes.append(f"{seeds}; ± in the tables is the std over seeds; intervals (plots, `summary.csv`, verdicts) "
                     f"come from {how}, {study.n_boot} replicates.")
    unused = [n for g in study.groups for n in g.notes if "not used" in n]
    if unused:
        notes.append("Intervals of these groups come from seeds only: " + "; ".join(unused) + ".")
    if any(c.sign < 0 for c in study.curves):
        notes.append("Lower-is-better metrics (marked ↓) are negated before judging, so a positive gain is always "
                     "an improvement.")
    key = ["dataset", "protocol", "metric", "encoder", "resolution", "seed"] + (["weights"] if "weights" in df else [])
    dup = int(df.duplicated(key).sum())
    if dup:
        notes.append(f"{dup} rows repeat a (cell, seed) already read (e.g. the same sweep read twice); they were "
                     "averaged into one value per seed.")
    doc.heading("Caveats")
    doc.bullets(notes)


def _verdicts(doc: Document, study: Study) -> None:
    doc.heading("Verdicts")
    counts = pd.Series([v.verdict for v in study.verdicts.values()]).value_counts()
    doc.para(f"{len(study.curves)} curves, judged together (Holm across all of them): "
             + ", ".join(f"**{counts.get(v, 0)}** {v}" for v in VERDICTS) + ".")
    doc.bullets(["`scales`: the largest x beats every smaller one; `saturates`: it gains overall but the last "
                 "step is within the margin; `peaks`: rises to an interior best, then falls; `inverse`: larger is "
                 "worse; `flat`: every change within the margin; `noisy`: the intervals are too wide to say (or "
                 "fewer than 3 points). The exact rules are quoted under Rules, below.",
                 "Margin (metric units): 0.005 on a [0, 1] scale, 0.5 in percent, 0.05 for VOI, 0.5 for "
                 "HD/HD95, 0.1 for ASD (`verdicts.csv`, column `margin`).",
                 "P(monotone ↑): share of bootstrap replicates whose AICc-selected form rises over the whole "
                 "range; P(best = largest): share whose largest x is best; peak: the best tested x with its "
                 "interval; Holm p: the isotonic test of \"non-decreasing\", adjusted across all curves."])
    header, rows = verdict_table(study)
    doc.table(header, rows, ["l"] * 5 + ["r", "l", "l", "r", "r", "r", "r", "r"])


def _results(doc: Document, study: Study) -> None:
    several = study.agg["weights"].nunique() > 1
    if study.reference and "table" in study.points.columns:
        doc.heading("Published results (DINOv3 rows)")
        doc.para("As printed; best **bold**, second <u>underlined</u> among DINOv3 S/B/L per column (the paper "
                 "marks them among all methods); ↓: lower is better.")
        for table, ref in study.points.groupby("table", sort=False):
            doc.heading(str(table), 3)
            doc.table(*reference_table(ref))
        return
    doc.heading("Headline metric by encoder and input resolution")
    doc.para("Mean over seeds" + (" ± std" if int(study.agg["n"].max()) >= 2 else "")
             + "; best **bold**, second <u>underlined</u> (over the whole table); –: not run.")
    shown = study.agg[study.agg["metric"].map(is_performance_metric)]
    headlines = set()
    for (dataset, protocol), g in shown.groupby(["dataset", "protocol"], sort=True):
        headline = metric_order(g["metric"].unique())[0]
        headlines.add(headline)
        doc.heading(f"{dataset} / {protocol}: {metric_label(headline)}", 3)
        doc.table(*headline_table(g[g["metric"] == headline], several))
    judged = {c.key.metric for c in study.curves}
    all_metrics = metric_order(shown["metric"].unique())
    others = [m for m in all_metrics if m not in headlines and m in judged]
    only = [m for m in all_metrics if m not in judged]
    skipped = sorted(set(study.agg["metric"]) - set(all_metrics))
    doc.heading("Other metrics")
    lines = ["Also plotted (below and in `summary.csv`): " + (", ".join(f"`{m}`" for m in others) or "none") + "."]
    if only:
        lines.append(f"In `summary.csv` only: {', '.join(f'`{m}`' for m in only)}.")
    if skipped:
        lines.append(f"Bookkeeping values kept in `summary.csv` only: {', '.join(f'`{m}`' for m in skipped)}.")
    doc.para(" ".join(lines))


def _fits(doc: Document, study: Study) -> None:
    doc.heading("Fits")
    header, rows = fits_table(study)
    doc.para("Forms in u = ln(x / x_min): flat, log-linear, saturating power law, quadratic (interior peak), "
             "broken power law (>= 8 points); chosen by AICc with k <= n - 2, so 3 points admit only `flat`. "
             "Every form of every curve, with Akaike weights and extrapolation errors, is in `fits.csv` "
             "(values oriented: multiply by `sign` for metric units).")
    if rows:
        doc.table(header, rows, ["l", "r", "l", "r", "l", "r", "r"])
    else:
        doc.para("No curve has 4 or more points: nothing beyond `flat` could be fitted.")


def _plots(doc: Document, figures: list[Plot], out_dir: Path) -> None:
    doc.heading("Plots")
    doc.para("PNG embedded; SVG beside each in `plots/`.")
    for f in figures:
        rel = f.png.relative_to(out_dir).as_posix()
        caption = f.title if f.kind == "forest" else f"{f.title}. {CAPTIONS[f.kind]}"
        doc.image(f.png, caption, rel, rel[:-4] + ".svg")
    if not any(f.kind == "fig1" for f in figures):
        doc.para("No metric-vs-resolution figure: no encoder was run (or published) at two or more known input "
                 "resolutions.")


def build_document(study: Study, figures: list[Plot], out_dir: Path, title: str) -> Document:
    doc = Document(title)
    if "random" in weights_kinds(study.points):
        doc.warning("WARNING: RANDOM-INIT weights. Some or all encoders were not pretrained: these numbers test "
                    "the pipeline, not foundation-model scaling. Do not read them as results.")
    _read_section(doc, study)
    _caveats(doc, study)
    _verdicts(doc, study)
    _results(doc, study)
    _fits(doc, study)
    doc.heading("Rules")
    doc.para("Quoted from `analysis/verdict.py`:")
    doc.pre(verdict_module.__doc__ or "")
    _plots(doc, figures, out_dir)
    doc.heading("Files")
    doc.bullets(["`summary.csv`: one row per (dataset, protocol, metric, encoder, weights, resolution): params, "
                 "gflops, n seeds, mean, std, 95% interval (ci_lo, ci_hi; `ci_method` says how), seeds.",
                 "`verdicts.csv`: one row per curve: verdict, reason, every effect with its interval, "
                 "probabilities, peak, p-values, margin.",
                 "`fits.csv`: every fitted form of every curve.",
                 "`plots/`: " + "; ".join(f"`{k}`: {v}" for k, v in CAPTIONS.items()) + "."])
    return doc
