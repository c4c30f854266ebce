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
from analysis.families import family_section, matched_compute
from analysis.figures import CAPTIONS, Plot, all_figures
from analysis.plots import metric_label
from analysis.points import check_points, headline_metric, is_performance_metric, metric_order, weights_kinds
from analysis.study import Study, build_study, fits_frame, verdict_frame
from analysis.tables import (  # noqa: F401  (rank_marks: part of this module's interface since v1)
    fits_table,
    headline_table,
    rank_marks,
    reference_table,
    verdict_table,
)
from analysis.verdict_model import VERDICTS
from tasks.errors import ConfigError


def analyze_points(df: pd.DataFrame, out_dir: Path, title: str, *, predictions: dict | None = None,
                   n_boot: int = 1000, seed: int = 0, reference: bool = False, every_metric: bool | None = None,
                   correction: str = "bh", adaptive: pd.DataFrame | None = None) -> dict:
    """Analyse points (per-case `predictions` by run id, if any) into `out_dir`.

    Returns {"report", "html", "summary", "verdicts", "fits": Path, "plots": [Path], "figures":
    [Plot], "study": Study}. `reference`: the points are a publication's tables. `every_metric`:
    judge every performance metric (default: for a reference; orchestrator sets it for a points
    file) rather than the headline ones. `correction`: "bh" or "holm" across the study. `adaptive`:
    an adaptive sweep's `adaptive_curves.csv` (analysis/adaptive/summary.py): a section on it.
    """
    check_points(df)
    if df.empty:
        raise ConfigError("no points to analyse")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    study = build_study(df, predictions=predictions, n_boot=n_boot, seed=seed, reference=reference,
                        every_metric=every_metric, correction=correction)
    paths = {"summary": out_dir / "summary.csv", "verdicts": out_dir / "verdicts.csv", "fits": out_dir / "fits.csv",
             "families": out_dir / "families.csv"}
    study.agg.to_csv(paths["summary"], index=False)
    matched_compute(study.agg[study.agg["metric"].map(is_performance_metric)]).to_csv(paths["families"], index=False)
    verdict_frame(study).to_csv(paths["verdicts"], index=False)
    fits_frame(study).to_csv(paths["fits"], index=False)
    figures = all_figures(study, out_dir / "plots")
    doc = build_document(study, figures, out_dir, title, adaptive)
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
        notes.append("Most published numbers have **no intervals**: their curves get an ORDERING of the printed "
                     "values (`order: ...`), tallied apart from interval-backed verdicts. Where a table prints "
                     f"mean ± SD over the test cases ({tables(df['spread'].notna())}), the SD / sqrt(n) of the "
                     "test-set size the paper states gives each mean an interval (models taken as independent: "
                     "conservative for differences). Input resolutions are known only where the paper states them "
                     f"({tables(df['resolution'] > 0)}); resolution curves the paper gives only as a figure (its "
                     "Figure 1) cannot be read off the text and are not reproduced.")
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
    free = sum(g.seed_free for g in study.groups)
    if free:
        notes.append(f"{free} cell(s) gave one value for every seed (a protocol that ignores the seed, or a "
                     "`seed_free` flag): each is one value, with no seed spread; a curve of such cells alone has "
                     "no interval and gets an ordering.")
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


def tally(study: Study) -> dict[str, dict[str, int]]:
    """Counts per verdict, kept apart by kind: "ci" (interval-backed), "ordering", "degenerate"."""
    out: dict[str, dict[str, int]] = {"ci": {}, "ordering": {}, "degenerate": {}}
    for v in study.verdicts.values():
        out[v.kind][v.verdict] = out[v.kind].get(v.verdict, 0) + 1
    return out


