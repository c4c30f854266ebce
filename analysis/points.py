"""Analysis points: one row per (cell, seed, metric), read from a CSV or MLflow, and their means.

A point is one measured value: a metric of one dataset x protocol x encoder x resolution x seed.
`orchestrator.tracking.load_points` yields them from MLflow; `read_points_csv` reads the same
columns from a file so that results from elsewhere can be analysed. `aggregate` reduces seeds to
mean / std / n and a 95% t-interval; `analysis.study` replaces that interval by the bootstrap's
(test cases, then seeds) in the same `ci_lo` / `ci_hi` columns wherever it has replicates.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import stats

from analysis.metric_table import MetricInfo, is_overlap, lower_is_better_names, metric_info, metric_label
from analysis.metric_table import higher_is_better as higher_is_better  # re-exported: its old home
from tasks.errors import ConfigError

# `params` is the parameter count (a file whose values are all below 10,000 gave millions: read so);
# `gflops` is inference GFLOPs per image at the point's resolution and may be empty when unknown.
POINT_COLUMNS = ["dataset", "protocol", "metric", "encoder", "params", "gflops", "resolution", "seed", "value"]
OPTIONAL_COLUMNS = ["experiment", "run_id", "weights", "family", "unit", "seed_free", "train_fraction", "train_shots",
                    "train_size", "n_train", "items"]
# `unit` says the scale of a metric's values (percent values get a x100 margin); `seed_free` marks
# cells whose protocol ignores the seed (kNN, registration): their seeds are one value.
UNITS = ("", "fraction", "percent", "mm", "px", "bits", "nats")
UNIT_NAMES = "fraction, percent, mm, px, bits, nats or empty"
TEXT_COLUMNS = ["dataset", "protocol", "metric", "encoder"]

# Headline metrics in the order the paper reports them; anything else follows alphabetically.
MAIN_METRICS = ("auc", "acc", "precision", "recall", "f1_macro", "f1_weighted")
# Bookkeeping a protocol may log beside its metrics: never plotted or tabulated.
NON_METRICS = frozenset({"fit_s", "compute_s", "extract_s", "n_train", "n_val", "n_test", "feature_dim"})
# Metrics where smaller is better (segmentation distances, registration errors): "best" flips. The
# one table of directions and margins is `analysis.metric_table.METRICS`; add new names there.
LOWER_IS_BETTER = lower_is_better_names()

# What one aggregated point is identified by. Weights are part of the identity: a random-init
# and a pretrained encoder are different models and must never be averaged together.
CELL_KEY = ["dataset", "protocol", "metric", "encoder", "weights", "resolution"]
SUMMARY_COLUMNS = ["dataset", "protocol", "metric", "encoder", "weights", "params", "gflops", "resolution",
                   "n", "mean", "std", "ci_lo", "ci_hi", "seeds"]


def is_performance_metric(metric: str) -> bool:
    """False for timing and size bookkeeping (`fit_s`, `n_train`, ...), which have no scaling curve."""
    return metric not in NON_METRICS and not metric.endswith("_s") and not metric.startswith("n_")


def metric_order(metrics) -> list[str]:
    """Main metrics first in the paper's order, then the rest alphabetically; bookkeeping dropped."""
    present = {str(m) for m in metrics if is_performance_metric(str(m))}
    return [m for m in MAIN_METRICS if m in present] + sorted(present - set(MAIN_METRICS))


def headline_metric(metrics) -> str:
    """The metric a summary leads with: AUC, else accuracy, else an overlap score (Dice, then mean Dice
    over classes, then mean IoU, before any per-class score), else
    VOI (instance segmentation), else the first in `metric_order`."""
    ordered = metric_order(metrics)
    for pick in ("auc", "acc"):  # under its own name first, else an alias (AUROC, roc_auc, accuracy)
        named = [m for m in ordered if m == pick] or [m for m in ordered if metric_label(m) == metric_label(pick)]
        if named:
            return named[0]
    overlap = [m for m in ordered if is_overlap(m)]
    # A summary overlap before a per-class one: a multi-class segmentation logs `mdice` beside
    # `dice_<class>`, and the first class alphabetically is not the task's score.
    for pick in ("dice", "mdice", "miou", "iou"):
        if pick in overlap:
            return pick
    if overlap:
        return overlap[0]
    return "voi" if "voi" in ordered else (ordered[0] if ordered else "")


def plotted_metrics(metrics) -> list[str]:
    """The metrics worth a figure: the main ones present, else (a task without them) every one."""
    ordered = metric_order(metrics)
    main = [m for m in ordered if m in MAIN_METRICS]
    return main or ordered


