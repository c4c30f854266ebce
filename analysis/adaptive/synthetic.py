"""Known-truth scaling studies in the `medscale analyze --points` format, for replaying the policy.

The shape of the paper's grid: DINOv3 S/B/L x 6 resolutions x 5 seeds per dataset x protocol, every
metric from the same cells. Each (dataset, protocol, metric) has one truth:
 - ``power``: y_inf - a (params/p0)^-0.5 - b (res/224)^-1, still rising at the top;
 - ``saturates``: the same with a fast exponential approach, level by 512 px and by ViT-B;
 - ``peak``: rises with resolution to an interior best (384-768 px), then falls; mild gain in params;
 - ``flat``: no change.
Noise, as a `--points` file carries it: a seed shift shared by every cell of a dataset x protocol
(head initialisation recipes), an offset per cell and metric shared by its seeds (the test set's
sampling error, which a points file cannot separate from the truth) and independent noise per run.
Cells also log `n_test` (items), so a cell's cost is GFLOPs x items. With ``train_fractions`` each
cell also trains on those shares of its split (nested subsets, `n_train` cases each): the metric
loses ``data_gain`` x (1/sqrt(f) - 1) / (1/sqrt(f_min) - 1), so ``data_gain`` is what the smallest
subset gives up (drawn per curve from ``DATA_GAINS``: some data curves flat, some rising).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

ENCODERS = {"dinov3_vits16": 21_586_944, "dinov3_vitb16": 85_641_216, "dinov3_vitl16": 303_079_424}
RESOLUTIONS = (224, 256, 384, 512, 768, 1024)
METRICS = ("auc", "acc", "f1_macro")
KINDS = ("power", "saturates", "peak", "flat")
DATA_GAINS = (0.0, 0.01, 0.04)  # what the smallest train fraction gives up against the whole split


def gflops(params: float, resolution: int) -> float:
    """ViT/16 inference GFLOPs: 2 per parameter per token plus attention (4 d tokens^2 per block,
    with d ~ sqrt(params / 12 / blocks) folded into a constant fitted to timm's counts)."""
    tokens = (resolution / 16) ** 2 + 1
    return (2 * params * tokens + 4 * 24 * 1024 * tokens**2 * (params / 3.03e8) ** 0.5) / 1e9


def truth(kind: str, params: float, resolution: int, peak_at: int, rng_level: float) -> float:
    p = params / min(ENCODERS.values())
    r = resolution / 224
    if kind == "power":
        return rng_level - 0.05 * p**-0.5 - 0.06 * r**-1.0
    if kind == "saturates":
        return rng_level - 0.05 * np.exp(-2.0 * (p - 1)) - 0.06 * np.exp(-3.0 * (r - 1))
    if kind == "peak":
        u = np.log2(resolution / peak_at)
        return rng_level + 0.012 * np.log2(p) / 4 - 0.035 * u**2 / (1.0 if u < 0 else 0.6)
    return rng_level


def generate_study(seed: int = 0, n_datasets: int = 4, protocols: tuple[str, ...] = ("linear_probe", "knn"),
                   metrics: tuple[str, ...] = METRICS, n_seeds: int = 5, seed_sd: float = 0.003,
                   shift_sd: float = 0.002, case_sd: float = 0.0015,
                   resolutions: tuple[int, ...] = RESOLUTIONS,
                   seed_free: tuple[str, ...] = (),
                   train_fractions: tuple[float, ...] = ()) -> tuple[pd.DataFrame, dict]:
    """Points and the truth per (dataset, protocol, metric): kind and, for peaks, the best resolution
    (and the data gain, with ``train_fractions``; module doc).

    The default grid has 4 datasets x 2 protocols x 3 metrics x 10 curves = 240 curves. Protocols in
    ``seed_free`` (kNN: no trained head) repeat one value under every seed."""
    r = np.random.default_rng(seed)
    rows, truths, i = [], {}, 0
    fractions = sorted(set(train_fractions) | {1.0}) if train_fractions else [1.0]
    train_cases = {}
    for d in range(n_datasets):
        ds = f"ds{d}"
        n_test = int(r.integers(200, 2000))
        train_cases[ds] = 4 * n_test
        for proto in protocols:
            shift = shift_sd * r.normal(size=n_seeds)
            for metric in metrics:
                kind = KINDS[(i + seed) % len(KINDS)]
                i += 1
                peak_at = int(r.choice(list(resolutions[2:-1] or resolutions[1:-1] or resolutions)))
                level = float(r.uniform(0.75, 0.9))
                gain = float(r.choice(DATA_GAINS)) if len(fractions) > 1 else 0.0
                truths[(ds, proto, metric)] = {"kind": kind, "peak_at": peak_at if kind == "peak" else None,
                                               "data_gain": gain}
                for enc, params in ENCODERS.items():
                    for res in resolutions:
                        top = truth(kind, params, res, peak_at, level)
                        for f in fractions:
                            loss = gain * (f**-0.5 - 1) / (fractions[0] ** -0.5 - 1) if f < 1 else 0.0
                            mu = top - loss + case_sd * r.normal()
                            free = proto in seed_free
                            for s in range(n_seeds):
                                rows.append((ds, proto, metric, enc, params, gflops(params, res), res, s,
                                             mu if free else mu + shift[s] + seed_sd * r.normal(), f))
            for enc, params in ENCODERS.items():  # items: the cost of a cell is GFLOPs x items
                for res in resolutions:
                    rows += [(ds, proto, "n_test", enc, params, gflops(params, res), res, s, float(n_test), f)
                             for f in fractions for s in range(n_seeds)]
    cols = ["dataset", "protocol", "metric", "encoder", "params", "gflops", "resolution", "seed", "value",
            "train_fraction"]
    out = pd.DataFrame(rows, columns=cols)
    if len(fractions) == 1:
        return out.drop(columns="train_fraction"), truths
    # nested subsets: the cases a cell trained on (the data curves' x)
    return out.assign(n_train=(out["train_fraction"] * out["dataset"].map(train_cases)).round()), truths


def true_peak_curves(truths: dict) -> set[tuple[str, str, str, str]]:
    """(dataset, protocol, metric, encoder) of every resolution curve whose truth has an interior peak."""
    return {(ds, proto, m, enc) for (ds, proto, m), t in truths.items() if t["kind"] == "peak" for enc in ENCODERS}
