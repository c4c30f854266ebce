"""Tiling whole-slide images: tissue mask, tile grid, per-slide coordinates, lazy tile reads.

Pure functions of (slide path, parameters) and (slide path, coordinate rows), so the Ray Data
pipeline is `flat_map(tile_slide)` -> repartition -> `map_batches(read_tiles per slide)` with no
state beyond an OpenSlide handle opened once per batch.

- Tissue mask (as CLAM): saturation of a low-resolution level, median-blurred, Otsu threshold
  (with a floor, see `min_saturation`), morphological closing, small objects removed, holes filled.
- Grid: non-overlapping tiles of `tile_size` px at the target resolution (native by default, as in
  the paper), i.e. a level-0 footprint of tile_size * downsample; a tile is kept when its tissue
  fraction (measured on the mask) reaches `min_tissue`. Only whole tiles inside the slide.
- Reads come from the best pyramid level (the coarsest whose downsample <= the target) and are
  resized to `tile_size` when that level is not exactly the target.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import ndimage

from tasks.errors import ConfigError, DatasetError

COORD_COLUMNS = ("x", "y", "level", "read_size", "tile_size", "tissue")
_PLAIN_IMAGES = (".jpg", ".jpeg", ".png")
# The mask level must resolve a tile to >= 4x4 px (tissue fractions in 1/16 steps or finer); not more,
# since the mask level is read whole: a 100k x 200k px slide at downsample 32 is 75 MB of RGBA.
_MASK_MIN_TILE_PX = 4
# Bump when tile_slide's output for the same parameters changes: it enters the cached coordinates'
# folder and the slide datasets' fingerprint (the bags' cache key). 2: a mask level finer than
# needed (a plain JPEG slide has only level 0) is box-reduced to 4-8 px per tile before masking.
TILING_VERSION = 2


@dataclass(frozen=True)
class TilingParams:
    """What defines a tile set; `key()` goes into the feature cache key next to the encoder's."""

    tile_size: int = 224
    target_mpp: float | None = None  # um/px of the tiles; None and no target_mag: native level 0
    target_mag: float | None = None  # objective magnification (e.g. 20); needs objective-power or mpp
    min_tissue: float = 0.5  # fraction of a tile on tissue to keep it
    min_saturation: float = 0.06  # floor on the Otsu threshold: on blank glass Otsu splits noise
    median: int = 7  # median blur (mask px), as CLAM's mthresh
    min_object_um2: float = 5.0e4  # objects smaller than this (um^2, ~0.22 mm side) are debris

    def validate(self) -> TilingParams:
        if not isinstance(self.tile_size, int) or self.tile_size < 16:
            raise ConfigError(f"tile_size must be an integer >= 16, got {self.tile_size!r}")
        if self.target_mpp is not None and self.target_mag is not None:
            raise ConfigError("give target_mpp or target_mag, not both")
        for name in ("target_mpp", "target_mag"):
            v = getattr(self, name)
            if v is not None and not (isinstance(v, (int, float)) and v > 0):
                raise ConfigError(f"{name} must be a number > 0, got {v!r}")
        if not 0.0 < self.min_tissue <= 1.0:
            raise ConfigError(f"min_tissue must be in (0, 1], got {self.min_tissue!r}")
        return self

    def key(self) -> dict:
        return asdict(self)


def open_slide(path: str | os.PathLike):
    """An OpenSlide handle; DatasetError naming the file when it is missing or not a slide."""
    import openslide

    p = str(path)
    if not os.path.isfile(p):
        raise DatasetError(p, "slide file is missing")
    if p.lower().endswith(_PLAIN_IMAGES):
        # BCNB ships its slides as plain JPEG: OpenSlide's ImageSlide (one level, no mpp) reads them.
        from PIL import Image

        try:
            return openslide.ImageSlide(p)
        except (OSError, ValueError, Image.DecompressionBombError) as e:
            raise DatasetError(p, f"cannot open the image slide: {e}") from e
    try:
        return openslide.OpenSlide(p)
    except openslide.OpenSlideUnsupportedFormatError:
        with open(p, "rb") as f:
            magic = f.read(4)
        if magic in (b"II*\0", b"MM\0*", b"II+\0", b"MM\0+"):  # a TIFF header OpenSlide still refuses
            raise DatasetError(p, "TIFF file OpenSlide cannot read (truncated or corrupt?)") from None
        raise DatasetError(p, "not a slide OpenSlide can open (unsupported or unrecognised format)") from None
    except openslide.OpenSlideError as e:
        raise DatasetError(p, f"cannot open the slide: {e}") from e


