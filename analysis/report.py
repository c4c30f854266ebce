"""`report.md`, `summary.csv` and plots from a points DataFrame: the first version of the analysis.

Tables follow the paper's style (best **bold**, second <u>underlined</u>), one per (dataset,
protocol) for the headline metric with encoders as rows and resolutions as columns. The report
says plainly what it cannot show: spread with one seed, meaning with random-init weights.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from analysis.plots import metric_label, plot_all, safe_name
from analysis.points import (
    aggregate,
    check_points,
    higher_is_better,
    is_performance_metric,
    metric_order,
    model_label,
    plotted_metrics,
    weights_kinds,
)
from tasks.errors import ConfigError

DIGITS = 4  # as in the paper's tables; ranking uses the shown value so bold matches what is read
MISSING = "–"


def analyze_points(df: pd.DataFrame, out_dir: Path, title: str) -> dict:
    """Aggregate, plot and report. Returns {"report": Path, "plots": [Path], "summary": Path}."""
    check_points(df)
    if df.empty:
        raise ConfigError("no points to analyse")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    agg = aggregate(df)
    summary = out_dir / "summary.csv"
    agg.to_csv(summary, index=False)
    shown = agg[agg["metric"].map(is_performance_metric)]
    plots = plot_all(shown, out_dir / "plots")
    report = out_dir / "report.md"
    report.write_text(render_report(df, agg, plots, out_dir, title), encoding="utf-8")
    return {"report": report, "plots": plots, "summary": summary}


# -- pieces --------------------------------------------------------------------------------------
def _md(text: object) -> str:
    return str(text).replace("|", "\\|")


def _fmt_cell(mean: float, std: float, n: int) -> str:
    return f"{mean:.{DIGITS}f} ± {std:.{DIGITS}f}" if n >= 2 and std == std else f"{mean:.{DIGITS}f}"


def rank_marks(means: pd.Series, higher: bool = True) -> pd.Series:
    """'best', 'second' or '' per cell, on the values as displayed (ties share a mark)."""
    shown = means.round(DIGITS)
    distinct = sorted(shown.dropna().unique(), reverse=higher)
    marks = pd.Series("", index=means.index)
    if distinct:
        marks[shown == distinct[0]] = "best"
    if len(distinct) > 1:
        marks[shown == distinct[1]] = "second"
    return marks


def headline_table(sub: pd.DataFrame, several_kinds: bool) -> list[str]:
    """Markdown table of one metric: rows encoder, columns resolution, mean ± std."""
    sub = sub.reset_index(drop=True)
    marks = rank_marks(sub["mean"], higher_is_better(str(sub["metric"].iloc[0])))
    resolutions = sorted(int(r) for r in sub["resolution"].unique())
    models = sub[["encoder", "weights", "params"]].drop_duplicates().sort_values(["params", "encoder", "weights"])
    lines = ["| encoder | params (M) | " + " | ".join(f"{r} px" for r in resolutions) + " |",
             "|---|---:|" + "---:|" * len(resolutions)]
    for enc, w, p in models.itertuples(index=False):
        cells = []
        for r in resolutions:
            hit = sub.index[(sub["encoder"] == enc) & (sub["weights"] == w) & (sub["resolution"] == r)]
            if len(hit) == 0:
                cells.append(MISSING)
                continue
            i = hit[0]
            text = _fmt_cell(sub.at[i, "mean"], sub.at[i, "std"], int(sub.at[i, "n"]))
            text = {"best": f"**{text}**", "second": f"<u>{text}</u>"}.get(marks[i], text)
            cells.append(text)
        lines.append(f"| {_md(model_label(enc, w, several_kinds))} | {p / 1e6:.1f} | " + " | ".join(cells) + " |")
    return lines


def _n_runs(df: pd.DataFrame) -> int:
    if "run_id" in df.columns and df["run_id"].astype(str).str.len().gt(0).all():
        return int(df["run_id"].nunique())
    cols = ["dataset", "protocol", "encoder", "resolution", "seed"] + (["weights"] if "weights" in df else [])
    return len(df[cols].drop_duplicates())


def _read_section(df: pd.DataFrame, agg: pd.DataFrame) -> list[str]:
    kinds = weights_kinds(df)
    enc = agg[["encoder", "params"]].drop_duplicates().sort_values(["params", "encoder"])
    seeds = sorted(int(s) for s in df["seed"].unique())
    lines = ["## What was read", "",
             f"- **{_n_runs(df)} runs** ({len(df)} metric values)"]
    if "experiment" in df.columns:
        lines.append(f"- experiments: {', '.join(sorted(map(str, df['experiment'].unique())))}")
    lines += [f"- datasets: {', '.join(sorted(map(str, df['dataset'].unique())))}",
              f"- protocols: {', '.join(sorted(map(str, df['protocol'].unique())))}",
              "- encoders: " + ", ".join(f"{e} ({p / 1e6:.1f}M params)" for e, p in enc.itertuples(index=False)),
              f"- input resolutions (px): {', '.join(str(int(r)) for r in sorted(df['resolution'].unique()))}",
              f"- seeds: {', '.join(map(str, seeds))}",
              "- weights: " + (", ".join(f"**{k.upper()}**" if k == "random" else k for k in kinds)
                               if kinds else "not recorded")]
    return lines


def _caveats(df: pd.DataFrame, agg: pd.DataFrame) -> list[str]:
    notes = []
    kinds = weights_kinds(df)
    if len(kinds) > 1:
        notes.append(f"The data mixes weights kinds ({', '.join(kinds)}); they are kept apart as "
                     "separate models, never averaged together.")
    n_lo, n_hi = int(agg["n"].min()), int(agg["n"].max())
    if n_hi == 1:
        notes.append("Every cell has **one seed: no spread is available**. Tables show single values "
                     "without ±, plots have no error bars, and differences between cells may be noise.")
    else:
        seeds = f"Every cell has {n_lo} seeds" if n_lo == n_hi else f"Cells have {n_lo} to {n_hi} seeds"
        notes.append(f"{seeds}; ± is the std over seeds, error bars in the plots "
                     "are 95% t-intervals over seeds (none where a cell has one seed). Test-set sampling "
                     "error is not included yet (no bootstrap over cases).")
    key = ["dataset", "protocol", "metric", "encoder", "resolution", "seed"] + (["weights"] if "weights" in df else [])
    dup = int(df.duplicated(key).sum())
    if dup:
        notes.append(f"{dup} rows repeat a (cell, seed) already read (e.g. the same sweep read twice); "
                     "they were averaged into one value per seed.")
    return ["## Caveats", ""] + [f"- {n}" for n in notes]


def render_report(df: pd.DataFrame, agg: pd.DataFrame, plots: list[Path], out_dir: Path, title: str) -> str:
    several_kinds = agg["weights"].nunique() > 1
    lines = [f"# {title}", ""]
    if "random" in weights_kinds(df):
        lines += ["> **WARNING: RANDOM-INIT weights.** Some or all encoders were not pretrained: these "
                  "numbers test the pipeline, not foundation-model scaling. Do not read them as results.", ""]
    lines += _read_section(df, agg) + [""] + _caveats(df, agg) + [""]

    shown = agg[agg["metric"].map(is_performance_metric)]
    groups = list(shown.groupby(["dataset", "protocol"], sort=True))
    lines += ["## Headline metric by encoder and input resolution", "",
              "Mean over seeds" + (" ± std" if int(agg["n"].max()) >= 2 else "")
              + f"; best **bold**, second <u>underlined</u> (over the whole table); {MISSING}: not run.", ""]
    headlines = set()
    for (dataset, protocol), g in groups:
        headline = metric_order(g["metric"].unique())[0]
        headlines.add(headline)
        lines += [f"### {_md(dataset)} / {_md(protocol)}: {metric_label(headline)}", ""]
        lines += headline_table(g[g["metric"] == headline], several_kinds) + [""]

    all_metrics = metric_order(shown["metric"].unique())
    plotted = {p.stem.rsplit("__", 1)[-1] for p in plots}
    others = [m for m in all_metrics if m not in headlines and m in plotted]
    unplotted = [m for m in all_metrics if m not in plotted]
    skipped = sorted(set(agg["metric"]) - set(all_metrics))
    lines += ["## Other metrics", ""]
    lines.append("Also plotted (below and in `summary.csv`): "
                 + (", ".join(f"`{m}`" for m in others) if others else "none") + ".")
    if unplotted:
        lines.append(f"In `summary.csv` only: {', '.join(f'`{m}`' for m in unplotted)}.")
    if skipped:
        lines.append(f"Bookkeeping values kept in `summary.csv` only: {', '.join(f'`{m}`' for m in skipped)}.")
    lines.append("")

    lines += ["## Plots", "",
              "(a) metric vs parameters (log scale), one line per input resolution; "
              "(b) metric vs input resolution, one line per encoder. SVG beside each PNG.", ""]
    pngs = {p.name: p for p in plots if p.suffix == ".png"}
    for (dataset, protocol), g in groups:
        lines += [f"### {_md(dataset)} / {_md(protocol)}", ""]
        for m in plotted_metrics(g["metric"].unique()):
            png = pngs.get(f"{safe_name(dataset, protocol, m)}.png")
            if png is None:
                continue
            rel = png.relative_to(out_dir).as_posix()
            lines += [f"![{_md(dataset)} / {_md(protocol)} / {metric_label(m)}]({rel})",
                      f"[SVG]({rel[:-4]}.svg)", ""]

    lines += ["## Files", "",
              "- `summary.csv`: one row per (dataset, protocol, metric, encoder, weights, resolution): "
              "params, gflops, n seeds, mean, std, 95% t-interval (ci_lo, ci_hi), seeds.",
              "- `plots/`: the figures above, PNG and SVG.", ""]
    return "\n".join(lines)

