"""Worker-side decoding: index rows -> uint8 pixel batches for the encoder actors.

Run by Ray Data's CPU tasks (`ray_backend`): `decode_batch` (images, handed over as decoded:
uint8 (C, H, W), grey kept one channel; the actor resizes them on its device, tasks/device_resize.py),
`decode_volumes` (CT
volumes, each read forward once, its slices batched as they come) and `decode_by_file` (items of
a few files, as slide tiles: extraction.slides.decode_tiles). An item that cannot be read fails alone:
its row carries the error (file and problem), its pixels stay zero and are never encoded.
Pure functions of the tasks package: nothing of the cache, the cells or Ray is imported here.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import numpy as np

from tasks.errors import DatasetError


def decode_batch(batch: dict[str, Any], dataset: str, root: str, val_fraction: float, split_seed: int,
                 options: str = "{}") -> dict[str, Any]:
    """Read one batch of images as decoded, uint8 (C, H, W), C 1 for grey sources or 3. Runs on CPU
    workers; the resize to the encoder's resolution is the actor's (on its device), which takes the
    costliest half of the per-image work off these cores (docs/gpu.md). `pixels` is a (B, C, H, W)
    array when every image has one shape, else an object array of them.

    An item that cannot be read or prepared fails alone: its row carries the error (named file,
    problem), its pixels stay zero and are never encoded, and the commit leaves it out of the
    cache entry and names it (`failed_rows`). One corrupt file never stops a dataset."""
    from tasks.datasets import get_dataset
    from tasks.device_resize import as_chw

    ds = get_dataset(dataset, root, val_fraction=val_fraction, seed=split_seed, **json.loads(options))
    paths = [str(p) for p in batch["path"]]
    decoded: list[np.ndarray | None] = [None] * len(paths)
    errors = [""] * len(paths)
    try:
        images: list[Any] = ds.read_images(paths)  # the fast path: a dataset may batch its reads
    except Exception:  # noqa: BLE001 - some item is bad: read one by one to find which
        images = []
        for path in paths:
            try:
                images.append(ds.read_images([path])[0])
            except Exception as e:  # noqa: BLE001
                images.append(e if isinstance(e, DatasetError) else DatasetError(path, f"cannot decode: {e}"))
    for i, (path, img) in enumerate(zip(paths, images, strict=True)):
        try:
            if isinstance(img, Exception):
                raise img
            decoded[i] = as_chw(img)
        except DatasetError as e:
            errors[i] = str(e)
        except Exception as e:  # noqa: BLE001 - a malformed decoded array: name the file
            errors[i] = str(DatasetError(path, f"cannot prepare image: {e}"))
    out = {k: batch[k] for k in ("case_id", "split", "patient_id", "target")}
    out["pixels"] = _stack(decoded)
    out["error"] = np.array(errors, dtype=object)
    return out


def _stack(images: list[np.ndarray | None]) -> np.ndarray:
    """One (B, C, H, W) array when the images share a shape (failed rows: zeros of that shape),
    else an object array of (C, H, W) arrays (failed rows: one zero pixel)."""
    good = [im for im in images if im is not None]
    shapes = {im.shape for im in good}
    if len(shapes) <= 1:
        shape = shapes.pop() if shapes else (1, 1, 1)
        return np.stack([np.zeros(shape, np.uint8) if im is None else im for im in images])
    out = np.empty(len(images), dtype=object)
    out[:] = [np.zeros((1, 1, 1), np.uint8) if im is None else im for im in images]
    return out


def decode_by_file(batch: dict[str, Any], resolution: int, interpolation: str, what: str,
                   read: Any) -> tuple[np.ndarray, np.ndarray]:
    """(pixels uint8 (B, 3, r, r), errors) of a batch whose rows are items of a few files (slices of
    volumes, tiles of slides): `read(path, rows)` reads the listed rows of one file, opened once. A
    file whose read fails marks its rows with the error; their pixels stay zero, never encoded."""
    from tasks.preprocess import prepare_image

    paths = [str(p) for p in batch["path"]]
    errors = [str(e) for e in batch["error"]]
    pixels = np.zeros((len(paths), 3, resolution, resolution), dtype=np.uint8)
    for path in dict.fromkeys(paths):
        rows = [i for i, p in enumerate(paths) if p == path and not errors[i]]
        if not rows:
            continue
        try:
            for i, img in zip(rows, read(path, rows), strict=True):
                pixels[i] = prepare_image(img, resolution, interpolation)
        except Exception as e:  # noqa: BLE001 - the file fails alone (its rows carry the error)
            msg = str(e) if isinstance(e, DatasetError) else str(DatasetError(path, f"cannot read {what}: {e}"))
            for i in rows:
                errors[i] = msg
    return pixels, np.array(errors, dtype=object)


def decode_volumes(batch: dict[str, Any], resolution: int, interpolation: str,
                   batch_size: int) -> Iterator[dict[str, Any]]:
    """Volume rows -> batches of at most `batch_size` of their slices, read, windowed and resized
    to uint8 (B, 3, r, r). Each volume is read forward once (`iter_slices`: a .nii.gz is
    decompressed once, not once per batch of its slices) and its slices leave as they are ready,
    so memory is one batch, never a volume. A volume that cannot be read fails alone: one row
    carries its error (`pool_volumes` leaves the volume out and names it)."""
    from tasks.datasets.ct_rate import iter_slices
    from tasks.preprocess import prepare_image

    keys = ("case_id", "split", "patient_id", "target")
    for v in range(len(batch["path"])):
        path = str(batch["path"][v])
        pixels = np.zeros((batch_size, 3, resolution, resolution), dtype=np.uint8)
        n, error = 0, ""
        try:
            for _, img in iter_slices(path, float(batch["slope"][v]), float(batch["intercept"][v]),
                                      float(batch["lo"][v]), float(batch["hi"][v])):
                pixels[n] = prepare_image(img, resolution, interpolation)
                n += 1
                if n == batch_size:
                    yield _slice_batch(batch, keys, v, pixels, [""] * n)
                    pixels, n = np.zeros_like(pixels), 0
        except Exception as e:  # noqa: BLE001 - the volume fails alone (one row carries the error)
            error = str(e) if isinstance(e, DatasetError) else str(DatasetError(path, f"cannot read slices: {e}"))
        if error:
            yield _slice_batch(batch, keys, v, pixels[:1] * 0, [error])
        elif n:
            yield _slice_batch(batch, keys, v, pixels[:n], [""] * n)


def _slice_batch(batch: dict[str, Any], keys: tuple[str, ...], v: int, pixels: np.ndarray,
                 errors: list[str]) -> dict[str, Any]:
    out = {k: np.repeat(np.asarray(batch[k])[v:v + 1], len(errors), axis=0) for k in keys}
    out["pixels"] = pixels
    out["error"] = np.array(errors, dtype=object)
    return out
