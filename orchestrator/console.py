"""What a sweep prints: a banner, one line per extraction and per finished cell, a summary."""

from __future__ import annotations

import csv
from typing import TYPE_CHECKING, Any

from orchestrator.progress import stream

if TYPE_CHECKING:
    from orchestrator.config import SweepConfig
    from orchestrator.extract import ExtractionJob
    from orchestrator.sweep import SweepOutcome


def _p(line: str = "") -> None:
    # progress.stream(): the terminal, also while Ray's own output is sent to the log file.
    print(line, file=stream(), flush=True)


def note(line: str) -> None:
    _p(f"medscale: {line}")


def block(text: str) -> None:
    """A multi-line block (the sweep's plan table) on the console."""
    for line in text.splitlines():
        _p(line)


def banner(cfg: SweepConfig, n_cells: int, skipped: dict[str, str]) -> None:
    g = cfg.grid
    _p(f"== medscale sweep '{cfg.name}': {n_cells} cells "
       f"({len(g.encoders)} encoders x {len(g.resolutions)} resolutions x {len(g.datasets)} datasets x "
       f"{len(g.protocols)} protocols x {len(g.seeds)} seeds"
       f"{f' x {len(g.train_sizes)} train sizes' if len(g.train_sizes) > 1 else ''})")
    if cfg.weights == "random" or isinstance(cfg.weights, dict) and "random" in cfg.weights.values():
        _p("== WEIGHTS: random  -- encoders are RANDOMLY INITIALISED; results say nothing about pretrained models")
    else:
        _p(f"== weights: {cfg.weights}")
    shared = f"   storage: {cfg.storage_root}" if cfg.storage else ""
    _p(f"== output: {cfg.output_path}{shared}   tracking: {cfg.resolved_tracking_uri}")
    for cid, why in skipped.items():
        note(f"skipped {cid}: {why}")


def extract_line(job: ExtractionJob, what: str, n: int, seconds: float, unit: str = "images") -> None:
    """`unit`: what `n` counts (images; volumes then slices; slides then tiles)."""
    if what == "cached":
        _p(f"   {job.label}: all splits cached, nothing to encode")
    elif what == "start":
        _p(f"   {job.label}: encoding {n} {unit} (pooling {job.pooling}, weights {job.weights})")
    else:
        rate = n / seconds if seconds > 0 else float("nan")
        _p(f"   {job.label}: {n} {unit} in {seconds:.1f} s ({rate:.1f} {unit}/s, Ray start-up included)")


def _fmt(v: float | None, spec: str) -> str:
    return format(v, spec) if isinstance(v, (int, float)) and v == v else "-"


def headline(metrics: dict[str, float]) -> tuple[str, float | None]:
    """The test metric a cell's line leads with, chosen as the report chooses it (AUC, else accuracy,
    else Dice or another overlap, else VOI), so a segmentation cell shows its Dice, not `test_auc=-`."""
    from analysis.points import headline_metric

    name = headline_metric([k[len("test_"):] for k in metrics if k.startswith("test_")]) or "auc"
    return f"test_{name}", metrics.get(f"test_{name}")


def cell_line(i: int, total: int, cell_id: str, status: str, metrics: dict[str, float],
              seconds: float | None, error: str | None) -> None:
    w = len(str(total))
    name, value = headline(metrics)
    line = f"[{i:>{w}}/{total}] {status:<8} {cell_id}  {name}={_fmt(value, '.4f')}  {_fmt(seconds, '.1f')}s"
    if error:
        line += f"\n          reason: {error.splitlines()[0][:300]}"
    _p(line)


def summary(cfg: SweepConfig, outcome: SweepOutcome) -> None:
    out = cfg.output_path
    rows: list[dict[str, Any]] = []
    for cid, status in sorted(outcome.cells.items()):
        m = outcome.metrics.get(cid, {})
        name, value = headline(m)
        rows.append({"cell": cid, "status": status, "metric": name if value is not None else "", "value": value,
                     "compute_s": m.get("compute_s"),
                     "reason": outcome.errors.get(cid) or outcome.skipped.get(cid, "")})
    with (out / "summary.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else ["cell"])
        w.writeheader()
        w.writerows(rows)
    width = max((len(r["cell"]) for r in rows), default=10)
    _p()
    mw = max((len(r["metric"]) for r in rows), default=6)
    _p(f"{'cell':<{width}}  {'status':<8}  {'metric':<{mw}}  {'value':>8}  {'time':>7}")
    _p("-" * (width + mw + 33))
    for r in rows:
        _p(f"{r['cell']:<{width}}  {r['status']:<8}  {r['metric']:<{mw}}  {_fmt(r['value'], '8.4f'):>8}  "
           f"{_fmt(r['compute_s'], '6.1f'):>6}s")
    counts = {s: sum(1 for r in rows if r["status"] == s) for s in ("FINISHED", "FAILED", "SKIPPED")}
    _p("-" * (width + mw + 33))
    _p(f"{counts['FINISHED']} finished, {counts['FAILED']} failed, {counts['SKIPPED']} skipped; "
       f"images encoded this run: {outcome.n_encoded}")
    for cid, err in outcome.errors.items():
        _p(f"FAILED {cid}: {err.splitlines()[0][:300]}")
    _p(f"results:  {out / 'summary.csv'}   per-cell files: {cfg.sweep_root}/cells")
    mlflow_hint(cfg)
    stream().flush()


def _mlflow_cmd() -> str:
    """`mlflow` when it is on PATH, else the one beside this Python (a venv not activated)."""
    import shutil
    import sys
    from pathlib import Path

    beside = Path(sys.executable).parent / "mlflow"
    return "mlflow" if shutil.which("mlflow") or not beside.exists() else str(beside)


def mlflow_hint(cfg: SweepConfig) -> None:
    """Where the runs are: the store, and the URL of the experiment's runs table (MLflow 3 opens on
    a GenAI overview otherwise)."""
    from orchestrator.tracking import experiment_id

    uri = cfg.resolved_tracking_uri
    eid = experiment_id(uri, cfg.name)
    _p(f"MLflow:   {uri}  (experiment '{cfg.name}'{f', id {eid}' if eid else ''})")
    if uri.startswith("sqlite:///"):
        _p(f"          start the UI: {_mlflow_cmd()} ui --backend-store-uri {uri} --port 5000")
        base = "http://127.0.0.1:5000"
    else:
        base = uri.rstrip("/")
    if eid and uri.startswith(("sqlite:///", "http://", "https://")):
        _p(f"          runs table:   {base}/#/experiments/{eid}/runs")
