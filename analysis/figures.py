"""The analysis figures, PNG and SVG, one set per protocol; panels are (dataset, metric) groups.

- ``fig1``: the paper's Figure 1: metric vs input resolution, one line per encoder, 95% CI band and
  the AICc-selected fit of each curve (dashed);
- ``params``: metric vs parameters (log), one line per input resolution, bands and fits;
- ``heatmap``: encoder x resolution, the mean in each cell, the best one boxed;
- ``gflops``: metric vs inference GFLOPs per image, every cell, the Pareto frontier (cells no
  cheaper cell beats) joined and ringed;
- ``forest``: per curve, (largest x - best smaller x) with its CI, in units of the curve's
  equivalence margin so that AUC, Dice in % and distances in mm share one axis: inside +-1 is
  "negligible" by the verdict rules; colour is the verdict.

Sizes are fixed by the panel count (`grid_size`, `forest_size`), so a figure's pixel size is known
in advance (the tests check it). Panels beyond MAX_PANELS (forest: MAX_ROWS) go to further parts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import FixedLocator, NullFormatter, NullLocator

from analysis.curves import Curve, Group, curve_order
from analysis.metric_table import axis_label
from analysis.plots import DPI, RANDOM_NOTE, metric_label, ordered_colors, safe_name, save_figure
from analysis.study import Study
from analysis.tables import fmt_effect

PANEL_W, PANEL_H, HEADER_H = 4.75, 2.75, 0.6  # inches; x DPI (120) whole pixels
# left (room for the y label), right (the legend sits there, outside the data), top, bottom; inches
PANEL_MARGINS = (0.72, 1.4, 0.28, 0.58)
MAX_COLS, MAX_PANELS = 4, 24
FOREST_W, FOREST_ROW_H, FOREST_PAD_H, MAX_ROWS = 11.0, 0.25, 1.25, 60
FOREST_MARGINS = (4.1, 2.3, 0.05, 0.55)
KINDS = ("fig1", "params", "heatmap", "gflops")
VERDICT_COLORS = {"scales": "#1a9850", "saturates": "#91cf60", "peaks": "#fc8d59", "inverse": "#d73027",
                  "flat": "#878787", "noisy": "#8073ac", "mixed": "#b35806", "degenerate": "#cccccc"}
TITLES = {"fig1": "metric vs input resolution, one line per encoder (Figure 1 style)",
          "params": "metric vs parameters, one line per input resolution",
          "heatmap": "encoder x input resolution", "gflops": "metric vs inference GFLOPs, Pareto frontier ringed"}
CAPTIONS = {
    "fig1": "Metric vs input resolution, one line per encoder (Figure 1 style); band: 95% CI; dashed: the "
            "AICc-selected form (curves of >= 4 points; 3 admit only a constant)",
    "params": "Metric vs parameters, one line per input resolution; band: 95% CI; dashed: the AICc-selected form "
              "(curves of >= 4 points)",
    "heatmap": "Encoder x input resolution; the best cell is boxed",
    "gflops": "Metric vs inference GFLOPs per image; ringed and joined: the Pareto frontier",
    "forest": "Largest x minus the best smaller x, per curve, in units of its margin (+-1: negligible)",
}


@dataclass
class Plot:
    kind: str
    title: str
    png: Path
    svg: Path
    size: tuple[int, int]  # PNG pixels (width, height)
    legends_outside: bool = True  # every legend lies outside its panel's data area (checked when drawn)
    datasets: tuple[str, ...] = ()  # the datasets with a panel in it


def grid_size(n_panels: int) -> tuple[float, float]:
    """Inches: panels of a fixed size, MAX_COLS a row; never narrower than two panels (the title)."""
    cols = min(MAX_COLS, n_panels)
    return max(cols, 2) * PANEL_W, math.ceil(n_panels / cols) * PANEL_H + HEADER_H


def forest_size(n_rows: int) -> tuple[float, float]:
    return FOREST_W, n_rows * FOREST_ROW_H + FOREST_PAD_H


def _new_figure(size: tuple[float, float], title: str, random_init: bool, margins: tuple[float, ...],
                gaps: tuple[float, float] = (0.0, 0.0)) -> Figure:
    """A figure with fixed margins in inches (left, right, top, bottom) and gaps between panels.

    Why not constrained layout: it measures every text many times over, which took ~80% of the
    time of a reference report's 100+ panels; fixed margins fit panels whose size is fixed anyway.
    """
    w, h = size
    fig = Figure(figsize=size, dpi=DPI)
    FigureCanvasAgg(fig)
    left, right, top, bottom = margins
    fig.subplots_adjust(left=left / w, right=1 - right / w, top=1 - (HEADER_H + top) / h, bottom=bottom / h,
                        wspace=gaps[0], hspace=gaps[1])
    fig.suptitle(title, fontsize=10, y=1 - 0.08 / h, va="top")
    if random_init:  # under the title, on every figure of random-init weights
        fig.text(0.01, 1 - 0.34 / h, RANDOM_NOTE, color="crimson", fontsize=9, weight="bold", va="top")
    return fig


def _lohi(g: Group) -> tuple[np.ndarray, np.ndarray]:
    return g.cells["ci_lo"].to_numpy(float), g.cells["ci_hi"].to_numpy(float)


def _thin(xs: np.ndarray, labels: list[str], min_gap: float = 0.09) -> list[str]:
    """Blank the label of a tick closer (in log x, as a share of the axis) to the last labelled
    one than ``min_gap``: 224 and 256 px side by side would print on top of each other."""
    lx = np.log(np.asarray(xs, float))
    span = max(float(lx.max() - lx.min()) + 2 * np.log(1.3), 1e-9)
    out, last = [], -np.inf
    for v, lab in zip(lx, labels, strict=True):
        keep = (v - last) / span >= min_gap
        out.append(lab if keep else "")
        last = v if keep else last
    return out


def _log_ticks(ax: Axes, xs: np.ndarray, labels: list[str], base: float = 10) -> None:
    ax.set_xscale("log", base=base)
    ax.xaxis.set_major_locator(FixedLocator(xs))
    ax.xaxis.set_minor_locator(NullLocator())
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xticklabels(_thin(xs, labels), fontsize=7)
    ax.set_xlim(float(xs.min()) / 1.3, float(xs.max()) * 1.3)


def _nice_log_ticks(lo: float, hi: float) -> np.ndarray:
    """1-2-5 values within [lo, hi]; the ends when fewer than two fall inside."""
    e = np.arange(np.floor(np.log10(lo)) - 1, np.ceil(np.log10(hi)) + 1)
    cand = np.sort((10.0 ** e[:, None] * np.array([1.0, 2.0, 5.0])[None]).ravel())
    inside = cand[(cand >= lo) & (cand <= hi)]
    return inside if inside.size >= 2 else np.array([lo, hi])


def _line(ax: Axes, study: Study, c: Curve, scale: float, label: str, color) -> None:
    """A curve's points, CI band and fitted form (metric units; x divided by `scale`)."""
    v = study.verdicts[c.key]
    y = c.cells["mean"].to_numpy(float)
    lo, hi = c.cells["ci_lo"].to_numpy(float), c.cells["ci_hi"].to_numpy(float)
    ax.plot(c.x / scale, y, "o-", color=color, lw=1.3, ms=4, label=f"{label}: {v.label}")
    if np.isfinite(lo).all() and np.isfinite(hi).all():
        ax.fill_between(c.x / scale, lo, hi, color=color, alpha=0.18, lw=0)
    if v.fit.selected and c.x.size >= 4:  # with 3 points AICc (K <= n - 2) can only pick a constant
        ax.plot(v.fit.grid_x / scale, c.sign * v.fit.grid_y(), "--", color=color, lw=1, alpha=0.9)