def _verdicts(doc: Document, study: Study) -> None:
    doc.heading("Verdicts")
    t = tally(study)
    n_ci, n_ord, n_deg = (sum(t[k].values()) for k in ("ci", "ordering", "degenerate"))
    name = {"bh": "Benjamini-Hochberg, false discovery rate 5%", "holm": "Holm, family-wise error rate 5%"}
    lines = []
    if n_ci:
        lines.append(f"**With intervals** ({n_ci} curves, one family, {name[study.correction]}): "
                     + ", ".join(f"**{t['ci'].get(v, 0)}** {v}" for v in VERDICTS if v != "degenerate") + ".")
    if n_ord:
        lines.append(f"**Orderings without intervals** ({n_ord} curves; the order of the point estimates, not a "
                     "test): " + ", ".join(f"{t['ordering'][v]} order: {v}" for v in VERDICTS if v in t["ordering"])
                     + ".")
    if n_deg:
        lines.append(f"**Degenerate** ({n_deg} curves, not counted): a companion overlap metric is ~0 or the "
                     "predictions are empty, so the curve measures the emptiness, not the encoder.")
    doc.para(" ".join(lines) or "No curves: no metric had two encoders at one resolution or an encoder at two.")
    doc.bullets(["`scales`: gains at least the margin overall and the largest x beats every smaller one; "
                 "`saturates`: gains overall, but the fitted gain per doubling of x at the top is within the margin; "
                 "`peaks`: rises to an interior best, then falls, and monotonicity is rejected; `inverse`: larger x is "
                 "worse (smaller is better); `mixed`: falls beyond the margin without a single interior best; "
                 "`flat`: every difference between two points within the margin; `noisy`: the shape the estimates "
                 "show is not shown after correction, or the intervals are too wide; `order: ...`: the same shapes "
                 "read off point estimates without intervals. Exact rules under Rules, below.",
                 "Multiplicity: every interval-backed curve is one hypothesis, tested by the p-value of the shape its "
                 "estimates show (intersection-union, analytic tails, so p-values far below 1/n_boot are resolved); "
                 "the family is the whole study, corrected by " + name[study.correction] + ". Why: a scaling study "
                 "maps the shapes of hundreds of curves, many of them truly non-flat; controlling the share of false "
                 "shapes among those reported keeps peaks detectable where a family-wise correction over ~240 curves "
                 "would need each p below 0.0002.",
                 "Margin (metric units, `verdicts.csv` column `margin`): 0.005 on a [0, 1] scale (0.5 in percent), 0.05 "
                 "for VOI, 0.5 for HD/HD95, 0.1 for ASD, 0.001 for a folding share.",
                 "Variance: the share of the variance of the curve's shape (points about their mean) that comes from "
                 "the test cases and from the seeds (in slide cells the seed also picks the CV fold, so fold "
                 "variation is inside the seed share)."])
    header, rows = verdict_table(study)
    doc.table(header, rows, ["l"] * 5 + ["r", "l", "l", "r", "r", "r", "r", "r", "r", "r"])


def _summary(doc: Document, study: Study, figures: list[Plot], out_dir: Path) -> None:
    """One line per dataset x protocol: its headline metric's verdicts per axis and the plot to open."""
    doc.heading("Summary")
    header = ["dataset", "protocol", "headline metric", "params", "resolution", "GFLOPs", "plot"]
    rows = []
    by_dp: dict[tuple[str, str], list] = {}
    for c in study.curves:
        by_dp.setdefault((c.key.dataset, c.key.protocol), []).append(c)
    for (ds, proto), curves in sorted(by_dp.items()):
        headline = headline_metric([c.key.metric for c in curves])
        mine = [c for c in curves if c.key.metric == headline]
        cells = []
        for axis in ("params", "resolution", "gflops"):
            labels = [study.verdicts[c.key].label for c in mine if c.key.axis == axis]
            counts = pd.Series(labels).value_counts() if labels else pd.Series(dtype=int)
            cells.append(", ".join(f"{lab}" + (f" ×{k}" if k > 1 else "") for lab, k in counts.items()) or "–")
        plot = next((f for kind in ("fig1", "params") for f in figures
                     if f.kind == kind and f.title.startswith(f"{proto}:") and ds in f.datasets), None)
        rel = f"`{plot.png.relative_to(out_dir).as_posix()}`" if plot else "–"
        rows.append([ds, proto, metric_label(headline), *cells, rel])
    if rows:
        doc.para("The headline metric of each dataset and protocol, its verdicts per axis (×k: k curves, e.g. one "
                 "per resolution), and the figure to open first; every metric and curve follows under Verdicts.")
        doc.table(header, rows)
    else:
        doc.para("No curves to summarise.")


