"""Every MLflow call medscale makes lives here (MLflow's APIs move between releases).

One experiment per sweep, one run per cell, found again by the `medscale.cell_id` tag (a readable
prefix plus the digest of the cell's identity, orchestrator.grid.identity). Runs are written from the
driver only (sqlite allows one writer), through `MlflowClient` with explicit run ids: no global
"active run", so a retried or resumed cell re-attaches to its run instead of creating a duplicate
(the failure mode of Ray's MLflowLoggerCallback after a restore).

The experiment's cell runs are searched once per sweep (`Tracker.index`) and the index is kept up
to date as runs are created, finished or deleted: finding a cell's run never rescans the
experiment. Runs of cells the current config no longer plans stay, tagged `medscale.superseded`.
"""

from __future__ import annotations

import os

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # one bar per artifact: noise

import re  # noqa: E402
import time  # noqa: E402
from collections.abc import Iterable  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import pandas as pd  # noqa: E402
from mlflow.entities import Metric, Param, RunTag, ViewType  # noqa: E402
from mlflow.tracking import MlflowClient  # noqa: E402

from tasks.errors import ConfigError  # noqa: E402

CELL_TAG = "medscale.cell_id"
# MLflow 3's UI opens an experiment on a GenAI traces overview unless it is tagged as model
# development; with this tag it opens on the runs table.
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}
SWEEP_TAG = "medscale.sweep"
KIND_TAG = "medscale.kind"
IDENTITY_TAG = "medscale.identity"
CONFIG_IDENTITY_TAG = "medscale.config_identity"
SUPERSEDED_TAG = "medscale.superseded"
SEED_FREE_TAG = "medscale.seed_free"


@dataclass
class RunRecord:
    run_id: str
    cell_id: str
    status: str  # RUNNING | FINISHED | FAILED | KILLED | SCHEDULED
    superseded: str = ""  # the SUPERSEDED_TAG's value, "" for a current run


def _chunks(items: list, n: int) -> Iterable[list]:
    for i in range(0, len(items), n):
        yield items[i : i + n]


def _search_runs(client: MlflowClient, experiment_id: str, filter_string: str) -> list[Any]:
    runs, token = [], None
    while True:
        page = client.search_runs([experiment_id], filter_string=filter_string,
                                  run_view_type=ViewType.ACTIVE_ONLY, max_results=1000, page_token=token)
        runs.extend(page)
        token = page.token
        if not token:
            return runs


def experiment_id(tracking_uri: str, experiment: str) -> str | None:
    """The id of an experiment by name, or None when the store has none (or cannot be reached)."""
    try:
        exp = MlflowClient(tracking_uri=tracking_uri).get_experiment_by_name(experiment)
    except Exception:  # noqa: BLE001 - a hint only: never fail a finished sweep over it
        return None
    return exp.experiment_id if exp is not None else None


