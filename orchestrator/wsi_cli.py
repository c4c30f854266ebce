"""`medscale wsi`: tile one slide (coordinates Parquet + thumbnail with the tiles drawn) and render
an attention heatmap over a slide thumbnail. Heavy imports stay inside the commands so that
`medscale --help` does not load OpenSlide."""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np


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


def cmd_tile(args: argparse.Namespace) -> int:
    from PIL import ImageDraw

    from tasks.wsi.heatmap import thumbnail, tile_boxes
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
    for box in tile_boxes(coords, scale):
        draw.rectangle(box, outline=(0, 160, 0))
    png = out / f"{stem}.tiles.png"
    im.save(png)
    print(f"{args.slide}: {len(coords)} tiles of {params.tile_size} px (downsample "
          f"{coords.attrs['downsample']:g}); coordinates {pq}; thumbnail {png}")
    return 0


def cmd_heatmap(args: argparse.Namespace) -> int:
    import pandas as pd

    from tasks.errors import DatasetError
    from tasks.wsi.heatmap import render_heatmap, slide_attention
    from tasks.wsi.tiling import load_coordinates

    coords = load_coordinates(args.coords)
    try:
        if str(args.attention).endswith(".parquet"):
            coords, att = slide_attention(coords, pd.read_parquet(args.attention),
                                          args.case or Path(args.slide).stem, args.attention)
        else:
            att = np.load(args.attention).astype(np.float64).ravel()
    except (OSError, ValueError) as e:
        raise DatasetError(args.attention, f"cannot read attention weights: {e}") from e
    if len(att) != len(coords):
        raise DatasetError(args.attention, f"{len(att)} attention weights for {len(coords)} tiles in "
                                           f"{args.coords}; they must match row for row")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    render_heatmap(args.slide, coords, att).save(out)
    print(f"{args.slide}: attention heatmap of {len(coords)} tiles written to {out}")
    return 0


def cmd_wsi(args: argparse.Namespace) -> int:
    return {"tile": cmd_tile, "heatmap": cmd_heatmap}[args.wsi_action](args)
