"""seg2d_linear and seg2d_decoder on OnlineFeatures (tiny random encoder, no Ray) over the synthetic
datasets: the decoder beats the linear probe where a pixel's class needs more than its patch, both
beat an all-background prediction; seeds, early stopping, hyperparameter checks; configs/seg2d.yaml."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tasks.datasets import dataset_class, get_dataset
from tasks.encoders import create_encoder
from tasks.errors import ConfigError
from tasks.features import OnlineFeatures
from tasks.protocols import create_protocol
from tasks.targets import TARGET_HANDLERS

TINY = "test_vit_tiny16"
REPO = Path(__file__).resolve().parents[1]


def _setup(name: str, root: Path, res: int):
    ds = get_dataset(name, root)
    src = OnlineFeatures(create_encoder(TINY, "random", "cpu"), ds, res, keep=1000)
    split, _ = ds.cell_splits(0)
    return ds, src, {s: sorted(c for c, v in split.items() if v == s) for s in ("train", "val", "test")}


def _score(ds, src, ids, predict) -> dict[str, float]:
    h = TARGET_HANDLERS["mask2d"]
    rows = []
    for cid in ids:
        s = src.sample(cid)
        rows += h.case_metrics(s, predict(s, cid), ds.classes)
    return h.aggregate(rows, ds.classes)


def _background(s, cid):
    return np.zeros_like(s.target) if s.target.ndim == 2 else np.zeros(s.target.shape, bool)


def _fit_both(ds, src, ids, steps: int):
    kw = {"task": ds.task, "max_steps": steps, "val_every": 25, "patience": 4, "device": "cpu"}
    return {name: create_protocol(name, **kw, **extra).fit(src, ids["train"], ids["val"])
            for name, extra in (("seg2d_linear", {}), ("seg2d_decoder", {"width": 32}))}


def test_decoder_beats_linear_on_context_endovis(tmp_path, one_torch_thread):
    """Robotic shafts and suction instruments are the same grey bar; only the clasper at the tip,
    2-3 patches away, tells them apart. A 1x1 probe on a patch cannot see it; the decoder's 3x3
    blocks can. Both find instruments and the kidney, which an all-background mask never does."""
    root = dataset_class("endovis18").synth(tmp_path / "ev", n=45, image_size=160)
    ds, src, ids = _setup("endovis18", root, 128)
    heads = _fit_both(ds, src, ids, steps=150)
    m = {name: _score(ds, src, ids["test"], lambda s, c, h=h: h.predict(src, c)) for name, h in heads.items()}
    bg = _score(ds, src, ids["test"], _background)
    context = {n: (v["iou_instrument_shaft"] + v["iou_suction_instrument"]) / 2 for n, v in m.items()}
    assert context["seg2d_decoder"] > context["seg2d_linear"] + 0.15, context
    assert m["seg2d_decoder"]["miou"] > m["seg2d_linear"]["miou"]
    assert bg["miou"] == 0.0 and bg["iou_instrument"] == 0.0
    for v in m.values():
        assert v["miou"] > 0.1 and v["iou_instrument"] > 0.25 and v["iou_kidney_parenchyma"] > 0.3
    dec = heads["seg2d_decoder"]
    assert dec.summary()["steps"] <= 150 and dec.history_ and dec.history_[-1]["step"] == dec.summary()["steps"]


def test_multilabel_edd_beats_background(tmp_path, one_torch_thread):
    root = dataset_class("edd2020").synth(tmp_path / "edd", n=30, image_size=64)
    ds, src, ids = _setup("edd2020", root, 64)
    heads = _fit_both(ds, src, ids, steps=150)
    bg = _score(ds, src, ids["test"], _background)
    assert bg["mdice"] == 0.0
    for h in heads.values():
        m = _score(ds, src, ids["test"], lambda s, c, h=h: h.predict(src, c))
        assert m["mdice"] > 0.08 and m["iou_be"] > 0.3, m
        p = h.predict_scores(src, ids["test"][0])
        assert p.shape == (5, *src.sample(ids["test"][0]).images.shape[2:4]) and 0 <= p.min() and p.max() <= 1


def test_seed_reproducible_and_early_stopping(tmp_path, one_torch_thread):
    root = dataset_class("endovis18").synth(tmp_path / "ev", n=15, image_size=48)
    ds, src, ids = _setup("endovis18", root, 32)
    kw = {"task": "multiclass", "max_steps": 12, "val_every": 2, "batch_size": 4, "device": "cpu"}
    a = create_protocol("seg2d_decoder", width=16, seed=3, **kw).fit(src, ids["train"], ids["val"])
    b = create_protocol("seg2d_decoder", width=16, seed=3, **kw).fit(src, ids["train"], ids["val"])
    c = create_protocol("seg2d_decoder", width=16, seed=4, **kw).fit(src, ids["train"], ids["val"])
    cid = ids["test"][0]
    np.testing.assert_array_equal(a.predict_scores(src, cid), b.predict_scores(src, cid))
    assert not np.array_equal(a.predict_scores(src, cid), c.predict_scores(src, cid))
    # lr so large that validation gets worse: stops after `patience` bad validations, keeps the best
    d = create_protocol("seg2d_linear", **{**kw, "max_steps": 200}, lr=50.0, patience=2).fit(
        src, ids["train"], ids["val"])
    assert d.summary()["steps"] < 200
    assert d.summary()["best_val_loss"] == min(h["val_loss"] for h in d.history_)
    assert not (set(ids["test"]) & (set(ids["train"]) | set(ids["val"])))


def test_hyperparameters_are_checked():
    with pytest.raises(ConfigError, match="loss"):
        create_protocol("seg2d_decoder", loss="focal")
    with pytest.raises(ConfigError, match="does not support task 'binary'"):
        create_protocol("seg2d_linear", task="binary")
    with pytest.raises(ConfigError, match="width"):
        create_protocol("seg2d_decoder", width=0)
    from tasks.protocols import protocols_for

    for name in ("endovis18", "edd2020"):
        assert protocols_for(dataset_class(name)) == ["seg2d_decoder", "seg2d_linear"]
    with pytest.raises(TypeError, match="dense head"):
        create_protocol("seg2d_linear").predict_proba(np.zeros((1, 2)))


def test_seg2d_config_is_the_papers_grid():
    from orchestrator.grid.config import load_config

    cfg = load_config(REPO / "configs" / "seg2d.yaml")
    g = cfg.grid
    assert g.encoders == ["dinov3_vits16", "dinov3_vitb16", "dinov3_vitl16"]
    assert min(g.resolutions) == 224 and max(g.resolutions) == 1024
    assert sorted(g.datasets) == ["edd2020", "endovis18", "endovis18_types"]
    assert sorted(g.protocols) == ["seg2d_decoder", "seg2d_linear"]
    assert g.seeds == [0, 1, 2]
    assert cfg.n_cells() == 3 * len(g.resolutions) * 3 * 2 * 3