def _slide_mpp(slide) -> float | None:
    import openslide

    try:
        return float(slide.properties[openslide.PROPERTY_NAME_MPP_X])
    except (KeyError, ValueError):
        return None


def target_downsample(slide, path: str, params: TilingParams) -> float:
    """Level-0 pixels per tile pixel. Magnification uses objective-power, else mpp (10 / mpp:
    the 20x = 0.5 um/px convention of CLAM and TRIDENT)."""
    import openslide

    if params.target_mpp is None and params.target_mag is None:
        return 1.0
    mpp = _slide_mpp(slide)
    if params.target_mpp is not None:
        if mpp is None:
            raise DatasetError(path, f"target_mpp {params.target_mpp} needs the slide's microns per pixel, "
                                     "but it has no openslide.mpp-x property")
        ds = params.target_mpp / mpp
    else:
        power = slide.properties.get(openslide.PROPERTY_NAME_OBJECTIVE_POWER)
        try:
            native = float(power) if power else (10.0 / mpp if mpp else None)
        except ValueError:
            native = 10.0 / mpp if mpp else None
        if native is None:
            raise DatasetError(path, f"target_mag {params.target_mag} needs the slide's objective power or "
                                     "microns per pixel, and it has neither")
        ds = native / params.target_mag
    if ds < 1.0 - 1e-6:
        raise DatasetError(path, f"the requested resolution is finer than the slide's native one "
                                 f"(downsample {ds:.3f} < 1); tiles would be upsampled")
    return max(ds, 1.0)


def otsu(values: np.ndarray) -> float:
    """Otsu's threshold of uint8 values (between-class variance maximised over 256 bins)."""
    hist = np.bincount(values.ravel(), minlength=256).astype(np.float64)
    p = hist / max(hist.sum(), 1.0)
    omega, mu = np.cumsum(p), np.cumsum(p * np.arange(256))
    with np.errstate(divide="ignore", invalid="ignore"):
        sigma_b = (mu[-1] * omega - mu) ** 2 / (omega * (1.0 - omega))
    return float(np.nanargmax(np.nan_to_num(sigma_b, nan=-1.0)))


