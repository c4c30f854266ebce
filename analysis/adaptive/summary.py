"""What an adaptive sweep concluded, per curve: `adaptive_curves.csv` (written by the live loop,
orchestrator/sweep/adaptive.py), the lines it prints at the end, and the report's section on it
(`medscale analyze --config` adds it when the sweep's output holds the file)."""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd

from analysis.adaptive.policy import CurveStatus
from analysis.curves import CurveKey
from analysis.document import Document
from analysis.study import KEY_COLUMNS

ADAPTIVE_CURVES = "adaptive_curves.csv"
ROUNDS_FIGURE = "adaptive_rounds"  # .png / .svg beside it: curves settled vs cost spent per round
COLUMNS = [*KEY_COLUMNS, "verdict", "status", "settled_round", "reason", "n_points", "planned_points"]


def curves_frame(final: dict[CurveKey, CurveStatus]) -> pd.DataFrame:
    """One row per curve of the full grid that had points: the adaptive verdict, settled or open,
    the round it settled at (the first look that settled it), why."""
    rows = [{**dict(zip(KEY_COLUMNS, (k.dataset, k.protocol, k.metric, k.weights, k.axis, k.fixed), strict=True)),
             "verdict": s.verdict, "status": "settled" if s.settled else "open",
             "settled_round": s.settled_round if s.settled else None, "reason": s.reason,
             "n_points": s.n_points, "planned_points": s.planned_points}
            for k, s in sorted(final.items(), key=lambda kv: kv[0])]
    out = pd.DataFrame(rows, columns=COLUMNS)
    out["settled_round"] = out["settled_round"].astype("Int64")
    return out


def label(row: pd.Series) -> str:
    return f"{row['dataset']} / {row['protocol']} / {row['metric']} vs {row['axis']} @ {row['fixed']}"


def end_lines(curves: pd.DataFrame, limit: int = 12) -> list[str]:
    """Which curves settled at which round, which stayed open and why (at most `limit` named each)."""
    lines = []
    settled = curves[curves["status"] == "settled"]
    for rnd, g in settled.groupby("settled_round", sort=True):
        lines.append(f"settled at round {int(rnd)}: {len(g)} curve(s)")
        lines += [f"  {label(r)}: {r['verdict']}" for _, r in g.head(limit).iterrows()]
        if len(g) > limit:
            lines.append(f"  ... and {len(g) - limit} more ({ADAPTIVE_CURVES})")
    open_ = curves[curves["status"] == "open"]
    lines.append(f"open: {len(open_)} curve(s)")
    for reason, g in open_.groupby("reason", sort=False):
        lines.append(f"  {len(g)} open because {reason}: " + "; ".join(label(r) for _, r in g.head(3).iterrows())
                     + (" ..." if len(g) > 3 else ""))
    return lines


def adaptive_section(doc: Document, curves: pd.DataFrame, out_dir: Path | None = None) -> None:
    """The report's "Adaptive sweep" section: per curve, the round at which it settled (and the
    rounds' figure, `curves.attrs["figure"]`, where the sweep drew it; linked relative to ``out_dir``)."""
    doc.heading("Adaptive sweep")
    n_open = int((curves["status"] == "open").sum())
    doc.para(f"This sweep ran adaptively (docs/analysis.md, \"Adaptive sweeps\"): {len(curves) - n_open} of "
             f"{len(curves)} curves settled, {n_open} stayed open. The verdict here is the adaptive one "
             "(claims frozen at an interim look, the rest at the final look's level), from `adaptive_curves.csv`; "
             "the sections above judge the same points as an ordinary analysis.")
    fig = curves.attrs.get("figure")
    if fig is not None and Path(fig).is_file() and out_dir is not None:
        rel = os.path.relpath(fig, out_dir)
        doc.image(Path(fig), "Curves settled against the share of the full grid's cost spent, per round.", rel,
                  link=str(Path(rel).with_suffix(".svg")))
    rows = [[label(r), str(r["verdict"]), str(r["status"]),
             "-" if pd.isna(r["settled_round"]) else str(int(r["settled_round"])),
             f"{int(r['n_points'])}/{int(r['planned_points'])}", str(r["reason"])]
            for _, r in curves.iterrows()]
    doc.table(["curve", "verdict", "status", "settled at round", "points run/planned", "why"], rows,
              align=["l", "l", "l", "r", "r", "l"])