class Tracker:
    def __init__(self, tracking_uri: str, experiment: str, artifact_root: str | None = None):
        self.uri = tracking_uri
        self.client = MlflowClient(tracking_uri=tracking_uri)
        exp = self.client.get_experiment_by_name(experiment)
        if exp is None:
            # sqlite stores put artifacts in ./mlruns of the working directory unless told otherwise.
            loc = Path(artifact_root).resolve().as_uri() if artifact_root else None
            self.experiment_id = self.client.create_experiment(experiment, artifact_location=loc,
                                                               tags=EXPERIMENT_KIND)
        else:
            if exp.lifecycle_stage == "deleted":
                self.client.restore_experiment(exp.experiment_id)
            self.experiment_id = exp.experiment_id
            for k, v in EXPERIMENT_KIND.items():
                if exp.tags.get(k) != v:
                    self.client.set_experiment_tag(self.experiment_id, k, v)
        self.experiment = experiment
        self._index: dict[str, list[RunRecord]] | None = None

    # -- reading -------------------------------------------------------------------------------
    def _search(self, filter_string: str = "") -> list[Any]:
        return _search_runs(self.client, self.experiment_id, filter_string)

    def index(self, refresh: bool = False) -> dict[str, list[RunRecord]]:
        """Cell runs by cell id: searched once (one paged query), then kept up to date by this
        tracker's own writes. `refresh`: search again (another writer may have been at work)."""
        if self._index is None or refresh:
            self._index = {}
            for r in self._search(f"tags.`{KIND_TAG}` = 'cell'"):
                cid = r.data.tags.get(CELL_TAG)
                self._index.setdefault(cid, []).append(
                    RunRecord(r.info.run_id, cid, r.info.status, r.data.tags.get(SUPERSEDED_TAG, "")))
        return self._index

    def cell_runs(self) -> dict[str, list[RunRecord]]:
        return self.index()

    def finished_cells(self) -> set[str]:
        return {c for c, recs in self.index().items() if any(r.status == "FINISHED" for r in recs)}

    def _set_status(self, run_id: str, status: str) -> None:
        for recs in (self._index or {}).values():
            for r in recs:
                if r.run_id == run_id:
                    r.status = status

    # -- writing -------------------------------------------------------------------------------
    def open_run(self, cell_id: str, params: dict[str, Any], tags: dict[str, str]) -> str:
        """The cell's run: re-attached if one exists (resume, retry), else created. Status RUNNING."""
        existing = self.index().get(cell_id, [])
        if existing:
            keep, *extra = sorted(existing, key=lambda r: r.status != "FINISHED")
            for r in extra:  # a crash between create and tag could leave a twin: keep one
                self.client.delete_run(r.run_id)
            self._index[cell_id] = [keep]
            run_id = keep.run_id
            self.client.update_run(run_id, status="RUNNING")
            keep.status = "RUNNING"
            logged = self.client.get_run(run_id).data.params
            params = {k: v for k, v in params.items() if k not in logged}
        else:
            run = self.client.create_run(self.experiment_id, run_name=cell_id,
                                         tags={CELL_TAG: cell_id, SWEEP_TAG: self.experiment,
                                               KIND_TAG: "cell"})
            run_id = run.info.run_id
            self._index.setdefault(cell_id, []).append(RunRecord(run_id, cell_id, "RUNNING"))
        plist = [Param(k, str(v)[:6000]) for k, v in params.items()]
        tlist = [RunTag(k, str(v)) for k, v in tags.items()]
        for chunk in _chunks(plist, 100):
            self.client.log_batch(run_id, params=chunk)
        if tlist:
            self.client.log_batch(run_id, tags=tlist)
        return run_id

    def log_params(self, run_id: str, params: dict[str, Any]) -> None:
        """Params known only once the cell ran (its training subset's counts); ones already logged
        are left alone (MLflow params are write-once)."""
        logged = self.client.get_run(run_id).data.params
        # Names come from data (class names such as "ALN N+"): MLflow takes alphanumerics, _ - . space /.
        params = {re.sub(r"[^\w\-. /]", "_", k): v for k, v in params.items()}
        plist = [Param(k, str(v)[:6000]) for k, v in params.items() if k not in logged]
        for chunk in _chunks(plist, 100):
            self.client.log_batch(run_id, params=chunk)

    def mark_superseded(self, current: set[str], note: str, unknown_prefixes: set[str] = frozenset()) -> tuple[int, int]:
        """Tag every cell run whose cell the config no longer plans (`note` says which config, as of
        when); untag a current one marked before (a config changed back). Runs whose prefix is in
        `unknown_prefixes` (cells whose identity could not be resolved this time, e.g. an unreadable
        dataset root) are left alone. Returns (marked, restored)."""
        from orchestrator.grid.identity import prefix_of

        marked = restored = 0
        for cid, recs in self.index().items():
            for r in recs:
                if cid in current:
                    if r.superseded:
                        self.client.delete_tag(r.run_id, SUPERSEDED_TAG)
                        r.superseded = ""
                        restored += 1
                elif not r.superseded and prefix_of(cid) not in unknown_prefixes:
                    self.client.set_tag(r.run_id, SUPERSEDED_TAG, note)
                    r.superseded = note
                    marked += 1
        return marked, restored

    def set_tags(self, run_id: str, tags: dict[str, str]) -> None:
        if tags:
            self.client.log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def finish(self, run_id: str, metrics: dict[str, float], artifact_dir: str | None = None) -> None:
        now = int(time.time() * 1000)
        mlist = [Metric(k, float(v), now, 0) for k, v in metrics.items() if v == v]  # drop NaN
        for chunk in _chunks(mlist, 1000):
            self.client.log_batch(run_id, metrics=chunk)
        if artifact_dir and Path(artifact_dir).is_dir():
            self.client.log_artifacts(run_id, artifact_dir)
        self.client.set_tag(run_id, "medscale.error", "")
        self.client.set_terminated(run_id, status="FINISHED")
        self._set_status(run_id, "FINISHED")

    def fail(self, run_id: str, message: str) -> None:
        self.client.set_tag(run_id, "medscale.error", message[:4000])
        self.client.log_text(run_id, message, "error.txt")
        self.client.set_terminated(run_id, status="FAILED")
        self._set_status(run_id, "FAILED")

    def delete_cells(self, cell_ids: Iterable[str]) -> int:
        runs = self.index()
        n = 0
        for cid in cell_ids:
            for r in runs.pop(cid, []):
                self.client.delete_run(r.run_id)
                n += 1
        return n

    def sweep_runs(self, kind: str) -> dict[str, dict[str, str]]:
        """Run id -> tags of the experiment's runs of one kind other than cells (plan,
        adaptive_round): the adaptive loop finds the rounds it logged before a restart."""
        return {r.info.run_id: dict(r.data.tags) for r in self._search(f"tags.`{KIND_TAG}` = '{kind}'")}

    def delete_runs(self, run_ids: Iterable[str]) -> None:
        for rid in run_ids:
            self.client.delete_run(rid)

    def log_sweep_run(self, name: str, params: dict[str, Any], metrics: dict[str, float],
                      artifact_dir: str | None = None, kind: str = "sweep", tags: dict[str, str] | None = None) -> str:
        run = self.client.create_run(self.experiment_id, run_name=name,
                                     tags={**(tags or {}), KIND_TAG: kind, SWEEP_TAG: self.experiment})
        for chunk in _chunks([Param(k, str(v)[:6000]) for k, v in params.items()], 100):
            self.client.log_batch(run.info.run_id, params=chunk)
        self.finish(run.info.run_id, metrics, artifact_dir)
        return run.info.run_id


