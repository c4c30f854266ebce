"""The seg3d group runner: five CV folds of one (encoder, resolution, dataset) in one trial, each
cell's result written separately; a case that cannot be read fails alone."""

from __future__ import annotations

import io
import json

import nibabel as nib
import numpy as np
import pandas as pd

from orchestrator.cells.seg3d import run_seg3d_group
from orchestrator.store.results import ResultStore
from tasks.datasets import dataset_class, get_dataset
from tasks.encoders import create_encoder

HP = {"steps": 4, "batch_size": 2, "crop_slices": 3, "val_every": 0, "base": 8, "lr": 1e-3, "layers": [-2, -1]}


def test_five_folds_in_one_group_write_five_results(tmp_path, one_torch_thread):
    dataset_class("msd_prostate").synth(tmp_path / "data", n=11, image_size=16, n_slices=4)
    d = tmp_path / "data" / "Task05_Prostate"
    (d / "imagesTr" / "prostate_11.nii.gz").write_bytes(b"broken")  # fails alone
    ds = get_dataset("msd_prostate", d)
    store = ResultStore(str(tmp_path / "cells"))
    cells = [{"cell_id": f"fold{k}", "seed": k, "hparams": HP} for k in range(5)]
    out = run_seg3d_group(ds, create_encoder("test_vit_tiny16", "random", "cpu"), 32, cells, store)
    assert sorted(out) == [f"fold{k}" for k in range(5)]
    tested = set()
    for k in range(5):
        base = tmp_path / "cells" / f"fold{k}"
        m = json.loads((base / "metrics.json").read_text())
        assert m["shared_data_order"] == 1 and m["group_size"] == 5 and m["data_seed"] == 0
        assert m["n_encoded_slices"] == out["fold0"]["n_encoded_slices"] == 4 * 2 * 3 * 2  # steps x crops x slices x modalities
        assert m["n_failed_cases"] == 1 and "prostate_11" in (base / "failed_cases.csv").read_text()
        assert {"test_dice_PZ", "test_dice_TZ", "test_dice_mean", "test_hd95_mean", "test_n_empty_predictions",
                "val_dice_mean"} <= set(m)
        per_case = pd.read_parquet(io.BytesIO((base / "per_case.parquet").read_bytes()))
        test_ids = sorted(per_case.loc[per_case["split"] == "test", "case_id"].unique())
        assert len(per_case) == 2 * per_case["case_id"].nunique()  # two classes per case
        tested |= set(test_ids)
        for cid in test_ids:
            pred = nib.load(base / "predictions" / f"{cid}.nii.gz")
            img = nib.load(d / "imagesTr" / f"{cid}.nii.gz")
            np.testing.assert_array_equal(pred.affine, img.affine)
            assert pred.shape == img.shape[:3]
        src = json.loads((base / "feature_source.json").read_text())
        assert src["source"] == "online" and src["split_scheme"] == f"cv5-fold{k}" and len(src["group_cells"]) == 5
    assert tested == {f"prostate_{i}" for i in range(1, 11)}  # the five folds test every readable case once
