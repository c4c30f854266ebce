"""A tiny test-only dense dataset, head and target handler, so the dense machinery (cache, source
rule, dense cell runner, sweep) is tested end to end without the real segmentation modules.

Nothing registers at import: tests put these in DATASETS / PROTOCOLS / TARGET_HANDLERS with
`register(monkeypatch)` in the driver. Ray workers never need the registries: the dense pipeline
and cells carry each class as "module:QualName" (orchestrator.extraction.dense.class_path).

Layout (`toy_dense`): images/<case>.png (RGB, non-square), masks/<case>.png (0 background, 1 blob),
splits.csv (case_id, split). Signal: a bright rectangle on dark noise; its mask is the blob. One
bad case can be added by writing a truncated PNG (`corrupt`).
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from PIL import Image

from tasks.datasets.base import LayoutFile, Report
from tasks.datasets.dense_base import DenseDataset
from tasks.dense import Sample, upsample_logits
from tasks.errors import DatasetError
from tasks.protocols.dense_base import DenseHead


class ToyDense(DenseDataset):
    name = "toy_dense"
    task = "multiclass"
    target_kind = "mask2d"
    classes = ("blob",)
    files = (LayoutFile("splits.csv", "split file", split=True),)
    carves_val = False

    def _image_dirs(self) -> list[Path]:
        return [self.root / "images", self.root / "masks"]

    def _load(self, report: Report) -> pd.DataFrame | None:
        df = self._read_csv("splits.csv", ["case_id", "split"], report)
        if df is None:
            return None
        return pd.DataFrame({"case_id": df["case_id"], "path": [str(self.root / "images" / f"{c}.png") for c in df["case_id"]],
                             "split": df["split"], "patient_id": df["case_id"], "target": [[1]] * len(df)})

    def read_sample(self, case_id: str) -> Sample:
        path = self.root / "images" / f"{case_id}.png"
        mpath = self.root / "masks" / f"{case_id}.png"
        try:
            img = np.asarray(Image.open(path).convert("RGB"))
        except Exception as e:  # noqa: BLE001
            raise DatasetError(str(path), f"cannot decode image: {e}") from e
        try:
            mask = np.asarray(Image.open(mpath)).astype(np.int64)
        except Exception as e:  # noqa: BLE001
            raise DatasetError(str(mpath), f"cannot decode mask: {e}") from e
        return Sample(case_id, img[None, None], mask, meta={"path": str(path), "label_path": str(mpath)})

    @classmethod
    def synth(cls, root: str | os.PathLike, n: int = 12, seed: int = 0, image_size: int = 48) -> Path:
        root = Path(root)
        rng = np.random.default_rng(seed)
        (root / "images").mkdir(parents=True, exist_ok=True)
        (root / "masks").mkdir(parents=True, exist_ok=True)
        rows = []
        for i in range(n):
            h, w = image_size, image_size + 16 * (i % 3)  # non-square, sizes differ
            img = rng.integers(0, 40, (h, w, 3), dtype=np.uint8)
            mask = np.zeros((h, w), np.uint8)
            y, x = rng.integers(0, h // 2), rng.integers(0, w // 2)
            mask[y:y + h // 2, x:x + w // 2] = 1
            img[mask == 1] = rng.integers(200, 255, (int(mask.sum()), 3), dtype=np.uint8)
            cid = f"case{i:03d}"
            Image.fromarray(img).save(root / "images" / f"{cid}.png")
            Image.fromarray(mask).save(root / "masks" / f"{cid}.png")
            rows.append((cid, ("train", "train", "val", "test")[i % 4]))
        pd.DataFrame(rows, columns=["case_id", "split"]).to_csv(root / "splits.csv", index=False)
        return root


def corrupt(root: Path, case_id: str) -> Path:
    """Truncate a case's image: its read fails, it must fail alone."""
    p = root / "images" / f"{case_id}.png"
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 3])
    return p