def _panel_fig1(ax: Axes, study: Study, g: Group, curves: list[Curve]) -> None:
    mine = [c for c in curves if c.key.axis == "resolution"]
    for c, color in zip(mine, ordered_colors(len(mine)), strict=True):
        _line(ax, study, c, 1.0, c.key.fixed, color)
    res = np.unique(np.concatenate([c.x for c in mine]))
    _log_ticks(ax, res, [str(int(r)) for r in res], base=2)
    ax.set_xlabel("input resolution (px)", fontsize=8)


def _panel_params(ax: Axes, study: Study, g: Group, curves: list[Curve]) -> None:
    mine = [c for c in curves if c.key.axis == "params"]
    for c, color in zip(mine, ordered_colors(len(mine)), strict=True):
        _line(ax, study, c, 1e6, c.key.fixed, color)
    p = g.cells.drop_duplicates("params").sort_values("params")
    _log_ticks(ax, p["params"].to_numpy(float) / 1e6,
               [f"{x / 1e6:.0f}M\n{e.removeprefix('dinov3_')}" for x, e in zip(p["params"], p["encoder"], strict=True)])
    ax.set_xlabel("parameters", fontsize=8)


def _panel_heatmap(ax: Axes, study: Study, g: Group, curves: list[Curve]) -> None:
    cells = g.cells[g.cells["resolution"] > 0]
    encs = list(cells.sort_values(["params", "encoder"])["encoder"].unique())
    res = sorted(int(r) for r in cells["resolution"].unique())
    m = np.full((len(encs), len(res)), np.nan)
    for e, r, y in zip(cells["encoder"], cells["resolution"], cells["mean"], strict=True):
        m[encs.index(e), res.index(int(r))] = y
    sign = curves[0].sign if curves else 1
    ax.imshow(np.ma.masked_invalid(m), cmap="viridis" if sign > 0 else "viridis_r", aspect="auto")
    best = np.unravel_index(np.nanargmax(sign * m), m.shape)
    for (i, j), y in np.ndenumerate(m):
        if np.isfinite(y):
            ax.text(j, i, f"{y:.4g}", ha="center", va="center", fontsize=7, color="w" if (sign * y) < np.nanmean(sign * m)
                    else "k", weight="bold" if (i, j) == best else "normal")
    ax.add_patch(_box(best))
    ax.set_xticks(range(len(res)), [str(r) for r in res], fontsize=7)
    ax.set_yticks(range(len(encs)), [e.removeprefix("dinov3_") for e in encs], fontsize=7)
    ax.set_xlabel("input resolution (px)", fontsize=8)


