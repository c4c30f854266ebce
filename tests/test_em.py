"""EM neuron segmentation: datasets (layouts, splits, check), the em_affinity head, the `instances`
target handler (waterz VOI/ARAND against scikit-image), and waterz's silence."""

from __future__ import annotations

import io
import pickle
from pathlib import Path

import h5py
import numpy as np
import pytest
from skimage.metrics import adapted_rand_error, variation_of_information

from tasks.datasets import dataset_class, get_dataset
from tasks.errors import ConfigError
from tasks.protocols import create_protocol, protocols_for
from tasks.protocols.em_affinity import DEFAULT_SCORING, DEFAULT_THRESHOLDS
from tasks.targets import TARGET_HANDLERS
from tasks.targets.instances import InstancePrediction, agglomerate, evaluate, seg_to_affinities

REPO = Path(__file__).resolve().parents[1]
TINY = "test_vit_tiny16"


@pytest.fixture(scope="module")
def em_roots(tmp_path_factory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("em")
    roots = {}
    for name, layout in (("cremi", "official"), ("cremi", "cropped"), ("ac3ac4", "official"), ("ac3ac4", "snemi3d")):
        roots[f"{name}-{layout}"] = dataset_class(name).synth(base / f"{name}-{layout}", image_size=32, layout=layout)
    return roots


def _skimage(gt: np.ndarray, seg: np.ndarray) -> dict[str, float]:
    split, merge = variation_of_information(gt, seg, ignore_labels=(0,))  # [H(seg|gt), H(gt|seg)], bits
    return {"voi_split": split, "voi_merge": merge, "voi": split + merge, "arand": adapted_rand_error(gt, seg)[0]}


# -- datasets --------------------------------------------------------------------------------------

@pytest.mark.parametrize("key", ["cremi-official", "cremi-cropped", "ac3ac4-official", "ac3ac4-snemi3d"])
def test_synth_layouts_read_clean_with_the_literature_split(em_roots, key):
    name = key.split("-")[0]
    ds = get_dataset(name, em_roots[key])
    assert ds.check() == []
    idx = ds.index()
    splits = dict(zip(idx["case_id"], idx["split"], strict=True))
    if name == "cremi":
        assert splits == {f"{x}_{s}": s for x in "ABC" for s in ("train", "val", "test")}
        assert [ds.n_slices(f"A_{s}") for s in ("train", "val", "test")] == [80, 20, 25]
    else:
        assert splits == {"AC4_train": "train", "AC4_val": "val", "AC3_test": "test"}
        assert [ds.n_slices(c) for c in ("AC4_train", "AC4_val", "AC3_test")] == [80, 20, 100]
    assert ds.cell_splits(3) == (splits, "official")
    cid = "A_test" if name == "cremi" else "AC3_test"
    s = ds.read_sample(cid)
    assert s.images.shape == (1, ds.n_slices(cid), 32, 32) and s.images.dtype == np.uint8
    assert s.target.shape == s.images.shape[1:] and s.target.dtype == np.uint64
    assert s.unit == "nm" and s.spacing == ((40.0, 4.0, 4.0) if name == "cremi" else (29.0, 3.0, 3.0))
    assert (s.target == 0).any() and len(np.unique(s.target)) > 5  # membranes (ignored) and neurons
    # Neurons continue across z: most labelled voxels keep their id from one slice to the next.
    same = (s.target[1:] == s.target[:-1]) & (s.target[1:] > 0)
    assert same.sum() > 0.7 * (s.target[1:] > 0).sum()


def test_cremi_official_ids_follow_cremis_background_convention(em_roots):
    root = em_roots["cremi-official"]
    with h5py.File(root / "sample_B_20160501.hdf", "r") as f:
        stored = f["volumes/labels/neuron_ids"][100:125]
        assert tuple(f["volumes/raw"].attrs["resolution"]) == (40.0, 4.0, 4.0)
    assert (stored == np.iinfo(np.uint64).max).any() and (stored == 0).any()  # "no label" and neuron 0
    t = get_dataset("cremi_b", root).read_sample("B_test").target
    np.testing.assert_array_equal(t == 0, stored == np.iinfo(np.uint64).max)
    np.testing.assert_array_equal(t[stored == 0], 1)
    assert get_dataset("cremi_b", root).index()["case_id"].tolist() == ["B_test", "B_train", "B_val"]


def test_check_names_every_problem(tmp_path):
    root = dataset_class("ac3ac4").synth(tmp_path / "ac", image_size=16)
    (root / "AC3_labels.h5").unlink()  # missing file
    with h5py.File(root / "AC4_labels.h5", "w") as f:  # wrong key and shape
        f.create_dataset("labels", data=np.zeros((100, 16, 8), np.uint64))
    problems = [str(p) for p in get_dataset("ac3ac4", root).check()]
    assert any("AC3_labels.h5: missing AC3 labels volume" in p for p in problems), problems
    assert any("AC4_labels.h5: no dataset 'main'" in p and "labels" in p for p in problems), problems

    root2 = dataset_class("cremi_a").synth(tmp_path / "cr", image_size=16, layout="cropped")
    with h5py.File(root2 / "cremiA_labels.h5", "w") as f:
        f.create_dataset("main", data=np.zeros((125, 16, 12), np.uint64))
    problems = [str(p) for p in get_dataset("cremi_a", root2).check()]
    assert any("cremiA_labels.h5: label volume shape (125, 16, 12) does not match" in p for p in problems), problems
    with h5py.File(root2 / "cremiA_labels.h5", "w") as f:
        f.create_dataset("main", data=np.zeros((90, 16, 16), np.uint64))
    with h5py.File(root2 / "cremiA_inputs_interp.h5", "w") as f:
        f.create_dataset("main", data=np.zeros((90, 16, 16), np.uint8))
    problems = [str(p) for p in get_dataset("cremi_a", root2).check()]
    assert any("A has 90 slices; the split needs 125" in p for p in problems), problems
    (root2 / "cremiA_inputs_interp.h5").write_bytes(b"not an hdf5 file")
    problems = [str(p) for p in get_dataset("cremi_a", root2).check()]
    assert any("cremiA_inputs_interp.h5: cannot read the volume" in p for p in problems), problems


# -- metrics and agglomeration ---------------------------------------------------------------------

def test_oracle_ground_truth_affinities_give_zero_error(em_roots):
    gt = get_dataset("ac3ac4", em_roots["ac3ac4-official"]).read_sample("AC3_test").target
    affs = seg_to_affinities(gt).astype(np.float32)
    results = agglomerate(affs, DEFAULT_THRESHOLDS, DEFAULT_SCORING, 256, gt=gt)
    assert len(results) == len(DEFAULT_THRESHOLDS)
    for seg, m in results:
        got = evaluate(seg, gt)
        assert got["voi"] < 1e-6 and got["arand"] < 1e-6, got
        assert m["V_Info_split"] + m["V_Info_merge"] < 1e-6
    # waterz mutates one array for every threshold: ours are copies, not views of it.
    assert results[0][0] is not results[-1][0] and not np.shares_memory(results[0][0], results[-1][0])


def test_metrics_match_scikit_image_on_the_saved_hdf5(em_roots, tmp_path):
    ds = get_dataset("ac3ac4", em_roots["ac3ac4-official"])
    s = ds.read_sample("AC3_test")
    rng = np.random.default_rng(0)
    seg = s.target.astype(np.int64).copy()
    seg[seg == 3] = 4                                  # a false merge
    seg[:, :, 16:][seg[:, :, 16:] == 5] = 99           # a false split
    seg[rng.random(seg.shape) < 0.02] = 7              # noise
    seg[s.target == 0] = rng.integers(1, 9, int((s.target == 0).sum()))  # membranes: ignored by both
    h = TARGET_HANDLERS["instances"]
    row = h.case_metrics(s, seg.astype(np.uint64), ["neuron"])[0]
    files = h.prediction_files(s, InstancePrediction(seg.astype(np.uint64), {"threshold": 0.5}))
    (path := tmp_path / "AC3_test_segmentation.h5").write_bytes(files["AC3_test_segmentation.h5"])
    with h5py.File(path, "r") as f:
        saved = f["volumes/labels/neuron_ids"][:]
        assert tuple(f["volumes/labels/neuron_ids"].attrs["resolution"]) == s.spacing
        assert f.attrs["threshold"] == 0.5 and tuple(f.attrs["z_range"]) == (0, 100)
    assert saved.shape == s.target.shape and saved.dtype == np.uint64
    ref = _skimage(s.target, saved)
    assert row["voi_split"] > 0.05 and row["voi_merge"] > 0.05  # a real test: both kinds of error
    for k in ("voi_split", "voi_merge", "voi"):
        assert row[k] == pytest.approx(ref[k], abs=1e-9), k
    # ARAND: waterz counts voxel pairs with themselves, scikit-image without (docs/em.md).
    assert row["arand"] == pytest.approx(ref["arand"], abs=2e-3)
    agg = h.aggregate([row, {**row, "voi": row["voi"] + 1.0}], ["neuron"])
    assert agg["voi"] == pytest.approx(row["voi"] + 0.5) and set(agg) == {"voi_split", "voi_merge", "voi", "arand"}


def test_waterz_prints_nothing(capfd, em_roots):
    gt = get_dataset("ac3ac4", em_roots["ac3ac4-official"]).read_sample("AC4_val").target
    capfd.readouterr()
    affs = seg_to_affinities(gt).astype(np.float32) * 0.8 + 0.1
    agglomerate(affs, [0.3, 0.6], DEFAULT_SCORING, 256, gt=gt)
    evaluate(gt, gt)
    print("after", flush=True)  # the descriptors are restored
    out, err = capfd.readouterr()
    assert out == "after\n" and err == ""


def test_prediction_keeps_its_extras_through_pickling_and_views():
    p = InstancePrediction(np.arange(8, dtype=np.uint64).reshape(2, 2, 2), {"slice": 1, "threshold": 0.3})
    q = pickle.loads(pickle.dumps(p))
    assert q.extras == p.extras and np.array_equal(q, p)
    assert p[1:].extras["slice"] == 1 and np.asarray(p).dtype == np.uint64


# -- the head ------------------------------------------------------------------------------------

def test_em_affinity_validates_and_pairs_with_em_datasets():
    with pytest.raises(ConfigError, match="thresholds"):
        create_protocol("em_affinity", thresholds=[0.5, 1.5])
    with pytest.raises(ConfigError, match="compiled"):
        create_protocol("em_affinity", scoring_function="OneMinus<MinAffinity<RegionGraphType, ScoreValue>>")
    create_protocol("em_affinity", task="instances", hidden=16, select_by="arand")
    for name in ("cremi", "cremi_a", "ac3ac4"):
        assert "em_affinity" in protocols_for(dataset_class(name))
        assert "linear_probe" not in protocols_for(dataset_class(name))
    assert "em_affinity" not in protocols_for(dataset_class("nih14"))


def test_head_learns_on_synthetic_ac3ac4_and_never_looks_at_test(tmp_path, one_torch_thread):
    from tasks.encoders import create_encoder
    from tasks.features import OnlineFeatures

    root = dataset_class("ac3ac4").synth(tmp_path / "ac", image_size=64, seed=1)
    ds = get_dataset("ac3ac4", root)
    src = OnlineFeatures(create_encoder(TINY, "random", "cpu"), ds, 256)
    seen: list[str] = []
    read = src.sample
    src.sample = lambda cid: (seen.append(cid), read(cid))[1]
    splits, _ = ds.cell_splits(0)
    head = create_protocol("em_affinity", task="instances", epochs=12, seed=0)
    with pytest.raises(ValueError, match="validation"):
        head.fit(src, ["AC4_train"], [])
    head.fit(src, [c for c, s in splits.items() if s == "train"], [c for c, s in splits.items() if s == "val"])
    assert set(seen) == {"AC4_train", "AC4_val"}  # the threshold is chosen without the test volume
    assert head.threshold_ in DEFAULT_THRESHOLDS and set(head.val_scores_) == set(DEFAULT_THRESHOLDS)
    assert head.threshold_ == min(head.val_scores_, key=lambda t: (head.val_scores_[t]["voi"], t))
    assert head.loss_curve_[-1] < head.loss_curve_[0]
    summary = head.summary()
    assert summary["threshold"] == head.threshold_ and summary["best_epoch"] == head.best_epoch_
    assert summary["val_voi_at_threshold"] == head.val_scores_[head.threshold_]["voi"]

    s = src.sample("AC3_test")
    pred = head.predict(src, "AC3_test")
    assert pred.shape == s.target.shape and pred.dtype == np.uint64
    h = TARGET_HANDLERS["instances"]
    row = h.case_metrics(s, pred, ["neuron"])[0]
    trivial = evaluate(np.ones_like(s.target), s.target)  # all one segment
    assert row["voi"] < 0.6 * trivial["voi"] and row["arand"] < 0.6 * trivial["arand"], (row, trivial)
    ref = _skimage(s.target, np.asarray(pred))
    assert row["voi"] == pytest.approx(ref["voi"], abs=1e-9)

    affs = head.predict_scores(src, "AC3_test")
    assert affs.shape == (3, *s.target.shape) and 0 <= affs.min() and affs.max() <= 1
    assert pred.extras["affinities"].shape == (3, 64, 64) and pred.extras["features_rgb"].shape == (16, 16, 3)
    figs = h.figures([(s, pred, row["voi"])])
    assert set(figs) == {"AC3_test_montage.png", "AC3_test_features_pca.png"}
    from PIL import Image

    for data in figs.values():
        assert Image.open(io.BytesIO(data)).size[0] > 300


# -- config and analysis ---------------------------------------------------------------------------

def test_em_config_loads():
    from orchestrator.grid.config import load_config

    cfg = load_config(REPO / "configs" / "em.yaml")
    assert cfg.grid.datasets == ["cremi_a", "cremi_b", "cremi_c", "ac3ac4"]
    assert cfg.grid.protocols == ["em_affinity"]
    assert cfg.grid.encoders == ["dinov3_vits16", "dinov3_vitb16", "dinov3_vitl16"]
    hp = cfg.protocols["em_affinity"]
    assert hp["lr"] == 0.001 and hp["scoring_function"] == DEFAULT_SCORING
    create_protocol("em_affinity", task="instances", **hp)


def test_analysis_orients_em_metrics_lower_is_better():
    from analysis.points import higher_is_better

    for m in ("voi_split", "voi_merge", "voi", "arand"):
        assert not higher_is_better(m), m


def test_layout_problems_and_notes_name_the_files(em_roots, tmp_path):
    ds = get_dataset("cremi", em_roots["cremi-cropped"])
    assert ds.layout_problems() == []
    assert ds.layout_notes() == [f"{x}: cremi{x}_inputs_interp.h5 + cremi{x}_labels.h5" for x in "ABC"]
    assert get_dataset("ac3ac4", em_roots["ac3ac4-snemi3d"]).layout_notes()[0] == "AC4: train-input.tif + train-labels.tif"
    root = dataset_class("cremi_c").synth(tmp_path / "c", image_size=16)
    (root / "sample_C_20160501.hdf").unlink()
    [p] = get_dataset("cremi_c", root).layout_problems()
    assert p.path == str(root / "sample_C_20160501.hdf")
    assert "missing C raw and labels volume (or give cremiC_inputs_interp.h5 + cremiC_labels.h5)" in p.message
    assert "does not exist" in str(get_dataset("ac3ac4", tmp_path / "nowhere").layout_problems()[0])
    fp = get_dataset("cremi", em_roots["cremi-official"]).fingerprint()
    assert fp != ds.fingerprint() and len(fp) == 64  # which layout was read is part of the identity