def _results(doc: Document, study: Study) -> None:
    several = study.agg["weights"].nunique() > 1
    if study.reference and "table" in study.points.columns:
        doc.heading("Published results (DINOv3 rows)")
        doc.para("As printed; best **bold**, second <u>underlined</u> among DINOv3 S/B/L per column (the paper "
                 "marks them among all methods); ↓: lower is better.")
        for table, ref in study.points.groupby("table", sort=False):
            doc.heading(str(table), 3)
            doc.table(*reference_table(ref))
        _left_out(doc, study)
        return
    doc.heading("Headline metric by encoder and input resolution")
    doc.para("Mean over seeds" + (" ± std" if int(study.agg["n"].max()) >= 2 else "")
             + "; best **bold**, second <u>underlined</u> (over the whole table); –: not run.")
    shown = study.agg[study.agg["metric"].map(is_performance_metric)]
    headlines = set()
    for (dataset, protocol), g in shown.groupby(["dataset", "protocol"], sort=True):
        headline = headline_metric(g["metric"].unique())
        headlines.add(headline)
        doc.heading(f"{dataset} / {protocol}: {metric_label(headline)}", 3)
        doc.table(*headline_table(g[g["metric"] == headline], several))
    judged = {c.key.metric for c in study.curves}
    all_metrics = metric_order(shown["metric"].unique())
    others = [m for m in all_metrics if m not in headlines and m in judged]
    doc.heading("Other metrics")
    doc.para("Also judged and plotted (below and in `summary.csv`): "
             + (", ".join(f"`{m}`" for m in others) or "none") + ".")
    _left_out(doc, study)


def _left_out(doc: Document, study: Study) -> None:
    if not study.left_out:
        return
    doc.para("Not judged (kept in `summary.csv`), and why:")
    doc.bullets([f"`{name}`: {why}" for name, why in sorted(study.left_out.items())])


def _fits(doc: Document, study: Study) -> None:
    doc.heading("Fits")
    header, rows = fits_table(study)
    doc.para("Forms in u = ln(x / x_min): flat, log-linear, saturating power law, quadratic (interior peak), "
             "broken power law (>= 8 points); chosen by AICc counting every estimated parameter K (the noise "
             "variance too when no standard errors are known) with K <= n - 2: with intervals 3 points admit only "
             "`flat`; without them 3 points admit no form and 4 only `flat`. "
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


def build_document(study: Study, figures: list[Plot], out_dir: Path, title: str,
                   adaptive: pd.DataFrame | None = None) -> Document:
    doc = Document(title)
    if "random" in weights_kinds(study.points):
        doc.warning("WARNING: RANDOM-INIT weights. Some or all encoders were not pretrained: these numbers test "
                    "the pipeline, not foundation-model scaling. Do not read them as results.")
    _summary(doc, study, figures, out_dir)
    _read_section(doc, study)
    _caveats(doc, study)
    _verdicts(doc, study)
    if adaptive is not None:
        from analysis.adaptive.summary import adaptive_section

        adaptive_section(doc, adaptive, out_dir)
    _results(doc, study)
    family_section(doc, matched_compute(study.agg[study.agg["metric"].map(is_performance_metric)]))
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
                 "`families.csv`: each encoder family's best cell at matched compute (empty with one family).",
                 "`plots/`: " + "; ".join(f"`{k}`: {v}" for k, v in CAPTIONS.items()) + "."])
    return doc
