"""`medscale wsi`: tile one slide (coordinates Parquet + thumbnail with the tiles drawn) and render
an attention heatmap over a slide thumbnail. Heavy imports stay inside the commands so that
`medscale --help` does not load OpenSlide."""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

THUMB_MAX = 1024  # longest side of the thumbnails, px


def add_wsi_parser(sub) -> None:
    w = sub.add_parser("wsi", help="whole-slide images: tile a slide, render an attention heatmap")
    ws = w.add_subparsers(dest="wsi_action", required=True)
    t = ws.add_parser("tile", help="tile one slide: coordinates (Parquet) and a thumbnail with the tiles")
    t.add_argument("slide", help="slide file (any format OpenSlide opens)")
    t.add_argument("--out", required=True, help="output directory")
    t.add_argument("--tile-size", type=int, default=224, help="tile side in px at the target resolution")
    t.add_argument("--mpp", type=float, default=None, help="target microns per pixel (default: native)")
    t.add_argument("--mag", type=float, default=None, help="target magnification, e.g. 20 (default: native)")
    t.add_argument("--min-tissue", type=float, default=0.5, help="tissue fraction a tile needs (default 0.5)")
    h = ws.add_parser("heatmap", help="slide thumbnail with an attention overlay (PNG)")
    h.add_argument("slide")
    h.add_argument("--coords", required=True, help="tile coordinates (Parquet from `wsi tile`)")
    h.add_argument("--attention", required=True,
                   help="attention weights: .npy (one per coordinate row) or a sweep cell's attention.parquet")
    h.add_argument("--case", default=None, help="slide's case id in attention.parquet (default: the file stem)")
    h.add_argument("--out", required=True, help="output PNG")


def thumbnail(slide_path: str | Path):
    """(PIL RGB thumbnail, level-0 px per thumbnail px)."""
    from tasks.wsi.tiling import open_slide

    slide = open_slide(slide_path)
    try:
        W, H = slide.dimensions
        im = slide.get_thumbnail((THUMB_MAX, THUMB_MAX)).convert("RGB")
    finally:
        slide.close()
    return im, W / im.width


def _boxes(coords, scale: float) -> list[tuple[float, float, float, float]]:
    ds = coords.attrs.get("downsample", 1.0) if coords.attrs else 1.0
    foot = coords["tile_size"].to_numpy() * float(ds)
    return [(x / scale, y / scale, (x + f) / scale - 1, (y + f) / scale - 1)
            for x, y, f in zip(coords["x"].to_numpy(), coords["y"].to_numpy(), foot, strict=True)]


def cmd_tile(args: argparse.Namespace) -> int:
    from PIL import ImageDraw

    from tasks.wsi.tiling import TilingParams, save_coordinates, tile_slide

    params = TilingParams(tile_size=args.tile_size, target_mpp=args.mpp, target_mag=args.mag,
                          min_tissue=args.min_tissue)
    coords = tile_slide(args.slide, params)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = Path(args.slide).stem
    pq = save_coordinates(coords, out / f"{stem}.coords.parquet")
    im, scale = thumbnail(args.slide)
    draw = ImageDraw.Draw(im)
    for box in _boxes(coords, scale):
        draw.rectangle(box, outline=(0, 160, 0))
    png = out / f"{stem}.tiles.png"
    im.save(png)
    print(f"{args.slide}: {len(coords)} tiles of {params.tile_size} px (downsample "
          f"{coords.attrs['downsample']:g}); coordinates {pq}; thumbnail {png}")
    return 0


def cmd_heatmap(args: argparse.Namespace) -> int:
    from matplotlib import colormaps
    from PIL import Image, ImageDraw

    from tasks.errors import DatasetError
    from tasks.wsi.tiling import load_coordinates

    coords = load_coordinates(args.coords)
    if str(args.attention).endswith(".parquet"):
        coords, att = _cell_attention(coords, args.attention, args.case or Path(args.slide).stem)
    else:
        try:
            att = np.load(args.attention).astype(np.float64).ravel()
        except (OSError, ValueError) as e:
            raise DatasetError(args.attention, f"cannot read attention weights: {e}") from e
    if len(att) != len(coords):
        raise DatasetError(args.attention, f"{len(att)} attention weights for {len(coords)} tiles in "
                                           f"{args.coords}; they must match row for row")
    im, scale = thumbnail(args.slide)
    # Rank-normalised colours (as CLAM's heatmaps): attention is heavy-tailed, a linear scale
    # would show one hot tile and a uniformly cold slide.
    rank = att.argsort().argsort() / max(len(att) - 1, 1)
    rgba = (np.asarray(colormaps["jet"](rank)) * 255).astype(np.uint8)
    overlay = Image.new("RGBA", im.size, (0, 0, 0, 0))
    draw = ImageDraw.Draw(overlay)
    for box, c in zip(_boxes(coords, scale), rgba, strict=True):
        draw.rectangle(box, fill=(int(c[0]), int(c[1]), int(c[2]), 140))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    Image.alpha_composite(im.convert("RGBA"), overlay).convert("RGB").save(out)
    print(f"{args.slide}: attention heatmap of {len(coords)} tiles written to {out}")
    return 0


def _cell_attention(coords, path: str, case: str):
    """(coords, weights) of one slide from a sweep cell's attention.parquet (case_id, x, y, attention),
    matched to the coordinate rows by tile position."""
    import pandas as pd

    from tasks.errors import DatasetError

    try:
        att = pd.read_parquet(path)
    except (OSError, ValueError) as e:
        raise DatasetError(path, f"cannot read attention weights: {e}") from e
    att = att[att["case_id"].astype(str) == case]
    if att.empty:
        raise DatasetError(path, f"no attention weights for slide {case!r} (pass --case; slides in the file "
                                 "are the cell's val and test slides)")
    merged = coords.reset_index(drop=True).merge(att[["x", "y", "attention"]], on=["x", "y"], how="inner")
    if len(merged) != len(att):
        raise DatasetError(path, f"{len(att) - len(merged)} of {len(att)} tiles of {case!r} are not in the "
                                 "coordinates given; were they tiled with other parameters?")
    merged.attrs = coords.attrs
    return merged, merged["attention"].to_numpy(np.float64)


def cmd_wsi(args: argparse.Namespace) -> int:
    return {"tile": cmd_tile, "heatmap": cmd_heatmap}[args.wsi_action](args)