def tissue_mask(rgb: np.ndarray, params: TilingParams, um2_per_px: float | None) -> np.ndarray:
    """bool (h, w) tissue mask of a low-resolution RGB image (CLAM's saturation recipe)."""
    rgb = rgb.astype(np.int16)
    mx, mn = rgb.max(axis=2), rgb.min(axis=2)
    sat = np.where(mx > 0, (mx - mn) * 255 // np.maximum(mx, 1), 0).astype(np.uint8)
    sat = ndimage.median_filter(sat, size=params.median)
    thr = max(otsu(sat), params.min_saturation * 255.0)
    mask = ndimage.binary_closing(sat > thr, structure=np.ones((3, 3), bool), iterations=2)
    mask = ndimage.binary_fill_holes(mask)
    labels, n = ndimage.label(mask)
    if n:
        # Without mpp, a fixed 64 px (at the mask level) stands in for the debris size.
        min_px = params.min_object_um2 / um2_per_px if um2_per_px else 64.0
        sizes = np.bincount(labels.ravel())
        keep = sizes >= min_px
        keep[0] = False
        mask = keep[labels]
    return mask


def _mask_level(slide, footprint: float) -> int:
    """The coarsest level that still resolves a tile footprint to >= _MASK_MIN_TILE_PX px (CLAM
    segments at downsample ~64 for the same reason)."""
    ok = [i for i, d in enumerate(slide.level_downsamples) if footprint / d >= _MASK_MIN_TILE_PX]
    return max(ok) if ok else 0


def _mask_reduction(footprint: float, level_ds: float) -> int:
    """Box-reduction factor that brings the mask to 4-8 px per tile footprint when the slide has no
    level that coarse (a plain JPEG or PNG has level 0 only): masking every level-0 pixel costs ~1 s
    per 3 MP on one core (the median filter), and a real slide of 10^8 px would take minutes."""
    return max(1, int(footprint / level_ds // _MASK_MIN_TILE_PX))


def _read_rgb(slide, path: str, loc: tuple[int, int], level: int, size: tuple[int, int]) -> np.ndarray:
    """RGB uint8 of a region, transparent (outside the scan) composited on white."""
    import openslide

    try:
        rgba = np.asarray(slide.read_region(loc, level, size))
    except openslide.OpenSlideError as e:
        raise DatasetError(path, f"cannot read level {level} at {loc}: {e} (truncated or corrupt file?)") from e
    rgb, alpha = rgba[..., :3].astype(np.float32), rgba[..., 3:].astype(np.float32) / 255.0
    return np.rint(rgb * alpha + 255.0 * (1.0 - alpha)).astype(np.uint8)


def tile_slide(path: str | os.PathLike, params: TilingParams | None = None,
               return_mask: bool = False):
    """Coordinates of the tissue tiles of one slide: a DataFrame with COORD_COLUMNS (level-0 x, y
    of the top-left corner, level read from, read_size at that level, tile_size, tissue fraction),
    and `attrs` holding the slide's facts (dimensions, mpp, downsample, mask level). DatasetError
    naming the slide if it cannot be opened, lacks the metadata asked for, or has no tissue.
    With `return_mask`: (coords, mask, mask_downsample)."""
    params = (params or TilingParams()).validate()
    p = str(path)
    slide = open_slide(p)
    try:
        ds = target_downsample(slide, p, params)
        footprint = params.tile_size * ds  # level-0 px per tile side
        level = slide.get_best_level_for_downsample(ds + 1e-6)
        level_ds = float(slide.level_downsamples[level])
        read_size = max(1, int(round(params.tile_size * ds / level_ds)))
        m_level = _mask_level(slide, footprint)
        m_ds = float(slide.level_downsamples[m_level])
        mw, mh = slide.level_dimensions[m_level]
        thumb = _read_rgb(slide, p, (0, 0), m_level, (mw, mh))
        k = _mask_reduction(footprint, m_ds)
        if k > 1:
            from PIL import Image

            thumb, m_ds = np.asarray(Image.fromarray(thumb).reduce(k)), m_ds * k
        mpp = _slide_mpp(slide)
        # A truncated file can hold a readable low level and a broken level 0: probe the read level.
        W, H = slide.level_dimensions[0]
        _read_rgb(slide, p, (int(W * 0.5), int(H * 0.5)), level, (16, 16))
    finally:
        slide.close()
    mask = tissue_mask(thumb, params, (mpp * m_ds) ** 2 if mpp else None)
    if not mask.any():
        raise DatasetError(p, "no tissue found (the tissue mask is empty)")
    step = int(round(footprint))
    xs = np.arange(0, W - step + 1, step)
    ys = np.arange(0, H - step + 1, step)
    frac = _tile_fractions(mask, xs, ys, step, m_ds)
    keep_y, keep_x = np.nonzero(frac >= params.min_tissue)
    if len(keep_x) == 0:
        raise DatasetError(p, f"no tile has >= {params.min_tissue:.0%} tissue (tissue too small for "
                              f"{params.tile_size} px tiles at downsample {ds:g})")
    n = len(keep_x)
    coords = pd.DataFrame({
        "x": xs[keep_x].astype(np.int64), "y": ys[keep_y].astype(np.int64),
        "level": np.full(n, level, np.int32), "read_size": np.full(n, read_size, np.int32),
        "tile_size": np.full(n, params.tile_size, np.int32),
        "tissue": frac[keep_y, keep_x].astype(np.float32)}, columns=list(COORD_COLUMNS))
    coords.attrs = {"slide": p, "width": int(W), "height": int(H), "mpp": mpp, "downsample": ds,
                    "mask_downsample": m_ds, "params": params.key()}
    return (coords, mask, m_ds) if return_mask else coords


def _tile_fractions(mask: np.ndarray, xs: np.ndarray, ys: np.ndarray, step: int, m_ds: float) -> np.ndarray:
    """Tissue fraction of every grid tile (len(ys), len(xs)), from a summed-area table of the mask;
    tile edges are rounded to mask pixels (an error of < 1 mask px per side)."""
    sat = np.zeros((mask.shape[0] + 1, mask.shape[1] + 1), np.int64)
    sat[1:, 1:] = mask.astype(np.int64).cumsum(0).cumsum(1)

    def edges(v: np.ndarray, limit: int) -> tuple[np.ndarray, np.ndarray]:
        a = np.clip(np.rint(v / m_ds).astype(np.int64), 0, limit)
        b = np.clip(np.rint((v + step) / m_ds).astype(np.int64), 0, limit)
        return a, b

    x0, x1 = edges(xs, mask.shape[1])
    y0, y1 = edges(ys, mask.shape[0])
    area = (y1 - y0)[:, None] * (x1 - x0)[None, :]
    s = sat[y1][:, x1] - sat[y0][:, x1] - sat[y1][:, x0] + sat[y0][:, x0]
    return np.where(area > 0, s / np.maximum(area, 1), 0.0)


def read_tiles(path: str | os.PathLike, x: Sequence[int], y: Sequence[int], level: Sequence[int],
               read_size: Sequence[int], tile_size: Sequence[int] | int = 224) -> np.ndarray:
    """uint8 (B, T, T, 3) tiles of one slide, opening it once for the whole batch (what a Ray
    Data `map_batches` worker calls per slide group). Coordinates are COORD_COLUMNS values."""
    from PIL import Image

    p = str(path)
    n = len(x)
    ts = np.broadcast_to(np.asarray(tile_size), (n,))
    if n and len(set(ts.tolist())) != 1:
        raise ValueError("read_tiles: one tile_size per batch")
    t = int(ts[0]) if n else int(np.asarray(tile_size).ravel()[0])
    out = np.empty((n, t, t, 3), np.uint8)
    if n == 0:
        return out
    slide = open_slide(p)
    try:
        for i in range(n):
            r = int(read_size[i])
            rgb = _read_rgb(slide, p, (int(x[i]), int(y[i])), int(level[i]), (r, r))
            if r != t:  # the read level is not exactly the target resolution
                rgb = np.asarray(Image.fromarray(rgb).resize((t, t), Image.BILINEAR))
            out[i] = rgb
    finally:
        slide.close()
    return out


def read_coordinate_tiles(path: str | os.PathLike, coords: pd.DataFrame) -> np.ndarray:
    return read_tiles(path, coords["x"].to_numpy(), coords["y"].to_numpy(), coords["level"].to_numpy(),
                      coords["read_size"].to_numpy(), coords["tile_size"].to_numpy())


def coordinates_table(coords: pd.DataFrame):
    """Arrow table of COORD_COLUMNS; the slide facts and tiling parameters in the schema metadata."""
    import pyarrow as pa

    table = pa.Table.from_pandas(coords[list(COORD_COLUMNS)], preserve_index=False)
    meta = dict(table.schema.metadata or {})
    meta[b"medscale.wsi"] = json.dumps(coords.attrs, default=str).encode()
    return table.replace_schema_metadata(meta)


def save_coordinates(coords: pd.DataFrame, path: str | os.PathLike) -> Path:
    """Parquet, one file per slide (`coordinates_table`)."""
    import pyarrow.parquet as pq

    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(coordinates_table(coords), out)
    return out


def load_coordinates(path: str | os.PathLike, filesystem=None) -> pd.DataFrame:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(str(path), filesystem=filesystem)
    except (OSError, ValueError) as e:
        raise DatasetError(str(path), f"cannot read tile coordinates: {e}") from e
    missing = [c for c in COORD_COLUMNS if c not in table.column_names]
    if missing:
        raise DatasetError(str(path), f"not a tile-coordinate file: missing column(s) {missing}")
    df = table.to_pandas()[list(COORD_COLUMNS)]
    raw = (table.schema.metadata or {}).get(b"medscale.wsi")
    df.attrs = json.loads(raw) if raw else {}
    return df