def load_points(tracking_uri: str, experiments: list[str] | None = None, split: str = "test",
                config_identities: set[str] | None = None) -> pd.DataFrame:
    """Finished cell runs as analysis points: one row per (run, metric of `split`).

    `config_identities` (from `grid.config_identities(cfg)`): keep only the runs of the cells
    a config plans as it is now, and of those only the ones no later sweep marked superseded.
    A seed-free cell (kNN: the protocol ignores the seed) is one value with `seed_free` True,
    never n copies counted as seeds (`analysis.points.collapse_seed_free`)."""
    from analysis.points import collapse_seed_free
    from tasks.protocols import PROTOCOLS

    client = MlflowClient(tracking_uri=tracking_uri)
    if experiments:
        exps = [client.get_experiment_by_name(e) for e in experiments]
        missing = [e for e, x in zip(experiments, exps, strict=True) if x is None]
        if missing:
            raise ConfigError(f"{tracking_uri}: no experiment named {missing}")
    else:
        exps = client.search_experiments()
    rows = []
    for exp in exps:
        for r in _search_runs(client, exp.experiment_id, f"tags.`{KIND_TAG}` = 'cell' and attributes.status = 'FINISHED'"):
            p, tags = r.data.params, r.data.tags
            if config_identities is not None and (tags.get(CONFIG_IDENTITY_TAG) not in config_identities
                                                  or tags.get(SUPERSEDED_TAG)):
                continue
            proto = PROTOCOLS.get(p.get("protocol", ""))
            # Runs logged before `seed_free` existed: the protocol's own declaration decides.
            seed_free = p.get("seed_free", str(proto is not None and not proto.uses_seed).lower()) == "true"
            base = {"experiment": exp.name, "experiment_id": exp.experiment_id, "run_id": r.info.run_id,
                    "task": p.get("task", ""), "dataset": p.get("dataset"),
                    "protocol": p.get("protocol"), "encoder": p.get("encoder"), "family": p.get("family", ""),
                    "params": int(p.get("params", 0)), "gflops": float(p.get("gflops", "nan")),
                    "resolution": int(p.get("resolution", 0)), "seed": int(p.get("seed", 0)),
                    "weights": p.get("weights_kind", ""), "seed_free": seed_free,
                    # the data axis: the cell's train size and the training cases it had
                    "train_fraction": float(p.get("train_fraction", 1.0) or 1.0),
                    "train_shots": int(p["train_shots"]) if p.get("train_shots") else 0,
                    "n_train": float(r.data.metrics.get("n_train", float("nan")))}
            for k, v in r.data.metrics.items():
                if k.startswith(f"{split}_"):
                    rows.append({**base, "metric": k[len(split) + 1 :], "value": float(v)})
            # Out-of-domain test sets (config evaluate_on): a curve of their own, "train->test"
            # dataset, whose run id names the predictions' split (see load_predictions).
            for ood in filter(None, p.get("evaluate_on", "").split(",")):
                prefix = f"{ood}_{split}_"
                for k, v in r.data.metrics.items():
                    if k.startswith(prefix):
                        rows.append({**base, "dataset": f"{base['dataset']}->{ood}", "metric": k[len(prefix):],
                                     "run_id": f"{r.info.run_id}{OOD_SEP}{ood}_{split}", "value": float(v)})
    cols = ["experiment", "experiment_id", "run_id", "task", "dataset", "protocol", "encoder", "family", "params", "gflops",
            "resolution", "seed", "weights", "seed_free", "train_fraction", "train_shots", "n_train", "metric",
            "value"]
    return collapse_seed_free(pd.DataFrame(rows, columns=cols))


