"""Registration pieces without Ray: warping, Jacobian, medpy metrics, the ConvexAdam head on known
deformations (MIND and tiny-encoder features), and the `synth` pair sets it runs on."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from tasks.dense import Pair, Sample
from tasks.protocols import create_protocol
from tasks.targets.pairs import (
    aggregate,
    contraction_field,
    folding_share,
    jacobian_determinant,
    pair_mean,
    pair_rows,
    warp_image,
    warp_labels,
)

from .conftest import TINY


def _labels(shape=(40, 44)) -> np.ndarray:
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    lab = np.zeros(shape, np.int64)
    r = np.hypot(yy - 20, xx - 22)
    lab[r < 12] = 2
    lab[r < 7] = 1
    lab[(np.hypot(yy - 33, xx - 22) < 5) & (lab == 0)] = 3
    return lab


def test_warp_labels_recovers_a_known_displacement_and_labels_stay_labels():
    lab = _labels()
    shift = np.stack([np.full(lab.shape, 3.0), np.full(lab.shape, -2.0)])
    moved = warp_labels(lab, shift)  # moved(x) = lab(x + (3, -2))
    assert np.array_equal(moved[:-3, 2:], lab[3:, :-2])
    assert np.array_equal(warp_labels(moved, -shift)[3:, :-2], lab[3:, :-2])  # and back
    smooth = contraction_field(lab.shape, (20, 22), 0.35, 10.0) + 0.37  # sub-voxel, non-integer
    out = warp_labels(lab, smooth)
    assert out.dtype == lab.dtype and set(np.unique(out)) <= set(np.unique(lab))
    assert warp_labels(lab, np.zeros((2, *lab.shape))).tolist() == lab.tolist()
    img = lab.astype(np.float32) * 10
    assert np.allclose(warp_image(img, shift)[:-3, 2:], img[3:, :-2])
    with pytest.raises(ValueError, match="does not fit"):
        warp_labels(lab, np.zeros((3, *lab.shape)))


def test_jacobian_and_folding():
    u = np.zeros((3, 6, 7, 8))
    assert np.allclose(jacobian_determinant(u), 1.0) and folding_share(u) == 0.0
    z = np.arange(6, dtype=float)[:, None, None] * np.ones((6, 7, 8))
    u[0] = 0.5 * z  # stretch along z: det 1.5
    assert np.allclose(jacobian_determinant(u), 1.5)
    u[0] = -2.0 * z  # x -> -x along z: the map folds everywhere
    assert folding_share(u) == 1.0
    assert folding_share(contraction_field((30, 30), (15, 15), 0.4, 8.0)) == 0.0


def test_pair_metrics_match_medpy_and_count_empty_labels():
    from medpy.metric import binary

    fixed = _labels()
    warped = warp_labels(fixed, np.stack([np.full(fixed.shape, 1.0), np.zeros(fixed.shape)]))
    warped[warped == 3] = 0  # an empty warped label: Dice 0, distances NaN (medpy raises)
    rows = pair_rows("p", "test", warped, fixed, ("LV", "myocardium", "LA"), (1.0, 2.0), 0.1)
    by = {r["class"]: r for r in rows}
    for k, name in ((1, "LV"), (2, "myocardium")):
        assert by[name]["hd95"] == pytest.approx(binary.hd95(warped == k, fixed == k, voxelspacing=(1.0, 2.0)))
        assert by[name]["asd"] == pytest.approx(binary.asd(warped == k, fixed == k, voxelspacing=(1.0, 2.0)))
        assert by[name]["dice"] == pytest.approx(binary.dc(warped == k, fixed == k))
    assert by["LA"]["dice"] == 0.0 and np.isnan(by["LA"]["hd95"]) and np.isnan(by["LA"]["asd"])
    assert pair_mean(rows, "dice") == pytest.approx(np.mean([by[c]["dice"] for c in ("LV", "myocardium", "LA")]))
    assert pair_mean(rows, "hd95") == pytest.approx(np.mean([by[c]["hd95"] for c in ("LV", "myocardium")]))
    # A second pair; per label the mean over pairs, then the mean over labels (NaN skipped).
    rows += pair_rows("q", "test", fixed, fixed, ("LV", "myocardium", "LA"), (1.0, 2.0), 0.3)
    rows += pair_rows("p", "identity", fixed, fixed, ("LV", "myocardium", "LA"), (1.0, 2.0), 0.0)
    m = aggregate(pd.DataFrame(rows), ("LV", "myocardium", "LA"))
    assert m["test_n_nan_hd95"] == 1 and m["identity_n_nan_hd95"] == 0 and m["test_n_pairs"] == 2
    assert m["test_hd95_LA"] == 0.0 and m["test_hd95_LV"] == pytest.approx(by["LV"]["hd95"] / 2)
    assert m["test_hd95"] == pytest.approx((by["LV"]["hd95"] / 2 + by["myocardium"]["hd95"] / 2 + 0) / 3)
    assert m["identity_dice"] == 1.0 and m["test_folding_share"] == pytest.approx(0.2)


class _Src:
    """Samples from memory (pure logic); features are not used by `features: mind`."""

    kind, channels, grid, layers = "memory", 0, 0, ()

    def __init__(self, samples: dict[str, Sample]):
        self.samples = samples

    def sample(self, case_id: str) -> Sample:
        return self.samples[case_id]

    def features(self, case_id: str) -> np.ndarray:
        raise AssertionError("MIND needs no encoder features")


def _texture(shape, seed=0) -> np.ndarray:
    from scipy import ndimage

    rng = np.random.default_rng(seed)
    return np.clip(ndimage.gaussian_filter(rng.random(shape), 1.5) * 600 - 200, 0, 255)


def test_mind_convexadam_recovers_translations_in_2d_and_3d(one_torch_thread):
    head = create_protocol("convexadam_reg", features="mind", grid_sp=4, niter=30)
    # 2D (a thin volume inside): moving(x + (3, -2)) = fixed(x)
    img = _texture((48, 48))
    lab = _labels((48, 48))
    shift = np.stack([np.full(img.shape, 3.0), np.full(img.shape, -2.0)])
    fixed = Sample("f", warp_image(img, shift).astype(np.uint8)[None, None], warp_labels(lab, shift))
    moving = Sample("m", img.astype(np.uint8)[None, None], lab)
    src = _Src({"f": fixed, "m": moving})
    reg = head.fit(src).register(src, Pair("p", "f", "m", "test"))
    assert reg.displacement.shape == (2, 48, 48)
    inner = reg.displacement[:, 10:-10, 10:-10].reshape(2, -1)
    assert np.allclose(np.median(inner, axis=1), (3.0, -2.0), atol=0.5)
    masked = create_protocol("convexadam_reg", features="mind", grid_sp=4, niter=30, use_mask=True).fit(src)
    inner = masked.register(src, Pair("p", "f", "m", "test")).displacement[:, 10:-10, 10:-10].reshape(2, -1)
    assert np.allclose(np.median(inner, axis=1), (3.0, -2.0), atol=0.5)
    # 3D, along the slice axis too: the axis order of the blocks is the array's.
    vol = _texture((14, 32, 32), seed=1)
    shift3 = np.stack([np.full(vol.shape, 2.0), np.full(vol.shape, 0.0), np.full(vol.shape, 3.0)])
    lab3 = np.repeat(_labels((32, 32))[None], 14, axis=0)
    f3 = Sample("f", warp_image(vol, shift3).astype(np.uint8)[None], warp_labels(lab3, shift3), spacing=(3, 1, 1))
    m3 = Sample("m", vol.astype(np.uint8)[None], lab3, spacing=(3, 1, 1))
    src3 = _Src({"f": f3, "m": m3})
    reg3 = head.register(src3, Pair("p", "f", "m", "test"))
    inner3 = reg3.displacement[:, 4:-4, 8:-8, 8:-8].reshape(3, -1)
    assert np.allclose(np.median(inner3, axis=1), (2.0, 0.0, 3.0), atol=0.6)


def test_head_hyperparameters_and_pairing():
    from tasks.datasets import dataset_class
    from tasks.errors import ConfigError
    from tasks.protocols import PROTOCOLS

    with pytest.raises(ConfigError, match="features must be one of"):
        create_protocol("convexadam_reg", features="sift")
    with pytest.raises(ConfigError, match="grid_sp"):
        create_protocol("convexadam_reg", grid_sp=0)
    assert create_protocol("mind_convexadam").features == "mind"
    for name in ("camus", "acdc"):
        assert PROTOCOLS["convexadam_reg"].accepts(dataset_class(name)) is None
        assert "pairs" in PROTOCOLS["linear_probe"].accepts(dataset_class(name))
    assert "pairs" in PROTOCOLS["convexadam_reg"].accepts(dataset_class("nih14"))
    assert PROTOCOLS["convexadam_reg"].uses_seed is False


@pytest.mark.parametrize("name", ["camus", "acdc"])
def test_registration_beats_identity_on_synthetic_pairs(name, tmp_path, one_torch_thread):
    """MIND and tiny-encoder (random weights) features on the synthetic known deformations."""
    from tasks.datasets import dataset_class, get_dataset
    from tasks.encoders import create_encoder
    from tasks.features import OnlineFeatures

    cls = dataset_class(name)
    if name == "camus":
        root, opts = cls.synth(tmp_path / name, n=10, seed=3, image_size=64), {"image_size": 64}
    else:
        root = cls.synth(tmp_path / name, n=5, seed=3, image_size=48, n_test=2)
        opts = {"spacing": (4.0, 2.0, 2.0), "crop": (12, 48, 48)}
    ds = get_dataset(name, root, **opts)
    src = OnlineFeatures(create_encoder(TINY, "random", "cpu"), ds, 192, keep=2)
    pairs = ds.pairs("test")
    assert pairs and all(p.fixed.endswith("_ES") and p.moving.endswith("_ED") for p in pairs)
    for features in ("mind", "dino"):
        head = create_protocol("convexadam_reg", features=features, grid_sp=4, niter=30).fit(src)
        before, after = [], []
        for p in pairs:
            reg = head.register(src, p)
            f, m = src.sample(p.fixed), src.sample(p.moving)
            before.append(pair_mean(pair_rows(p.pair_id, "identity", m.target, f.target, ds.classes, f.spacing, 0),
                                    "dice"))
            after.append(pair_mean(pair_rows(p.pair_id, "test", reg.warped_target, f.target, ds.classes, f.spacing, 0),
                                   "dice"))
            assert folding_share(reg.displacement) < 0.05
        assert np.mean(after) > np.mean(before) + 0.05, (features, before, after)
    # The paper's per-table choice: DINO alone in 2D, DINO (24 PCA components) + MIND (12) in 3D.
    paper = create_protocol("convexadam_reg", features="dino+mind3d", grid_sp=4, niter=0).fit(src)
    assert paper.register(src, pairs[0]).info["feature_channels"] == (24 if name == "camus" else 36)
