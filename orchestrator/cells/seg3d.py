"""The group runner of 3D segmentation: every `seg3d_decoder` cell of one (encoder, resolution,
dataset) -- all folds and seeds -- runs together in one trial, on one stream of encoded crops
(tasks/protocols/seg3d_group.py), and each cell's result is written separately, in the layout of
the dense cell runner:

- `metrics.json`: `val_*` / `test_*` from the mask3d handler's aggregate (Dice per label and mean,
  HD95 mm, precision, recall, `n_empty_predictions`), counts, timings, and how the group shared
  its data: `shared_data_order` (1 when the cell's head drew the same crops as the others),
  `data_seed`, `group_size`, `n_encoded_slices` (the group's, once for all its cells);
- `per_case.parquet` (case_id, split, class, metrics), `predictions/<case>.nii.gz` (test cases, on
  the source affine), `figures/` (best and worst test cases), `feature_source.json` (online, why,
  layers, split scheme, the cells that shared the crops), `failed_cases.csv` when cases were left out.

Plain Python (no Ray, no MLflow): a trial calls `run_seg3d_group`. A case whose header cannot be
read is left out of every cell and named (it fails alone).
"""

from __future__ import annotations

import io
import json
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from orchestrator.store.results import PLACEMENT_FILE, RESULT_FILE, RUNNING_FILE, ResultStore

SPLITS = ("train", "val", "test")
ONLINE_REASON = "seg3d_decoder trains with geometric augmentation, which must pass through the encoder"


def _probe(dataset: Any, case_ids: Sequence[str]) -> dict[str, str]:
    from tasks.errors import DatasetError

    failed = {}
    for cid in case_ids:
        try:
            dataset.n_slices(cid)
        except DatasetError as e:
            failed[cid] = str(e)
    return failed


def run_seg3d_group(dataset: Any, encoder: Any, resolution: int, cells: Sequence[dict[str, Any]],
                    results: Any, data_order: dict[str, Any] | None = None) -> dict[str, dict[str, float]]:
    """cells: [{"cell_id", "seed", "hparams"}] of one (encoder, resolution, dataset). Returns each
    cell's metrics, as written to its result directory. `data_order` ({"seed", "seeds"}: the planned
    group, see `data_order_for`) fixes the crop stream to the planned group's, whichever of its cells
    run now."""
    from tasks.features import OnlineFeatures
    from tasks.protocols import create_protocol
    from tasks.protocols.seg3d_group import fit_group
    from tasks.targets import TARGET_HANDLERS

    t0 = time.perf_counter()
    handler = TARGET_HANDLERS[dataset.target_kind]
    heads = [create_protocol("seg3d_decoder", **{**c.get("hparams", {}), "task": dataset.task, "seed": c["seed"]})
             for c in cells]
    splits = [dataset.cell_splits(c["seed"]) for c in cells]
    failed = _probe(dataset, list(splits[0][0]))
    ids = [{s: [cid for cid, sp in sp_map.items() if sp == s and cid not in failed] for s in SPLITS}
           for sp_map, _ in splits]
    source = OnlineFeatures(encoder, dataset, resolution, heads[0].layers)
    order: dict[str, Any] = {}
    if data_order:
        seeds = [int(x) for x in data_order["seeds"]]
        pool = sorted({cid for s in seeds for cid, sp in dataset.cell_splits(s)[0].items()
                       if sp == "train" and cid not in failed})
        order = {"data_seed": int(data_order["seed"]), "pool": pool, "shared": len(seeds) > 1}
    fit_group(heads, source, [i["train"] for i in ids], [i["val"] for i in ids], **order)
    fit_s = time.perf_counter() - t0
    fit_encoded = source.n_encoded_slices

    classes = list(dataset.classes)
    rows, files, scored = _score_group(heads, source, handler, classes, ids)
    predict_encoded = source.n_encoded_slices - fit_encoded  # each val/test volume once for the group
    out = {}
    cell_ids = [c["cell_id"] for c in cells]
    for k, (cell, head) in enumerate(zip(cells, heads, strict=True)):
        per_case = pd.DataFrame(rows[k])
        metrics: dict[str, float] = {}
        for split in ("val", "test"):
            sub = per_case[per_case["split"] == split] if len(per_case) else per_case
            if len(sub):
                metrics.update({f"{split}_{m}": float(v) for m, v in handler.aggregate(sub, classes).items()})
        ranked = sorted(scored[k], key=lambda t: -t[0])
        chosen = ranked[:1] + ranked[-1:] if len(ranked) > 1 else ranked
        f = files[k]
        f.update(handler.figures([(s, p, sc) for sc, s, p in chosen]))
        lost = [(splits[k][0].get(c, ""), c, e) for c, e in sorted(failed.items())]
        if lost:
            f["failed_cases.csv"] = pd.DataFrame(lost, columns=["split", "case_id", "error"]).to_csv(index=False).encode()
        metrics.update(n_train=float(len(ids[k]["train"])), n_val=float(len(ids[k]["val"])),
                       n_test=float(len(ids[k]["test"])), n_failed_cases=float(len(lost)),
                       feature_channels=float(source.channels), fit_s=fit_s, best_step=float(head.best_step_),
                       n_updates=float(head.n_updates_), shared_data_order=float(head.shared_data_order_),
                       data_seed=float(head.data_seed_), group_size=float(head.group_size_),
                       n_encoded_slices=float(head.n_encoded_slices_), warmup_steps=float(head.warmup_steps_),
                       group_encoded_slices_fit=float(fit_encoded), group_encoded_slices_predict=float(predict_encoded),
                       compute_s=time.perf_counter() - t0)
        f["training_curve.csv"] = _training_curve(head)
        buf = io.BytesIO()
        per_case.to_parquet(buf, index=False)
        f["per_case.parquet"] = buf.getvalue()
        f["feature_source.json"] = json.dumps({
            "source": "online", "reason": ONLINE_REASON, "layers": list(source.layers),
            "split_scheme": splits[k][1], "shared_data_order": bool(head.shared_data_order_),
            "data_seed": head.data_seed_, "group_cells": cell_ids,
            "note": "every cell of this group trained on the same encoded crops, in the same order; "
                    "each cell's loss used only its own training cases"}, indent=1).encode()
        f[RESULT_FILE] = json.dumps(metrics, indent=1, sort_keys=True).encode()
        results.write(cell["cell_id"], f)
        out[cell["cell_id"]] = metrics
    return out


