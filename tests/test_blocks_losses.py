"""The dense heads' network blocks, losses and z-windows are MONAI's, written out: parity with MONAI
1.6, bit for bit on CPU (weights drawn at initialisation, outputs, gradients, blended logits).

This is the one test module that imports MONAI (its package init costs ~5 s of CPU per process)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tasks.datasets import dataset_class, get_dataset
from tasks.dense import upsample_logits
from tasks.encoders import create_encoder
from tasks.features import OnlineFeatures
from tasks.protocols import blocks, create_protocol
from tasks.protocols.losses import dice_ce_loss, sigmoid_dice_loss
from tasks.protocols.seg3d_group import _decoder_input, fit_group, predict_logits_group, z_windows

UP = (1, 2, 2)


@pytest.fixture(scope="module")
def monai():
    """MONAI (a dev dependency), imported by the tests that use it, not at collection, where every
    xdist worker would pay its ~5 s of CPU."""
    import monai.inferers
    import monai.losses
    import monai.networks.blocks

    return monai


def _built_alike(ours, theirs, seed: int = 0):
    torch.manual_seed(seed)
    a = ours()
    torch.manual_seed(seed)
    b = theirs()
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)  # same keys, same order: checkpoints load either way
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k  # same draws from the generator at initialisation
    return a, b


def _same_forward_backward(a, b, *inputs):
    xa = [x.clone().requires_grad_(True) for x in inputs]
    xb = [x.clone().requires_grad_(True) for x in inputs]
    ya, yb = a(*xa), b(*xb)
    assert torch.equal(ya, yb)
    (ya * torch.linspace(-1, 1, ya.numel()).view_as(ya)).sum().backward()
    (yb * torch.linspace(-1, 1, yb.numel()).view_as(yb)).sum().backward()
    for x, y in zip(xa, xb, strict=True):
        assert torch.equal(x.grad, y.grad)
    for (na, pa), (nb, pb) in zip(a.named_parameters(), b.named_parameters(), strict=True):
        assert na == nb and torch.equal(pa.grad, pb.grad), na


@pytest.mark.parametrize("c_in,c_out", [(6, 4), (4, 4)])
def test_unet_res_block_is_monais(monai, c_in, c_out):
    a, b = _built_alike(lambda: blocks.UnetResBlock(3, c_in, c_out),
                        lambda: monai.networks.blocks.UnetResBlock(3, c_in, c_out, kernel_size=3, stride=1, norm_name="instance"))
    _same_forward_backward(a, b, torch.randn(2, c_in, 3, 5, 6))


def test_unet_up_and_out_blocks_are_monais(monai):
    a, b = _built_alike(lambda: blocks.UnetUpBlock(3, 8, 4, upsample=UP),
                        lambda: monai.networks.blocks.UnetUpBlock(3, 8, 4, kernel_size=3, stride=1, upsample_kernel_size=UP,
                                                         norm_name="instance"))
    _same_forward_backward(a, b, torch.randn(1, 8, 2, 3, 4), torch.randn(1, 4, 2, 6, 8))
    a, b = _built_alike(lambda: blocks.UnetOutBlock(3, 4, 3), lambda: monai.networks.blocks.UnetOutBlock(3, 4, 3))
    _same_forward_backward(a, b, torch.randn(1, 4, 2, 6, 8))


def test_conv_norm_act_is_monais_convolution_in_train_and_eval(monai):
    a, b = _built_alike(lambda: blocks.conv_norm_act(2, 5, 7),
                        lambda: monai.networks.blocks.Convolution(2, 5, 7, kernel_size=3, norm="batch", act="relu"))
    _same_forward_backward(a, b, torch.randn(3, 5, 6, 9))  # train mode: batch statistics
    assert torch.equal(a.adn.N.running_mean, b.adn.N.running_mean)
    a.eval(), b.eval()
    with torch.no_grad():
        x = torch.randn(2, 5, 4, 4)
        assert torch.equal(a(x), b(x))


def test_even_kernels_are_refused():
    with pytest.raises(ValueError, match="odd"):
        blocks.conv_only(2, 1, 1, 2)


@pytest.mark.parametrize("shape", [(2, 3, 9, 7), (1, 4, 3, 5, 6)])
def test_dice_ce_loss_is_monais(monai, shape):
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(shape, generator=g) * 3
    labels = torch.randint(0, shape[1], (shape[0], 1, *shape[2:]), generator=g)
    labels[0, 0, 0] = 0  # a class absent from one case (its Dice is the smoothed 0/0)
    la, lb = logits.clone().requires_grad_(True), logits.clone().requires_grad_(True)
    ours, theirs = dice_ce_loss(la, labels), monai.losses.DiceCELoss(to_onehot_y=True, softmax=True)(lb, labels)
    assert torch.equal(ours, theirs)
    ours.backward(), theirs.backward()
    assert torch.equal(la.grad, lb.grad)


def test_sigmoid_dice_loss_is_monais(monai):
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(2, 3, 8, 5, generator=g)
    target = (torch.rand(2, 3, 8, 5, generator=g) > 0.6).float()
    target[1, 2] = 0  # an empty label
    assert torch.equal(sigmoid_dice_loss(logits, target), monai.losses.DiceLoss(sigmoid=True)(logits, target))
    with pytest.raises(ValueError, match="shape"):
        sigmoid_dice_loss(logits, target[:, :2])


def test_loss_inputs_are_checked():
    with pytest.raises(ValueError, match="at least two classes"):
        dice_ce_loss(torch.zeros(1, 1, 4, 4), torch.zeros(1, 1, 4, 4, dtype=torch.long))
    with pytest.raises(ValueError, match=r"\(B, 1, \*spatial\)"):
        dice_ce_loss(torch.zeros(1, 3, 4, 4), torch.zeros(1, 4, 4, dtype=torch.long))


@pytest.mark.parametrize("n", [1, 2, 5, 7, 16, 17, 40])
@pytest.mark.parametrize("size,overlap", [(3, 0.25), (16, 0.25), (4, 0.5), (5, 0.0), (2, 0.9)])
def test_z_windows_are_monais(monai, n, size, overlap):
    seen: list[tuple[int, int]] = []

    def record(win, coords):
        seen.append((coords[0][2].start, coords[0][2].stop))
        return win

    monai.inferers.sliding_window_inference(torch.zeros(1, 1, n, 2, 2), roi_size=(min(size, n), -1, -1), sw_batch_size=1,
                             predictor=record, overlap=(overlap, 0.0, 0.0), mode="constant", with_coord=True)
    windows = z_windows(n, size, overlap)
    assert windows == seen
    covered = np.zeros(n, bool)
    for z0, z1 in windows:
        covered[z0:z1] = True
    assert covered.all()


def test_group_logits_are_monais_sliding_window(monai, tmp_path, one_torch_thread):
    root = tmp_path / "msd"
    dataset_class("msd_spleen").synth(root, n=6, image_size=16, n_slices=7)
    ds = get_dataset("msd_spleen", root)
    hp = {"steps": 2, "batch_size": 1, "crop_slices": 3, "val_every": 0, "base": 8, "layers": [-2, -1]}
    heads = [create_protocol("seg3d_decoder", seed=k, **hp) for k in range(2)]
    # batch_size=1: one slice per encoder call, so a slice's maps do not depend on the window encoding it
    src = OnlineFeatures(create_encoder("test_vit_tiny16", "random", "cpu"), ds, 32, layers=heads[0].layers,
                         batch_size=1)
    cids = list(ds.index()["case_id"])
    fit_group(heads, src, [cids[:4], cids[1:5]])
    ours = predict_logits_group(heads, src, cids[5])

    sample = src.sample(cids[5])
    x = torch.from_numpy(sample.images.astype(np.float32))[None]
    dev = torch.device(heads[0].device_)

    def predictor(win):  # the pre-rewrite predictor, without carrying maps over
        pixels = win[0].round().clamp(0, 255).to(torch.uint8).numpy()
        feats = _decoder_input(torch.as_tensor(src.encode(pixels)), dev)
        return tuple(upsample_logits(h.net_.eval()(feats), pixels.shape[1:]) for h in heads)

    with torch.no_grad():
        theirs = monai.inferers.sliding_window_inference(x, roi_size=(3, -1, -1), sw_batch_size=1, predictor=predictor,
                                          overlap=(0.25, 0.0, 0.0), mode="constant")
    assert len(ours) == len(theirs) == 2
    for a, b in zip(ours, theirs, strict=True):
        assert a.shape == b[0].shape
        assert torch.equal(a, b[0])
