"""What a sweep prints: a banner, notes, one line per finished cell (the summary table is
sweep/summary.py's, the extraction lines extraction/jobs.py's), and how to open MLflow."""

from __future__ import annotations

from typing import TYPE_CHECKING

from orchestrator.console.progress import stream

if TYPE_CHECKING:
    from orchestrator.grid.config import SweepConfig


def line(text: str = "") -> None:
    """One line on the terminal (progress.stream(): also while Ray's own output goes to the log)."""
    print(text, file=stream(), flush=True)


_p = line


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


def fmt(v: float | None, spec: str) -> str:
    """`v` formatted, or "-" for a missing or NaN value."""
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
    line = f"[{i:>{w}}/{total}] {status:<8} {cell_id}  {name}={fmt(value, '.4f')}  {fmt(seconds, '.1f')}s"
    if error:
        line += f"\n          reason: {error.splitlines()[0][:300]}"
    _p(line)


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