PREDICTIONS_ARTIFACT = "predictions.parquet"  # written by orchestrator.cells.run_cell
PER_CASE_ARTIFACT = "per_case.parquet"  # dense cells (orchestrator.cells.dense): per-case metrics
OOD_SEP = "#"  # run ids of out-of-domain points: "<MLflow run id>#<dataset>_test"


def load_predictions(tracking_uri: str, run_ids: Iterable[str], split: str = "test") -> dict[str, pd.DataFrame]:
    """Per-case predictions (case_id, patient_id, target_*, score_*) of `split` per run id.

    Runs without the artifact (logged before it existed, or elsewhere) are left out; the analysis
    then falls back to per-seed values for their curves.
    """
    import tempfile

    from mlflow.exceptions import MlflowException

    client = MlflowClient(tracking_uri=tracking_uri)
    out: dict[str, pd.DataFrame] = {}
    with tempfile.TemporaryDirectory(prefix="medscale-preds-") as tmp:
        for rid in dict.fromkeys(run_ids):
            run, _, ood_split = rid.partition(OOD_SEP)  # "<run>#camelyon17_test": an OOD test set
            path = None
            for name in (PREDICTIONS_ARTIFACT, PER_CASE_ARTIFACT):  # dense runs: per-case metrics
                p = Path(tmp) / run / name
                if not p.exists():
                    try:
                        client.download_artifacts(run, name, str(Path(tmp) / run))
                    except (MlflowException, OSError):
                        continue
                path = p
                break
            if path is None:
                continue
            df = pd.read_parquet(path)
            if "split" in df.columns:
                df = df[df["split"] == (ood_split or split)]
            out[rid] = df.drop(columns=["split"], errors="ignore").reset_index(drop=True)
    return out


ANALYSIS_TAG = "medscale.analysis"
TAG_LIMIT = 5000  # MLflow caps tag values; longer run lists go to the sources.csv artifact only


def log_analysis_run(tracking_uri: str, experiment: str, out_dir: str, sources: pd.DataFrame,
                     params: dict[str, Any], metrics: dict[str, float]) -> str:
    """Log an analysis (its whole output directory) as a run of kind "analysis" in `experiment`,
    tagged with the experiments and runs it read (`sources`: experiment, experiment_id, run_id)."""
    run_ids = ",".join(sorted(sources["run_id"].astype(str).unique()))
    tags = {f"{ANALYSIS_TAG}.experiments": ",".join(sorted(sources["experiment"].astype(str).unique())),
            f"{ANALYSIS_TAG}.experiment_ids": ",".join(sorted(sources["experiment_id"].astype(str).unique())),
            f"{ANALYSIS_TAG}.n_runs": str(sources["run_id"].nunique()),
            f"{ANALYSIS_TAG}.run_ids": run_ids if len(run_ids) <= TAG_LIMIT else "too many for a tag: see sources.csv"}
    return Tracker(tracking_uri, experiment).log_sweep_run("analysis", params, metrics, out_dir, kind="analysis",
                                                          tags=tags)
