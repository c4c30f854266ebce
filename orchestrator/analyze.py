"""`medscale analyze`: collect points (MLflow runs, a CSV, or a published reference) and hand them
to `analysis/`; an analysis of MLflow runs is itself logged to MLflow, linked to what it read."""

from __future__ import annotations

from pathlib import Path

from tasks.errors import ConfigError


def analyze(*, tracking_uri: str | None = None, experiments: list[str] | None = None,
            points: str | None = None, reference: str | None = None, out: str | None = None,
            config: str | None = None, n_boot: int = 1000, seed: int = 0, log: bool = True) -> dict:
    """One input: `reference` (a set in analysis/reference/), `points` (a CSV), or MLflow (from
    `config` or `tracking_uri` + `experiments`). `config` also supplies defaults for the others."""
    from analysis.report import analyze_points

    if points and reference:
        raise ConfigError("analyze reads one input: --points FILE or --reference NAME, not both")
    if n_boot < 0 or (0 < n_boot < 100):
        raise ConfigError(f"--n-boot {n_boot}: use 0 (no intervals) or at least 100 replicates")
    current = adaptive = None  # the config's cells' digests (None: every run); an adaptive sweep's record
    if config:
        from orchestrator.grid.cells import config_identities
        from orchestrator.grid.config import load_config

        cfg = load_config(config)
        tracking_uri, experiments = tracking_uri or cfg.resolved_tracking_uri, experiments or [cfg.name]
        out = out or str(cfg.output_path / "analysis")
        current = set(config_identities(cfg))
        adaptive = _adaptive_curves(cfg.output_path)
    out_dir, predictions, kind = Path(out or "analysis_out"), None, "points"
    if reference:
        from analysis.reference import load_reference, reference_points

        df = reference_points(load_reference(reference))
        source, kind = f"the published reference '{reference}'", "reference"
    elif points:
        from analysis.points import read_points_csv

        df = read_points_csv(points)
        source = points
        for note in df.attrs.get("read_as", []):
            print(f"{points}: {note}")
    elif tracking_uri:
        from orchestrator.tracking import load_points, load_predictions

        # With --config, only the cells of the config as it is now: runs of an earlier pooling,
        # hyperparameter or weights (or marked superseded by a later sweep) are left out.
        df = load_points(tracking_uri, experiments, config_identities=current)
        source, kind = f"{tracking_uri} ({', '.join(experiments or ['all experiments'])})", "mlflow"
        if current is not None:
            source += " [cells of the config as it is now]"
        if not df.empty and n_boot:
            predictions = load_predictions(tracking_uri, df["run_id"].unique())
    else:
        raise ConfigError("analyze needs --reference, --points, --config or --tracking-uri")
    if df.empty:
        hint = ("; the config changed since its cells ran? run `medscale sweep` on it first"
                if current is not None else "")
        raise ConfigError(f"{source}: no finished cells to analyse{hint}")
    from analysis.data_axis import analyze_data_axis, full_data, has_data_axis

    # The other axes compare cells trained on their whole split; subsets are the data axis.
    data_axis = has_data_axis(df)
    main = full_data(df) if data_axis else df
    result = analyze_points(main if not main.empty else df, out_dir, title=f"medscale analysis of {source}",
                            predictions=predictions, n_boot=n_boot, seed=seed, reference=kind == "reference",
                            every_metric=kind != "mlflow", adaptive=adaptive)
    if data_axis:
        from analysis.points import is_random_init

        result["data_axis"] = analyze_data_axis(df, out_dir, predictions=predictions, n_boot=n_boot, seed=seed,
                                                random_init=is_random_init(df))
        with open(result["report"], "a") as f:  # the data axis as the report's last section
            f.write("\n" + result["data_axis"]["markdown"])
    if kind == "mlflow" and log:
        result["analysis_run_id"] = _log(tracking_uri, df, out_dir, result, n_boot, seed, len(predictions or {}))
    n_read = _mlflow_runs(df).nunique() if kind != "reference" and "run_id" in df else len(df)
    print(f"analysed {n_read} {'runs' if kind != 'reference' else 'published values'} from {source}")
    print(f"report:   {result['report']} (and {Path(result['html']).name})")
    print(f"verdicts: {result['verdicts']}  fits: {Path(result['fits']).name}")
    print(f"plots:    {len(result['plots'])} files in {out_dir / 'plots'}")
    print(f"summary:  {result['summary']}")
    if "data_axis" in result:
        dx = result["data_axis"]
        print(f"data axis: {len(dx['curves'])} curves of metric vs training cases ({dx['data_verdicts']}), "
              f"{len(dx['plots'])} plots")
    if "analysis_run_id" in result:
        print(f"MLflow:   analysis run {result['analysis_run_id']}")
    return result


def _adaptive_curves(output: Path):
    """`adaptive_curves.csv` of an adaptive sweep (the round each curve settled at), else None."""
    from analysis.adaptive.summary import ADAPTIVE_CURVES, ROUNDS_FIGURE

    path = output / ADAPTIVE_CURVES
    if not path.is_file():
        return None
    import pandas as pd

    curves = pd.read_csv(path, dtype={"settled_round": "Int64"})
    curves.attrs["figure"] = output / f"{ROUNDS_FIGURE}.png"
    return curves


def _mlflow_runs(df):
    """The MLflow run id of each point (an out-of-domain point's id carries its test set after it)."""
    from orchestrator.tracking import OOD_SEP

    return df["run_id"].astype(str).str.partition(OOD_SEP)[0]


def _log(tracking_uri: str, df, out_dir: Path, result: dict, n_boot: int, seed: int, n_predictions: int) -> str:
    from orchestrator.tracking import log_analysis_run

    sources = df.assign(run_id=_mlflow_runs(df))[["experiment", "experiment_id", "run_id"]]
    sources = sources.drop_duplicates().sort_values(["experiment", "run_id"])
    sources.to_csv(out_dir / "sources.csv", index=False)  # the full list of runs read, beside the report
    from analysis.verdict_model import VERDICTS

    verdicts = [v for v in result["study"].verdicts.values()]
    ci = [v.verdict for v in verdicts if v.kind == "ci"]
    metrics = {"n_runs": float(sources["run_id"].nunique()), "n_curves": float(len(verdicts)),
               "n_runs_with_predictions": float(n_predictions),
               "n_ordering_only": float(sum(v.kind == "ordering" for v in verdicts)),
               "n_degenerate": float(sum(v.kind == "degenerate" for v in verdicts)),
               **{f"n_{v}": float(ci.count(v)) for v in VERDICTS if v != "degenerate"}}
    params = {"n_boot": n_boot, "seed": seed, "experiments": ",".join(sorted(sources["experiment"].unique()))}
    # The run goes into the first experiment read; its tags name every experiment and run.
    return log_analysis_run(tracking_uri, str(sources["experiment"].iloc[0]), str(out_dir), sources, params, metrics)
