"""Whole-slide images: tiling real pyramidal TIFFs through OpenSlide, the lazy tile reader, the
failures that name the slide, ABMIL on bags, and the `medscale wsi` commands. CPU only, no Ray."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from sklearn.metrics import roc_auc_score

from orchestrator.cli import main
from tasks.errors import DatasetError
from tasks.protocols import create_protocol
from tasks.wsi.synth import render, synth_slide
from tasks.wsi.tiling import (
    COORD_COLUMNS,
    TilingParams,
    load_coordinates,
    read_coordinate_tiles,
    read_tiles,
    save_coordinates,
    tile_slide,
)

T = 224
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def slides(tmp_path_factory):
    d = tmp_path_factory.mktemp("wsi")
    out = {"pos": synth_slide(d / "pos.tif", positive=True, seed=0),
           "neg": synth_slide(d / "neg.tif", positive=False, seed=1),
           "blank": synth_slide(d / "blank.tif", tissue=False, size=(1024, 768)),
           "nompp": synth_slide(d / "nompp.tif", seed=2, size=(2048, 1536), mpp=None)}
    data = out["pos"].path.read_bytes()
    (d / "truncated.tif").write_bytes(data[: len(data) // 2])
    (d / "notes.tif").write_text("this is not a slide\n")
    # Intact structure, broken pixels: level-0 tile data zeroed (opens, fails on reading).
    import tifffile

    broken = bytearray(data)
    with tifffile.TiffFile(out["pos"].path) as tif:
        for offset, count in zip(tif.pages[0].dataoffsets, tif.pages[0].databytecounts, strict=True):
            broken[offset:offset + count] = bytes(count)
    (d / "corrupt.tif").write_bytes(bytes(broken))
    return out


def gt_fraction(mask: np.ndarray, coords, foot: int) -> np.ndarray:
    return np.array([mask[y:y + foot, x:x + foot].mean() for x, y in zip(coords["x"], coords["y"], strict=True)])


@pytest.mark.parametrize("which", ["pos", "neg"])
def test_tile_count_matches_tissue_area_and_tiles_lie_on_tissue(slides, which):
    s = slides[which]
    coords = tile_slide(s.path)
    assert tuple(coords.columns) == COORD_COLUMNS and len(coords) > 50
    expected = s.tissue.sum() / T ** 2
    assert abs(len(coords) - expected) / expected < 0.05, (len(coords), expected)
    H, W = s.tissue.shape
    assert (coords["x"] >= 0).all() and (coords["y"] >= 0).all()
    assert (coords["x"] + T <= W).all() and (coords["y"] + T <= H).all()
    assert (coords["x"] % T == 0).all() and (coords["y"] % T == 0).all()  # a non-overlapping grid
    frac = gt_fraction(s.tissue, coords, T)
    assert frac.min() > 0.35 and np.median(frac) == 1.0  # the mask is measured at 1/16 resolution
    assert (coords["level"] == 0).all() and (coords["read_size"] == T).all()
    # The reader returns exactly the level-0 pixels (zlib is lossless).
    rgb, _, _ = render((W, H), which == "pos", 0 if which == "pos" else 1)
    tiles = read_coordinate_tiles(s.path, coords.iloc[:6])
    assert tiles.dtype == np.uint8 and tiles.shape == (6, T, T, 3)
    for tile, (x, y) in zip(tiles, coords[["x", "y"]].to_numpy()[:6], strict=True):
        np.testing.assert_array_equal(tile, rgb[y:y + T, x:x + T])


def test_target_resolution_reads_the_best_level(slides):
    s = slides["pos"]  # 0.5 um/px, levels at downsample 1, 4, 16
    half = tile_slide(s.path, TilingParams(target_mpp=1.0))  # downsample 2: level 0, 448 px reads
    assert (half["level"] == 0).all() and (half["read_size"] == 2 * T).all()
    expected = s.tissue.sum() / (2 * T) ** 2
    assert abs(len(half) - expected) / expected < 0.1
    quarter = tile_slide(s.path, TilingParams(target_mag=5))  # 10/0.5 = 20x native -> 5x: downsample 4
    assert (quarter["level"] == 1).all() and (quarter["read_size"] == T).all()
    tiles = read_tiles(s.path, quarter["x"][:3], quarter["y"][:3], quarter["level"][:3],
                       quarter["read_size"][:3], T)
    assert tiles.shape == (3, T, T, 3) and tiles.dtype == np.uint8
    resized = read_coordinate_tiles(s.path, half.iloc[:2])
    assert resized.shape == (2, T, T, 3)


def test_coordinates_round_trip_through_parquet(slides, tmp_path):
    coords = tile_slide(slides["neg"].path, TilingParams(min_tissue=0.9))
    back = load_coordinates(save_coordinates(coords, tmp_path / "neg.parquet"))
    assert back.equals(coords) and back.attrs["downsample"] == 1.0
    assert back.attrs["params"]["min_tissue"] == 0.9 and back.attrs["slide"] == str(slides["neg"].path)
    with pytest.raises(DatasetError, match="cannot read tile coordinates"):
        load_coordinates(slides["neg"].path)


def test_bad_slides_fail_alone_with_an_error_naming_the_file(slides):
    d = slides["pos"].path.parent
    cases = {d / "blank.tif": "no tissue", d / "truncated.tif": "truncated or corrupt",
             d / "notes.tif": "not a slide", d / "missing.tif": "missing", d / "corrupt.tif": "cannot read level 0"}
    for path, what in cases.items():
        with pytest.raises(DatasetError, match=what) as e:
            tile_slide(path)
        assert e.value.path == str(path) and str(path) in str(e.value)
    nompp = slides["nompp"].path
    assert len(tile_slide(nompp)) > 0  # native resolution needs no metadata
    for params, what in [(TilingParams(target_mpp=1.0), "mpp"), (TilingParams(target_mag=10), "objective power")]:
        with pytest.raises(DatasetError, match=what) as e:
            tile_slide(nompp, params)
        assert e.value.path == str(nompp)
    with pytest.raises(DatasetError, match="finer than the slide"):
        tile_slide(slides["pos"].path, TilingParams(target_mpp=0.25))
    coords = tile_slide(slides["pos"].path).iloc[:2]
    with pytest.raises(DatasetError, match="truncated or corrupt") as e:
        read_coordinate_tiles(d / "corrupt.tif", coords)  # the lazy reader names the slide too
    assert e.value.path == str(d / "corrupt.tif")
    # The other slides are unaffected by the failures.
    assert len(tile_slide(slides["neg"].path)) > 50


# -- ABMIL ------------------------------------------------------------------------------------------
TUMOUR_DIR = np.random.default_rng(99).normal(size=32)
TUMOUR_DIR /= np.linalg.norm(TUMOUR_DIR)


def planted_bags(n: int, seed: int, D: int = 32):
    """Bags of 20-60 instances; positive bags hold 2-5 tumour instances shifted along one direction:
    too few for the bag mean to show them, so the model has to attend to them."""
    rng = np.random.default_rng(seed)
    bags, Y, tumour = [], [], []
    for i in range(n):
        k = int(rng.integers(20, 60))
        X = rng.normal(size=(k, D)).astype(np.float32)
        t = np.zeros(k, bool)
        if i % 2:
            t[rng.permutation(k)[: int(rng.integers(2, 6))]] = True
            X[t] += (4.0 * TUMOUR_DIR).astype(np.float32)
        bags.append(X)
        Y.append([i % 2])
        tumour.append(t)
    return bags, np.array(Y), tumour


def test_abmil_learns_the_bag_task_attends_to_tumour_and_ignores_order():
    bags, Y, _ = planted_bags(60, seed=0)
    test_bags, Y_test, tumour = planted_bags(40, seed=1)
    p = create_protocol("abmil", epochs=30, patience=10, embed_dim=32, attn_dim=32, seed=0).fit(bags, Y)
    S = p.predict_proba(test_bags)
    assert S.shape == (40, 1) and S.dtype == np.float64
    assert roc_auc_score(Y_test[:, 0], S[:, 0]) > 0.9
    mass = [p.attention(b)[t].sum() for b, t, y in zip(test_bags, tumour, Y_test[:, 0], strict=True) if y]
    assert np.mean(mass) > 0.5 and np.median(mass) > 0.5
    # Invariant to tile order: the same score, and the attention follows its tile.
    rng = np.random.default_rng(3)
    perm = [rng.permutation(len(b)) for b in test_bags]
    S_perm = p.predict_proba([b[q] for b, q in zip(test_bags, perm, strict=True)])
    np.testing.assert_allclose(S_perm, S, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(p.attention(test_bags[1][perm[1]]), p.attention(test_bags[1])[perm[1]], atol=1e-6)
    assert len(p.val_curve_) == len(p.loss_curve_) and p.best_epoch_ < len(p.loss_curve_)


def test_abmil_with_the_tiny_encoder_on_real_tiles(tmp_path):
    """The whole path on real files: synthetic slides -> tiles -> test_vit_tiny16 (random init) ->
    one bag per slide -> ABMIL. The tumour texture is what separates the slides."""
    from tasks.encoders import create_encoder

    enc = create_encoder("test_vit_tiny16", device="cpu")
    bags, Y, tumour = [], [], []
    for i in range(16):
        s = synth_slide(tmp_path / f"{i}.tif", positive=bool(i % 2), seed=100 + i, size=(2048, 1536), mpp=1.0)
        coords = tile_slide(s.path)
        bags.append(enc.embed(read_coordinate_tiles(s.path, coords).transpose(0, 3, 1, 2)))
        Y.append([i % 2])
        tumour.append(gt_fraction(s.tumour, coords, T) > 0.5)
    Y = np.array(Y)
    p = create_protocol("abmil", epochs=30, patience=10, embed_dim=32, attn_dim=32).fit(bags[:10], Y[:10])
    assert roc_auc_score(Y[10:, 0], p.predict_proba(bags[10:])[:, 0]) > 0.9
    mass = [p.attention(b)[t].sum() for b, t, y in zip(bags[10:], tumour[10:], Y[10:, 0], strict=True) if y]
    assert min(mass) > 0.5, mass


def test_abmil_explicit_validation_set_and_bad_bags():
    bags, Y, _ = planted_bags(20, seed=4)
    p = create_protocol("abmil", epochs=3, embed_dim=8, attn_dim=8).fit(bags[:14], Y[:14], bags[14:], Y[14:])
    assert len(p.val_curve_) == 3
    with pytest.raises(ValueError, match="list of bags"):
        p.predict_proba(bags[0])
    with pytest.raises(ValueError, match="non-empty"):
        p.predict_proba([bags[0][:0]])


# -- the CLI ----------------------------------------------------------------------------------------

def test_cli_tile_and_heatmap_write_pngs(slides, tmp_path, capsys):
    s = slides["pos"]
    assert main(["wsi", "tile", str(s.path), "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    coords = load_coordinates(tmp_path / "pos.coords.parquet")
    assert f"{len(coords)} tiles" in out and "pos.tiles.png" in out
    with Image.open(tmp_path / "pos.tiles.png") as im:
        im.load()
        assert im.mode == "RGB" and max(im.size) == 1024
    att = np.random.default_rng(0).random(len(coords))
    np.save(tmp_path / "att.npy", att)
    png = tmp_path / "heat" / "pos.png"
    assert main(["wsi", "heatmap", str(s.path), "--coords", str(tmp_path / "pos.coords.parquet"),
                 "--attention", str(tmp_path / "att.npy"), "--out", str(png)]) == 0
    with Image.open(png) as im:
        arr = np.asarray(im.convert("RGB"))
    assert arr.shape == (768, 1024, 3) and len(np.unique(arr.reshape(-1, 3), axis=0)) > 20
    np.save(tmp_path / "short.npy", att[:-1])
    assert main(["wsi", "heatmap", str(s.path), "--coords", str(tmp_path / "pos.coords.parquet"),
                 "--attention", str(tmp_path / "short.npy"), "--out", str(png)]) == 2
    assert "must match row for row" in capsys.readouterr().err
    assert main(["wsi", "tile", str(slides["blank"].path), "--out", str(tmp_path)]) == 2
    assert "no tissue" in capsys.readouterr().err


# -- the slide datasets -----------------------------------------------------------------------------

def test_slide_dataset_layouts_and_splits(tmp_path):
    from tasks.datasets import get_dataset
    from tasks.datasets.bcnb import BCNB
    from tasks.datasets.camelyon import Camelyon16, Camelyon17

    c16 = get_dataset("camelyon16", Camelyon16.synth(tmp_path / "c16", n=12, image_size=64)).index()
    ref = dict(line.split(",")[:2] for line in (tmp_path / "c16/testing/reference.csv").read_text().split())
    test = c16[c16["split"] == "test"]
    assert {c: "Tumor" if t == [1] else "Normal" for c, t in zip(test["case_id"], test["target"], strict=True)} == ref
    train = c16[c16["split"] != "test"]
    assert all((t == [1]) == c.startswith("tumor_") for c, t in zip(train["case_id"], train["target"], strict=True))

    root = Camelyon17.synth(tmp_path / "c17", n=20, image_size=64)
    stages = dict(line.split(",") for line in (root / "training/stage_labels.csv").read_text().split()[1:])
    c17 = get_dataset("camelyon17", root).index()
    itc = {k.removesuffix(".tif") for k, v in stages.items() if v == "itc"}
    assert itc and not itc & set(c17["case_id"]) and len(c17) == 20
    centre = c17["path"].str.extract(r"center_(\d)/")[0].astype(int)
    assert set(centre[c17["split"] == "test"]) <= {1, 3, 4} and set(centre[c17["split"] != "test"]) <= {0, 2}
    for c, t in zip(c17["case_id"], c17["target"], strict=True):
        assert t == [int(stages[f"{c}.tif"] in ("micro", "macro"))]

    root = BCNB.synth(tmp_path / "bcnb", n=10, image_size=64)
    rows = [line.split(",") for line in (root / "patient-clinical-data.csv").read_text().splitlines()[1:]]
    bc = get_dataset("bcnb", root).index().set_index("case_id")
    for r in rows:
        assert bc.loc[r[0], "target"][0] == int(r[-1] != "N0")
        assert bc.loc[r[0], "target"][1:] == [int(r[i] == "Positive") for i in (4, 5, 6, 10)]
    assert (bc["split"].value_counts().to_dict()) == {"train": 7, "test": 2, "val": 1}
    with pytest.raises(DatasetError, match="tile_slide"):
        get_dataset("bcnb", root).read_image(bc["path"].iloc[0])
    coords = tile_slide(bc["path"].iloc[0], TilingParams(tile_size=32))  # a JPEG slide, through ImageSlide
    assert len(coords) > 20 and coords.attrs["mpp"] is None


def test_cross_validation_folds_partition_the_pool_patient_wise(tmp_path):
    """CAMELYON16 CV draws folds from the official training set; BCNB's 5 folds are 7:1:2; each
    case is a test case in exactly one fold, and no patient spans two splits of a fold."""
    from tasks.datasets import dataset_class, get_dataset

    c16 = get_dataset("camelyon16", dataset_class("camelyon16").synth(tmp_path / "c16", n=24, image_size=64),
                      cv_folds=5)
    bcnb = get_dataset("bcnb", dataset_class("bcnb").synth(tmp_path / "bcnb", n=40, image_size=64))
    assert get_dataset("camelyon16", c16.root).cell_cases(3)[1] == "official"
    for ds, pool in ((c16, set(c16.index().query("split != 'test'")["case_id"])), (bcnb, set(bcnb.index()["case_id"]))):
        tested = []
        for seed in range(5):
            cases, name = ds.cell_cases(seed)
            assert name == f"cv fold {seed + 1}/5" and set(cases["case_id"]) == pool
            assert cases.groupby("patient_id")["split"].nunique().max() == 1
            tested += cases.loc[cases["split"] == "test", "case_id"].tolist()
            if ds is bcnb:
                assert cases["split"].value_counts().to_dict() == {"train": 28, "test": 8, "val": 4}
        assert sorted(tested) == sorted(pool)
    def test_set(seed):
        cases = c16.cell_cases(seed)[0]
        return set(cases.loc[cases["split"] == "test", "case_id"])

    assert test_set(7) == test_set(2)  # seed 7 tests fold 3 again (with its own val draw)


def test_slide_coordinates_are_tiled_once_then_read_back(slides, tmp_path, monkeypatch):
    """What every encoder after the first gets: the stored coordinates, not a second tiling."""
    import pandas as pd
    import pyarrow.fs as pafs

    from orchestrator.extraction.slides import slide_coordinates

    fs, root, path = pafs.LocalFileSystem(), str(tmp_path / "coords"), str(slides["pos"].path)
    first = slide_coordinates(fs, root, "pos", path, TilingParams().key())

    def tile_again(*args, **kwargs):
        raise AssertionError("the slide was tiled a second time")

    monkeypatch.setattr("tasks.wsi.tiling.tile_slide", tile_again)
    again = slide_coordinates(fs, root, "pos", path, TilingParams().key())
    pd.testing.assert_frame_equal(first.reset_index(drop=True), again)
    assert again.attrs["slide"] == path and list((tmp_path / "coords").iterdir()) == [tmp_path / "coords/pos.parquet"]


@pytest.mark.parametrize("f", [2, 3, 4, 16, 17])
def test_pyramid_levels_are_the_rounded_block_mean(f):
    """Synthetic pyramid levels: the mean of each f x f block rounded half to even, as a float mean
    gives it (summed in integers here: exact, and what made the slides ~10x faster to write)."""
    from tasks.wsi.synth import _downsample

    rgb = np.random.default_rng(f).integers(0, 256, (301, 203, 3), dtype=np.uint8)
    h, w = 301 // f * f, 203 // f * f
    mean = rgb[:h, :w].reshape(h // f, f, w // f, f, 3).astype(np.float64).mean(axis=(1, 3))
    np.testing.assert_array_equal(_downsample(rgb, f), np.rint(mean).astype(np.uint8))
