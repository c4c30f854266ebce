"""Train and apply many `seg3d_decoder` heads on ONE stream of encoded crops.

With online features (the paper's augmentations must pass through the encoder), encoding is the
cost of 3D segmentation. Every head that shares (encoder, resolution, dataset) -- all CV folds and
all seeds of a sweep -- therefore trains on the same crops: each step draws `batch_size` crops
from the union of the heads' training cases, encodes them once, and every head takes a gradient
step on the crops of ITS OWN training cases (a fold never sees its test or validation cases).
Heads keep their own initialisation (their seed); the crop order is shared, and each head records
it (`shared_data_order_`, `data_seed_`, `group_size_`). Validation and test volumes are encoded
once per window for all heads that score them.

Memory: only a crop's or a window's slices are encoded at a time; a volume's full feature volume
never exists. No Ray, no MLflow here (the orchestrator's group runner calls these in a trial).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import numpy as np
import torch
from tqdm.auto import tqdm

from tasks.dense import FeatureSource, Sample, upsample_logits
from tasks.protocols.losses import dice_ce_loss
from tasks.protocols.optim import AdamW


class GroupedHead(Protocol):
    """What the group trainer needs of a head (`Seg3DDecoder` is one). A structural type, so this
    module, which the decoder delegates its fit and predict to, never imports the decoder back."""

    seed: int
    steps: int
    lr: float
    warmup: float
    weight_decay: float
    device_: Any
    net_: Any

    def validate(self) -> Any: ...
    def build(self, source: FeatureSource, n_modalities: int, n_classes: int, patch: int) -> torch.nn.Module: ...


def same_data_params(heads: Sequence[GroupedHead]) -> None:
    """ValueError unless every head draws the same data stream (then one encoded crop serves all)."""
    ref = heads[0]
    for h in heads[1:]:
        diff = [p for p in ref.DATA_PARAMS if getattr(h, p) != getattr(ref, p)]
        if diff:
            raise ValueError(f"heads differ in {diff}: they cannot share encoded crops")


def draw_crop(sample: Sample, n_slices: int, rng: np.random.Generator, fg_ratio: float,
              augment: bool) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 (M, D, H', W'), int64 (D, H', W')): D = min(n_slices, S) whole axial slices,
    centred on a foreground voxel with probability fg_ratio; with `augment`, a random in-plane
    flip (each axis, p=0.5) and rot90 (k in 0..3) of the PIXELS and the target together."""
    assert sample.target is not None
    s = sample.n_slices
    d = min(n_slices, s)
    fg = np.flatnonzero(sample.target.reshape(s, -1).any(axis=1))
    if fg.size and rng.random() < fg_ratio:
        z = int(rng.choice(fg))
        start = int(np.clip(z - rng.integers(0, d), 0, s - d))
    else:
        start = int(rng.integers(0, s - d + 1))
    img, tgt = sample.images[:, start:start + d], sample.target[start:start + d]
    if augment:
        if rng.random() < 0.5:
            img, tgt = img[:, :, ::-1], tgt[:, ::-1]
        if rng.random() < 0.5:
            img, tgt = img[:, :, :, ::-1], tgt[:, :, ::-1]
        k = int(rng.integers(0, 4))
        img, tgt = np.rot90(img, k, axes=(2, 3)), np.rot90(tgt, k, axes=(1, 2))
    return np.ascontiguousarray(img), np.ascontiguousarray(tgt)


def _volume(source: FeatureSource, images: np.ndarray, device: torch.device) -> torch.Tensor:
    """Encoded slices (D, C, h, w) as a decoder input (1, C, D, h, w) on `device`."""
    return _decoder_input(source.encode(images), device)  # type: ignore[attr-defined]


def _decoder_input(maps: Any, device: torch.device) -> torch.Tensor:
    """Slice maps (D, C, h, w) as a decoder input (1, C, D, h, w), float32 on `device`."""
    return torch.as_tensor(maps).to(device=device, dtype=torch.float32).permute(1, 0, 2, 3).unsqueeze(0)


def _classes(source: FeatureSource) -> tuple[str, ...]:
    ds = getattr(source, "dataset", None)
    classes = tuple(getattr(ds, "classes", ()))
    if not classes:
        raise ValueError("the feature source names no dataset classes; seg3d_decoder needs them")
    return classes


def _patch(source: FeatureSource) -> int:
    res = getattr(source, "resolution", None)
    return int(res) // int(source.grid) if res else 16


def _lr_lambda(steps: int, warmup: int) -> Callable[[int], float]:
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        t = (step - warmup) / max(1, steps - warmup)
        return 0.5 * (1.0 + np.cos(np.pi * min(1.0, t)))
    return f