# -- reading -------------------------------------------------------------------------------------
def _bad_rows(mask: pd.Series, raw: pd.Series, limit: int = 3) -> str:
    rows = list(mask[mask].index[:limit])
    # Row 1 is the first data row, on line 2 of the file (line 1 is the header).
    shown = ", ".join(f"row {i + 1} (line {i + 2}): {raw[i]!r}" for i in rows)
    more = int(mask.sum()) - len(rows)
    return shown + (f" and {more} more" if more > 0 else "")


def _numeric(df: pd.DataFrame, col: str, source: str, *, integer: bool = False, positive: bool = False,
             allow_empty: bool = False) -> pd.Series:
    raw = df[col].astype(str).str.strip()
    num = pd.to_numeric(raw, errors="coerce")
    empty = raw.eq("") | raw.str.lower().isin(["nan", "na", "none", "null"])
    bad = num.isna() & ~(empty if allow_empty else pd.Series(False, index=raw.index))
    what = "an integer" if integer else "a number"
    if bad.any():
        raise ConfigError(f"{source}: column '{col}' must be {what}; {_bad_rows(bad, raw)}")
    finite = num.dropna()
    checks = [(~np.isfinite(finite), "is not finite")]
    if integer:
        checks.append((np.isfinite(finite) & (finite != np.round(finite)), f"is not {what}"))
    if positive:
        checks.append((finite <= 0, "must be > 0"))
    for fail, why in checks:
        if fail.any():
            mask = pd.Series(False, index=raw.index)
            mask[fail[fail].index] = True
            raise ConfigError(f"{source}: column '{col}' value {why}; {_bad_rows(mask, raw)}")
    return num.astype("int64") if integer else num.astype("float64")


def read_points_csv(path: str | Path) -> pd.DataFrame:
    """Read and validate a points CSV; every error names the file, the column and the row."""
    source = str(path)
    if not Path(path).is_file():
        raise ConfigError(f"{source}: no such points file")
    try:
        raw = pd.read_csv(path, dtype=str, keep_default_na=False, skipinitialspace=True)
    except (pd.errors.EmptyDataError, pd.errors.ParserError, UnicodeDecodeError) as e:
        raise ConfigError(f"{source}: not a readable CSV ({e})") from e
    # headers as people write them: "GFLOPs", "Params", "train size", "n-train" name our columns
    named = [re.sub(r"[\s\-]+", "_", str(c).strip().lower()) for c in raw.columns]
    twice = sorted({n for n in named if named.count(n) > 1})
    if twice:
        raise ConfigError(f"{source}: more than one column reads as {', '.join(repr(n) for n in twice)} "
                          "(headers are read case-blind, spaces and '-' as '_'); keep one")
    raw.columns = named
    missing = [c for c in POINT_COLUMNS if c not in raw.columns]
    if missing:
        raise ConfigError(f"{source}: missing column(s) {', '.join(repr(c) for c in missing)}; "
                          f"a points CSV needs {', '.join(POINT_COLUMNS)} "
                          f"(optional: {', '.join(OPTIONAL_COLUMNS)})")
    if raw.empty:
        raise ConfigError(f"{source}: no rows (only a header)")
    out = pd.DataFrame(index=raw.index)
    for col in TEXT_COLUMNS:
        text = raw[col].astype(str).str.strip()
        if text.eq("").any():
            raise ConfigError(f"{source}: column '{col}' is empty; {_bad_rows(text.eq(''), text)}")
        out[col] = text
    out["params"] = _numeric(raw, "params", source, positive=True)
    out["gflops"] = _numeric(raw, "gflops", source, positive=True, allow_empty=True)
    out["resolution"] = _numeric(raw, "resolution", source, integer=True, positive=True)
    out["seed"] = _numeric(raw, "seed", source, integer=True)
    out["value"] = _numeric(raw, "value", source)
    for col in ("experiment", "run_id", "weights", "family"):
        if col in raw.columns:
            out[col] = raw[col].astype(str).str.strip()
    if "items" in raw.columns:  # images / slices / tiles a cell embeds: its cost is GFLOPs x items
        out["items"] = _numeric(raw, "items", source, positive=True, allow_empty=True)
    if "unit" in raw.columns:
        unit = raw["unit"].astype(str).str.strip().str.lower()
        bad = ~unit.isin(UNITS)
        if bad.any():
            raise ConfigError(f"{source}: column 'unit' must be one of {UNIT_NAMES}; "
                              f"{_bad_rows(bad, raw['unit'])}")
        out["unit"] = unit
    if "seed_free" in raw.columns:
        flag = raw["seed_free"].astype(str).str.strip().str.lower()
        bad = ~flag.isin(["", "true", "false", "1", "0", "yes", "no"])
        if bad.any():
            raise ConfigError(f"{source}: column 'seed_free' must be true/false; {_bad_rows(bad, raw['seed_free'])}")
        out["seed_free"] = flag.isin(["true", "1", "yes"])
    _read_train_sizes(raw, out, source)
    out = out.reset_index(drop=True)
    # what was read another way than the file says outright: the commands print it
    notes = []
    if out["params"].max() < 1e4:  # no encoder has under 10k parameters; a 7B one is 7000 million
        out["params"] *= 1e6
        notes.append("every 'params' value is below 10,000: read as millions of parameters")
    out["params"] = out["params"].round().astype("int64")
    out.attrs["percent_metrics"] = _infer_percent(out)
    notes += [f"'{m}' values run above 1: read as percent (margin x100); a 'unit' column says otherwise"
              for m in out.attrs["percent_metrics"]]
    out.attrs["read_as"] = notes
    return out


