"""Published numbers as analysis points: `medscale analyze --reference paper`.

`analysis/reference/<name>_*.csv` hold one row per (table, dataset, protocol, metric, encoder) of
a publication, transcribed by hand (REFERENCE_COLUMNS). The paper set covers the DINOv3 S/B/L
rows of Tables 2-16 of "Does DINOv3 Set a New Medical Vision Standard?"; baselines (BiomedCLIP,
nnU-Net, ...) are left out because they are no point on a DINOv3 scaling curve.

Why the columns: `direction` is the paper's own arrow or caption ("lower-is-better") and is
checked against `points.higher_is_better`, so a metric name that would be judged upside down is
caught at load time; `unit` ("fraction", "percent", "mm" or empty) sets the verdict margin's
scale; `resolution` is filled only where the paper states the encoder's input size (Table 2's
caption: 256 px; Tables 3-4: 224 px patches, section 3.1), 0 elsewhere ("not stated").
`spread` is what the table prints after "±" (Tables 15-16: a standard deviation over test cases,
not the uncertainty of a mean); with the test-set size the paper states (``TEST_CASES``) it gives
each mean a standard error SD / sqrt(n) and the curve intervals (`bootstrap.printed_spread`). Parameter counts
and GFLOPs come from `tasks.encoders`, never from the CSV.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from analysis.points import higher_is_better
from tasks.errors import ConfigError

REFERENCE_DIR = Path(__file__).resolve().parent / "reference"
REFERENCE_COLUMNS = ["table", "dataset", "protocol", "metric", "encoder", "resolution", "value", "spread",
                     "spread_kind", "unit", "direction", "note"]
UNITS = ("fraction", "percent", "mm", "")
UNKNOWN_RESOLUTION = 0  # as load_points records a run without one
# Test-set sizes the paper states for the tables that print "mean ± SD" (its sections 2.2 and 2.6):
# CAMUS 100 test registration pairs, ACDC 50 test patients.
TEST_CASES = {"camus": 100, "acdc": 50}


def reference_sets() -> list[str]:
    """Names accepted by `--reference`: the file-name prefixes in analysis/reference/."""
    return sorted({p.name.split("_", 1)[0] for p in REFERENCE_DIR.glob("*_*.csv")})


def _number(raw: pd.Series, col: str, source: str, integer: bool = False) -> pd.Series:
    text = raw.str.strip()
    num = pd.to_numeric(text, errors="coerce")
    bad = num.isna() & text.ne("")
    if integer:
        bad |= num.notna() & (num != num.round())
    if bad.any():
        i = int(np.flatnonzero(bad.to_numpy())[0])
        raise ConfigError(f"{source}: column '{col}' line {i + 2}: {text.iloc[i]!r} is not a number")
    return num


def read_reference_csv(path: Path) -> pd.DataFrame:
    """One transcribed table file, validated; every error names the file and the line."""
    from tasks.encoders import get_encoder_spec

    source = str(path)
    raw = pd.read_csv(path, dtype=str, keep_default_na=False)
    missing = [c for c in REFERENCE_COLUMNS if c not in raw.columns]
    if missing:
        raise ConfigError(f"{source}: missing column(s) {missing}; needs {', '.join(REFERENCE_COLUMNS)}")
    df = raw[REFERENCE_COLUMNS].copy()
    for col in ("value", "spread"):
        df[f"{col}_text"] = raw[col].str.strip()  # as printed: the report keeps the paper's decimals
        df[col] = _number(raw[col], col, source)
    df["resolution"] = _number(raw["resolution"], "resolution", source, integer=True).fillna(UNKNOWN_RESOLUTION)
    df["resolution"] = df["resolution"].astype("int64")
    for i, row in df.iterrows():
        where = f"{source} line {int(i) + 2}"
        if row["unit"] not in UNITS:
            raise ConfigError(f"{where}: unit {row['unit']!r} is not one of {UNITS}")
        if row["direction"] not in ("higher", "lower"):
            raise ConfigError(f"{where}: direction must be 'higher' or 'lower', got {row['direction']!r}")
        if (row["direction"] == "higher") != higher_is_better(row["metric"]):
            raise ConfigError(f"{where}: the paper says {row['metric']} is {row['direction']}-is-better but "
                              f"analysis.points would orient it the other way; fix the name or LOWER_IS_BETTER")
        if not str(row["table"]).startswith("Table "):
            raise ConfigError(f"{where}: every row must name its table ('Table N'), got {row['table']!r}")
    try:
        specs = {e: get_encoder_spec(e) for e in df["encoder"].unique()}
    except Exception as e:  # an unknown encoder name: say which file
        raise ConfigError(f"{source}: {e}") from e
    df["params"] = df["encoder"].map(lambda e: specs[e].params).astype("int64")
    df["gflops"] = [float(specs[e].gflops(int(r))) if r > 0 else np.nan
                    for e, r in zip(df["encoder"], df["resolution"], strict=True)]
    return df


def load_reference(name: str = "paper") -> pd.DataFrame:
    """Every table of the reference set `name`, one row per published number (NaN: not given)."""
    files = sorted(REFERENCE_DIR.glob(f"{name}_*.csv"))
    if not files:
        raise ConfigError(f"no reference set {name!r}; available: {', '.join(reference_sets()) or 'none'}")
    df = pd.concat([read_reference_csv(f).assign(file=f.name) for f in files], ignore_index=True)
    dup = df.duplicated(["dataset", "protocol", "metric", "encoder", "resolution"], keep=False)
    if dup.any():
        first = df[dup].iloc[0]
        raise ConfigError(f"reference {name!r}: {first['dataset']}/{first['protocol']}/{first['metric']}/"
                          f"{first['encoder']} appears more than once ({', '.join(sorted(set(df[dup]['table'])))})")
    return df


def reference_points(ref: pd.DataFrame) -> pd.DataFrame:
    """The published numbers as analysis points (one 'seed' each); missing values dropped."""
    pts = ref[ref["value"].notna()].copy()
    pts["seed"] = 0
    pts["weights"] = ""
    pts["experiment"] = "reference"
    pts["run_id"] = ""
    pts["n_cases"] = pts["dataset"].map(TEST_CASES).astype(float)
    return pts.reset_index(drop=True)
