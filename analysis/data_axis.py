"""The training-set size as a scaling axis (config `grid.train_fractions` / `grid.train_shots`).

For every (dataset, protocol, metric, weights) the cells of one encoder at one resolution form a
*data curve*: the metric against the number of training cases the cell had (`n_train`, averaged over
seeds; the subsets are nested, tasks/subsets.py). Replicates and the covariance of the points come
from the same machinery as the other axes (`curves.make_group`: test cases and seeds when per-case
predictions exist, else seeds, with its analytic parts), with one trick: a cell is keyed by
"encoder@resolution" and the train size's rank, so the pairing of resampled test cases across a
group's cells is kept. The tests read the covariance parts as the other axes' do (so a verdict does
not depend on the number of bootstrap replicates), at the margin of the metric in its unit (`unit`
percent: x100). All data curves are judged in one `judge_curves` call (their own family, corrected
like the other axes' - Benjamini-Hochberg - beside the model-size and resolution curves).

"How many labels does a larger encoder save?": at each resolution, for each pair of encoders
(smaller, larger by parameters), the horizontal distance between their data curves at the metric
the smaller one reaches with all its training cases: saved = n_small(full) - n_large(same metric),
with n_large found by interpolation in log n along the larger encoder's curve. The interval is the
same computation on every replicate. When the larger encoder is already better at its smallest
subset the saving is at least n_full - n_min (a bound, marked ">="); when it never reaches the
metric there is no saving ("none").
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from analysis.bootstrap import CurveReplicates
from analysis.curves import CurveKey, cell_intervals, make_group, margin_for
from analysis.points import aggregate, higher_is_better, is_performance_metric, plotted_metrics
from analysis.verdict import judge_curves
from analysis.verdict_model import CI_LEVEL
from analysis.verdict_text import verdict_row

SIZE_COLUMNS = ("train_fraction", "train_shots", "n_train")
DATA_AXIS = "train cases"  # the axis of a data curve's key


@dataclass
class DataCurve:
    key: CurveKey  # axis "train cases", fixed "<encoder> @ <r> px"
    encoder: str
    resolution: int
    params: float
    sizes: list[str]  # "f0.1" / "k4" / "all" in x order
    x: np.ndarray  # mean training cases
    estimate: np.ndarray  # metric units
    replicates: np.ndarray | None  # (B, n) metric units
    lo: np.ndarray
    hi: np.ndarray
    sign: int
    rep: CurveReplicates | None = None  # oriented (higher is better), x = training cases, with covariance parts
    margin: float = float("nan")  # the metric's margin in its unit


def has_data_axis(df: pd.DataFrame) -> bool:
    """True when some cells trained on part of their split."""
    if "train_fraction" not in df.columns:
        return False
    shots = df["train_shots"].fillna(0) if "train_shots" in df.columns else 0
    return bool(((df["train_fraction"].fillna(1.0) < 1.0) | (shots > 0)).any())


def full_data(df: pd.DataFrame) -> pd.DataFrame:
    """The points of cells that trained on their whole split (what the other axes compare): the
    rows whose train size is "all" (`size_labels`, the one definition of a whole split)."""
    if "train_fraction" not in df.columns and "train_shots" not in df.columns:
        return df
    return df[size_labels(df) == "all"].reset_index(drop=True)


def size_label(fraction: float, shots: int) -> str:
    """A train size's name: "k4" (4 cases per class), "f0.1" (a tenth of the split), "all"."""
    return f"k{int(shots)}" if shots else ("all" if fraction >= 1.0 else f"f{fraction:g}")


def size_labels(df: pd.DataFrame) -> np.ndarray:
    """Each row's train size by name (blank fraction: the whole split; blank shots: none; "all"
    where the frame has no data axis)."""
    frac = df["train_fraction"].astype(float).fillna(1.0) if "train_fraction" in df.columns else pd.Series(1.0, df.index)
    shots = df["train_shots"].astype(float).fillna(0.0) if "train_shots" in df.columns else pd.Series(0.0, df.index)
    return np.array([size_label(f, int(k)) for f, k in zip(frac, shots, strict=True)], dtype=object)


