"""Whole-slide images: tiling (tissue mask, tile grid, lazy tile reads) and synthetic slides."""

from tasks.wsi.tiling import (
    COORD_COLUMNS,
    TilingParams,
    load_coordinates,
    open_slide,
    read_tiles,
    save_coordinates,
    tile_slide,
    tissue_mask,
)

__all__ = ["COORD_COLUMNS", "TilingParams", "load_coordinates", "open_slide", "read_tiles",
           "save_coordinates", "tile_slide", "tissue_mask"]
