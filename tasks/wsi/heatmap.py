"""Slide thumbnails with tiles or attention drawn on them (`medscale wsi`, and the PNGs ABMIL
cells save). Plain functions of (slide, coordinates, weights): no Ray, no MLflow."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

THUMB_MAX = 1024  # longest side of the thumbnails, px


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


def tile_boxes(coords, scale: float) -> list[tuple[float, float, float, float]]:
    ds = coords.attrs.get("downsample", 1.0) if coords.attrs else 1.0
    foot = coords["tile_size"].to_numpy() * float(ds)
    return [(x / scale, y / scale, (x + f) / scale - 1, (y + f) / scale - 1)
            for x, y, f in zip(coords["x"].to_numpy(), coords["y"].to_numpy(), foot, strict=True)]


def render_heatmap(slide_path: str | Path, coords: pd.DataFrame, attention: np.ndarray):
    """PIL RGB: the slide's thumbnail with one box per coordinate row, coloured by attention.
    Colours are rank-normalised (as CLAM's heatmaps): attention is heavy-tailed, and a linear
    scale would show one hot tile on a uniformly cold slide."""
    from matplotlib import colormaps
    from PIL import Image, ImageDraw

    att = np.asarray(attention, dtype=np.float64).ravel()
    im, scale = thumbnail(slide_path)
    rank = att.argsort().argsort() / max(len(att) - 1, 1)
    rgba = (np.asarray(colormaps["jet"](rank)) * 255).astype(np.uint8)
    overlay = Image.new("RGBA", im.size, (0, 0, 0, 0))
    draw = ImageDraw.Draw(overlay)
    for box, c in zip(tile_boxes(coords, scale), rgba, strict=True):
        draw.rectangle(box, fill=(int(c[0]), int(c[1]), int(c[2]), 140))
    return Image.alpha_composite(im.convert("RGBA"), overlay).convert("RGB")


def slide_attention(coords: pd.DataFrame, att: pd.DataFrame, case: str, source: str = "attention"):
    """(coords, weights) of one slide from a sweep cell's attention.parquet (case_id, x, y, attention),
    matched to the coordinate rows by tile position."""
    from tasks.errors import DatasetError

    path = source
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
