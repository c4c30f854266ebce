"""Images resized on the encoder's device (tasks/device_resize.py) against the CPU path they replace
(PIL in tasks/preprocess.prepare_image), and the decode step that now only decodes.

Measured tolerances (this file's images, CPU torch 2.14, PIL 13): resized pixels differ from PIL's
by at most 1 level (rounding; mean 0.06-0.24 levels) for bicubic and bilinear, shrinking
1024 -> 224/512 px and enlarging 40 -> 64 px; the tiny test encoder's embeddings then differ by a
cosine distance below 1e-5 and at most 2% of the largest component's magnitude."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from orchestrator.extraction.decode import decode_batch
from orchestrator.extraction.images import EncoderUDF
from tasks.device_io import DeviceIO
from tasks.device_resize import as_chw, resize_on_device
from tasks.encoders import create_encoder
from tasks.preprocess import prepare_image

from .conftest import TINY

CPU = DeviceIO(torch.device("cpu"))


def _film(rng: np.random.Generator, h: int, w: int, rgb: bool = False) -> np.ndarray:
    """A smooth image with noise (a film's texture, not white noise, which no resize keeps)."""
    low = rng.normal(size=(12, 12))
    base = Image.fromarray(((low - low.min()) / np.ptp(low) * 200).astype(np.uint8)).resize((w, h), Image.BICUBIC)
    img = np.clip(np.asarray(base, float) + rng.normal(0, 6, (h, w)) + 20, 0, 255).astype(np.uint8)
    return np.stack([img, np.roll(img, 5, 0), 255 - img], 2) if rgb else img


@pytest.mark.parametrize(("h", "w", "rgb", "r"), [(1024, 1024, False, 224), (1024, 1024, False, 512),
                                                  (300, 250, False, 32), (200, 160, True, 48), (40, 40, False, 64)])
@pytest.mark.parametrize("interpolation", ["bicubic", "bilinear"])
def test_device_resize_matches_pil_within_one_level(h, w, rgb, r, interpolation):
    img = _film(np.random.default_rng(h + w + r), h, w, rgb)
    old = prepare_image(img, r, interpolation).astype(int)
    new = resize_on_device([as_chw(img)], r, interpolation, CPU)
    assert new.dtype == torch.uint8 and tuple(new.shape) == (1, 3, r, r)
    diff = np.abs(new[0].numpy().astype(int) - old)
    assert diff.max() <= 1 and diff.mean() < 0.3, (diff.max(), diff.mean())


def test_mixed_sizes_and_channels_in_one_batch_each_resize_alone():
    rng = np.random.default_rng(3)
    imgs = [_film(rng, 64, 64), _film(rng, 80, 48, rgb=True), _film(rng, 64, 64), np.full((32, 32, 3), 7, np.uint8)]
    out = resize_on_device([as_chw(i) for i in imgs], 32, "bicubic", CPU).numpy()
    for i, img in enumerate(imgs):  # grouped by shape, yet each equals its own resize
        solo = resize_on_device([as_chw(img)], 32, "bicubic", CPU)[0].numpy()
        np.testing.assert_array_equal(out[i], solo)
    assert (out[0][0] == out[0][2]).all() and (out[3] == 7).all()  # grey replicated; r x r untouched
    with pytest.raises(ValueError, match="cannot run on the device"):
        resize_on_device([as_chw(imgs[0])], 32, "lanczos", CPU)


def test_decode_workers_only_decode_and_the_actor_embeds_as_the_cpu_path_did(synth_roots, one_torch_thread):
    """decode_batch hands over the films as decoded (grey: one channel, full size); EncoderUDF
    resizes them and embeds: the embeddings equal those of PIL-resized pixels within the measured
    tolerance, and a file that fails keeps its error and a zero embedding."""
    from tasks.datasets import get_dataset

    root = str(synth_roots["nih14"])
    ds = get_dataset("nih14", root)
    idx = ds.index().iloc[:6]
    paths = list(idx["path"])
    paths[4] = paths[4] + ".missing"  # one unreadable file in the batch
    batch = {"case_id": list(idx["case_id"]), "split": list(idx["split"]), "patient_id": list(idx["patient_id"]),
             "target": list(idx["target"]), "path": paths}
    out = decode_batch(batch, "nih14", root, 0.1, 0)
    first = ds.read_image(paths[0])
    assert out["pixels"].dtype == np.uint8 and out["pixels"].shape == (6, 1, *first.shape)  # grey, not resized
    np.testing.assert_array_equal(out["pixels"][0, 0], first)
    assert out["error"][4] and not any(out["error"][i] for i in (0, 1, 2, 3, 5))

    enc = create_encoder(TINY, weights="random", device="cpu")
    udf = EncoderUDF(TINY, "random", "cls+mean", enc.weights.digest, 1, expected_precision="fp32",
                     resolution=32, interpolation="bicubic")
    got = udf(out)
    emb = got.column("embedding").combine_chunks().values.to_numpy().reshape(6, -1)
    assert (emb[4] == 0).all() and got.column("error").to_pylist()[4]
    keep = [0, 1, 2, 3, 5]
    old = enc.embed(torch.from_numpy(np.stack([prepare_image(ds.read_image(paths[i]), 32) for i in keep])),
                    pooling="cls+mean")
    new = emb[keep]
    cos = (old * new).sum(1) / np.linalg.norm(old, axis=1) / np.linalg.norm(new, axis=1)
    assert (1 - cos).max() < 1e-5, (1 - cos).max()
    assert np.abs(old - new).max() <= 0.02 * np.abs(old).max()
    assert np.abs(old - new).max() > 0  # torch's resize is not PIL's: the cache key's version changed with it


def test_libpng_decodes_the_same_pixels_as_pil_and_leaves_other_files_to_it(tmp_path):
    """The decode workers' PNG fast path (tasks/datasets/png.py) gives PIL's pixels for plain 8-bit
    files and hands 16-bit, palette and truncated files back to PIL (its conversions, its errors)."""
    from tasks.datasets.base import read_raster
    from tasks.datasets.png import decode_png
    from tasks.errors import DatasetError

    rng = np.random.default_rng(5)
    grey, rgb = _film(rng, 50, 40), _film(rng, 30, 20, rgb=True)
    Image.fromarray(grey).save(tmp_path / "g.png")
    Image.fromarray(rgb).save(tmp_path / "c.png")
    np.testing.assert_array_equal(decode_png(tmp_path / "g.png", "L"), grey)
    np.testing.assert_array_equal(decode_png(tmp_path / "c.png", "RGB"), rgb)
    assert decode_png(tmp_path / "g.png", "RGB") is None and decode_png(tmp_path / "c.png", "L") is None
    Image.fromarray(grey.astype(np.uint16) * 257).save(tmp_path / "w.png")  # 16-bit: PIL scales it
    assert decode_png(tmp_path / "w.png", "L") is None
    np.testing.assert_array_equal(read_raster(tmp_path / "w.png"), grey)
    Image.fromarray(grey).convert("P").save(tmp_path / "p.png")
    np.testing.assert_array_equal(read_raster(tmp_path / "p.png"), read_raster(tmp_path / "p.png", libpng=False))
    (tmp_path / "t.png").write_bytes((tmp_path / "g.png").read_bytes()[:200])
    with pytest.raises(DatasetError, match="cannot decode image"):
        read_raster(tmp_path / "t.png")