def _training_curve(head: Any) -> bytes:
    """The head's training loss per update and its validation Dice per validation step, long format
    (curve, step, value): what a researcher plots to see whether the steps were enough."""
    rows = [("train_loss", i + 1, v) for i, v in enumerate(head.loss_curve_)]
    rows += [("val_dice", step, dice) for step, dice in head.val_curve_]
    return pd.DataFrame(rows, columns=["curve", "step", "value"]).to_csv(index=False).encode()


def _score_group(heads: list[Any], source: Any, handler: Any, classes: list[str], ids: list[dict[str, list[str]]]
                 ) -> tuple[list[list[dict[str, Any]]], list[dict[str, bytes]], list[list[tuple[float, Any, np.ndarray]]]]:
    """Per cell of the group: its val/test per-case rows, its test prediction files, and its scored
    test cases (for the best/worst figures). Each case is encoded once for every cell that scores it."""
    from tasks.protocols.seg3d_group import predict_group

    rows: list[list[dict[str, Any]]] = [[] for _ in heads]
    files: list[dict[str, bytes]] = [{} for _ in heads]
    scored: list[list[tuple[float, Any, np.ndarray]]] = [[] for _ in heads]
    need = sorted({cid for i in ids for s in ("val", "test") for cid in i[s]})
    for cid in need:
        who = [k for k, i in enumerate(ids) if cid in i["val"] or cid in i["test"]]
        preds = predict_group([heads[k] for k in who], source, cid)
        sample = source.sample(cid)
        for k, pred in zip(who, preds, strict=True):
            split = "val" if cid in ids[k]["val"] else "test"
            case_rows = [{**r, "case_id": cid, "split": split} for r in handler.case_metrics(sample, pred, classes)]
            rows[k] += case_rows
            if split == "test":
                files[k].update(handler.prediction_files(sample, pred))
                score = float(np.nanmean([r["dice"] for r in case_rows])) if case_rows else float("nan")
                if np.isfinite(score):
                    scored[k].append((score, sample, pred))
    return rows, files, scored


# -- the sweep's side: cells of one group become one trial ----------------------------------------

GROUPED_PROTOCOL = "seg3d_decoder"


