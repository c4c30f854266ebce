"""Adaptive replay on known-truth studies: agreement with the full grid, cost share, peak recall.

    python benchmarks/adaptive_replay.py [--studies 3] [--budget 0.5] [--datasets 4]

Each study (`analysis.adaptive.synthetic.generate_study`, a different seed each) has the paper's
shape: S/B/L x 6 resolutions x 5 seeds, 240 curves with 4 datasets. Targets (issue 25): agreement
>= 0.95, cost <= 0.50, peak recall >= 0.90 (true-peak resolution curves called `peaks`).
`--uniform 3 4` also prints what a fixed design buys: the full grid's first 3 (4) seeds of every
cell, judged alike, against the full grid (at 60% / 80% of its cost).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from analysis.adaptive.cells import PRICINGS  # noqa: E402
from analysis.adaptive.policy import AdaptivePolicy  # noqa: E402
from analysis.adaptive.replay import full_grid_verdicts, replay, write_replay  # noqa: E402
from analysis.adaptive.synthetic import generate_study, true_peak_curves  # noqa: E402
from analysis.curves import CurveKey  # noqa: E402
from analysis.data_axis import DATA_AXIS  # noqa: E402
from analysis.study import KEY_COLUMNS  # noqa: E402


def peak_recall(curves, truths) -> tuple[float, float]:
    """Share of true-peak resolution curves called `peaks`: adaptively, and by the full grid."""
    peaks = true_peak_curves(truths)
    true_peak = np.array([(d, p, m, f) in peaks for d, p, m, f in
                          zip(curves["dataset"], curves["protocol"], curves["metric"], curves["fixed"], strict=True)])
    rows = curves[(curves["axis"] == "resolution").to_numpy() & true_peak]
    if rows.empty:
        return float("nan"), float("nan")
    return float((rows["adaptive_verdict"] == "peaks").mean()), float((rows["full_verdict"] == "peaks").mean())


def uniform_baseline(df, curves, k: int) -> str:
    """Agreement with the full grid, and cost share, of the grid's first ``k`` seeds of every cell."""
    sub = df[df["seed"].isin(sorted(df["seed"].unique())[:k])]
    verdicts = full_grid_verdicts(sub)
    keys = [CurveKey(*r) for r in curves[KEY_COLUMNS].itertuples(index=False)]
    same = np.mean([verdicts.get(key, "open") == v for key, v in zip(keys, curves["full_verdict"], strict=True)])
    cost = sub["seed"].nunique() / df["seed"].nunique()
    return f"agreement={same:.3f} cost={cost:.3f}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--studies", type=int, default=3)
    ap.add_argument("--first-seed", type=int, default=0)
    ap.add_argument("--budget", type=float, default=0.5)
    ap.add_argument("--round-share", type=float, default=AdaptivePolicy.round_share)
    ap.add_argument("--max-rounds", type=int, default=AdaptivePolicy.max_rounds)
    ap.add_argument("--datasets", type=int, default=4)
    ap.add_argument("--seed-sd", type=float, default=0.003, help="noise per run (default 0.003)")
    ap.add_argument("--case-sd", type=float, default=0.0015, help="test-set offset per cell (default 0.0015)")
    ap.add_argument("--shift-sd", type=float, default=0.002, help="seed shift shared by a unit's cells (default 0.002)")
    ap.add_argument("--seed-free-knn", action="store_true", help="kNN cells repeat one value under every seed")
    ap.add_argument("--train-fractions", type=float, nargs="*", default=[],
                    help="a data axis: every cell also at these shares of its split (data curves join the study)")
    ap.add_argument("--pricing", choices=PRICINGS, default="cell",
                    help="extraction: features embedded once per site, a run then costs --head-share of it")
    ap.add_argument("--head-share", type=float, default=0.05)
    ap.add_argument("--uniform", type=int, nargs="*", default=[], metavar="K",
                    help="baselines: the full grid's verdicts on its first K seeds of every cell (cost K / seeds)")
    ap.add_argument("--out", help="write each study's curves.csv, rounds.csv, cells.csv under OUT/seed<N>")
    args = ap.parse_args(argv)
    figures = []
    for seed in range(args.first_seed, args.first_seed + args.studies):
        df, truths = generate_study(seed=seed, n_datasets=args.datasets, seed_sd=args.seed_sd, case_sd=args.case_sd,
                                    shift_sd=args.shift_sd, seed_free=("knn",) if args.seed_free_knn else (),
                                    train_fractions=tuple(args.train_fractions))
        t0 = time.perf_counter()
        policy = AdaptivePolicy(budget=args.budget, round_share=args.round_share, max_rounds=args.max_rounds)
        res = replay(df, policy, pricing=args.pricing, head_share=args.head_share)
        recall, full_recall = peak_recall(res.curves, truths)
        if args.out:
            write_replay(res, Path(args.out) / f"seed{seed}")
        figures.append((res.agreement, res.cost_share, recall))
        open_ = int((res.curves["status"] == "open").sum())
        print(f"study seed={seed}: curves={len(res.curves)} agreement={res.agreement:.3f} cost={res.cost_share:.3f} "
              f"peak_recall={recall:.3f} (full grid {full_recall:.3f}) rounds={len(res.rounds)} open={open_} "
              f"extractions={res.extraction_share:.3f} "
              f"[{time.perf_counter() - t0:.0f} s]", flush=True)
        if args.train_fractions:
            data = res.curves[res.curves["axis"] == DATA_AXIS]
            print(f"  data curves: {len(data)}, agreement {data['same'].mean():.3f}, "
                  f"settled {(data['status'] == 'settled').mean():.3f}", flush=True)
        for k in args.uniform:  # what a fixed design of the same kind buys: fewer seeds everywhere
            print(f"  uniform {k} seeds: {uniform_baseline(df, res.curves, k)}", flush=True)
    agree, cost, recall = (min(f[i] for f in figures) for i in range(3))
    print(f"worst over {len(figures)} studies: agreement={agree:.3f} cost={max(f[1] for f in figures):.3f} "
          f"peak_recall={recall:.3f}")
    ok = agree >= 0.95 and max(f[1] for f in figures) <= 0.5 and recall >= 0.9
    print("targets met" if ok else "targets NOT met")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