def data_curves(df: pd.DataFrame, predictions: dict | None = None, n_boot: int = 1000,
                seed: int = 0) -> list[DataCurve]:
    """Every data curve with >= 2 train sizes (module doc)."""
    d = df.copy()
    d["weights"] = d["weights"].fillna("").astype(str) if "weights" in d.columns else ""
    if "n_train" not in d.columns:  # a points file without counts: no x for a data curve
        d["n_train"] = np.nan
    d["size"] = size_labels(d)
    d = d[d["metric"].map(is_performance_metric)]
    out: list[DataCurve] = []
    for (ds, proto, w), g in d.groupby(["dataset", "protocol", "weights"], sort=True):
        for metric in plotted_metrics(g["metric"].unique()):
            pts = g[g["metric"] == metric].copy()
            pts["model"] = pts["encoder"].astype(str) + "@" + pts["resolution"].astype(int).astype(str) + "px"
            n_by = pts.groupby(["model", "size"])["n_train"].mean()
            # a cell = (model, size): rank sizes by their training cases so "resolution" is an int key
            order = {s: i + 1 for i, s in enumerate(pts.groupby("size")["n_train"].mean().sort_values().index)}
            keyed = pts.assign(encoder=pts["model"], resolution=pts["size"].map(order))
            cells = aggregate(keyed)
            task = str(pts["task"].iloc[0]) if "task" in pts.columns else ""
            unit = str(pts["unit"].iloc[0]) if "unit" in pts.columns else ""
            grp = make_group(cells, keyed, predictions=predictions, task=task, n_boot=n_boot, seed=seed, unit=unit)
            lo, hi = cell_intervals(grp)
            sign = 1 if higher_is_better(metric) else -1
            whole = grp.replicates_of()
            meta = pts.drop_duplicates("model").set_index("model")
            for model in sorted(set(grp.cells["encoder"]), key=lambda m: (meta.loc[m, "params"], m)):
                rows = np.flatnonzero(grp.cells["encoder"].to_numpy() == model)
                sizes = {v: k for k, v in order.items()}
                labels = [sizes[int(r)] for r in grp.cells["resolution"].to_numpy()[rows]]
                x = np.array([n_by[(model, s)] for s in labels], dtype=float)
                srt = np.argsort(x, kind="stable")
                rows, x, labels = rows[srt], x[srt], [labels[i] for i in srt]
                if np.unique(x).size < 2 or not np.all(np.isfinite(x)):
                    continue
                enc, res = str(meta.loc[model, "encoder"]), int(meta.loc[model, "resolution"])
                key = CurveKey(str(ds), str(proto), metric, str(w), DATA_AXIS, f"{enc} @ {res} px")
                reps = None if grp.replicates is None else grp.replicates[:, rows]
                r = whole.take(rows, sign)
                rep = CurveReplicates(x, r.estimate, r.replicates, r.method, r.parts, r.dfs)
                out.append(DataCurve(key, enc, res, float(meta.loc[model, "params"]), labels, x,
                                     grp.estimate[rows], reps, lo[rows], hi[rows], sign, rep,
                                     margin_for(metric, unit)))
    return out


def judge_data_curves(curves: list[DataCurve], describe: bool = True) -> dict:
    """Every data curve's verdict, one Benjamini-Hochberg family (module doc)."""
    reps = {c.key: c.rep if c.rep is not None else CurveReplicates(c.x, c.sign * c.estimate) for c in curves}
    margins = {c.key: c.margin if np.isfinite(c.margin) else margin_for(c.key.metric) for c in curves}
    return judge_curves(reps, min_effect=margins, describe=describe) if reps else {}


