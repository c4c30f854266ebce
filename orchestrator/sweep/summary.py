"""The end of a sweep: `summary.csv` beside the outputs (one row per cell: status, headline
metric, time, reason) and the same table on the terminal."""

from __future__ import annotations

import csv
from typing import Any

from orchestrator import console
from orchestrator.grid.config import SweepConfig
from orchestrator.sweep.listener import SweepOutcome


def write_summary(cfg: SweepConfig, outcome: SweepOutcome) -> None:
    out = cfg.output_path
    rows: list[dict[str, Any]] = []
    for cid, status in sorted(outcome.cells.items()):
        m = outcome.metrics.get(cid, {})
        name, value = console.headline(m)
        rows.append({"cell": cid, "status": status, "metric": name if value is not None else "", "value": value,
                     "compute_s": m.get("compute_s"),
                     "reason": outcome.errors.get(cid) or outcome.skipped.get(cid, "")})
    with (out / "summary.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else ["cell"])
        w.writeheader()
        w.writerows(rows)
    width = max((len(r["cell"]) for r in rows), default=10)
    console.line()
    mw = max((len(r["metric"]) for r in rows), default=6)
    console.line(f"{'cell':<{width}}  {'status':<8}  {'metric':<{mw}}  {'value':>8}  {'time':>7}")
    console.line("-" * (width + mw + 33))
    for r in rows:
        console.line(f"{r['cell']:<{width}}  {r['status']:<8}  {r['metric']:<{mw}}  {console.fmt(r['value'], '8.4f'):>8}  "
           f"{console.fmt(r['compute_s'], '6.1f'):>6}s")
    counts = {s: sum(1 for r in rows if r["status"] == s) for s in ("FINISHED", "FAILED", "SKIPPED")}
    console.line("-" * (width + mw + 33))
    console.line(f"{counts['FINISHED']} finished, {counts['FAILED']} failed, {counts['SKIPPED']} skipped; "
       f"images encoded this run: {outcome.n_encoded}")
    for cid, err in outcome.errors.items():
        console.line(f"FAILED {cid}: {err.splitlines()[0][:300]}")
    console.line(f"results:  {out / 'summary.csv'}   per-cell files: {cfg.sweep_root}/cells")
    console.mlflow_hint(cfg)
