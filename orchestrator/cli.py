"""`medscale` command line: encoders, datasets, plan, sweep, analyze."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from analysis.adaptive import cli as adaptive_cli
from orchestrator.wsi_cli import add_wsi_parser, cmd_wsi
from tasks.errors import MedscaleError

# Exit statuses of `medscale sweep` (README, "Failures and resume").
EXIT_CELLS_FAILED = 1  # the sweep ran; at least one cell FAILED (unless --allow-failures)
EXIT_ERROR = 2  # the sweep could not run: a bad config, a refused restart (--resume / --rerun)


def _cmd_encoders(args: argparse.Namespace) -> int:
    from tasks.encoders import encoder_table

    def num(v: float | None, fmt: str) -> str:
        return "-" if v is None else format(v, fmt)

    rows = encoder_table()
    print(f"{'name':<22} {'family':<10} {'library':<12} {'model':<30} {'patch':>5} {'params':>9} "
          f"{'GFLOPs@224':>10} {'GFLOPs@512':>10}  {'pooling (auto)':<17} {'pretrain':>8}  preprocessing | licence")
    for r in rows:
        params = "-" if r["params"] is None else f"{r['params'] / 1e6:.1f}M"
        licence = r["licence"] + (", gated" if r["gated"] and "gated" not in r["licence"] else "")
        print(f"{r['name']:<22} {r['family']:<10} {r['library']:<12} {r['timm_model'][:30]:<30} {r['patch']:>5} "
              f"{params:>9} {num(r['gflops_224'], '.1f'):>10} {num(r['gflops_512'], '.1f'):>10}  {r['pooling']:<17} "
              f"{num(r['pretrain_resolution'], 'd'):>8}  {r['preprocessing']} | {licence}")
    for r in rows:
        if r["unavailable"]:
            print(f"\n{r['name']}: unavailable: {r['unavailable']}")
    print("\nparams and GFLOPs are computed from each architecture on the meta device; "
          "GFLOPs@512: '-' where 512 is not a multiple of the patch size")
    return 0


def _cmd_datasets(args: argparse.Namespace) -> int:
    from tasks.datasets import dataset_class, get_dataset, list_datasets
    from tasks.protocols import protocols_for

    if args.action == "list":
        for name in list_datasets():
            cls = dataset_class(name)
            print(f"{name:<18} {cls.task:<11} {len(cls.classes):>3} classes  protocols: {', '.join(protocols_for(cls))}")
        return 0
    if args.name is None or args.root is None:
        raise MedscaleError(f"datasets {args.action} needs NAME and --root DIR")
    if args.action == "synth":
        kwargs = {"n": args.n} if args.n else {}
        dataset_class(args.name).synth(Path(args.root), seed=args.seed, **kwargs)
        print(f"wrote a synthetic {args.name} dataset to {args.root}")
        return 0
    ds = get_dataset(args.name, args.root)
    problems = ds.check(decode=not args.no_decode)
    for note in ds.layout_notes():
        print(f"{args.name}: {note}")
    for p in problems:
        print(f"{p.path}: {p.message}")
    if problems:
        print(f"{args.name} at {args.root}: {len(problems)} problem(s)", file=sys.stderr)
        return 1
    print(f"{args.name} at {args.root}: OK")
    return 0


def _cmd_plan(args: argparse.Namespace) -> int:
    from orchestrator.grid.config import load_config
    from orchestrator.plan.build import plan_sweep
    from orchestrator.plan.format import format_plan, write_plan

    cfg = load_config(args.config)
    plan = plan_sweep(cfg, accelerator=args.accelerator)
    print(format_plan(plan))
    print(f"plan:     {write_plan(plan, cfg.output_path / 'plan')}/plan.json, plan.md")
    return 0


def _cmd_sweep(args: argparse.Namespace) -> int:
    from orchestrator.grid.config import load_config
    from orchestrator.sweep.preflight import check_data

    if args.dry_run:
        return _cmd_plan(args)
    cfg = load_config(args.config)
    adaptive = args.adaptive if args.adaptive is not None else cfg.adaptive is not None
    if not adaptive and (args.budget is not None or args.budget_hours is not None):
        raise MedscaleError("--budget and --budget-hours are the budget of an adaptive sweep: add --adaptive")
    check_data(cfg, args.allow_missing)  # a wrong path stops here, before Ray, MLflow and the driver load
    from orchestrator.console.progress import quiet_ray_output
    from orchestrator.sweep.driver import run_sweep

    log = cfg.output_path / "ray.log"
    with quiet_ray_output(log, enabled=not args.verbose):
        try:
            if adaptive:
                from orchestrator.sweep.adaptive import run_adaptive

                outcome = run_adaptive(cfg, resume=args.resume, rerun=args.rerun, address=args.address,
                                       allow_missing=args.allow_missing, accelerator=args.accelerator,
                                       budget=args.budget, budget_hours=args.budget_hours).sweep
            else:
                outcome = run_sweep(cfg, resume=args.resume, rerun=args.rerun, address=args.address,
                                    allow_missing=args.allow_missing, accelerator=args.accelerator)
        finally:  # inside the redirect: Ray's last forwarded worker lines go to the log too
            from orchestrator import ray_backend

            ray_backend.stop()
    if log.exists():
        print(f"Ray and Tune log: {log}")
    failed = sorted(c for c, s in outcome.cells.items() if s == "FAILED")
    if not failed:
        return 0
    # After the summary: scripts, CI and `ray job submit` see a sweep with failed cells as failed.
    print(f"medscale: {len(failed)} cell(s) FAILED: {', '.join(failed[:20])}"
          f"{' ...' if len(failed) > 20 else ''}", file=sys.stderr)
    if args.allow_failures:
        print("medscale: --allow-failures: exit status 0 all the same", file=sys.stderr)
        return 0
    return EXIT_CELLS_FAILED


def _cmd_runs(args: argparse.Namespace) -> int:
    """Where a sweep's runs are: the tracking store, how to start the UI, the runs table's URL."""
    from orchestrator import console
    from orchestrator.grid.config import load_config

    console.mlflow_hint(load_config(args.config))
    return 0


def _cmd_analyze(args: argparse.Namespace) -> int:
    from orchestrator.analyze import analyze

    analyze(tracking_uri=args.tracking_uri, experiments=args.experiment, points=args.points,
            reference=args.reference, out=args.out, config=args.config, n_boot=args.n_boot, seed=args.seed,
            log=not args.no_log)
    return 0


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="medscale", description=__doc__)
    sub = ap.add_subparsers(dest="command", required=True)

    sub.add_parser("encoders", help="list registered encoders with parameters and GFLOPs")

    d = sub.add_parser("datasets", help="list, synthesise or check datasets")
    d.add_argument("action", choices=["list", "synth", "check"])
    d.add_argument("name", nargs="?")
    d.add_argument("--root", help="dataset directory (official layout)")
    d.add_argument("--n", type=int, default=None, help="synth: number of images")
    d.add_argument("--seed", type=int, default=0, help="synth: random seed")
    d.add_argument("--no-decode", action="store_true",
                   help="check: validate the layout and labels without decoding every image (fast)")

    s = sub.add_parser("sweep", help="run a sweep config on Ray and record it in MLflow")
    add_sweep_args(s)

    r = sub.add_parser("runs", help="print where a sweep's MLflow runs are and the URL of its runs table")
    r.add_argument("config", help="sweep config (YAML)")

    p = sub.add_parser("plan", help="what a sweep will cost before it runs: items, GFLOPs, cache, device-hours")
    p.add_argument("config", help="sweep config (YAML)")
    _accelerator_arg(p)

    a = sub.add_parser("analyze", help="scaling verdicts, fits, plots and a report (MLflow, a CSV, or the paper)")
    a.add_argument("--config", help="a sweep config: read its tracking URI, experiment and output")
    a.add_argument("--tracking-uri", help="MLflow tracking URI (default: from --config)")
    a.add_argument("--experiment", action="append", help="experiment (sweep) name; repeatable")
    a.add_argument("--points", help="a points CSV instead of MLflow")
    a.add_argument("--reference", help="a published reference instead: 'paper' (Tables 2-16 of the DINOv3 "
                   "medical benchmark)")
    a.add_argument("--out", help="output directory (default: <sweep output>/analysis)")
    a.add_argument("--n-boot", type=int, default=1000,
                   help="bootstrap replicates (default 1000; 0: no intervals, every verdict 'no CI')")
    a.add_argument("--seed", type=int, default=0, help="bootstrap random seed")
    a.add_argument("--no-log", action="store_true", help="do not log the analysis of MLflow runs back to MLflow")
    add_wsi_parser(sub)
    adaptive_cli.add_parser(sub)
    return ap


def add_sweep_args(s: argparse.ArgumentParser, config_flag: bool = False) -> None:
    if config_flag:
        s.add_argument("--config", required=True, help="sweep config (YAML)")
    else:
        s.add_argument("config", help="sweep config (YAML)")
    s.add_argument("--resume", action="store_true", help="run only the cells not finished yet")
    s.add_argument("--rerun", action="store_true", help="run every cell again (features stay cached)")
    s.add_argument("--address", default=None, help="join this Ray cluster ('local': a private one; default: "
                   "RAY_ADDRESS, else the cluster `ray start` runs on this machine, else a private one)")
    s.add_argument("--allow-failures", action="store_true",
                   help="exit 0 even when cells failed (default: exit 1 after the summary)")
    s.add_argument("--strict", action="store_true", help=argparse.SUPPRESS)  # the default now; kept for old scripts
    s.add_argument("--allow-missing", action="store_true", help="run the datasets whose data is there; the "
                   "cells of datasets whose root or index files are missing are recorded as FAILED")
    s.add_argument("--verbose", action="store_true", help="show Ray's and Tune's own output on the console "
                   "(by default it goes to <output>/ray.log)")
    s.add_argument("--dry-run", action="store_true", help="print the plan (medscale plan) and run nothing")
    s.add_argument("--adaptive", action=argparse.BooleanOptionalAction, default=None,
                   help="run the grid in rounds, only where a scaling verdict is still open (docs/analysis.md, "
                   "'Adaptive sweeps'); default: when the config has an `adaptive:` block. --no-adaptive: every cell")
    s.add_argument("--budget", type=float, default=None,
                   help="adaptive: share of the full grid's planned cost to spend (default: adaptive.budget, else 0.5)")
    s.add_argument("--budget-hours", type=float, default=None,
                   help="adaptive: the budget in the plan's device-hours on --accelerator (needs every item count)")
    _accelerator_arg(s)


def _accelerator_arg(p: argparse.ArgumentParser) -> None:
    from orchestrator.plan.throughput import ACCELERATORS

    p.add_argument("--accelerator", default="H100", choices=list(ACCELERATORS),
                   help="accelerator class the plan's device-hours are for (default H100)")


COMMANDS = {"encoders": _cmd_encoders, "datasets": _cmd_datasets, "sweep": _cmd_sweep, "analyze": _cmd_analyze,
            "runs": _cmd_runs, "plan": _cmd_plan}
COMMANDS["wsi"] = cmd_wsi
COMMANDS["adaptive"] = adaptive_cli.run


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except MedscaleError as e:
        print(f"medscale: error: {e}", file=sys.stderr)
        return EXIT_ERROR


def sweep_main(argv: list[str] | None = None) -> int:
    """`python sweep.py --config CONFIG`: the same as `medscale sweep CONFIG` (for `ray submit`)."""
    ap = argparse.ArgumentParser(prog="sweep.py", description="run a medscale sweep")
    add_sweep_args(ap, config_flag=True)
    args = ap.parse_args(argv)
    try:
        return _cmd_sweep(args)
    except MedscaleError as e:
        print(f"medscale: error: {e}", file=sys.stderr)
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