def _infer_percent(df: pd.DataFrame) -> list[str]:
    """Known [0, 1] scores (AUC, accuracy, Dice, ...) whose values in a file without a `unit` run
    above 1 but stay within 100 are percentages: they get `unit` percent (so the x100 margin), in
    place. Judged at a fraction's margin, 85.3 vs 85.6 would be a difference 60x the margin."""
    unit = df["unit"] if "unit" in df.columns else pd.Series("", index=df.index)
    found = []
    for metric, vals in df.loc[unit.eq(""), "value"].groupby(df["metric"]):
        info = metric_info(str(metric))
        known = info != MetricInfo(label=str(metric))  # listed, or named after a listed one
        if known and info.scale == "fraction" and vals.min() >= 0 and 1.0 < vals.max() <= 100.0:
            found.append(str(metric))
    if found:
        df["unit"] = unit.mask(df["metric"].isin(found) & unit.eq(""), "percent")
    return found


def _read_train_sizes(raw: pd.DataFrame, out: pd.DataFrame, source: str) -> None:
    """The data axis of a points file, in place (docs/analysis.md, "Inputs"): `train_fraction` (share
    of the training split; blank = all of it), `train_shots` (labelled cases per class; blank = 0),
    `train_size` (training cases; a dataset's largest is its whole split; values all <= 1 are
    shares) and `n_train` (training cases, the data curves' x; else `train_size`, else the cell's
    `n_train` metric rows). Without them the subsets of a cell would be averaged into its point."""
    def column(col: str, integer: bool = False) -> pd.Series:
        v = _numeric(raw, col, source, allow_empty=True)
        bad = (v < 0) | (v.notna() & (v != v.round()) if integer else False)
        if bad.any():
            what = "a whole number >= 0" if integer else "a number >= 0"
            raise ConfigError(f"{source}: column '{col}' must be {what}; {_bad_rows(bad.fillna(False), raw[col])}")
        return v

    if "train_size" in raw.columns and "train_fraction" in raw.columns:
        raise ConfigError(f"{source}: columns 'train_size' and 'train_fraction' both give the train size; keep one")
    if "train_size" in raw.columns:
        size = column("train_size")
        if size.isna().any() or (size <= 0).any():
            raise ConfigError(f"{source}: column 'train_size' must be > 0; {_bad_rows(size.isna() | (size <= 0), raw['train_size'])}")
        if (size <= 1).all():  # shares of the split
            out["train_fraction"] = size
        else:  # cases: each dataset's largest train size is its whole split
            out["train_fraction"] = size / size.groupby(out["dataset"]).transform("max")
            out["n_train"] = size
    if "train_fraction" in raw.columns:
        frac = column("train_fraction")
        if ((frac == 0) | (frac > 1)).any():
            raise ConfigError(f"{source}: column 'train_fraction' must lie in (0, 1] (a share of the training "
                              f"split); {_bad_rows((frac == 0) | (frac > 1), raw['train_fraction'])}")
        out["train_fraction"] = frac.fillna(1.0)
    if "train_shots" in raw.columns:
        out["train_shots"] = column("train_shots", integer=True).fillna(0).astype("int64")
        out["train_fraction"] = out["train_fraction"] if "train_fraction" in out.columns else 1.0
    if "train_fraction" not in out.columns:
        return
    if "n_train" in raw.columns:
        out["n_train"] = column("n_train")
    elif "n_train" not in out.columns:  # the cells' own `n_train` rows, onto each of their rows
        key = [c for c in ("dataset", "protocol", "encoder", "weights", "resolution", "seed", "train_fraction",
                           "train_shots") if c in out.columns]
        counts = out[out["metric"] == "n_train"].groupby(key, dropna=False)["value"].mean().rename("n_train")
        out["n_train"] = out[key].merge(counts.reset_index(), on=key, how="left")["n_train"].to_numpy()


