"""Before Ray starts: every dataset root of the grid exists and has its index files (layout only,
fast). A machine without the data learns it once per dataset, not as one FAILED run per cell."""

from __future__ import annotations

from orchestrator.grid.config import SweepConfig
from tasks.errors import ConfigError


def missing_data(cfg: SweepConfig) -> dict[str, list[str]]:
    """{dataset: [problem, ...]} for the grid's datasets and out-of-domain test sets."""
    from tasks.datasets import get_dataset

    names = list(dict.fromkeys([*cfg.grid.datasets, *(d for v in cfg.evaluate_on.values() for d in v)]))
    out: dict[str, list[str]] = {}
    for name in names:
        try:
            ds = get_dataset(name, cfg.data_root(name), **cfg.options_for(name))
            problems = [str(p) for p in ds.layout_problems()]
        except (ConfigError, OSError, ValueError) as e:
            problems = [f"{cfg.data_root(name)}: {e}"]
        if problems:
            out[name] = problems
    return out


def check_data(cfg: SweepConfig, allow_missing: bool) -> dict[str, list[str]]:
    """The datasets whose roots or index files are missing; a ConfigError unless `allow_missing`.
    Imports neither Ray nor MLflow: `medscale sweep` calls it before it loads the driver, so a
    wrong path is reported in about a second."""
    missing = missing_data(cfg)
    if missing and not allow_missing:
        raise ConfigError(f"data missing for {len(missing)} dataset(s); nothing was run:\n"
                          f"{report(missing)}\n(fix the paths under data: in the config, or pass "
                          "--allow-missing to run the other datasets)")
    return missing


def report(missing: dict[str, list[str]]) -> str:
    lines = []
    for name, problems in missing.items():
        lines.append(f"{name}: {problems[0]}")
        lines += [f"{' ' * len(name)}  {p}" for p in problems[1:5]]
        if len(problems) > 5:
            lines.append(f"{' ' * len(name)}  ... and {len(problems) - 5} more")
    return "\n".join(lines)
