"""3D segmentation through the sweep (issue #12's acceptance): synthetic MSD (one single-, one
multi-modal task), AutoPET-II and HECKTOR 2022 layouts with the tiny encoder end as FINISHED runs
with Dice above an all-background prediction; five MSD folds run as ONE trial on one stream of
encoded crops, each fold still its own cell (identity, MLflow run, result directory)."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from orchestrator.cells.seg3d import run_seg3d_group
from orchestrator.grid.config import parse_config
from orchestrator.grid.identity import prefix_of
from orchestrator.store.results import ResultStore
from orchestrator.sweep.driver import run_sweep
from tasks.datasets import dataset_class, get_dataset
from tasks.encoders import create_encoder
from tasks.targets.mask3d import to_file_grid

from .conftest import TINY, sweep_config
from .test_sweep import _runs

LEARN = {"steps": 60, "crop_slices": 4, "val_every": 30, "base": 8, "lr": 3e-3, "layers": [-2, -1]}
DATASETS = ("msd_spleen", "msd_prostate", "autopet2", "hecktor22")


def _cfg(tmp: Path, roots: dict[str, Path], hparams: dict, seeds: list[int], resolution: int):
    raw = sweep_config(tmp, roots, grid={"resolutions": [resolution], "protocols": ["seg3d_decoder"],
                                         "seeds": seeds})
    raw["protocols"] = {"seg3d_decoder": hparams}
    return parse_config(raw)


def _cell_dirs(cfg) -> dict[str, Path]:
    return {p.name: p for p in (Path(cfg.sweep_root) / "cells").iterdir() if not p.name.startswith(".")}


@pytest.mark.slow
def test_seg3d_sweep_learns_on_every_layout(ray_session, tmp_path, one_torch_thread):
    roots = {}
    for name in DATASETS:
        roots[name] = dataset_class(name).synth(tmp_path / "data" / name, n=10, image_size=32, n_slices=8)
    cfg = _cfg(tmp_path, roots, LEARN, [0], 64)
    outcome = run_sweep(cfg)
    assert sorted(prefix_of(c) for c in outcome.cells) == sorted(
        f"{d}__seg3d_decoder__{TINY}__64px__s0" for d in DATASETS)
    assert set(outcome.cells.values()) == {"FINISHED"}, outcome.errors
    runs = _runs(cfg)
    assert len(runs) == 4 and set(runs["status"]) == {"FINISHED"}
    for cid, m in outcome.metrics.items():
        # all background scores Dice 0 on every labelled class of every case
        assert m["test_dice_mean"] > 0.2, (cid, m)
        assert "test_hd95_mean" in m and "test_n_empty_predictions" in m
    # each cell (here a group of one: a single seed) writes its test cases' NIfTI predictions
    for name, d in _cell_dirs(cfg).items():
        m = json.loads((d / "metrics.json").read_text())
        preds = sorted((d / "predictions").glob("*.nii.gz"))
        assert len(preds) == m["n_test"] > 0, name
        assert len(nib.load(preds[0]).shape) == 3 and m["shared_data_order"] == 0 and m["group_size"] == 1
        # What tests/test_seg3d_learn.py checks of the protocol called plainly (there on one layout),
        # here on every layout, through the same fit_group with the same hyperparameters.
        dataset = prefix_of(name).split("__")[0]
        ds = get_dataset(dataset, roots[dataset])
        assert m["feature_channels"] == ds.n_modalities * 2 * 64  # modalities x layers x width
        assert m["warmup_steps"] == (3 if dataset in ("autopet2", "hecktor22") else 0)  # 5% warm-up on PET/CT
        curve = pd.read_csv(d / "training_curve.csv")
        loss = curve.loc[curve["curve"] == "train_loss", "value"].to_numpy()
        assert len(loss) == LEARN["steps"] and loss[-1] < loss[0]
        assert curve.loc[curve["curve"] == "val_dice", "step"].tolist() == [30, 60]
        fg = []  # foreground Dice of each saved prediction against the label volume, on the file's grid
        for p in preds:
            s = ds.read_sample(p.name.removesuffix(".nii.gz"))
            pred, gt = np.asarray(nib.load(p).dataobj) > 0, to_file_grid(s.target, s) > 0
            assert pred.shape == gt.shape, (name, p.name)
            fg.append(2 * np.sum(pred & gt) / (pred.sum() + gt.sum()))
        assert np.mean(fg) > 0.4, (dataset, fg)
        assert m["test_dice_mean"] > 0.25 and max(m[f"test_dice_{c}"] for c in ds.classes) > 0.4, m


@pytest.mark.slow
def test_five_fold_msd_sweep_encodes_each_volume_once(ray_session, tmp_path, one_torch_thread):
    root = dataset_class("msd_spleen").synth(tmp_path / "data", n=6, image_size=16, n_slices=4)
    hp = {"steps": 3, "batch_size": 2, "crop_slices": 4, "val_every": 0, "base": 8, "lr": 1e-3, "layers": [-2, -1]}
    cfg = _cfg(tmp_path, {"msd_spleen": root}, hp, [0, 1, 2, 3, 4], 32)
    outcome = run_sweep(cfg)
    assert len(outcome.cells) == 5 and set(outcome.cells.values()) == {"FINISHED"}, outcome.errors
    runs = _runs(cfg)
    assert len(runs) == 5 and set(runs["status"]) == {"FINISHED"}  # one MLflow run per fold

    dirs = _cell_dirs(cfg)
    assert sorted(prefix_of(c) for c in dirs) == sorted(
        f"msd_spleen__seg3d_decoder__{TINY}__32px__s{k}" for k in range(5))
    metrics = {c: json.loads((d / "metrics.json").read_text()) for c, d in dirs.items()}
    identities = {json.loads((d / "identity.json").read_text())["identity"] for d in dirs.values()}
    assert len(identities) == 5  # each fold keeps its own identity
    # Training: the group encoded steps x crops x slices once, for all five heads (not five times);
    # its one validation round encoded each fold's val volumes once for every head scoring them.
    # Scoring: every volume is val or test of some fold; each was encoded once for the group.
    ds = get_dataset("msd_spleen", root)
    slices = {c: ds.n_slices(c) for c in ds.index()["case_id"]}
    val_union = {c for k in range(5) for c, s in ds.cell_splits(k)[0].items() if s == "val"}
    per_group = 3 * 2 * 4
    for m in metrics.values():
        assert m["group_size"] == 5 and m["shared_data_order"] == 1 and m["data_seed"] == 0
        assert m["n_encoded_slices"] == per_group
        assert m["group_encoded_slices_fit"] == per_group + sum(slices[c] for c in val_union)
        assert m["group_encoded_slices_predict"] == sum(slices.values())  # 5 folds, each volume once
    assert sum(m["n_test"] for m in metrics.values()) == 6  # the five folds test each case once
    for _, row in runs.iterrows():
        p = row["run"].data.params
        assert p["shared_data_order"] == "true" and p["group_size"] == "5" and p["data_seed"] == "0"
        assert p["group_seeds"] == p["data_order_seeds"] == "0,1,2,3,4" and p["feature_source"] == "online"


def test_a_resumed_part_of_a_group_draws_the_same_crops(tmp_path, one_torch_thread):
    """Resume runs only the missing folds: with the planned group's data order they train exactly
    as they would have in the whole group."""
    dataset_class("msd_spleen").synth(tmp_path / "data", n=6, image_size=16, n_slices=4)
    ds = get_dataset("msd_spleen", tmp_path / "data")
    enc = create_encoder(TINY, "random", "cpu")
    hp = {"steps": 3, "batch_size": 2, "crop_slices": 4, "val_every": 0, "base": 8, "lr": 1e-3, "layers": [-2, -1]}
    order = {"seed": 0, "seeds": [0, 1, 2, 3, 4]}
    whole = run_seg3d_group(ds, enc, 32, [{"cell_id": f"f{k}", "seed": k, "hparams": hp} for k in range(5)],
                            ResultStore(str(tmp_path / "whole")), order)
    part = run_seg3d_group(ds, enc, 32, [{"cell_id": f"f{k}", "seed": k, "hparams": hp} for k in (2, 4)],
                           ResultStore(str(tmp_path / "part")), order)
    for k in (2, 4):
        for m in ("test_dice_mean", "val_dice_mean", "n_updates"):
            assert part[f"f{k}"][m] == pytest.approx(whole[f"f{k}"][m], nan_ok=True), (k, m)
        assert part[f"f{k}"]["shared_data_order"] == 1 and part[f"f{k}"]["group_size"] == 2