def _box(ij):
    from matplotlib.patches import Rectangle

    return Rectangle((ij[1] - 0.5, ij[0] - 0.5), 1, 1, fill=False, ec="crimson", lw=2)


def pareto_front(gflops: np.ndarray, oriented: np.ndarray) -> np.ndarray:
    """Indices (by increasing GFLOPs) of cells that beat every cheaper-or-equal cell."""
    order = np.lexsort((-oriented, gflops))
    front, best = [], -np.inf
    for i in order:
        if oriented[i] > best:
            front.append(i)
            best = oriented[i]
    return np.array(front, dtype=int)


def _panel_gflops(ax: Axes, study: Study, g: Group, curves: list[Curve]) -> None:
    cells = g.cells[np.isfinite(g.cells["gflops"].to_numpy(float))]
    lo, hi = cells["ci_lo"].to_numpy(float), cells["ci_hi"].to_numpy(float)
    encs = list(cells.sort_values("params")["encoder"].unique())
    for e, color in zip(encs, ordered_colors(len(encs)), strict=True):
        k = (cells["encoder"] == e).to_numpy()
        x, y = cells["gflops"].to_numpy(float)[k], cells["mean"].to_numpy(float)[k]
        ax.plot(x, y, "o", color=color, ms=5, label=e.removeprefix("dinov3_"))
        ok = np.isfinite(lo[k]) & np.isfinite(hi[k])
        if ok.any():
            ax.errorbar(x[ok], y[ok], yerr=np.vstack([y - lo[k], hi[k] - y])[:, ok], fmt="none", ecolor=color, lw=1)
        for xi, yi, r in zip(x, y, cells["resolution"].to_numpy()[k], strict=True):
            ax.annotate(str(int(r)), (xi, yi), fontsize=6, xytext=(3, 3), textcoords="offset points")
    x, y = cells["gflops"].to_numpy(float), cells["mean"].to_numpy(float)
    sign = curves[0].sign if curves else 1
    f = pareto_front(x, sign * y)
    ax.plot(x[f], y[f], "-", color="k", lw=1, drawstyle="steps-post", label="Pareto frontier")
    ax.plot(x[f], y[f], "o", mfc="none", mec="k", ms=9, mew=1.2)
    ticks = _nice_log_ticks(float(np.nanmin(x)) / 1.3, float(np.nanmax(x)) * 1.3)
    _log_ticks(ax, ticks, [f"{t:,.0f}" if t >= 100 else f"{t:g}" for t in ticks])
    ax.set_xlim(float(np.nanmin(x)) / 1.3, float(np.nanmax(x)) * 1.3)
    ax.set_xlabel("inference GFLOPs / image", fontsize=8)


