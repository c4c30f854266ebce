"""Scaling plots from aggregated points: metric vs parameters and metric vs resolution.

One figure per (dataset, protocol, metric) with two panels, in the spirit of the paper's Figure 1:
(a) the metric against parameter count (log x), one line per input resolution;
(b) the metric against input resolution (log2 x), one line per encoder.
Error bars are the aggregate's 95% interval and are drawn only where seeds give a spread.
Figures are built on the Agg canvas directly (no pyplot): no global state, no display needed.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib import rc_context
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import FixedLocator, NullLocator

from analysis.points import model_label, plotted_metrics

FIGSIZE = (11.0, 4.4)  # inches; at DPI this is the PNG's size in pixels
DPI = 120
RANDOM_NOTE = "RANDOM-INIT weights: these numbers say nothing about pretrained scaling"
METRIC_LABELS = {"auc": "AUC", "acc": "accuracy", "precision": "precision", "recall": "recall",
                 "f1_macro": "F1 (macro)", "f1_weighted": "F1 (weighted)"}


def metric_label(metric: str) -> str:
    return METRIC_LABELS.get(metric, metric)


def safe_name(*parts: object) -> str:
    """File stem from name parts: 'nih14__linear_probe__auc' (names keep their own underscores)."""
    return "__".join(re.sub(r"[^A-Za-z0-9._-]+", "-", str(p)).strip("-") or "x" for p in parts)


def _colors(n: int) -> list:
    # An ordered colormap: small -> large reads as light -> dark in both panels.
    from matplotlib import colormaps

    cmap = colormaps["viridis"]
    return [cmap(x) for x in (np.linspace(0.8, 0.0, n) if n > 1 else [0.3])]


def _dodge(i: int, k: int, agg: pd.DataFrame) -> float:
    # With error bars, lines sharing x values are shifted a few percent (log axes) to keep the bars
    # apart; without them the markers stay exactly on their ticks.
    return 1.025 ** (i - (k - 1) / 2) if agg["ci_lo"].notna().any() else 1.0


def _draw(ax: Axes, x: np.ndarray, sub: pd.DataFrame, label: str, color) -> None:
    y = sub["mean"].to_numpy(float)
    lo, hi = sub["ci_lo"].to_numpy(float), sub["ci_hi"].to_numpy(float)
    ax.plot(x, y, "o-", color=color, label=label, lw=1.6, ms=5)
    spread = np.isfinite(lo) & np.isfinite(hi)
    if spread.any():
        err = np.vstack([y - lo, hi - y])[:, spread]
        ax.errorbar(x[spread], y[spread], yerr=err, fmt="none", ecolor=color, capsize=3, lw=1)


def plot_vs_params(ax: Axes, agg: pd.DataFrame, metric: str, several_kinds: bool) -> None:
    """Panel (a): one line per resolution (and weights kind when mixed) over parameter count."""
    agg = agg[agg["params"] > 0]  # runs logged without a parameter count cannot go on a log axis
    if agg.empty:
        ax.text(0.5, 0.5, "parameter counts not recorded", ha="center", transform=ax.transAxes)
        return
    keys = sorted({(int(r), str(w)) for r, w in zip(agg["resolution"], agg["weights"], strict=True)})
    for i, ((res, w), color) in enumerate(zip(keys, _colors(len(keys)), strict=True)):
        sub = agg[(agg["resolution"] == res) & (agg["weights"] == w)].sort_values(["params", "encoder"])
        label = f"{res} px" + (f" ({w})" if several_kinds and w else "")
        _draw(ax, sub["params"].to_numpy(float) / 1e6 * _dodge(i, len(keys), agg), sub, label, color)
    ax.set_xscale("log")
    # Ticks at the encoders themselves, named: a log axis alone hides which model is where.
    ticks = agg.groupby("params")["encoder"].agg(lambda s: "/".join(sorted(set(s))))
    ax.xaxis.set_major_locator(FixedLocator(ticks.index.to_numpy(float) / 1e6))
    ax.xaxis.set_minor_locator(NullLocator())
    ax.set_xticklabels([f"{p / 1e6:.1f}\n{name}" for p, name in ticks.items()], fontsize=8)
    _pad_log(ax, ticks.index.to_numpy(float) / 1e6)
    ax.set_xlabel("params (M)")
    ax.set_ylabel(metric_label(metric))
    ax.set_title(f"(a) {metric_label(metric)} vs model size", fontsize=10)
    ax.legend(title="input resolution", fontsize=8, title_fontsize=8)


def plot_vs_resolution(ax: Axes, agg: pd.DataFrame, metric: str, several_kinds: bool) -> None:
    """Panel (b), the paper's Figure 1: one line per encoder over input resolution."""
    models = (agg[["encoder", "weights", "params"]].drop_duplicates()
              .sort_values(["params", "encoder", "weights"]).itertuples(index=False))
    models = list(models)
    for i, ((enc, w, p), color) in enumerate(zip(models, _colors(len(models)), strict=True)):
        sub = agg[(agg["encoder"] == enc) & (agg["weights"] == w)].sort_values("resolution")
        label = f"{model_label(enc, w, several_kinds)} ({p / 1e6:.1f}M)"
        _draw(ax, sub["resolution"].to_numpy(float) * _dodge(i, len(models), agg), sub, label, color)
    res = np.array(sorted(agg["resolution"].unique()), dtype=float)
    ax.set_xscale("log", base=2)
    ax.xaxis.set_major_locator(FixedLocator(res))
    ax.xaxis.set_minor_locator(NullLocator())
    ax.set_xticklabels([str(int(r)) for r in res], fontsize=8)
    _pad_log(ax, res)
    ax.set_xlabel("input resolution (px)")
    ax.set_ylabel(metric_label(metric))
    ax.set_title(f"(b) {metric_label(metric)} vs input resolution", fontsize=10)
    ax.legend(title="encoder", fontsize=8, title_fontsize=8)


