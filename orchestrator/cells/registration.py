"""A training-free grid cell (head family `training_free`: registration). Nothing is trained, so the
cell is the whole evaluation: the frozen encoder runs inside the cell (online features; each frame
of a test pair is encoded once), every test pair is registered, and the warped moving segmentation
is scored against the fixed one, with the unregistered pair (identity) as the reference in every
run. Plain Python, like `cells.run_cell` (which dispatches here by the protocol's family).

Results (`<sweep>/cells/<cell_id>/`):
- `per_case.parquet`: one row per (pair, label): case_id (the pair), split, class, dice, hd95, asd,
  folding_share; split "test" for the registered pairs (what `medscale analyze` bootstraps over
  pairs, as for any dense run) and "identity" for the same pairs unregistered;
- `metrics.json`: `test_dice`, `test_hd95`, `test_asd` (per label the mean over pairs, then the
  mean over labels), per label (`test_dice_myocardium`), `test_folding_share`, NaN counts, and the
  same for the unregistered pairs as `identity_*` (a reference, not a scaling curve); timings,
  the GPU share the cell asked for and whether it ran on a GPU;
- `registrations/<pair>_disp.nii.gz` (voxel displacement on the fixed grid, NIfTI axis order
  (x, y[, z]) with the components last, in the same order) and `<pair>_warped_seg.nii.gz`, on the
  fixed image's affine (identity for 2D rasters);
- `figures/<pair>.png` for the first FIGURES test pairs: fixed, moving, warped moving (Figure 8 of
  the paper), each with the fixed (ES) myocardium contour in red and the shown image's own
  myocardium in green.
"""

from __future__ import annotations

import gzip
import io
import json
import time
from typing import Any

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from orchestrator.store.results import PLACEMENT_FILE, RESULT_FILE, ResultStore

FIGURES = 3


def registration_spec(cell: Any, cfg: Any, results_dir: str, weights: dict[str, str], gpu_share: float,
                      task: str, classes: list[str]) -> dict[str, Any]:
    """Everything a worker needs (plain data): no cache keys, the dataset is read in the cell."""
    from dataclasses import asdict

    from tasks.encoders import get_encoder_spec

    return {**asdict(cell), "cell_id": cell.cell_id, "family": "training_free", "runner": "training_free", "results_dir": results_dir,
            "task": task, "classes": classes, "hparams": cfg.protocols.get(cell.protocol, {}),
            "size": get_encoder_spec(cell.encoder).size, "root": str(cfg.data_root(cell.dataset)),
            "dataset_options": cfg.options_for(cell.dataset), "val_fraction": cfg.val_fraction,
            "split_seed": cfg.split_seed, "weights": cfg.weights_of(cell.encoder), "weights_digest": weights.get("digest", ""),
            "gpu_share": gpu_share}


class _SamplesOnly:
    """A feature source for heads that read no encoder features (`features: mind`)."""

    kind, channels, grid, layers = "none", 0, 0, ()

    def __init__(self, dataset: Any):
        self.dataset = dataset

    def sample(self, case_id: str) -> Any:
        return self.dataset.read_sample(case_id)

    def features(self, case_id: str) -> np.ndarray:
        raise RuntimeError("this source serves no encoder features")

    def case_ids(self, split: str | None = None) -> list[str]:
        idx = self.dataset.index()
        return [str(c) for c in (idx if split is None else idx[idx["split"] == split])["case_id"]]


def _nifti(array: np.ndarray, affine: np.ndarray | None, vector: bool = False) -> bytes:
    """(z, y, x) or (y, x) arrays (components first when `vector`) as NIfTI in (x, y[, z]) order."""
    import nibabel as nib

    if vector:
        a = np.moveaxis(array[::-1], 0, -1)  # components reversed to (x, y[, z]) and moved last
        a = np.transpose(a, (*range(a.ndim - 2, -1, -1), a.ndim - 1))
    else:
        a = np.transpose(array)
    img = nib.Nifti1Image(np.ascontiguousarray(a), np.eye(4) if affine is None else affine)
    return gzip.compress(img.to_bytes(), compresslevel=6)  # the files are .nii.gz; storage writes bytes as given


def read_nifti_back(data: bytes | str, vector: bool = False) -> np.ndarray:
    """Inverse of `_nifti` (tests, analysis): the array in (z, y, x) / (y, x) order again."""
    import nibabel as nib

    img = nib.load(data) if isinstance(data, str) else nib.Nifti1Image.from_bytes(gzip.decompress(data))
    a = np.asarray(img.dataobj)
    if not vector:
        return np.transpose(a)
    a = np.transpose(a, (*range(a.ndim - 2, -1, -1), a.ndim - 1))
    return np.moveaxis(a, -1, 0)[::-1]