PANELS = {"fig1": _panel_fig1, "params": _panel_params, "heatmap": _panel_heatmap, "gflops": _panel_gflops}


def _wanted(kind: str, g: Group, curves: list[Curve]) -> bool:
    if kind == "fig1":
        return any(c.key.axis == "resolution" for c in curves)
    if kind == "params":
        return any(c.key.axis == "params" for c in curves)
    if kind == "heatmap":
        return bool((g.cells["resolution"] > 0).any())
    return int(np.isfinite(g.cells["gflops"].to_numpy(float)).sum()) >= 2


def grid_figures(study: Study, out_dir: Path) -> list[Plot]:
    """fig1, params, heatmap and gflops figures per protocol (and part), where the data allow."""
    by_group: dict[int, list[Curve]] = {}
    for c in study.curves:
        gi = next(i for i, g in enumerate(study.groups) if _same(g, c))
        by_group.setdefault(gi, []).append(c)
    several = len({str(g.cells["weights"].iloc[0]) for g in study.groups}) > 1
    plots = []
    for kind in KINDS:
        protocols = sorted({str(g.cells["protocol"].iloc[0]) for g in study.groups})
        for proto in protocols:
            panels = [(g, by_group.get(i, [])) for i, g in enumerate(study.groups)
                      if str(g.cells["protocol"].iloc[0]) == proto and _wanted(kind, g, by_group.get(i, []))]
            parts = [panels[i:i + MAX_PANELS] for i in range(0, len(panels), MAX_PANELS)]
            for n, part in enumerate(parts, 1):
                suffix = f" (part {n} of {len(parts)})" if len(parts) > 1 else ""
                title = f"{proto}: {TITLES[kind]}{suffix}"
                stem = safe_name(kind, proto) + (f"__part{n}" if len(parts) > 1 else "")
                plots.append(_grid(kind, part, study, title, out_dir, stem, several))
    return plots


def _same(g: Group, c: Curve) -> bool:
    r = g.cells.iloc[0]
    return (str(r["dataset"]), str(r["protocol"]), str(r["metric"]), str(r["weights"])) == \
        (c.key.dataset, c.key.protocol, c.key.metric, c.key.weights)


def _grid(kind: str, panels: list, study: Study, title: str, out_dir: Path, stem: str, several: bool) -> Plot:
    size = grid_size(len(panels))
    random_init = any((g.cells["weights"] == "random").any() for g, _ in panels)
    left, right, top, bottom = PANEL_MARGINS
    ax_w, ax_h = PANEL_W - left - right, PANEL_H - top - bottom
    # one panel's margins either side become the gap between neighbours (fractions of an axes)
    fig = _new_figure(size, title, random_init, (left, right, top, bottom),
                      ((left + right) / ax_w, (top + bottom) / ax_h))
    cols = min(MAX_COLS, len(panels))
    axes = fig.subplots(math.ceil(len(panels) / cols), cols, squeeze=False).ravel()
    for ax, (g, curves) in zip(axes, panels, strict=False):
        PANELS[kind](ax, study, g, curves)
        r = g.cells.iloc[0]
        w = f" [{r['weights']}]" if several and r["weights"] else ""
        arrow = "" if kind != "heatmap" or not curves or curves[0].sign > 0 else " ↓"
        ax.set_title(f"{r['dataset']}{w}: {metric_label(str(r['metric']))}{arrow}", fontsize=8)
        ax.tick_params(labelsize=7)
        if kind != "heatmap":
            ax.grid(True, alpha=0.3)
            ax.set_ylabel(axis_label(str(r["metric"]), g.unit), fontsize=7)
            # outside the data, to the right of the panel: it can never hide a point
            ax.legend(fontsize=6, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0, frameon=False)
    for ax in axes[len(panels):]:
        ax.set_axis_off()
    plot = _save(kind, fig, out_dir, stem, title, size)
    plot.legends_outside = legends_outside(fig)
    plot.datasets = tuple(dict.fromkeys(str(g.cells["dataset"].iloc[0]) for g, _ in panels))
    return plot


