"""Replay the adaptive policy on a finished study: cells are drawn from its points instead of run.

What it answers: had this study run adaptively, which cells would it have run, what would each
curve's verdict have been, and what share of the full grid's cost would it have spent. The full
grid's verdicts are `medscale analyze --points` on every point (BH at the usual level); the
adaptive ones are `AdaptivePolicy.final` on the points drawn.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from analysis.adaptive.cells import (
    PRICINGS,
    candidates_from_points,
    cell_columns,
    cost_of,
    drawn_cells,
    grid_cost,
    priced_by_extraction,
)
from analysis.adaptive.figures import rounds_figure
from analysis.adaptive.judged import judge_points
from analysis.adaptive.policy import OPEN, AdaptivePolicy
from analysis.curves import CurveKey
from analysis.study import KEY_COLUMNS

CURVE_COLUMNS = [*KEY_COLUMNS, "full_verdict", "adaptive_verdict", "same", "status", "settled_round",
                 "reason", "n_points", "planned_points"]
ROUND_COLUMNS = ["round", "cells", "cost", "cost_share", "spent_share", "open_after", "settled_after"]


@dataclass
class ReplayResult:
    curves: pd.DataFrame  # one row per curve of the full grid (CURVE_COLUMNS)
    rounds: pd.DataFrame  # one row per round (ROUND_COLUMNS)
    cells: pd.DataFrame  # the cells run, with their round and why
    agreement: float  # share of curves whose adaptive verdict equals the full grid's
    cost_share: float  # cost of the cells run / cost of the full grid
    extraction_share: float = float("nan")  # encoder work of the extractions they needed / the grid's
    budget: float = float("nan")  # the policy's budget (a share of the grid's cost)

    def by_axis(self) -> dict[str, dict]:
        """Per axis (params, resolution, gflops, train cases): curves, the share that agree, and how
        many of the differing ones stayed open - where the budget, not the policy, decided."""
        out = {}
        for axis, g in self.curves.groupby("axis", sort=True):
            differ = g[~g["same"].astype(bool)]
            out[str(axis)] = {"curves": len(g), "agreement": float(g["same"].mean()),
                              "differ_open": int((differ["status"] == "open").sum()), "differ": len(differ)}
        return out

    def summary(self) -> dict:
        open_ = self.curves[self.curves["status"] == "open"]
        return {"curves": len(self.curves), "agreement": self.agreement, "cost_share": self.cost_share,
                "extraction_share": self.extraction_share, "rounds": len(self.rounds), "cells_run": len(self.cells),
                "open_curves": len(open_), "open_reasons": open_["reason"].value_counts().to_dict(),
                "by_axis": self.by_axis()}


def full_grid_verdicts(points: pd.DataFrame, n_boot: int = 20) -> dict[CurveKey, str]:
    """What `medscale analyze --points` says of every curve, data curves included (verdicts do not
    depend on n_boot: the tests read analytic tails; replicates feed only the reported shape shares)."""
    return {k: v.verdict for k, v in judge_points(points, n_boot).verdicts.items()}


def replay(points: pd.DataFrame, policy: AdaptivePolicy, full: dict[CurveKey, str] | None = None, *,
           pricing: str = "cell", head_share: float = 0.05) -> ReplayResult:
    """Run the policy's rounds on ``points``, each round drawing its cells' points from the study.

    ``pricing``: "cell" (the default: every run pays its GFLOPs x items) or "extraction" (features
    embedded once per dataset x weights x encoder x resolution, each run then paying ``head_share``
    of its dataset's mean extraction: `cells.priced_by_extraction`, what a medscale sweep spends)."""
    pts = points.assign(weights=points["weights"].fillna("").astype(str) if "weights" in points.columns else "")
    cands = base = candidates_from_points(pts)
    if pricing == "extraction":
        cands = priced_by_extraction(base, head_share)
    elif pricing not in PRICINGS:
        raise ValueError(f"pricing {pricing!r}: one of {', '.join(PRICINGS)}")
    # the study judges the families the candidates were planned with (`cells.candidates_from_points`)
    pts = pts.assign(family=pts["encoder"].map(dict(zip(cands["encoder"], cands["family"], strict=True))))
    total = grid_cost(cands)
    key = pts[cell_columns(cands)].merge(cands[cell_columns(cands)].reset_index(), on=cell_columns(cands),
                                         how="left")["index"].to_numpy()
    rnd = policy.initial_cells(cands)
    run, rounds, logs = set(), [], []
    while not rnd.empty:
        run |= set(rnd.cells.index)
        logs.append(rnd.cells.assign(round=rnd.index))
        drawn = pts[pd.Series(key).isin(run).to_numpy()]
        rounds.append({"round": rnd.index, "cells": len(rnd.cells), "cost": rnd.cost,
                       "cost_share": rnd.cost / total, "spent_share": cost_of(cands, sorted(run)) / total})
        rnd = policy.next_cells(drawn, cands)
        st = policy.last_status
        rounds[-1] |= {"open_after": sum(not s.settled for s in st.values()),
                       "settled_after": sum(s.settled for s in st.values())}
    drawn = pts[pd.Series(key).isin(run).to_numpy()]
    final = policy.final(drawn, cands)
    full = full if full is not None else full_grid_verdicts(pts, policy.n_boot)
    rows = []
    for k in sorted(full):
        s = final.get(k)
        verdict = s.verdict if s is not None else OPEN
        rows.append({**dict(zip(KEY_COLUMNS, (k.dataset, k.protocol, k.metric, k.weights, k.axis, k.fixed),
                                strict=True)),
                     "full_verdict": full[k], "adaptive_verdict": verdict, "same": verdict == full[k],
                     "status": "settled" if s is not None and s.settled else "open",
                     "settled_round": s.settled_round if s is not None else None,
                     "reason": s.reason if s is not None else "no point of the curve has run",
                     "n_points": s.n_points if s is not None else 0,
                     "planned_points": s.planned_points if s is not None else 0})
    curves = pd.DataFrame(rows, columns=CURVE_COLUMNS)
    ran = cands.index[drawn_cells(drawn, cands)]
    spent = cost_of(cands, ran)
    cells = pd.concat(logs) if logs else cands.iloc[:0].assign(round=[], reason=[])
    agreement = float(curves["same"].mean()) if len(curves) else 1.0
    # what a medscale sweep would have encoded: every extraction any chosen cell needs, once
    encode = priced_by_extraction(base, 0.0)
    ext = cost_of(encode, ran) / max(grid_cost(encode), 1e-300)
    return ReplayResult(curves, pd.DataFrame(rounds, columns=ROUND_COLUMNS), cells, agreement, spent / total, ext,
                        policy.budget)


def write_replay(result: ReplayResult, out: str | Path) -> dict[str, Path]:
    """curves.csv, rounds.csv, cells.csv, summary.json and replay.png / .svg (`figures.rounds_figure`)
    in ``out``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = {name: out / f"{name}.csv" for name in ("curves", "rounds", "cells")}
    result.curves.to_csv(paths["curves"], index=False)
    result.rounds.to_csv(paths["rounds"], index=False)
    cols = [c for c in (*cell_columns(result.cells), "params", "gflops", "cost", "round", "reason")
            if c in result.cells.columns]
    result.cells[cols].to_csv(paths["cells"], index=False)
    paths["summary"] = out / "summary.json"
    paths["summary"].write_text(json.dumps(result.summary(), indent=2, default=str) + "\n")
    rounds = result.rounds.rename(columns={"settled_after": "settled"})
    paths["figure"] = rounds_figure(rounds, len(result.curves), result.budget, out, "replay", result.curves,
                                    f"adaptive replay: agreement {result.agreement:.3f}, "
                                    f"cost {result.cost_share:.3f} of the full grid")[0]
    return paths