def cases_to_reach(x: np.ndarray, y: np.ndarray, target: float) -> tuple[float, str]:
    """Training cases at which the (oriented, higher-is-better) curve first reaches `target`,
    interpolated in log n: (n, "") inside the range, (min n, ">=") when reached at once,
    (nan, "none") when never."""
    if y[0] >= target:
        return float(x[0]), ">="
    for i in range(1, len(x)):
        if y[i] >= target:
            t = (target - y[i - 1]) / (y[i] - y[i - 1])
            return float(np.exp(np.log(x[i - 1]) + t * (np.log(x[i]) - np.log(x[i - 1])))), ""
    return float("nan"), "none"


def labels_saved(small: DataCurve, large: DataCurve, level: float = CI_LEVEL) -> dict:
    """Training cases the larger encoder saves at the smaller one's full-data metric (module doc)."""
    def one(ys: np.ndarray, yl: np.ndarray) -> tuple[float, str]:
        n, flag = cases_to_reach(large.x, large.sign * yl, small.sign * ys[-1])
        return (small.x[-1] - n if flag != "none" else float("nan")), flag

    saved, flag = one(small.estimate, large.estimate)
    lo = hi = float("nan")
    if small.replicates is not None and large.replicates is not None:
        vals = np.array([one(a, b)[0] for a, b in zip(small.replicates, large.replicates, strict=True)])
        # a replicate where the larger never gets there saves nothing: count it as 0, not missing
        vals = np.where(np.isfinite(vals), vals, 0.0)
        q = 50 * (1 - level)
        lo, hi = (float(v) for v in np.percentile(vals, [q, 100 - q]))
    return {"dataset": small.key.dataset, "protocol": small.key.protocol, "metric": small.key.metric,
            "weights": small.key.weights, "resolution": small.resolution, "smaller": small.encoder,
            "larger": large.encoder, "target": float(small.estimate[-1]), "n_smaller": float(small.x[-1]),
            "labels_saved": saved, "bound": flag, "saved_lo": lo, "saved_hi": hi,
            "ratio": float(small.x[-1] / (small.x[-1] - saved)) if np.isfinite(saved) and saved < small.x[-1]
            else float("nan")}


def savings_frame(curves: list[DataCurve]) -> pd.DataFrame:
    rows = []
    by = {}
    for c in curves:
        by.setdefault((c.key.dataset, c.key.protocol, c.key.metric, c.key.weights, c.resolution), []).append(c)
    for group in by.values():
        group = sorted(group, key=lambda c: c.params)
        for i, s in enumerate(group):
            for lg in group[i + 1:]:
                if lg.params > s.params:
                    rows.append(labels_saved(s, lg))
    return pd.DataFrame(rows)