def _pad_log(ax: Axes, xs: np.ndarray) -> None:
    # A single x value would give a zero-width log axis; pad by a fixed factor either side.
    lo, hi = float(xs.min()), float(xs.max())
    ax.set_xlim(lo / 1.25, hi * 1.25)


def scaling_figure(agg: pd.DataFrame, dataset: str, protocol: str, metric: str,
                   random_init: bool, several_kinds: bool) -> Figure:
    fig = Figure(figsize=FIGSIZE, dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    if random_init:
        # Keep the bottom strip free for the warning; constrained layout ignores free text.
        fig.get_layout_engine().set(rect=(0, 0.07, 1, 0.93))
        fig.text(0.01, 0.015, RANDOM_NOTE, color="crimson", fontsize=11, weight="bold")
    ax_a, ax_b = fig.subplots(1, 2)
    plot_vs_params(ax_a, agg, metric, several_kinds)
    plot_vs_resolution(ax_b, agg, metric, several_kinds)
    for ax in (ax_a, ax_b):
        ax.grid(True, alpha=0.3)
    lo, hi = int(agg["n"].min()), int(agg["n"].max())
    seeds = f"{lo} seed{'s' if lo > 1 else ''}" if lo == hi else f"{lo}-{hi} seeds"
    bars = "error bars: 95% t-interval over seeds" if hi >= 2 else "no error bars: one seed per cell"
    fig.suptitle(f"{dataset} / {protocol} / {metric_label(metric)}   ({seeds}; {bars})", fontsize=11)
    return fig


def save_figure(fig: Figure, out_dir: Path, stem: str) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / f"{stem}.png", out_dir / f"{stem}.svg"]
    # A fixed hash salt and no date keep the SVGs identical between runs on the same data; text
    # stays text (not paths) so it can be searched and copied.
    with rc_context({"svg.hashsalt": "medscale", "svg.fonttype": "none"}):
        fig.savefig(paths[0], dpi=DPI, metadata={"Software": None})
        fig.savefig(paths[1], metadata={"Date": None})
    return paths


def plot_all(agg: pd.DataFrame, out_dir: Path, metrics: Iterable[str] | None = None) -> list[Path]:
    """Both panels per (dataset, protocol, metric) of an aggregate; PNG and SVG paths.

    Metrics default to `plotted_metrics` per (dataset, protocol). A figure any of whose points has
    random-init weights carries RANDOM_NOTE.
    """
    several_kinds = agg["weights"].nunique() > 1
    paths: list[Path] = []
    for (dataset, protocol), group in agg.groupby(["dataset", "protocol"], sort=True):
        wanted = plotted_metrics(metrics if metrics is not None else group["metric"].unique())
        for metric in wanted:
            sub = group[group["metric"] == metric]
            if sub.empty:
                continue
            random_init = bool((sub["weights"] == "random").any())
            fig = scaling_figure(sub, str(dataset), str(protocol), metric, random_init, several_kinds)
            paths += save_figure(fig, out_dir, safe_name(dataset, protocol, metric))
    return paths
