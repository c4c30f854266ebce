"""Encoder families in the analysis: which family each point belongs to, and the "families at
matched compute" table that answers "does the domain model beat a bigger generalist here?".

A point's family is the `family` run param the sweep logged (a points CSV may carry a `family`
column); where it is missing (runs of an older release, a CSV without it) the encoder registry
says; an encoder this checkout does not know takes its name before the first `_`, `-` or `/`
(`vit_small` and `vit_large` are `vit`), and unknown names that share no such prefix with any other
(`ViTS`, `ViTB`, `ViTL`) are one family, `other` - never one family each, which would leave no
curve along parameters or GFLOPs (a family of one encoder has no curve). Scaling curves along the
parameter and GFLOPs axes are drawn per family (`analysis.curves`): a ResNet50 and a ViT-L on one
parameter axis would be a comparison of designs, not of scale.

Matched compute: for each (dataset, protocol, metric, weights) with two or more families, a window
[g, 2g] GFLOPs per image is chosen: one holding a generalist (DINOv3) cell when there is any, since
the table exists to compare with it; then the one holding the most families; then the largest g
(the most capable comparison). Each family's best cell inside it is listed and ranked; a family
with no cell inside is listed with its best cell at any compute, unranked, marked `outside`. Every
row is also compared with the generalist's best cell at any compute: a domain model that beats it
beats every bigger generalist the sweep ran.
"""

from __future__ import annotations

import functools
import re

import numpy as np
import pandas as pd

from analysis.metric_table import higher_is_better

GENERALIST = "dinov3"
FAMILY_COLUMNS = ["dataset", "protocol", "metric", "weights", "window", "family", "encoder", "resolution", "params",
                  "gflops", "mean", "ci_lo", "ci_hi", "rank", "vs_best_generalist"]


UNKNOWN = "other"  # the one family of unknown encoders whose names share no prefix


@functools.lru_cache(maxsize=512)
def registered_family(encoder: str) -> str | None:
    from tasks.encoders import ENCODERS

    spec = ENCODERS.get(encoder)
    return spec.family if spec is not None else None


def family_of(encoder: str) -> str:
    """The registry's family, else the name before its first '_', '-' or '/'."""
    return registered_family(encoder) or re.split(r"[_/-]", encoder, maxsplit=1)[0]


def families_of(encoders, logged: dict[str, str] | None = None) -> dict[str, str]:
    """encoder -> family for a set of encoders (module doc): logged, else `family_of`; unknown names
    that each got a prefix of their own are pooled into `UNKNOWN` when there are several."""
    logged = logged or {}
    names = sorted({str(e) for e in encoders})
    out = {e: logged.get(e) or family_of(e) for e in names}
    guessed = [e for e in names if not logged.get(e) and registered_family(e) is None]
    prefixes = [out[e] for e in guessed]
    if len(guessed) > 1 and len(set(prefixes)) == len(guessed):
        out |= dict.fromkeys(guessed, UNKNOWN)
    return out


def with_family(agg: pd.DataFrame, points: pd.DataFrame | None = None) -> pd.DataFrame:
    """`agg` with a `family` column: the points' logged family per encoder, else `families_of`."""
    logged: dict[str, str] = {}
    if points is not None and "family" in points.columns:
        known = points[points["family"].fillna("").astype(str).str.strip() != ""]
        logged = dict(zip(known["encoder"].astype(str), known["family"].astype(str), strict=True))
    out = agg.copy()
    fam = families_of(out["encoder"], logged)
    out["family"] = [fam[str(e)] for e in out["encoder"]]
    return out


def _best(cells: pd.DataFrame, higher: bool) -> pd.Series:
    return cells.loc[cells["mean"].idxmax() if higher else cells["mean"].idxmin()]


def _window(cells: pd.DataFrame) -> tuple[float, float] | None:
    """[g, 2g] by (holds the generalist, number of families, g); None if no window holds two families."""
    g = cells["gflops"].to_numpy(float)
    fam = cells["family"].to_numpy(str)
    best, best_score = None, None
    for lo in sorted(set(g[np.isfinite(g)])):
        inside = set(fam[(g >= lo) & (g <= 2 * lo)])
        score = (GENERALIST in inside, len(inside), lo)
        if len(inside) >= 2 and (best_score is None or score > best_score):
            best, best_score = (lo, 2 * lo), score
    return best


