"""Base classes of the dense head families (docs/dense.md): `DenseHead` (trained decoders on
patch-token maps) and `TrainingFreeHead` (registration: nothing is fitted).

Contract (scikit-learn style, as every protocol): the constructor only stores hyperparameters;
`fit(source, train_ids, val_ids)` returns self; fitted state ends in `_`. The head reads features
and targets only through a `tasks.dense.FeatureSource`, so cached and online features are the same
to it. `predict(source, case_id)` returns the prediction at the case's original geometry:

- mask2d, task multiclass:  int64 (H, W) label map
- mask2d, task multilabel:  bool (C, H, W) (a pixel may carry several classes)
- mask3d:                   int64 (S, H, W) label map
- instances:                uint64 (S, H, W) segment ids (0 = background)

`predict_scores(source, case_id)` (optional) returns per-class probabilities at the same size.
Early stopping and anything chosen on data (a threshold) use `val_ids`, never test.
`TrainingFreeHead.register(source, pair)` returns a `Registration` (see its docstring).
No Ray, no MLflow here.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
from sklearn.exceptions import NotFittedError

from tasks.dense import FeatureSource, Pair
from tasks.protocols.base import Protocol


class DenseHead(Protocol):
    """Base of trained dense heads. Subclasses set `name`, `supports`, `target_kinds` and implement
    `_check_params`, `_fit(source, train_ids, val_ids)` and `_predict(source, case_id)`."""

    family: ClassVar[str] = "dense"
    target_kinds: ClassVar[frozenset[str]] = frozenset({"mask2d"})
    item_kinds: ClassVar[frozenset[str]] = frozenset({"image", "volume"})
    # True when training augments geometrically (flips, rotations): features must then be computed
    # online from the augmented pixels (tasks.dense.choose_source).
    augments: ClassVar[bool] = False

    def fit(self, source: FeatureSource, train_ids: Sequence[str],  # type: ignore[override]
            val_ids: Sequence[str] | None = None) -> DenseHead:
        self.validate()
        train_ids, val_ids = list(train_ids), list(val_ids or [])
        if not train_ids:
            raise ValueError(f"{self.name}: cannot fit on an empty training set")
        self.device_ = str(self._torch_device())
        self.n_features_in_ = int(source.channels)
        self.feature_source_ = source.kind
        self._fit(source, train_ids, val_ids)
        return self

    def predict(self, source: FeatureSource, case_id: str) -> np.ndarray:  # type: ignore[override]
        self._fitted()
        if int(source.channels) != self.n_features_in_:
            raise ValueError(f"{self.name}: features have {source.channels} channels, but the head was "
                             f"fitted on {self.n_features_in_}")
        return self._predict(source, case_id)

    def predict_proba(self, X: Any) -> np.ndarray:  # the feature-head API does not apply
        raise TypeError(f"{self.name} is a dense head: use predict(source, case_id)")

    def _fitted(self) -> None:
        if not hasattr(self, "n_features_in_"):
            raise NotFittedError(f"this {self.name} head is not fitted yet: call fit(source, train_ids, val_ids)")

    def _fit(self, source: FeatureSource, train_ids: list[str], val_ids: list[str]) -> None:
        raise NotImplementedError

    def _predict(self, source: FeatureSource, case_id: str) -> np.ndarray:
        raise NotImplementedError


@dataclass
class Registration:
    """What a registration head returns for one pair, at the fixed image's grid.

    displacement: float32 (ndim, *size) voxel displacement field: the fixed-grid point x samples
        the moving image at x + displacement[:, x] (voxels of the fixed grid).
    warped_target: the moving segmentation warped with nearest-neighbour sampling (labels stay
        labels), int (*size).
    warped_image: the moving image warped linearly (float32 (*size)), for figures; may be None.
    """

    displacement: np.ndarray
    warped_target: np.ndarray
    warped_image: np.ndarray | None = None
    info: dict[str, Any] = field(default_factory=dict)


class TrainingFreeHead(Protocol):
    """Base of heads that fit nothing (registration). `fit` only validates and records the source;
    results do not depend on the seed, so a sweep runs one cell per (encoder, resolution, dataset)."""

    family: ClassVar[str] = "training_free"
    target_kinds: ClassVar[frozenset[str]] = frozenset({"pairs"})
    item_kinds: ClassVar[frozenset[str]] = frozenset({"image", "volume"})
    uses_seed: ClassVar[bool] = False

    def fit(self, source: FeatureSource | None = None, *args: Any, **kwargs: Any) -> TrainingFreeHead:  # type: ignore[override]
        self.validate()
        self.device_ = str(self._torch_device())
        self.n_features_in_ = int(source.channels) if source is not None else 0
        return self

    def register(self, source: FeatureSource, pair: Pair) -> Registration:
        if not hasattr(self, "device_"):
            raise NotFittedError(f"call {self.name}.fit(source) before register()")
        return self._register(source, pair)

    def predict_proba(self, X: Any) -> np.ndarray:
        raise TypeError(f"{self.name} is a registration head: use register(source, pair)")

    def _register(self, source: FeatureSource, pair: Pair) -> Registration:
        raise NotImplementedError