class _SampleCache:
    """The last few samples read (a crop needs its volume; neighbouring steps often reuse one)."""

    def __init__(self, source: FeatureSource, keep: int = 4):
        self.source, self.keep, self._d = source, keep, {}

    def __call__(self, cid: str) -> Sample:
        if cid not in self._d:
            if len(self._d) >= self.keep:
                self._d.pop(next(iter(self._d)))
            self._d[cid] = self.source.sample(cid)
        return self._d[cid]


def fit_group(heads: Sequence[GroupedHead], source: FeatureSource, train_ids_per_head: Sequence[Sequence[str]],
              val_ids_per_head: Sequence[Sequence[str]] | None = None, *, data_seed: int | None = None,
              pool: Sequence[str] | None = None, shared: bool | None = None) -> list[GroupedHead]:
    """Fit every head on one shared stream of encoded crops (module docstring). Returns the heads.
    `data_seed` (default: the smallest head seed) and `pool` (cases crops are drawn from; default:
    the union of the heads' training cases) fix the crop stream whatever subset of a planned group
    runs (a resumed sweep runs only the missing folds and must draw the same crops); `shared`
    (default: more than one head) is what the heads record as `shared_data_order_`."""
    heads = list(heads)
    same_data_params(heads)
    val_ids_per_head = val_ids_per_head or [[] for _ in heads]
    if not (len(heads) == len(train_ids_per_head) == len(val_ids_per_head)):
        raise ValueError("one list of training ids and one of validation ids per head")
    trains = [set(map(str, t)) for t in train_ids_per_head]
    vals = [list(map(str, v)) for v in val_ids_per_head]
    if any(not t for t in trains):
        raise ValueError("seg3d_decoder: a head has an empty training set")
    ref = heads[0]
    classes = _classes(source)
    ds = getattr(source, "dataset", None)
    samples = _SampleCache(source)
    first = samples(sorted(trains[0])[0])
    data_seed = min(int(h.seed) for h in heads) if data_seed is None else int(data_seed)
    rng = np.random.default_rng(data_seed)
    union = sorted(set().union(*trains, map(str, pool or ())))
    opts, lr_at = [], []
    for h in heads:
        h.validate()
        h.device_ = str(h._torch_device())
        h.n_features_in_ = int(source.channels)
        h.feature_source_ = source.kind
        h.classes_ = classes
        h.net_ = h.build(source, first.n_modalities, len(classes) + 1, _patch(source)).to(h.device_)
        warm = h.warmup if h.warmup is not None else float(getattr(ds, "warmup_fraction", 0.0))
        h.warmup_steps_ = int(round(warm * h.steps))
        opt = AdamW(h.net_.parameters(), lr=h.lr, weight_decay=h.weight_decay)
        opts.append(opt)
        lr_at.append(_lr_lambda(h.steps, h.warmup_steps_))
        h.loss_curve_, h.val_curve_, h.n_updates_, h.best_step_ = [], [], 0, 0
        h.data_seed_, h.group_size_ = data_seed, len(heads)
        h.shared_data_order_ = len(heads) > 1 if shared is None else bool(shared)
        h.best_dice_, h._best_state = -1.0, None
        h.trained_cases_ = set()  # the cases whose crops gave this head gradients (its own training cases)
    n_encoded = 0
    for step in tqdm(range(ref.steps), desc=f"seg3d x{len(heads)} heads", unit="step"):
        crops = []
        for _ in range(ref.batch_size):
            cid = union[int(rng.integers(len(union)))]
            img, tgt = draw_crop(samples(cid), ref.crop_slices, rng, ref.fg_ratio, ref.augment)
            feats = _volume(source, img, torch.device(heads[0].device_))  # ONE encoding for every head
            n_encoded += img.shape[0] * img.shape[1]
            crops.append((cid, feats, torch.from_numpy(tgt)[None, None]))
        for h, opt, lr_f, tr in zip(heads, opts, lr_at, trains, strict=True):
            opt.lr = h.lr * lr_f(step)  # the schedule follows the group's step, updates or not
            mine = [(f, t) for cid, f, t in crops if cid in tr]
            h.trained_cases_.update(cid for cid, _, _ in crops if cid in tr)
            h.net_.train()
            if mine:
                opt.zero_grad(set_to_none=True)
                loss = sum(dice_ce_loss(upsample_logits(h.net_(f.to(h.device_)), t.shape[2:]), t.to(h.device_))
                           for f, t in mine) / len(mine)
                loss.backward()
                opt.step()
                h.n_updates_ += 1
                h.loss_curve_.append(float(loss.detach()))
        if ref.val_every and ((step + 1) % ref.val_every == 0 or step + 1 == ref.steps):
            _validate(heads, source, vals, step + 1)
    if not ref.val_every:
        _validate(heads, source, vals, ref.steps)
    for h in heads:
        if h._best_state is not None:
            h.net_.load_state_dict(h._best_state)
        del h._best_state
        h.net_.eval()
        h.n_encoded_slices_ = n_encoded
    return heads