def weights_class(kind: str) -> str:
    """Pretrained weights from the hub and from a local file compare with each other (a released
    checkpoint is a checkpoint wherever it was read from); random-init cells only with random ones."""
    return "pretrained" if kind in ("hub", "file") else kind


def matched_compute(agg: pd.DataFrame) -> pd.DataFrame:
    """One row per family per (dataset, protocol, metric, weights class) with >= 2 families
    (FAMILY_COLUMNS; `weights` holds the class: random or pretrained)."""
    rows = []
    if "family" not in agg.columns or agg.empty:
        return pd.DataFrame(columns=FAMILY_COLUMNS)
    agg = agg.assign(weights=agg["weights"].fillna("").astype(str).map(weights_class))
    for key, cells in agg.groupby(["dataset", "protocol", "metric", "weights"], sort=True):
        cells = cells[np.isfinite(cells["gflops"].astype(float)) & np.isfinite(cells["mean"].astype(float))]
        if cells["family"].nunique() < 2:
            continue
        window = _window(cells)
        if window is None:
            continue
        higher = higher_is_better(str(key[2]))
        inside = cells[(cells["gflops"] >= window[0]) & (cells["gflops"] <= window[1])]
        generalist = cells[cells["family"] == GENERALIST]
        ref = _best(generalist, higher) if not generalist.empty else None
        picks = [_best(c, higher) for _, c in inside.groupby("family", sort=True)]
        picks.sort(key=lambda r: -r["mean"] if higher else r["mean"])
        ranks: list[int | str] = list(range(1, len(picks) + 1))
        outside = [_best(c, higher) for f, c in cells.groupby("family", sort=True) if f not in set(inside["family"])]
        for r, rank in zip(picks + outside, ranks + ["outside"] * len(outside), strict=True):
            vs = ""
            if ref is not None and r["family"] != GENERALIST:
                diff = (r["mean"] - ref["mean"]) * (1 if higher else -1)
                vs = (f"{'beats' if diff > 0 else 'trails'} {ref['encoder']} @ {int(ref['resolution'])} px "
                      f"({ref['gflops']:.0f} GFLOPs) by {abs(r['mean'] - ref['mean']):.4g}")
            rows.append([*map(str, key), f"{window[0]:.1f}-{window[1]:.1f} GFLOPs", r["family"], r["encoder"],
                         int(r["resolution"]), int(r["params"]), float(r["gflops"]), float(r["mean"]),
                         float(r.get("ci_lo", np.nan)), float(r.get("ci_hi", np.nan)), rank, vs])
    return pd.DataFrame(rows, columns=FAMILY_COLUMNS)


def family_section(doc, table: pd.DataFrame) -> None:  # doc: analysis.document.Document
    """The report's "Families at matched compute" section (nothing when one family ran)."""
    from analysis.points import headline_metric

    heads = {k: headline_metric(g["metric"].unique()) for k, g in table.groupby(["dataset", "protocol"])}
    table = table[[heads[(d, p)] == m for d, p, m in zip(table["dataset"], table["protocol"], table["metric"],
                                                         strict=True)]]
    if table.empty:
        return
    doc.heading("Families at matched compute")
    doc.para("Each family's best cell inside one compute window [g, 2g] GFLOPs per image (the window holding "
             "the most families; ties: the largest g), ranked; `vs best generalist` compares with the best "
             f"{GENERALIST} cell at any compute, so a domain model that beats it beats every bigger generalist "
             "run here. Headline metrics; every metric in `families.csv`; curves per family are in the verdict table.")
    for (ds, proto, metric, weights), g in table.groupby(["dataset", "protocol", "metric", "weights"], sort=True):
        w = f" [{weights}]" if weights and table["weights"].nunique() > 1 else ""
        doc.heading(f"{ds} / {proto} / {metric}{w}: {g['window'].iloc[0]}", 3)
        rows = [[str(r.rank), r.family, r.encoder, str(r.resolution), f"{r.params / 1e6:.1f}M", f"{r.gflops:.1f}",
                 f"{r.mean:.4g}" + (f" [{r.ci_lo:.4g}, {r.ci_hi:.4g}]" if np.isfinite(r.ci_lo) else ""),
                 r.vs_best_generalist or "-"] for r in g.itertuples()]
        doc.table(["rank", "family", "encoder", "px", "params", "GFLOPs", "mean [95% CI]", "vs best generalist"],
                  rows, ["r", "l", "l", "r", "r", "r", "l", "l"])
