"""The figure of an adaptive run: what each round bought and, for a replay, how its verdicts compare.

- left: curves settled against the share of the full grid's cost spent, one point per round (the
  round's number beside it), the budget as a dashed line - where the curve flattens, more budget
  buys little;
- right (replay only): the full grid's verdict (rows) against the adaptive one (columns), counts
  in the cells, agreement on the diagonal (boxed), so what differs and how is seen at once.

Written as PNG and SVG (`analysis.plots.save_figure`) beside the run's CSVs.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from analysis.plots import save_figure

# verdicts in the order the report tallies them; `open` last (the adaptive run's own)
ORDER = ("scales", "saturates", "peaks", "inverse", "mixed", "flat", "noisy", "degenerate", "open")


def rounds_figure(rounds: pd.DataFrame, n_curves: int, budget: float, out_dir: Path, stem: str = "adaptive",
                  curves: pd.DataFrame | None = None, title: str = "") -> list[Path]:
    """``rounds``: `round`, `spent_share` and `settled` (curves settled after judging the round);
    ``curves`` (a replay's curves.csv): `full_verdict` and `adaptive_verdict` add the right panel."""
    both = curves is not None and len(curves) > 0
    fig = Figure(figsize=(10.5 if both else 5.5, 4.2))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 2 if both else 1, 1)
    spent = np.r_[0.0, rounds["spent_share"].to_numpy(float)]
    settled = np.r_[0.0, rounds["settled"].to_numpy(float)] / max(n_curves, 1)
    # a round's curves settle once its cells are paid for: a step at each round's spend
    ax.step(spent, settled, where="post", color="#1f4e79")
    ax.plot(spent[1:], settled[1:], "o", color="#1f4e79")
    for r, x, y in zip(rounds["round"], spent[1:], settled[1:], strict=True):
        ax.annotate(f"{int(r)}", (x, y), textcoords="offset points", xytext=(4, -10 if y > 0.05 else 4), fontsize=8)
    if np.isfinite(budget) and budget < 1:
        ax.axvline(budget, color="grey", linestyle="--", linewidth=1)
        ax.text(budget, 0.02, f" budget {budget:.0%}", color="grey", fontsize=8)
    ax.set_xlim(0, max(1.0, float(spent.max()) * 1.05))
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("share of the full grid's cost spent")
    ax.set_ylabel(f"share of the {n_curves} curves settled")
    ax.set_title("curves settled per round (round number beside each point)", fontsize=9)
    ax.grid(alpha=0.3)
    if both:
        _confusion(fig.add_subplot(1, 2, 2), curves)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return save_figure(fig, Path(out_dir), stem)


def _confusion(ax, curves: pd.DataFrame) -> None:
    full, adaptive = curves["full_verdict"].astype(str), curves["adaptive_verdict"].astype(str)
    rows = [v for v in ORDER if v in set(full)] + sorted(set(full) - set(ORDER))
    cols = [v for v in ORDER if v in set(adaptive)] + sorted(set(adaptive) - set(ORDER))
    table = pd.crosstab(full, adaptive).reindex(index=rows, columns=cols, fill_value=0)
    counts = table.to_numpy()
    ax.imshow(counts, cmap="Blues", aspect="auto")
    for i, r in enumerate(rows):
        for j, c in enumerate(cols):
            n = int(counts[i, j])
            if n:
                ax.text(j, i, str(n), ha="center", va="center", fontsize=8,
                        color="white" if n > counts.max() / 2 else "black")
            if r == c:
                ax.add_patch(_box(i, j))
    ax.set_xticks(range(len(cols)), cols, rotation=30, ha="right", fontsize=8)
    ax.set_yticks(range(len(rows)), rows, fontsize=8)
    ax.set_xlabel("adaptive verdict")
    ax.set_ylabel("full grid's verdict")
    same = float((full == adaptive).mean())
    ax.set_title(f"verdicts: {same:.1%} of {len(curves)} curves agree (boxed)", fontsize=9)


def _box(i: int, j: int):
    from matplotlib.patches import Rectangle

    return Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, edgecolor="#d62728", linewidth=1.2)