def collapse_seed_free(df: pd.DataFrame) -> pd.DataFrame:
    """A seed-free cell (`seed_free` True: its protocol ignores the seed, e.g. kNN) is one value:
    of rows repeating it under several seeds (runs of an older release, or a CSV listing every
    seed) only the lowest seed's stay, so `aggregate` sees n = 1 and no seed spread, never n
    identical values posing as independent seeds."""
    if "seed_free" not in df.columns or df.empty:
        return df
    free = df["seed_free"].fillna(False).astype(bool)
    if not free.any():
        return df
    key = [c for c in (*CELL_KEY, "train_fraction", "train_shots") if c in df.columns]
    lowest = df[free].groupby(key, dropna=False)["seed"].transform("min")
    keep = ~free
    keep[free] = df.loc[free, "seed"] == lowest
    return df[keep].reset_index(drop=True)


def check_points(df: pd.DataFrame, source: str = "points") -> None:
    """The columns `aggregate` relies on are there (a DataFrame built by hand or by load_points)."""
    missing = [c for c in POINT_COLUMNS if c not in df.columns]
    if missing:
        raise ConfigError(f"{source}: missing column(s) {', '.join(repr(c) for c in missing)}")


def weights_kinds(df: pd.DataFrame) -> list[str]:
    if "weights" not in df.columns:
        return []
    return sorted({str(w) for w in df["weights"].fillna("") if str(w)})


def is_random_init(df: pd.DataFrame) -> bool:
    return "random" in weights_kinds(df)


# -- aggregating ---------------------------------------------------------------------------------
def _t_interval(mean: float, std: float, n: int) -> tuple[float, float]:
    if n < 2 or not math.isfinite(std):
        return math.nan, math.nan
    half = float(stats.t.ppf(0.975, n - 1)) * std / math.sqrt(n)
    return mean - half, mean + half


def aggregate(df: pd.DataFrame) -> pd.DataFrame:
    """Mean, std, n and a 95% t-interval over seeds per cell (columns: SUMMARY_COLUMNS).

    Rows repeating the same (cell, seed), e.g. one cell read from two sweeps, are averaged first
    so that `n` counts seeds, not rows. With n == 1 the std and the interval are NaN.
    """
    check_points(df)
    d = df.copy()
    d["weights"] = d["weights"].fillna("").astype(str) if "weights" in d.columns else ""
    if d.empty:
        return pd.DataFrame(columns=SUMMARY_COLUMNS)
    per_seed = (d.groupby([*CELL_KEY, "seed"], sort=False, dropna=False)
                .agg(value=("value", "mean"), params=("params", "first"), gflops=("gflops", "mean"))
                .reset_index())
    g = per_seed.groupby(CELL_KEY, sort=False, dropna=False)
    out = g.agg(params=("params", "first"), gflops=("gflops", "mean"), n=("value", "size"),
                mean=("value", "mean"), std=("value", "std")).reset_index()
    out["seeds"] = g["seed"].agg(lambda s: ",".join(str(int(x)) for x in sorted(s))).to_numpy()
    ci = [_t_interval(m, s, int(n)) for m, s, n in zip(out["mean"], out["std"], out["n"], strict=True)]
    out["ci_lo"] = [lo for lo, _ in ci]
    out["ci_hi"] = [hi for _, hi in ci]
    out["n"] = out["n"].astype("int64")
    rank = {m: i for i, m in enumerate(metric_order(out["metric"].unique()))}
    out["_m"] = out["metric"].map(rank).fillna(len(rank))
    out = out.sort_values(["dataset", "protocol", "_m", "metric", "params", "encoder", "weights", "resolution"])
    return out[SUMMARY_COLUMNS].reset_index(drop=True)


def model_label(encoder: str, weights: str, several_kinds: bool) -> str:
    """Encoder name, with its weights kind when the data mixes kinds (then they are two models)."""
    return f"{encoder} ({weights})" if several_kinds and weights else encoder
