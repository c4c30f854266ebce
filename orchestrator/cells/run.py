"""Run one cell: the Tune trainable calls `run_cell(spec)`, and so can a plain test.

The spec names its runner (`spec["runner"]`, set on the driver by `cells.spec.head_family`); each
head family's runner is a function imported here, so the import graph sees every one of them. A new
head family adds its module under `orchestrator/cells/` and one entry to `RUNNERS`.
"""

from __future__ import annotations

import traceback
from collections.abc import Callable
from typing import Any

from orchestrator.cells.bags import run_bag_cell
from orchestrator.cells.dense import run_dense_cell
from orchestrator.cells.features import run_feature_cell
from orchestrator.cells.registration import run_registration_cell
from orchestrator.cells.seg3d import run_group_spec
from orchestrator.store.results import RUNNING_FILE, ResultStore

RUNNERS: dict[str, Callable[..., dict[str, float]]] = {
    "feature": run_feature_cell,  # a head on pooled features, one row per case
    "bag": run_bag_cell,  # a head on slide bags (ABMIL; mean-pooled bags for linear probe / kNN)
    "dense": run_dense_cell,  # a head on dense maps (segmentation, EM affinities)
    "training_free": run_registration_cell,  # registration: nothing trained, the encoder runs in the cell
}


def run_cell(spec: dict[str, Any], placement: dict[str, Any] | None = None) -> dict[str, float]:
    """Run the cell (or a group of seg3d cells sharing one stream of crops: `members`) and return
    its metrics; its results are written through a ResultStore before this returns.
    `placement` (node, resources) is saved beside the results, so a resumed driver can log it."""
    if spec.get("members"):
        return run_group_spec(spec, placement)
    runner = RUNNERS.get(spec.get("runner", "feature"))
    if runner is None:
        raise NotImplementedError(f"{spec['cell_id']}: no cell runner for head family {spec.get('runner')!r} "
                                  "(orchestrator.cells.run.RUNNERS)")
    cell_id = spec["cell_id"]
    results = ResultStore(spec["results_dir"], identity={**spec.get("identity", {}), "cell_id": cell_id})
    if placement:
        results.mark_running(cell_id, placement)
    try:
        return runner(spec, results, placement)
    except Exception as e:
        results.write_error(cell_id, f"{type(e).__name__}: {e}", traceback.format_exc())
        results.clear_marks(cell_id, RUNNING_FILE)
        raise
