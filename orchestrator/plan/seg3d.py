"""Planned GPU-hours of 3D segmentation sweeps, printed before a sweep starts.

With online features the encoder is the cost. Per group (encoder, resolution, dataset) -- every
fold and seed of it shares the encoded crops (tasks/protocols/seg3d_group.py) -- the slices
encoded are:

    training   steps x batch_size x crop_slices x modalities
    validation (steps / val_every) rounds x validation cases x slices x modalities
               (MSD: the union over folds, 80% of cases; one encoding serves all its heads)
    test       test cases x slices x modalities (MSD: every case, once; PET: 20%)

(sliding windows overlap along z, but a slice two windows share is encoded once: predict_group
carries its maps to the next window).

GPU-hours = slices x encoder GFLOPs(resolution) / effective throughput. The decoder is left out
(tens of GFLOPs per crop against the encoder's hundreds to thousands per slice). Case counts and
median slice counts of the releases are approximate (`DATASET_STATS`; pass real ones when known).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import pandas as pd

# (cases with labels, typical axial slices, modalities encoded): public releases, approximate.
DATASET_STATS: dict[str, tuple[int, int, int]] = {
    "msd_brain": (484, 155, 4), "msd_heart": (20, 110, 1), "msd_liver": (131, 430, 1),
    "msd_hippocampus": (260, 36, 1), "msd_prostate": (32, 20, 2), "msd_lung": (63, 250, 1),
    "msd_pancreas": (281, 95, 1), "msd_hepatic_vessel": (303, 70, 1), "msd_spleen": (41, 90, 1),
    "msd_colon": (126, 100, 1), "autopet2": (1014, 326, 2), "hecktor22": (524, 180, 2),
}
# Shares of the cases (validation, test) a group encodes: MSD's 5-fold CV with 80/20 train/val in a
# fold puts every case in some fold's test set and 80% in some fold's validation set; the PET/CT
# sets hold out 20% for test and carve 10% of the rest for validation.
CASE_SHARES = {"cv": (0.8, 1.0), "split": (0.08, 0.2)}
EFFECTIVE_TFLOPS = 300.0  # ~35% of an H100-class GPU's bf16 peak on a ViT forward pass


def planned_gpu_hours(encoders: Sequence[str], resolutions: Sequence[int], datasets: Sequence[str],
                      params: Mapping[str, Any] | None = None, n_seeds: int = 1,
                      stats: Mapping[str, tuple[int, int, int]] | None = None,
                      effective_tflops: float = EFFECTIVE_TFLOPS,
                      modalities: Mapping[str, int] | None = None) -> pd.DataFrame:
    """One row per group (encoder, resolution, dataset): slices encoded, GFLOPs per slice, GPU-hours,
    and the heads (seeds/folds) the group trains. `params`: seg3d_decoder hyperparameters."""
    from tasks.encoders import get_encoder_spec
    from tasks.protocols.seg3d_decoder import Seg3DDecoder

    p = {**Seg3DDecoder().get_params(), **(params or {})}
    stats = {**DATASET_STATS, **(stats or {})}
    rows = []
    for enc in encoders:
        spec = get_encoder_spec(enc)
        for res in resolutions:
            g = spec.gflops(int(res))
            for ds in datasets:
                if ds not in stats:
                    raise KeyError(f"no case/slice counts for {ds}; pass stats={{{ds!r}: (cases, slices, modalities)}}")
                n, s, m = stats[ds]
                m = (modalities or {}).get(ds, m)
                rounds = p["steps"] // p["val_every"] if p["val_every"] else 1
                train = p["steps"] * p["batch_size"] * p["crop_slices"] * m
                val, test = CASE_SHARES["cv" if ds.startswith("msd_") else "split"]
                infer = (rounds * val + test) * n * s * m
                slices = train + infer
                rows.append({"encoder": enc, "resolution": int(res), "dataset": ds, "heads": n_seeds,
                             "slices_encoded": int(slices), "gflops_per_slice": g,
                             "gpu_hours": slices * g / (effective_tflops * 1e3) / 3600.0})
    return pd.DataFrame(rows)


def plan_for_config(cfg: Any) -> pd.DataFrame:
    """The plan of a SweepConfig's seg3d_decoder cells (empty when the grid has none)."""
    if "seg3d_decoder" not in cfg.grid.protocols:
        return pd.DataFrame()
    from tasks.datasets import dataset_class

    dense = [d for d in cfg.grid.datasets if getattr(dataset_class(d), "target_kind", "") == "mask3d"]
    mods = {d: (2 if cfg.options_for(d).get("modality", "ct+pet") == "ct+pet" else 1)
            for d in dense if "modality" in cfg.options_for(d)}
    return planned_gpu_hours(cfg.grid.encoders, cfg.grid.resolutions, dense, cfg.protocols.get("seg3d_decoder"),
                             n_seeds=len(cfg.grid.seeds), modalities=mods)


def format_plan(plan: pd.DataFrame) -> str:
    """The lines printed before the sweep: total, per encoder, and the largest group."""
    if plan.empty:
        return "seg3d plan: no 3D segmentation cells"
    total = plan["gpu_hours"].sum()
    per = plan.groupby("encoder")["gpu_hours"].sum()
    top = plan.loc[plan["gpu_hours"].idxmax()]
    lines = [f"seg3d plan: {len(plan)} groups (encoder x resolution x dataset), {int(plan['heads'].sum())} heads, "
             f"{plan['slices_encoded'].sum() / 1e6:.1f} M slice encodings, {total:,.0f} GPU-hours planned "
             f"at {EFFECTIVE_TFLOPS:.0f} effective TFLOP/s"]
    lines += [f"  {enc}: {h:,.0f} GPU-h" for enc, h in per.items()]
    lines.append(f"  largest group: {top['encoder']} @ {top['resolution']} on {top['dataset']}: "
                 f"{top['gpu_hours']:,.1f} GPU-h")
    return "\n".join(lines)


def plan_text(cfg: Any) -> str | None:
    """What the sweep prints before it starts when its grid has seg3d_decoder cells (else None)."""
    if "seg3d_decoder" not in cfg.grid.protocols:
        return None
    return format_plan(plan_for_config(cfg))
