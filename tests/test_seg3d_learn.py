"""seg3d_decoder, called as a plain protocol, learns on a synthetic HECKTOR22 layout with the tiny
encoder through online features: Dice clearly above an all-background prediction. The sweep runs
the same on every layout (tests/test_seg3d_sweep.py)."""

from __future__ import annotations

import numpy as np
import pytest

from tasks.datasets import DATASETS, dataset_class, get_dataset
from tasks.dense import choose_source
from tasks.encoders import create_encoder
from tasks.errors import ConfigError
from tasks.features import OnlineFeatures
from tasks.protocols import PROTOCOLS, create_protocol, protocols_for
from tasks.targets import TARGET_HANDLERS


def test_registered_for_mask3d_volumes_only():
    cls = PROTOCOLS["seg3d_decoder"]
    assert cls.family == "dense" and cls.augments and cls.uses_seed
    assert "seg3d_decoder" in protocols_for(DATASETS["msd_brain"])
    assert "seg3d_decoder" in protocols_for(DATASETS["hecktor22"])
    assert "seg3d_decoder" not in protocols_for(DATASETS["nih14"])
    # augmenting heads are always online (flips/rotations must pass through the encoder)
    assert choose_source(100, 4, 64, budget_gb=1e6, augment=cls.augments).kind == "online"
    for bad, frag in [({"warmup": 1.5}, "warmup"), ({"crop_slices": 0}, "crop_slices"), ({"overlap": 1.0}, "overlap")]:
        with pytest.raises(ConfigError, match=frag):
            create_protocol("seg3d_decoder", **bad)
    assert tuple(cls().layers) == (-4, -3, -2, -1)  # DINOv3's multi-layer dense evaluation: the last four
    with pytest.raises(ConfigError, match="layers"):
        create_protocol("seg3d_decoder", layers=[])


# The protocol called plainly (no Ray, no sweep) on one layout: multi-modal PET/CT, with warm-up.
# The same checks run on all four layouts (MSD single- and multi-modal, AutoPET-II, HECKTOR22) in
# tests/test_seg3d_sweep.py, whose cells train through the same fit_group with these hyperparameters.
@pytest.mark.parametrize("name", ["hecktor22"])
def test_learns_above_all_background(tmp_path, name, one_torch_thread):
    dataset_class(name).synth(tmp_path, n=10, image_size=32, n_slices=8)
    ds = get_dataset(name, tmp_path)
    enc = create_encoder("test_vit_tiny16", "random", "cpu")
    head = create_protocol("seg3d_decoder", steps=60, crop_slices=4, val_every=30, base=8, lr=3e-3, seed=0,
                           layers=[-2, -1])
    src = OnlineFeatures(enc, ds, 64, layers=head.layers)
    assert src.channels == ds.n_modalities * 2 * 64  # modalities x layers x width, concatenated
    splits, _ = ds.cell_splits(0)
    ids = {k: [c for c, v in splits.items() if v == k] for k in ("train", "val", "test")}
    head.fit(src, ids["train"], ids["val"])
    assert head.warmup_steps_ == (3 if name in ("autopet2", "hecktor22") else 0)  # 5% warm-up on PET/CT
    assert head.loss_curve_[-1] < head.loss_curve_[0]
    handler = TARGET_HANDLERS["mask3d"]
    rows, fg = [], []
    for cid in ids["test"]:
        s = src.sample(cid)
        pred = head.predict(src, cid)
        assert pred.shape == s.target.shape
        rows += handler.case_metrics(s, pred, ds.classes)
        p, g = pred > 0, s.target > 0
        fg.append(2 * np.sum(p & g) / (p.sum() + g.sum()))
    agg = handler.aggregate(rows, ds.classes)
    # all background scores Dice 0 on every case that has a lesion
    assert np.mean(fg) > 0.4, (name, fg, agg)
    assert agg["dice_mean"] > 0.25 and max(agg[f"dice_{c}"] for c in ds.classes) > 0.4, agg