def legends_outside(fig: Figure) -> bool:
    """True when no legend's box overlaps its axes' data area (after the figure was drawn)."""
    renderer = fig.canvas.get_renderer()
    for ax in fig.axes:
        leg = ax.get_legend()
        if leg is not None and leg.get_window_extent(renderer).overlaps(ax.get_window_extent(renderer)):
            return False
    return True


def _save(kind: str, fig: Figure, out_dir: Path, stem: str, title: str, size: tuple[float, float]) -> Plot:
    png, svg = save_figure(fig, out_dir, stem)
    return Plot(kind, title, png, svg, (round(size[0] * DPI), round(size[1] * DPI)))


def forest_figures(study: Study, out_dir: Path) -> list[Plot]:
    """(largest - best smaller) per curve with its CI, in margin units; one figure per MAX_ROWS curves."""
    rows = [c for c in sorted(study.curves, key=lambda c: (c.key.axis, curve_order(c)))
            if np.isfinite(study.verdicts[c.key].gain_top.estimate)]
    parts = [rows[i:i + MAX_ROWS] for i in range(0, len(rows), MAX_ROWS)]
    plots = []
    for n, part in enumerate(parts, 1):
        size = forest_size(len(part))
        suffix = f" (part {n} of {len(parts)})" if len(parts) > 1 else ""
        title = CAPTIONS["forest"] + suffix
        fig = _new_figure(size, title, any(c.key.weights == "random" for c in part), FOREST_MARGINS)
        ax = fig.subplots()
        for i, c in enumerate(part):
            v = study.verdicts[c.key]
            e = v.gain_top
            color = VERDICT_COLORS.get(v.verdict, "#444444")
            ax.plot([e.lo / c.margin, e.hi / c.margin], [i, i], "-", color=color, lw=2)
            ax.plot([e.estimate / c.margin], [i], "s" if v.no_ci else "o", color=color, ms=5)
            ax.annotate(f"{v.label}  {fmt_effect(e, v.no_ci)}", (1.01, i),
                        xycoords=("axes fraction", "data"), fontsize=7, va="center", color=color)
        for xv, ls in ((0, "-"), (-1, ":"), (1, ":")):
            ax.axvline(xv, color="k", ls=ls, lw=0.8)
        # linear within the margins, logarithmic beyond: a distance in mm can be thousands of margins
        ax.set_xscale("symlog", linthresh=1.0)
        ax.margins(x=0.06)
        several = len({c.key.weights for c in study.curves}) > 1
        ax.set_yticks(range(len(part)), [_short(c, several) for c in part], fontsize=7)
        ax.set_ylim(len(part) - 0.5, -0.5)
        ax.set_xlabel("(largest - best smaller) / margin   (square: no CI; text: value [95% CI] in metric "
                      "units, oriented so + is better)", fontsize=8)
        plots.append(_save("forest", fig, out_dir, "forest" + (f"__part{n}" if len(parts) > 1 else ""), title, size))
    return plots


def _short(c: Curve, several: bool) -> str:
    k = c.key
    w = f" [{k.weights}]" if several and k.weights else ""
    return f"{k.dataset}/{k.protocol}: {k.metric}{w} vs {k.axis} @ {k.fixed.replace('resolution ', 'res ')}"


def all_figures(study: Study, out_dir: Path) -> list[Plot]:
    return grid_figures(study, out_dir) + forest_figures(study, out_dir)