def plot_data_curves(curves: list[DataCurve], out_dir: Path, random_init: bool = False) -> list[Path]:
    """One figure per (dataset, protocol, metric, weights): metric vs training cases (log x), one
    line per encoder and resolution, with the cells' intervals."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import FuncFormatter

    from analysis.plots import safe_name

    out_dir.mkdir(parents=True, exist_ok=True)
    groups: dict[tuple, list[DataCurve]] = {}
    for c in curves:
        groups.setdefault((c.key.dataset, c.key.protocol, c.key.metric, c.key.weights), []).append(c)
    paths = []
    for (ds, proto, metric, w), cs in groups.items():
        fig = Figure(figsize=(6.0, 4.2))
        FigureCanvasAgg(fig)
        ax = fig.add_subplot(1, 1, 1)
        for c in cs:
            line = ax.plot(c.x, c.estimate, marker="o", label=f"{c.encoder} @ {c.resolution} px")[0]
            if np.isfinite(c.lo).all():
                ax.fill_between(c.x, c.lo, c.hi, color=line.get_color(), alpha=0.15, linewidth=0)
        ax.set_xscale("log")
        plain = FuncFormatter(lambda v, _: f"{v:g}")  # 20, 50, 100: cases, not powers of ten
        ax.xaxis.set_major_formatter(plain)
        ax.xaxis.set_minor_formatter(plain)
        ax.tick_params(axis="x", which="minor", labelsize=7)
        ax.set_xlabel("training cases (log scale)")
        ax.set_ylabel(metric)
        ax.set_title(f"{ds} / {proto}: {metric} vs training-set size" + (" [RANDOM-INIT]" if random_init else ""),
                     fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        p = out_dir / f"data_{safe_name(f'{ds}_{proto}_{metric}_{w}')}.png"
        fig.savefig(p, dpi=120)
        paths.append(p)
    return paths


def _fmt_saved(r: pd.Series) -> str:
    if r["bound"] == "none":
        return "none (the larger encoder never reaches it)"
    ci = f" [{r['saved_lo']:.0f}, {r['saved_hi']:.0f}]" if np.isfinite(r["saved_lo"]) else ""
    return f"{'>= ' if r['bound'] else ''}{r['labels_saved']:.0f}{ci}"


def analyze_data_axis(df: pd.DataFrame, out_dir: str | Path, *, predictions: dict | None = None,
                      n_boot: int = 1000, seed: int = 0, random_init: bool = False) -> dict:
    """Data curves, their verdicts, labels saved, plots; data_verdicts.csv, labels_saved.csv and
    data_axis.md under `out_dir`. Returns the paths, the curves and the markdown section."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    curves = data_curves(df, predictions, n_boot, seed)
    verdicts = judge_data_curves(curves)
    vrows = [{"dataset": c.key.dataset, "protocol": c.key.protocol, "metric": c.key.metric,
              "weights": c.key.weights, "encoder": c.encoder, "resolution": c.resolution,
              "sizes": " ".join(c.sizes), "train_cases": " ".join(f"{v:.0f}" for v in c.x),
              **verdict_row(verdicts[c.key])} for c in curves]
    vframe = pd.DataFrame(vrows)
    saved = savings_frame(curves)
    vframe.to_csv(out / "data_verdicts.csv", index=False)
    saved.to_csv(out / "labels_saved.csv", index=False)
    plots = plot_data_curves(curves, out / "plots", random_init)
    md = ["## Training-set size", "",
          "Metric vs the number of training cases (nested, stratified, patient-level subsets of each "
          "cell's training split; validation and test whole). One verdict per curve (their own family, Benjamini-Hochberg; `order: ...` without intervals).", "",
          "| dataset | protocol | metric | encoder @ px | train cases | verdict | reason |", "|---|---|---|---|---|---|---|"]
    if not curves and ("n_train" not in df.columns or df["n_train"].isna().all()):
        md += ["", "No data curve: the points give no training-case counts (an `n_train` column or metric "
               "rows, or a `train_size` column of cases), which are the curves' x."]
    for r in vrows:
        md.append(f"| {r['dataset']} | {r['protocol']} | {r['metric']} | {r['encoder']} @ {r['resolution']} | "
                  f"{r['train_cases']} | **{r['label']}** | {r['reason']} |")
    if not saved.empty:
        md += ["", "Labels a larger encoder saves for the same metric (the smaller encoder's full-data value; "
               f"{CI_LEVEL:.0%} interval over replicates):", "",
               "| dataset | protocol | metric | px | smaller -> larger | target | cases saved | ratio |",
               "|---|---|---|---|---|---|---|---|"]
        for _, r in saved.iterrows():
            md.append(f"| {r['dataset']} | {r['protocol']} | {r['metric']} | {r['resolution']} | {r['smaller']} -> "
                      f"{r['larger']} | {r['target']:.4f} | {_fmt_saved(r)} of {r['n_smaller']:.0f} | "
                      f"{r['ratio']:.2f} |")
    md += [""] + [f"![{p.stem}](plots/{p.name})" for p in plots]
    text = "\n".join(md) + "\n"
    (out / "data_axis.md").write_text(text)
    return {"curves": curves, "verdicts": verdicts, "verdict_table": vframe, "savings": saved,
            "plots": [str(p) for p in plots], "markdown": text, "data_verdicts": str(out / "data_verdicts.csv")}