def data_order_for(cfg: Any, cell: Any) -> dict[str, Any] | None:
    """The planned group of a `seg3d_decoder` cell: every grid seed of its (encoder, resolution,
    dataset, hyperparameters, train size) trains on one crop stream, seeded by the smallest seed and
    drawn from the union of their training cases. Part of the cell's identity (its data order
    depends on it). None for other cells and for training subsets (they run alone: the group draws
    from whole training splits)."""
    if cell.protocol != GROUPED_PROTOCOL or not cell.train_size.is_full:
        return None
    seeds = sorted({int(s) for s in cfg.grid.seeds})
    return {"seed": seeds[0], "seeds": seeds}


def _group_key(spec: dict[str, Any]) -> str | None:
    """What cells must share to train on one stream of crops: everything but the seed (the fold).
    None for a cell that runs alone through the dense runner (no planned group, or not online)."""
    if not spec.get("data_order") or (spec.get("dense") or {}).get("source") != "online":
        return None
    same = {k: spec.get(k) for k in ("encoder", "resolution", "dataset", "hparams", "config", "keys", "data_order")}
    same["dense"] = {k: v for k, v in spec["dense"].items() if k != "reason"}
    return json.dumps(same, sort_keys=True, default=str)


def group_specs(specs: Sequence[dict[str, Any]]) -> tuple[list[dict[str, Any]], dict[str, dict[str, Any]]]:
    """(the trials' specs, {cell_id: params of the group it joined}). The `seg3d_decoder` cells to
    run that differ only in their seed become one spec whose `members` are their own specs (each
    keeps its identity, result directory and MLflow run); every other spec passes through."""
    groups: dict[str, list[dict[str, Any]]] = {}
    out: list[dict[str, Any]] = []
    for spec in specs:
        key = _group_key(spec)
        if key is None:
            out.append(spec)
        else:
            groups.setdefault(key, []).append(spec)
    params: dict[str, dict[str, Any]] = {}
    for members in groups.values():
        members = sorted(members, key=lambda m: int(m["seed"]))
        ids = [m["cell_id"] for m in members]
        order = members[0]["data_order"]
        out.append({**members[0], "cell_id": f"{ids[0]}__group{len(ids)}", "members": members})
        for m in members:
            params[m["cell_id"]] = {"shared_data_order": str(len(order["seeds"]) > 1).lower(),
                                    "data_seed": int(order["seed"]),
                                    "data_order_seeds": ",".join(str(x) for x in order["seeds"]),
                                    "group_size": len(ids), "group_seeds": ",".join(str(x["seed"]) for x in members)}
    return out, params


class _PerCellStore:
    """A ResultStore per member: each result directory gets its own identity.json and placement."""

    def __init__(self, members: Sequence[dict[str, Any]], placement: dict[str, Any] | None):
        self.stores = {m["cell_id"]: ResultStore(m["results_dir"], identity={**m.get("identity", {}),
                                                                            "cell_id": m["cell_id"]})
                       for m in members}
        self.placement = placement

    def write(self, cell_id: str, files: dict[str, Any]) -> None:
        if self.placement:
            files = {**files, PLACEMENT_FILE: json.dumps({**self.placement, "t_end": time.time()},
                                                         sort_keys=True).encode()}
        self.stores[cell_id].write(cell_id, files)


def run_group_spec(spec: dict[str, Any], placement: dict[str, Any] | None = None) -> dict[str, float]:
    """A group trial (see `group_specs`): the encoder built once, `run_seg3d_group` over the
    members. A failure is written as each member's error, so each run says why it failed."""
    import traceback

    from orchestrator.extraction.dense import open_dataset
    from orchestrator.extraction.weights import check_planned
    from tasks.encoders import create_encoder

    members = spec["members"]
    store = _PerCellStore(members, placement)
    for m in members:
        if placement:
            store.stores[m["cell_id"]].mark_running(m["cell_id"], placement)
    try:
        d = spec["dense"]
        dataset = open_dataset(d["dataset"])
        encoder = check_planned(create_encoder(spec["encoder"], weights=d["weights"]), d["expected_digest"],
                                d.get("precision"))
        cells = [{"cell_id": m["cell_id"], "seed": int(m["seed"]), "hparams": m["hparams"]} for m in members]
        out = run_seg3d_group(dataset, encoder, int(spec["resolution"]), cells, store, spec["data_order"])
    except Exception as e:
        for m in members:
            s = store.stores[m["cell_id"]]
            s.write_error(m["cell_id"], f"{type(e).__name__}: {e}", traceback.format_exc())
            s.clear_marks(m["cell_id"], RUNNING_FILE)
        raise
    return {"group_size": float(len(members)), **{k: v for k, v in next(iter(out.values())).items()
                                                  if k.startswith("group_encoded")}}
