"""The grid an adaptive run draws from: candidate cells, their cost, the ends of every axis, and
which planned curve each cell lies on.

A *cell* is one run: dataset x protocol x weights x encoder x resolution [x train size] x seed. It
yields every metric at once, so metrics are not part of it. A *site* is a cell without its seed
(what a curve point is made of). The curves are the analysis' own (`analysis.curves`): metric vs
parameters at each resolution, vs resolution for each encoder, and vs GFLOPs across all cells, on
the whole training split; and where the grid has a data axis, metric vs training cases for each
encoder at each resolution (`analysis.data_axis`). A site is keyed (unit, encoder, resolution) on
the whole split and (unit, encoder, resolution, size) on a subset (size: `data_axis.size_label`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from analysis.curves import _slices  # the one definition of which cells make a curve
from analysis.data_axis import DATA_AXIS, full_data, size_labels
from analysis.families import families_of, with_family
from analysis.points import is_performance_metric

UNIT = ["dataset", "protocol", "weights"]  # the cells one set of curves is sliced from
SIZE = ["train_fraction", "train_shots"]  # the data axis, where the grid has it
SITE = [*UNIT, "encoder", "resolution"]
ITEM_METRICS = ("n_train", "n_val", "n_test")  # bookkeeping rows that count a cell's items


def site_columns(df: pd.DataFrame) -> list[str]:
    return SITE + [c for c in SIZE if c in df.columns]


def cell_columns(df: pd.DataFrame) -> list[str]:
    return [*site_columns(df), "seed"]


def vit_gflops(params: np.ndarray, resolution: np.ndarray) -> np.ndarray:
    """Stand-in GFLOPs per image where a grid leaves them empty: a ViT/16 spends ~2 FLOPs per
    parameter per token, and (resolution/16)^2 tokens. Only cost shares are used, so the constant
    matters only against cells whose GFLOPs are known."""
    return 2.0 * params * (resolution / 16.0) ** 2 / 1e9


def candidates_from_points(points: pd.DataFrame) -> pd.DataFrame:
    """One row per cell of a finished study (columns: `cell_columns`, params, gflops, items, cost).

    Cost = GFLOPs per image x items: items are the file's `items` column where it has one, else the
    cell's `n_train + n_val + n_test` bookkeeping rows where the study logged them (else 1, i.e.
    GFLOPs alone)."""
    d = points.copy()
    if "weights" not in d.columns:
        d["weights"] = ""
    d["weights"] = d["weights"].fillna("").astype(str)
    cols = cell_columns(d)
    cells = (d.groupby(cols, dropna=False, sort=True)
             .agg(params=("params", "first"), gflops=("gflops", "mean")).reset_index())
    items = d[d["metric"].isin(ITEM_METRICS)]
    if "items" in d.columns and d["items"].notna().any():
        per = d.groupby(cols, dropna=False)["items"].mean()
        cells = cells.merge(per.rename("items").reset_index(), on=cols, how="left")
    elif not items.empty:
        per = items.groupby([*cols, "metric"], dropna=False)["value"].mean().groupby(cols, dropna=False).sum()
        cells = cells.merge(per.rename("items").reset_index(), on=cols, how="left")
    else:
        cells["items"] = np.nan
    # the analysis draws parameter and GFLOPs curves per family: the planned curves must too
    return with_cost(with_family(cells, d))


def with_cost(cells: pd.DataFrame) -> pd.DataFrame:
    """Fill `cost` (GFLOPs x items) where the caller gave none; GFLOPs fall back to `vit_gflops`."""
    out = cells.copy()
    gf = out["gflops"].astype(float).to_numpy()
    gf = np.where(np.isfinite(gf) & (gf > 0), gf,
                  vit_gflops(out["params"].astype(float).to_numpy(), out["resolution"].astype(float).to_numpy()))
    items = out["items"].astype(float).to_numpy() if "items" in out.columns else np.ones(len(out))
    items = np.where(np.isfinite(items) & (items > 0), items, 1.0)
    if "cost" not in out.columns:
        out["cost"] = gf * items
    else:
        out["cost"] = out["cost"].astype(float).where(out["cost"].notna(), pd.Series(gf * items, index=out.index))
    return out


EXTRACTION = ["dataset", "weights", "encoder", "resolution"]  # what one feature extraction serves
PRICINGS = ("cell", "extraction")


def priced_by_extraction(cells: pd.DataFrame, head_share: float) -> pd.DataFrame:
    """Cells priced as medscale spends: features are embedded once per dataset x weights x encoder
    x resolution and cached, so a cell's seeds, protocols and train sizes share one extraction.
    ``extraction_cost`` is that extraction's cost (the cells' GFLOPs x items), paid by the first cell
    that needs it; ``cost`` becomes the cell's own head: ``head_share`` of its dataset's mean
    extraction, since a head trains on cached features for as long as its dataset's items take,
    whichever encoder made them (a second seed of ViT-L at 1024 px is no dearer than one of ViT-S),
    times the share of the split it trains on (a head on a tenth of the cases trains ~10x faster):
    a ``train_share`` column where the caller counted the cases (a sweep's plan does), else the
    train fraction, and a k-shot subset whose cases are unknown is priced as the whole split."""
    out = cells.copy()
    out["extraction_cost"] = out.groupby(EXTRACTION, dropna=False)["cost"].transform("max")
    per_site = out.drop_duplicates(EXTRACTION)
    mean = per_site.groupby("dataset", dropna=False)["extraction_cost"].mean()
    out["cost"] = head_share * out["dataset"].map(mean).astype(float) * _train_share(out)
    return out


def _train_share(cells: pd.DataFrame) -> np.ndarray:
    """The share of its split each cell's head trains on (`priced_by_extraction`): ``train_share``
    where known, else its fraction - 1 for the whole split and for k-shot subsets."""
    frac = np.clip([1.0 if lab[0] == "k" else _size_x(lab)[1] for lab in size_labels(cells)], 0.0, 1.0)
    if "train_share" in cells.columns:
        known = cells["train_share"].astype(float).to_numpy()
        frac = np.where(np.isfinite(known), np.clip(known, 0.0, 1.0), frac)
    return frac


def extractions_of(cells: pd.DataFrame, idx) -> set[tuple]:
    """The extractions the rows ``idx`` need (empty when cells are priced one by one)."""
    if "extraction_cost" not in cells.columns:
        return set()
    return set(map(tuple, cells.loc[list(idx), EXTRACTION].itertuples(index=False)))


def cost_of(cells: pd.DataFrame, idx, paid: set[tuple] | None = None) -> float:
    """What running rows ``idx`` costs: their own cost, plus (priced by extraction) each extraction
    they need that is not in ``paid`` - once, however many of the rows share it."""
    rows = cells.loc[list(idx)]
    own = float(rows["cost"].sum())
    if "extraction_cost" not in cells.columns or rows.empty:
        return own
    first = rows.drop_duplicates(EXTRACTION)
    keys = list(map(tuple, first[EXTRACTION].itertuples(index=False)))
    new = [k not in (paid or set()) for k in keys]
    return own + float(first["extraction_cost"].to_numpy()[np.array(new, bool)].sum())


def grid_cost(cells: pd.DataFrame) -> float:
    """The full grid's cost under the cells' pricing."""
    return cost_of(cells, cells.index)


def axis_ends(candidates: pd.DataFrame, n_seeds: int) -> pd.DataFrame:
    """Round 0: per dataset x protocol x weights and encoder family (the candidates' `family`, else
    `analysis.families.families_of`), the corners of the grid - smallest and largest encoder x lowest
    and highest resolution [x smallest and largest train size] - each with its first ``n_seeds`` seeds."""
    keep = []
    fam = (candidates["family"].fillna("").astype(str) if "family" in candidates.columns
           else candidates["encoder"].map(families_of(candidates["encoder"])))
    for _, g in candidates.groupby([*UNIT, fam.rename("_family")], sort=False, dropna=False):
        by_size = g.sort_values(["params", "encoder"])
        ends = {by_size["encoder"].iloc[0], by_size["encoder"].iloc[-1]}
        mask = g["encoder"].isin(ends)
        for enc in ends:
            e = g[g["encoder"] == enc]
            mask &= (g["encoder"] != enc) | g["resolution"].isin([e["resolution"].min(), e["resolution"].max()])
        if any(c in g.columns for c in SIZE):  # the smallest and largest train size (k-shot < fraction < all)
            labels = size_labels(g)
            order = sorted(set(labels), key=_size_x)
            mask &= np.isin(labels, [order[0], order[-1]])
        sel = g[mask]
        seeds = sel.groupby(site_columns(sel), dropna=False)["seed"].rank(method="first")
        keep.append(sel[seeds <= n_seeds])
    return pd.concat(keep).sort_index() if keep else candidates.iloc[:0]


@dataclass(frozen=True)
class PlannedCurve:
    """A curve of the full grid: its (axis, fixed) within a unit and the sites it needs, in x order."""

    unit: tuple
    axis: str
    fixed: str
    sites: tuple[tuple, ...]  # (encoder, resolution) per point; a train-size subset adds its size label
    x: tuple[float, ...]


def planned_curves(candidates: pd.DataFrame) -> list[PlannedCurve]:
    """Every curve the full grid would have, per unit (metrics aside: each metric has them all).
    Only cells on the whole training split make these curves, and only known GFLOPs a GFLOPs
    curve, as in `medscale analyze`; the data curves are `planned_data_curves`."""
    d = full_data(candidates)
    out = []
    for unit, g in d.groupby(UNIT, sort=True, dropna=False):
        fam = {"family": ("family", "first")} if "family" in g.columns else {}
        sites = (g.groupby(["encoder", "resolution"], sort=False)
                 .agg(params=("params", "first"), gflops=("gflops", "mean"), **fam).reset_index())
        for axis, fixed, rows, x in _slices(sites):
            pts = tuple((str(sites["encoder"].iloc[i]), int(sites["resolution"].iloc[i])) for i in rows)
            out.append(PlannedCurve(tuple(unit), axis, fixed, pts, tuple(float(v) for v in x)))
    return out


def _size_x(label: str) -> tuple[int, float]:
    """Order of train sizes before any has run (the training cases come with the runs): k-shot
    subsets by shots, then fractions, then the whole split - nested subsets of one split."""
    return (0, float(label[1:])) if label[0] == "k" else (1, float(label[1:])) if label[0] == "f" else (2, 1.0)


def planned_data_curves(candidates: pd.DataFrame) -> list[PlannedCurve]:
    """Per unit, encoder and resolution with >= 2 train sizes: the data curve (`analysis.data_axis`),
    its sites in train-size order; x is the fraction of the split where every size is one (else the
    rank), since the training cases are known only once a cell has run."""
    if not any(c in candidates.columns for c in SIZE):
        return []
    d = candidates.assign(_size=size_labels(candidates))
    out = []
    for unit, g in d.groupby(UNIT, sort=True, dropna=False):
        for (enc, res), h in g.groupby(["encoder", "resolution"], sort=False):
            sizes = sorted(set(h["_size"]), key=_size_x)
            if len(sizes) < 2:
                continue
            frac = all(s[0] != "k" for s in sizes)
            x = tuple(_size_x(s)[1] if frac else float(i + 1) for i, s in enumerate(sizes))
            sites = tuple((str(enc), int(res)) if s == "all" else (str(enc), int(res), s) for s in sizes)
            out.append(PlannedCurve(tuple(unit), DATA_AXIS, f"{enc} @ {int(res)} px", sites, x))
    return out


def site_rows(candidates: pd.DataFrame) -> dict[tuple, pd.Index]:
    """Site key (module doc) -> the candidate rows (its seeds)."""
    labels = size_labels(candidates)
    out: dict[tuple, list] = {}
    for i, lab, key in zip(candidates.index, labels, candidates[SITE].itertuples(index=False), strict=True):
        k = (*key[:-1], int(key[-1])) if lab == "all" else (*key[:-1], int(key[-1]), lab)
        out.setdefault(k, []).append(i)
    return {k: pd.Index(v) for k, v in out.items()}


def performance_metrics(points: pd.DataFrame) -> dict[tuple, list[str]]:
    """Metrics judged per unit (everything but bookkeeping, as `medscale analyze --points` does)."""
    d = points.assign(weights=points["weights"].fillna("").astype(str) if "weights" in points.columns else "")
    out: dict[tuple, list[str]] = {}
    for unit, g in d.groupby(UNIT, sort=True, dropna=False):
        out[tuple(unit)] = sorted(str(m) for m in g["metric"].unique() if is_performance_metric(str(m)))
    return out


def drawn_cells(points: pd.DataFrame, candidates: pd.DataFrame) -> pd.Series:
    """Candidate rows that have points (bool Series on ``candidates.index``)."""
    cols = cell_columns(candidates)
    p = points.assign(weights=points["weights"].fillna("").astype(str) if "weights" in points.columns else "")
    have = set(map(tuple, p[cols].drop_duplicates().itertuples(index=False)))
    return pd.Series([tuple(r) in have for r in candidates[cols].itertuples(index=False)], index=candidates.index)


def seed_counts(points: pd.DataFrame, candidates: pd.DataFrame) -> dict[tuple, tuple[int, int]]:
    """Site key (module doc) -> (seeds run, seeds planned)."""
    drawn = drawn_cells(points, candidates)
    return {k: (int(drawn.loc[idx].sum()), len(idx)) for k, idx in site_rows(candidates).items()}