def figure(fixed: Any, moving: Any, reg: Any, myo: int) -> bytes:
    """Fixed | moving | warped moving, grey, fixed myocardium contour red on all three, the shown
    image's myocardium green; a 3D pair shows the slice with the most fixed myocardium."""
    from PIL import Image
    from skimage.segmentation import find_boundaries

    planar = fixed.target.ndim == 2
    z = 0 if planar else int(np.argmax((fixed.target == myo).sum(axis=(1, 2))))

    def sl(a: np.ndarray) -> np.ndarray:
        return a if planar else a[z]

    fimg, mimg = sl(fixed.images[0, 0] if planar else fixed.images[0]), sl(moving.images[0, 0] if planar
                                                                          else moving.images[0])
    wimg = np.clip(sl(reg.warped_image), 0, 255).astype(np.uint8) if reg.warped_image is not None else mimg
    red = find_boundaries(sl(fixed.target) == myo, mode="inner")
    panels = []
    for img, own in ((fimg, None), (mimg, sl(moving.target)), (wimg, sl(reg.warped_target))):
        rgb = np.repeat(img[..., None], 3, axis=2).astype(np.uint8)
        if own is not None:
            rgb[find_boundaries(own == myo, mode="inner")] = (0, 220, 0)
        rgb[red] = (230, 0, 0)
        panels.append(rgb)
    canvas = np.concatenate([np.pad(p, ((2, 2), (2, 2), (0, 0)), constant_values=255) for p in panels], axis=1)
    buf = io.BytesIO()
    im = Image.fromarray(canvas)
    im.resize((im.width * 2, im.height * 2), Image.NEAREST).save(buf, format="PNG")
    return buf.getvalue()


def run_registration_cell(spec: dict[str, Any], results: ResultStore,
                          placement: dict[str, Any] | None) -> dict[str, float]:
    import torch

    from orchestrator.extraction.weights import check_planned
    from tasks.datasets import get_dataset
    from tasks.encoders import create_encoder
    from tasks.features import OnlineFeatures
    from tasks.protocols import create_protocol
    from tasks.targets.pairs import aggregate, folding_share, pair_rows

    t0 = time.perf_counter()
    protocol = create_protocol(spec["protocol"], task=spec["task"], seed=spec["seed"], **spec["hparams"])
    uses_encoder = "dino" in getattr(protocol, "features", "dino")
    ds = get_dataset(spec["dataset"], spec["root"], val_fraction=spec["val_fraction"], seed=spec["split_seed"],
                     **spec["dataset_options"])
    pairs = ds.pairs("test")
    source: Any = _SamplesOnly(ds)
    if uses_encoder:  # online: each test frame is encoded once, inside the cell (nothing is reused)
        encoder = check_planned(create_encoder(spec["encoder"], weights=spec["weights"], device="auto"),
                                spec.get("weights_digest", ""), spec.get("precision"))
        source = OnlineFeatures(encoder, ds, spec["resolution"], keep=2)
    if not pairs:
        raise ValueError(f"{spec['cell_id']}: {spec['dataset']} has no test pairs")
    protocol.fit(source)
    classes = list(spec["classes"])
    myo = classes.index("myocardium") + 1 if "myocardium" in classes else 1
    rows, files, failed, secs = [], {}, [], []
    for i, pair in enumerate(tqdm(pairs, desc=f"register {spec['cell_id']}", unit="pair")):
        try:
            reg = protocol.register(source, pair)
            fixed, moving = source.sample(pair.fixed), source.sample(pair.moving)
        except Exception as e:  # noqa: BLE001 - one bad pair fails alone, named in failed_pairs.csv
            failed.append({"pair_id": pair.pair_id, "fixed": pair.fixed, "moving": pair.moving,
                           "error": f"{type(e).__name__}: {e}"})
            continue
        secs.append(reg.info.get("register_s", float("nan")))
        rows += pair_rows(pair.pair_id, "test", reg.warped_target, fixed.target, classes, fixed.spacing,
                          folding_share(reg.displacement))
        rows += pair_rows(pair.pair_id, "identity", moving.target, fixed.target, classes, fixed.spacing, 0.0)
        files[f"registrations/{pair.pair_id}_disp.nii.gz"] = _nifti(reg.displacement, fixed.affine, vector=True)
        files[f"registrations/{pair.pair_id}_warped_seg.nii.gz"] = _nifti(
            reg.warped_target.astype(np.int16), fixed.affine)
        if i < FIGURES:
            files[f"figures/{pair.pair_id}.png"] = figure(fixed, moving, reg, myo)
    if not rows:
        raise ValueError(f"{spec['cell_id']}: every test pair failed; first error: {failed[0]['error']}")
    table = pd.DataFrame(rows)
    metrics = aggregate(table, classes)
    cuda = torch.cuda.is_available()
    metrics.update(n_failed_pairs=float(len(failed)), register_s_mean=float(np.nanmean(secs)),
                   gpu_share=float(spec.get("gpu_share", 0.0)), on_gpu=float(cuda),
                   gpu_max_memory_gb=float(torch.cuda.max_memory_allocated() / 1e9) if cuda else 0.0,
                   feature_channels=float(getattr(source, "channels", 0)), compute_s=time.perf_counter() - t0)
    buf = io.BytesIO()
    table.to_parquet(buf, index=False)
    files["per_case.parquet"] = buf.getvalue()
    if failed:
        files["failed_pairs.csv"] = pd.DataFrame(failed).to_csv(index=False).encode()
    if placement:
        files[PLACEMENT_FILE] = json.dumps({**placement, "t_end": time.time()}, sort_keys=True).encode()
    files[RESULT_FILE] = json.dumps(metrics, indent=1, sort_keys=True).encode()
    results.write(spec["cell_id"], files)
    return metrics