class ToyHead(DenseHead):
    """A 1x1 conv on the patch grid, logits upsampled to the mask's size, CE loss; early stop on val."""

    name = "toy_seg"
    supports = frozenset({"multiclass"})

    def __init__(self, layers: list[int] | None = None, epochs: int = 30, lr: float = 0.05, augment: bool = False,
                 task: str = "multiclass", seed: int = 0, device: str = "auto"):
        self.layers = layers
        self.epochs = epochs
        self.lr = lr
        self.augment = augment
        self.task = task
        self.seed = seed
        self.device = device

    def _check_params(self) -> None:
        self._int("epochs", 1)
        self._float("lr", 0.0)
        self._bool("augment")

    def _fit(self, source: Any, train_ids: list[str], val_ids: list[str]) -> None:
        from tasks.dense import as_tensor_features

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            conv = torch.nn.Conv2d(source.channels, 2, 1)
        opt = torch.optim.Adam(conv.parameters(), lr=self.lr)
        def pairs(ids):  # one case at a time, read when used: memory does not grow with the cases
            for c in ids:
                yield as_tensor_features(source.features(c)), torch.from_numpy(source.sample(c).target)

        best, state, self.best_epoch_ = np.inf, None, 0
        for epoch in range(self.epochs):
            for x, y in pairs(train_ids):
                loss = torch.nn.functional.cross_entropy(upsample_logits(conv(x), y.shape), y[None])
                opt.zero_grad()
                loss.backward()
                opt.step()
            with torch.no_grad():
                vl = sum(float(torch.nn.functional.cross_entropy(upsample_logits(conv(x), y.shape), y[None]))
                         for x, y in pairs(val_ids)) if val_ids else -epoch
            if vl < best:
                best, state, self.best_epoch_ = vl, {k: v.clone() for k, v in conv.state_dict().items()}, epoch
        conv.load_state_dict(state)
        self.conv_ = conv.eval()

    def _predict(self, source: Any, case_id: str) -> np.ndarray:
        from tasks.dense import as_tensor_features

        size = source.sample(case_id).target.shape
        with torch.no_grad():
            logits = upsample_logits(self.conv_(as_tensor_features(source.features(case_id))), size)
        return logits[0].argmax(0).numpy().astype(np.int64)


class ToyHandler:
    """Per-case Dice and IoU of each class, means over cases, PNG masks, one overlay figure."""

    def case_metrics(self, sample: Sample, prediction: np.ndarray, classes) -> list[dict[str, Any]]:
        rows = []
        for k, c in enumerate(classes, start=1):
            t, p = sample.target == k, prediction == k
            inter, tot, union = (t & p).sum(), t.sum() + p.sum(), (t | p).sum()
            rows.append({"case_id": sample.case_id, "class": c, "dice": 2 * inter / tot if tot else 1.0,
                         "iou": inter / union if union else 1.0})
        return rows

    def aggregate(self, rows: pd.DataFrame, classes) -> dict[str, float]:
        return {"dice_mean": float(rows["dice"].mean()), "iou_mean": float(rows["iou"].mean())}

    def prediction_files(self, sample: Sample, prediction: np.ndarray) -> dict[str, bytes]:
        buf = io.BytesIO()
        Image.fromarray(prediction.astype(np.uint8)).save(buf, format="PNG")
        return {f"{sample.case_id}.png": buf.getvalue()}

    def figures(self, cases) -> dict[str, bytes]:
        out = {}
        for s, pred, score in cases:
            buf = io.BytesIO()
            Image.fromarray((np.concatenate([s.target, pred], axis=1) * 255).astype(np.uint8)).save(buf, format="PNG")
            out[f"{s.case_id}_{score:.2f}.png"] = buf.getvalue()
        return out


def register(monkeypatch) -> None:
    """Known to this process (the driver) for the test's duration."""
    from tasks import targets
    from tasks.datasets import DATASETS
    from tasks.protocols import PROTOCOLS

    monkeypatch.setitem(DATASETS, ToyDense.name, ToyDense)
    monkeypatch.setitem(PROTOCOLS, ToyHead.name, ToyHead)
    monkeypatch.setitem(targets.TARGET_HANDLERS, "mask2d", ToyHandler())  # restored after the test
