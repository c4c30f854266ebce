"""Plot helpers shared by the analysis figures (`analysis.figures`): labels, file names, colours
and saving. Figures are built on the Agg canvas directly (no pyplot): no global state, no display.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
from matplotlib import rc_context
from matplotlib.figure import Figure

DPI = 120  # a figure's PNG is its size in inches x DPI pixels
RANDOM_NOTE = "RANDOM-INIT weights: these numbers say nothing about pretrained scaling"
def metric_label(metric: str) -> str:
    """A metric's name for people, from the one metric table (`analysis.metric_table`)."""
    from analysis.metric_table import metric_label as label

    return label(metric)


def safe_name(*parts: object) -> str:
    """File stem from name parts: 'params__linear_probe' (names keep their own underscores)."""
    return "__".join(re.sub(r"[^A-Za-z0-9._-]+", "-", str(p)).strip("-") or "x" for p in parts)


def ordered_colors(n: int) -> list:
    """An ordered colormap: small -> large reads as light -> dark in every figure."""
    from matplotlib import colormaps

    cmap = colormaps["viridis"]
    return [cmap(x) for x in (np.linspace(0.8, 0.0, n) if n > 1 else [0.3])]


def save_figure(fig: Figure, out_dir: Path, stem: str) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / f"{stem}.png", out_dir / f"{stem}.svg"]
    # A fixed hash salt and no date keep the SVGs identical between runs on the same data; text
    # stays text (not paths) so it can be searched and copied.
    with rc_context({"svg.hashsalt": "medscale", "svg.fonttype": "none"}):
        fig.savefig(paths[0], dpi=DPI, metadata={"Software": None})
        fig.savefig(paths[1], metadata={"Date": None})
    return paths
