"""Shared encoding: one encoded crop trains every head of an (encoder, resolution, dataset)."""

from __future__ import annotations

import numpy as np
import pytest

from tasks.datasets import dataset_class, get_dataset
from tasks.encoders import create_encoder
from tasks.features import OnlineFeatures
from tasks.protocols import create_protocol
from tasks.protocols.seg3d_group import draw_crop, fit_group, predict_group

HP = {"steps": 3, "batch_size": 2, "crop_slices": 3, "val_every": 0, "base": 8, "lr": 1e-3, "layers": [-2, -1]}


class Counting(OnlineFeatures):
    """The online source, counting encoder calls and slices encoded (pure bookkeeping)."""

    calls = 0
    slices = 0

    def encode(self, images):
        self.calls += 1
        self.slices += images.shape[0] * images.shape[1]
        return super().encode(images)


@pytest.fixture(scope="module")
def spleen(tmp_path_factory):
    root = tmp_path_factory.mktemp("msd")
    dataset_class("msd_spleen").synth(root, n=10, image_size=16, n_slices=5)
    return get_dataset("msd_spleen", root)


def _source(ds, head):
    enc = create_encoder("test_vit_tiny16", "random", "cpu")
    return Counting(enc, ds, 32, layers=head.layers)


def test_five_folds_encode_once_per_step_and_train_on_their_own_cases(spleen, one_torch_thread):
    heads = [create_protocol("seg3d_decoder", seed=k, **HP) for k in range(5)]
    splits = [spleen.cell_splits(k)[0] for k in range(5)]
    train = [[c for c, v in sp.items() if v == "train"] for sp in splits]
    src = _source(spleen, heads[0])
    fit_group(heads, src, train, [[] for _ in heads])
    # 3 steps x 2 crops, once for all five folds (not 5 x 6): the acceptance criterion.
    assert src.calls == HP["steps"] * HP["batch_size"]
    assert src.slices == src.calls * HP["crop_slices"]
    for h, tr in zip(heads, train, strict=True):
        assert h.trained_cases_ <= set(tr)  # never a crop of its own val or test cases
        assert h.shared_data_order_ and h.group_size_ == 5 and h.data_seed_ == 0
        assert h.n_updates_ == len(h.loss_curve_) <= HP["steps"]
        assert h.n_encoded_slices_ == src.slices
    # one head alone draws the same crops (same data seed): the same encoder work
    alone = _source(spleen, heads[0])
    fit_group([create_protocol("seg3d_decoder", seed=0, **HP)], alone, [train[0]])
    assert alone.calls == src.calls


def test_group_prediction_encodes_each_window_once_and_equals_single_heads(spleen, one_torch_thread):
    heads = [create_protocol("seg3d_decoder", seed=k, **HP) for k in range(3)]
    train = [[c for c, v in spleen.cell_splits(k)[0].items() if v == "train"] for k in range(3)]
    src = _source(spleen, heads[0])
    fit_group(heads, src, train)
    cid = spleen.index()["case_id"][0]
    src.calls, slices_before = 0, src.slices
    together = predict_group(heads, src, cid)
    windows = src.calls
    # 5 slices, windows of 3, 25% overlap: MONAI steps int(3 * 0.75) = 2 -> windows at 0 and 2, for all
    # heads; slice 2 is in both windows and is encoded once (its maps carried to the second window)
    assert windows == 2 and src.slices - slices_before == 5
    for h, p in zip(heads, together, strict=True):
        assert p.shape == (5, 16, 16) and p.dtype == np.int64
        np.testing.assert_array_equal(p, h.predict(src, cid))


def test_carried_window_maps_give_the_whole_volume_prediction(spleen, one_torch_thread):
    """With a pointwise head, overlapping windows (maps of shared slices carried over, not
    re-encoded) must give exactly what the head gives on the whole volume encoded at once."""
    import torch

    from tasks.dense import upsample_logits

    head = create_protocol("seg3d_decoder", **{**HP, "crop_slices": 2, "overlap": 0.5, "layers": None})
    src = _source(spleen, head)
    torch.manual_seed(0)
    head.net_ = torch.nn.Conv3d(src.channels, len(spleen.classes) + 1, 1)
    head.device_ = "cpu"
    cid = spleen.index()["case_id"][1]
    got = predict_group([head], src, cid)[0]
    assert src.slices == 5  # windows at z 0, 1, 2, 3: each slice encoded once, not twice
    img = spleen.read_sample(cid).images
    with torch.no_grad():
        f = src.encode(img).permute(1, 0, 2, 3).unsqueeze(0)  # (1, C, S, h, w), all slices in one call
        want = upsample_logits(head.net_(f), img.shape[1:4])[0].argmax(0).numpy()
    np.testing.assert_array_equal(got, want)


def test_heads_with_different_data_streams_refuse_to_share(spleen):
    a = create_protocol("seg3d_decoder", **HP)
    b = create_protocol("seg3d_decoder", **{**HP, "crop_slices": 4})
    with pytest.raises(ValueError, match="crop_slices"):
        fit_group([a, b], _source(spleen, a), [["spleen_1"], ["spleen_2"]])


def test_crops_augment_pixels_and_target_together(spleen):
    s = spleen.read_sample("spleen_1")
    rng = np.random.default_rng(0)
    for _ in range(20):
        img, tgt = draw_crop(s, 3, rng, fg_ratio=1.0, augment=True)
        assert img.shape[1] == 3 and tgt.any()  # fg_ratio 1: every crop holds foreground
        # the synthetic lesion is brighter than background in the same augmented frame
        assert img[0][tgt > 0].mean() > img[0][tgt == 0].mean() + 30