def _validate(heads: list[GroupedHead], source: FeatureSource, vals: list[list[str]], step: int) -> None:
    """Mean foreground Dice of each head on its own validation cases; keeps its best weights (the
    last ones when it has no validation cases)."""
    union = sorted(set().union(*map(set, vals)))
    scores: list[list[float]] = [[] for _ in heads]
    for cid in union:
        idx = [i for i, v in enumerate(vals) if cid in v]
        preds = predict_group([heads[i] for i in idx], source, cid)
        gt = source.sample(cid).target
        for i, p in zip(idx, preds, strict=True):
            k = len(heads[i].classes_)
            d = [2 * np.sum((p == c) & (gt == c)) / (np.sum(p == c) + np.sum(gt == c))
                 for c in range(1, k + 1) if np.sum(p == c) + np.sum(gt == c)]
            scores[i].append(float(np.mean(d)) if d else 1.0)
    for h, s in zip(heads, scores, strict=True):
        dice = float(np.mean(s)) if s else float("nan")
        h.val_curve_.append((step, dice))
        if not s or dice > h.best_dice_:
            h.best_dice_, h.best_step_ = (dice if s else h.best_dice_), step
            h._best_state = copy.deepcopy({k: v.detach().cpu() for k, v in h.net_.state_dict().items()})


def z_windows(n_slices: int, size: int, overlap: float) -> list[tuple[int, int]]:
    """[start, stop) of the windows of `size` whole slices covering a volume of `n_slices`: MONAI's
    `sliding_window_inference` along z (step int(size * (1 - overlap)), at least 1; the last
    window ends at the last slice; one window when the volume is no longer than it)."""
    size = min(int(size), int(n_slices))
    step = size if size == n_slices else max(1, int(size * (1 - overlap)))
    count = next(d for d in range(math.ceil(n_slices / step)) if d * step + size >= n_slices) + 1
    return [(z0, z0 + size) for z0 in (min(i * step, n_slices - size) for i in range(count))]


def predict_logits_group(heads: Sequence[GroupedHead], source: FeatureSource, case_id: str) -> list[torch.Tensor]:
    """Class logits (K, S, H, W) of one case for every head: windows of crop_slices whole slices,
    `overlap` along z (`z_windows`), logits averaged where windows overlap (MONAI's constant-mode
    sliding window, bit-equal: tests/test_blocks_losses.py), each slice encoded once for all heads
    and all the windows it is in. Logits are blended at the volume's own size."""
    heads = list(heads)
    ref = heads[0]
    sample = source.sample(case_id)
    s = sample.images.shape[1]
    dev = torch.device(ref.device_)

    # Windows overlap along z: the slices a window shares with the previous one are not encoded
    # again (their maps are carried over, by z), so each slice is encoded once per volume and no
    # more than one window's maps are held.
    carry: dict[int, torch.Tensor] = {}
    sums: list[torch.Tensor] = []
    count = torch.zeros(s)
    for z0, z1 in z_windows(s, ref.crop_slices, ref.overlap):
        pixels = sample.images[:, z0:z1]  # uint8 (M, d, H, W)
        new = [z for z in range(z0, z1) if z not in carry]
        enc = iter(torch.as_tensor(source.encode(pixels[:, [z - z0 for z in new]])) if new else ())  # type: ignore[attr-defined]
        carry = {z: carry[z] if z in carry else next(enc) for z in range(z0, z1)}
        feats = _decoder_input(torch.stack([carry[z] for z in range(z0, z1)]), dev)
        with torch.no_grad():
            logits = [upsample_logits(hd.net_.eval()(feats.to(hd.device_)), pixels.shape[1:]).cpu()[0]
                      for hd in heads]
        if not sums:
            sums = [torch.zeros((lg.shape[0], s, *lg.shape[2:])) for lg in logits]
        for acc, lg in zip(sums, logits, strict=True):
            acc[:, z0:z1] += lg
        count[z0:z1] += 1
    return [acc / count[None, :, None, None] for acc in sums]


def predict_group(heads: Sequence[GroupedHead], source: FeatureSource, case_id: str) -> list[np.ndarray]:
    """Label maps (S, H, W) of one case for every head (argmax of `predict_logits_group`)."""
    # numpy's argmax over the class axis (first maximum on ties, as torch's): torch's argmax along
    # a leading dim of a (C, S, H, W) volume is strided and ~7x slower on CPU (0.2 s a volume).
    return [lg.numpy().argmax(axis=0).astype(np.int64) for lg in predict_logits_group(heads, source, case_id)]
