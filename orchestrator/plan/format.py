"""The plan (orchestrator/plan/build.py) as a console table, as Markdown, and as plan.json / plan.md."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from orchestrator.plan.model import Plan


def human_bytes(n: float | None) -> str:
    if n is None:
        return "unknown"
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{int(n)} B"


def _n(v: int | None) -> str:
    return "unknown" if v is None else f"{v:,}"


def _hours(h: float | None) -> str:
    return "unknown" if h is None else (f"{h:.2f} h" if h >= 0.01 else f"{h * 3600:.1f} s")


def _util(u: float | str) -> str:
    return f"{u:.0%}" if isinstance(u, float | int) else str(u)


def format_plan(plan: Plan) -> str:
    """The plan as a text table (printed by `medscale plan` and before a sweep)."""
    t = plan.totals
    head = (f"{'extraction':<40} {'items':>14} {'GFLOPs/item':>11} {'s/1k items':>10} {'cache':>10} {'cached':>7} "
            f"{'hours':>9} {'bound':>6} {'rate':>8}")
    lines = [f"== plan of '{plan.sweep}' on {plan.accelerator} "
             f"({'measured throughput where known, else ' if t['estimated'] else ''}"
             f"{_util(plan.utilisation)} of peak: estimated)", head, "-" * len(head)]
    for e in plan.extractions:
        label = f"{e.encoder}@{e.resolution}px/{e.dataset}"
        items = f"{_n(e.items)} {e.item}s"
        hours = _hours(e.device_hours) + ("*" if e.throughput == "estimated" and e.device_hours is not None else "")
        per_k = f"{1000 / e.items_per_s:.1f}" if e.items_per_s else "-"
        lines.append(f"{label:<40} {items:>14} {e.gflops_per_item:>11.2f} {per_k:>10} {human_bytes(e.cache_bytes):>10} "
                     f"{e.cached:>7} {hours:>9} {e.bound:>6} {e.throughput[:8]:>8}")
    shares = sorted({c.gpu_share for c in plan.cells})
    mems = [c.memory_bytes for c in plan.cells if c.memory_bytes is not None]
    lines.append("-" * len(head))
    lines.append(f"cells: {t['cells']} ({t['skipped_cells']} skipped), one MLflow run each; GPU share per cell "
                 f"{', '.join(f'{s:g}' for s in shares) or '-'}; features per cell up to "
                 f"{human_bytes(max(mems)) if mems else 'unknown'}")
    hours = _hours(t["device_hours"]) + (" + unknown" if t["incomplete"] else "")
    lines.append(f"to encode: {t['items_to_encode']:,} items{' + unknown' if t['incomplete'] else ''}, {hours} "
                 f"on {plan.accelerator}{' (estimated: *)' if t['estimated'] else ''}"
                 f"; cache {human_bytes(t['cache_bytes'])} ({human_bytes(t['cache_bytes_new'])} new, "
                 f"{human_bytes(t['free_bytes'])} free)")
    notes = dict.fromkeys(f"{e.dataset}: {e.note}" for e in plan.extractions if e.note)
    lines += [f"note: {n}" for n in notes] + [f"WARNING: {w}" for w in plan.warnings]
    return "\n".join(lines)


def format_markdown(plan: Plan) -> str:
    t = plan.totals
    out = [f"# Plan of sweep `{plan.sweep}` on {plan.accelerator}", "",
           "| encoder | px | dataset | items | feature | GFLOPs/item | cache | cached | items/s | hours |",
           "|---|---|---|---|---|---|---|---|---|---|"]
    for e in plan.extractions:
        rate = "unknown" if e.items_per_s is None else f"{e.items_per_s:,.1f} ({e.throughput})"
        out.append(f"| {e.encoder} | {e.resolution} | {e.dataset} | {_n(e.items)} {e.item}s | {e.feature} | "
                   f"{e.gflops_per_item:.2f} | {human_bytes(e.cache_bytes)} | {e.cached} | {rate} | {_hours(e.device_hours)} |")
    out += ["", "| cell | GPU share | feature memory | GPU share memory | train cases |", "|---|---|---|---|---|"]
    out += [f"| {c.cell_id} | {c.gpu_share:g} | {human_bytes(c.memory_bytes)} | {human_bytes(c.gpu_memory_bytes)} | "
            f"{_n(c.n_train)} |" for c in plan.cells]
    out += ["", "## Totals", ""] + [f"- {k}: {v}" for k, v in t.items()]
    out += ["", f"Throughput: measured where orchestrator/plan/throughput.py has a figure, else GFLOPs at "
            f"{_util(plan.utilisation)} of {plan.accelerator}'s peak (estimated)."]
    if plan.warnings:
        out += ["", "## Warnings", ""] + [f"- {w}" for w in plan.warnings]
    return "\n".join(out) + "\n"


def write_plan(plan: Plan, out_dir: str | os.PathLike) -> Path:
    """plan.json and plan.md under `out_dir` (created); returns the directory."""
    d = Path(out_dir)
    d.mkdir(parents=True, exist_ok=True)
    (d / "plan.json").write_text(plan.to_json())
    (d / "plan.md").write_text(format_markdown(plan))
    return d
