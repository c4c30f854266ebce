"""`medscale adaptive replay --points POINTS.csv --out DIR [--budget F] [--pricing cell|extraction]`.

Hooked into the `medscale` command line by `add_parser(subparsers)` and `run(args)`; the heavy
imports wait until the command runs, so `medscale --help` stays fast.
"""

from __future__ import annotations

import argparse

from tasks.errors import ConfigError


def add_parser(subparsers) -> argparse.ArgumentParser:
    a = subparsers.add_parser("adaptive", help="adaptive sweeps: replay the round policy on a finished study")
    sub = a.add_subparsers(dest="adaptive_command", required=True)
    r = sub.add_parser("replay", help="what an adaptive sweep would have run and concluded, from a points CSV")
    r.add_argument("--points", required=True, help="a finished study (the `medscale analyze --points` CSV)")
    r.add_argument("--out", required=True, help="output directory: curves.csv, rounds.csv, cells.csv, summary.json")
    r.add_argument("--budget", type=float, default=0.5,
                   help="share of the full grid's cost the policy may spend (default 0.5; 1: the whole grid)")
    r.add_argument("--confidence", type=float, default=0.9995,
                   help="a claim settles at an interim look when its adjusted p <= 1 - confidence (default 0.9995)")
    r.add_argument("--max-rounds", type=int, default=12, help="rounds at most, round 0 included (default 12)")
    r.add_argument("--round-share", type=float, default=0.05,
                   help="the most one round may spend, as a share of the full grid's cost (default 0.05; more "
                        "when the budget left would not fit in the rounds left at that pace)")
    # cells.PRICINGS, written out: importing cells here would slow `medscale --help`
    r.add_argument("--pricing", choices=("cell", "extraction"), default="cell",
                   help="cell (default): every run pays its GFLOPs x items; extraction: as a medscale sweep "
                        "spends, features embedded once per dataset x encoder x resolution, each run then "
                        "paying --head-share of its dataset's mean extraction")
    r.add_argument("--head-share", type=float, default=0.05,
                   help="with --pricing extraction: a head's cost as a share of its dataset's mean extraction "
                        "(default 0.05)")
    return a


def run(args: argparse.Namespace) -> int:
    from analysis.adaptive.policy import AdaptivePolicy
    from analysis.adaptive.replay import replay, write_replay
    from analysis.points import read_points_csv

    if not 0 < args.budget:
        raise ConfigError(f"--budget {args.budget}: a share of the full grid's cost, > 0")
    if not 0 < args.confidence < 1:
        raise ConfigError(f"--confidence {args.confidence}: must lie in (0, 1)")
    if not 0 <= args.head_share:
        raise ConfigError(f"--head-share {args.head_share}: a share of an extraction's cost, >= 0")
    if not 0 < args.round_share <= 1:
        raise ConfigError(f"--round-share {args.round_share}: a share of the full grid's cost, in (0, 1]")
    try:
        policy = AdaptivePolicy(budget=args.budget, confidence=args.confidence, max_rounds=args.max_rounds,
                                round_share=args.round_share)
    except ValueError as e:
        raise ConfigError(str(e)) from e
    points = read_points_csv(args.points)
    for note in points.attrs.get("read_as", []):
        print(f"{args.points}: {note}")
    result = replay(points, policy, pricing=args.pricing, head_share=args.head_share)
    paths = write_replay(result, args.out)
    for _, r in result.rounds.iterrows():
        print(f"round {int(r['round'])}: {int(r['cells'])} cells, {r['cost_share']:.1%} of the grid's cost "
              f"(spent {r['spent_share']:.1%}); after it {int(r['open_after'])} curves open")
    open_ = result.curves[result.curves["status"] == "open"]
    print(f"curves: {len(result.curves)}, settled {len(result.curves) - len(open_)}, open {len(open_)}")
    for reason, n in open_["reason"].value_counts().head(8).items():
        print(f"  open ({n}): {reason}")
    print("agreement by axis:")
    for axis, a in result.by_axis().items():
        print(f"  {axis}: {a['curves']} curves, agreement {a['agreement']:.3f}"
              + (f" ({a['differ']} differ, {a['differ_open']} of them open)" if a["differ"] else ""))
    print(f"written: {', '.join(str(p) for p in paths.values())}")
    # with features cached, a cell's seeds and protocols share its extraction: the encoding a
    # medscale sweep of the chosen cells would do, next to the per-run cost share
    print(f"extractions the chosen cells need: {result.extraction_share:.1%} of the grid's encoder work")
    print(f"agreement={result.agreement:.3f} cost={result.cost_share:.3f}")
    return 0
