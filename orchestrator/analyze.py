"""`medscale analyze`: collect points (MLflow runs or a CSV) and hand them to `analysis/`."""

from __future__ import annotations

from pathlib import Path

from tasks.errors import ConfigError


def analyze(*, tracking_uri: str | None = None, experiments: list[str] | None = None,
            points: str | None = None, out: str | None = None, config: str | None = None) -> dict:
    from analysis.points import read_points_csv
    from analysis.report import analyze_points
    from orchestrator.tracking import load_points

    if config:
        from orchestrator.config import load_config

        cfg = load_config(config)
        tracking_uri = tracking_uri or cfg.resolved_tracking_uri
        experiments = experiments or [cfg.name]
        out = out or str(cfg.output_path / "analysis")
    if points:
        df = read_points_csv(points)
        source = points
    elif tracking_uri:
        df = load_points(tracking_uri, experiments)
        source = f"{tracking_uri} ({', '.join(experiments or ['all experiments'])})"
    else:
        raise ConfigError("analyze needs --config, --tracking-uri or --points")
    if df.empty:
        raise ConfigError(f"{source}: no finished cells to analyse")
    out_dir = Path(out or "analysis_out")
    result = analyze_points(df, out_dir, title=f"medscale analysis of {source}")
    print(f"analysed {df['run_id'].nunique() if 'run_id' in df else len(df)} runs from {source}")
    print(f"report:   {result['report']}")
    print(f"plots:    {len(result['plots'])} files in {out_dir}")
    print(f"summary:  {result['summary']}")
    return result
