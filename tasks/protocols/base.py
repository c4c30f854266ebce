"""Shared base of the evaluation protocols: scikit-learn style estimators on frozen features.

A protocol is a `sklearn.base.BaseEstimator`, so `get_params`, `set_params`, `clone` and `repr` come
free and follow the usual rules: the constructor only stores its arguments (no validation, no
work), `fit(X, Y)` returns `self`, and everything learned ends in `_`. Values are checked in
`validate()`, which `create_protocol` calls (so a sweep config fails before anything runs) and
`fit` calls again (so `set_params` cannot smuggle in a bad value).

Data contract (every task): `X` float32 (n, D); `Y` int (n, C) of 0/1 -- binary C=1, multilabel
multi-hot, multiclass one-hot. `predict_proba(X)` returns (n, C) float64: per-class probabilities
for binary/multilabel, rows summing to 1 for multiclass.

No Ray, no MLflow here: the orchestrator calls protocols inside its trials.
"""

from __future__ import annotations

import difflib
import inspect
import numbers
import re
from typing import Any, ClassVar

import numpy as np
import torch
from sklearn.base import BaseEstimator
from sklearn.exceptions import NotFittedError

from tasks.errors import ConfigError

# Tasks: the classification kinds, plus what dense targets ask of a head ("multiclass" and
# "multilabel" also name label maps and multi-label masks; "instances": EM neuron ids;
# "registration": pairs).
TASKS = ("binary", "multilabel", "multiclass", "instances", "registration")
_DEVICE_RE = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")


PROTOCOLS: dict[str, type[Protocol]] = {}


def register_protocol(cls: type[Protocol]) -> type[Protocol]:
    """Class decorator: the protocol is known to sweeps by `cls.name` (registered beside its class,
    as timm registers models; `tasks.protocols` imports every protocol module)."""
    if not cls.name or cls.name in PROTOCOLS:
        raise ValueError(f"protocol name {cls.name!r} is empty or registered twice")
    PROTOCOLS[cls.name] = cls
    return cls


class Protocol(BaseEstimator):
    """Base class. Subclasses set `name` and `supports`, list every hyperparameter explicitly in
    `__init__` (scikit-learn introspects the signature), and implement `_check_params`, `_fit`
    and `_predict_proba`."""

    name: ClassVar[str] = ""
    supports: ClassVar[frozenset[str]] = frozenset()
    # The head family (tasks.dense.FAMILIES) decides which cell runner runs it; the target kinds
    # and item kinds it accepts decide which datasets it pairs with in a grid (no dataset lists
    # protocols). `uses_seed` False: the result cannot change with the seed (kNN, training-free
    # registration), so a sweep plans one cell per (encoder, resolution, dataset), not one per seed.
    family: ClassVar[str] = "feature"
    target_kinds: ClassVar[frozenset[str]] = frozenset({"labels"})
    item_kinds: ClassVar[frozenset[str]] = frozenset({"image", "volume"})
    uses_seed: ClassVar[bool] = True

    # Subclasses define __init__ with task="binary", seed=0, device="auto" among their arguments.
    task: str
    seed: int
    device: str

    @classmethod
    def accepts(cls, dataset_cls: Any) -> str | None:
        """None when this protocol can run on the dataset class, else the reason it cannot."""
        kind = getattr(dataset_cls, "target_kind", "labels")
        if kind not in cls.target_kinds:
            return f"{cls.name} takes {'/'.join(sorted(cls.target_kinds))} targets, {dataset_cls.name} has {kind}"
        item = getattr(dataset_cls, "kind", "image")
        if item not in cls.item_kinds:
            return f"{cls.name} takes {'/'.join(sorted(cls.item_kinds))} items, {dataset_cls.name} has {item}s"
        if dataset_cls.task not in cls.supports:
            return f"{cls.name} does not handle {dataset_cls.task} tasks"
        return None

    # -- hyperparameters ------------------------------------------------------------------------
    @classmethod
    def param_names(cls) -> list[str]:
        """Hyperparameter names, in constructor order (what `create_protocol` accepts)."""
        sig = inspect.signature(cls.__init__)
        return [p for p in sig.parameters if p != "self"]

    @classmethod
    def check_param_names(cls, names: list[str] | set[str]) -> None:
        """ConfigError naming the first unknown hyperparameter and listing the valid ones."""
        valid = cls.param_names()
        for n in names:
            if n not in valid:
                close = difflib.get_close_matches(n, valid, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise ConfigError(f"{cls.name} has no hyperparameter {n!r}{hint}; "
                                  f"valid hyperparameters: {', '.join(valid)}")

    def validate(self) -> Protocol:
        """Check every hyperparameter's value; ConfigError naming the first bad one. Returns self."""
        if self.task not in TASKS:
            self._bad("task", self.task, f"one of {', '.join(TASKS)}")
        if self.task not in self.supports:
            raise ConfigError(f"{self.name} does not support task {self.task!r} "
                              f"(supports {', '.join(sorted(self.supports))})")
        self._int("seed", minimum=0)
        if not isinstance(self.device, str) or not _DEVICE_RE.match(self.device):
            self._bad("device", self.device, "'auto', 'cpu', 'cuda' or 'cuda:N'")
        self._check_params()
        return self

    def _check_params(self) -> None:
        """Subclass hook: check the protocol's own hyperparameters with `_int`, `_float`, ..."""

    def _bad(self, param: str, value: Any, expected: str) -> None:
        hint = ""
        if isinstance(value, str) and re.fullmatch(r"[-+]?\d+e[-+]?\d+", value.strip()):
            # PyYAML (YAML 1.1) reads 5e-3 as a string; 5.0e-3 is a float.
            hint = " (YAML reads 5e-3 as text: write 5.0e-3 or 0.005)"
        raise ConfigError(f"{self.name} hyperparameter {param} must be {expected}, got {value!r}{hint}")

    def _int(self, param: str, minimum: int) -> None:
        v = getattr(self, param)
        # bool is an int subclass in Python; `epochs: true` is a config mistake, not 1 epoch.
        if not isinstance(v, numbers.Integral) or isinstance(v, bool) or v < minimum:
            self._bad(param, v, f"an integer >= {minimum}")

    def _float(self, param: str, minimum: float, *, inclusive: bool = False) -> None:
        v = getattr(self, param)
        ok = isinstance(v, numbers.Real) and not isinstance(v, bool) and np.isfinite(v)
        if not ok or (v < minimum if inclusive else v <= minimum):
            self._bad(param, v, f"a finite number {'>=' if inclusive else '>'} {minimum}")

    def _bool(self, param: str) -> None:
        v = getattr(self, param)
        if not isinstance(v, (bool, np.bool_)):
            self._bad(param, v, "true or false")

    def _choice(self, param: str, choices: tuple[str, ...]) -> None:
        v = getattr(self, param)
        if v not in choices:
            self._bad(param, v, f"one of {', '.join(choices)}")

    # -- fit / predict --------------------------------------------------------------------------
    def fit(self, X: np.ndarray, Y: np.ndarray) -> Protocol:
        """Fit on train features X (n, D) and targets Y (n, C). Returns self."""
        self.validate()
        X, Y = self._check_xy(X, Y)
        self.device_ = str(self._torch_device())
        self.n_features_in_ = X.shape[1]
        self.n_classes_ = Y.shape[1]
        self._fit(X, Y)
        return self

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        """Scores (n, C) float64 in [0, 1]; multiclass rows sum to 1."""
        X = self._check_predict(X)
        if len(X) == 0:
            return np.zeros((0, self.n_classes_), dtype=np.float64)
        return self._predict_proba(X)

    def _check_predict(self, X: np.ndarray) -> np.ndarray:
        """Fitted? Right width? Returns X as contiguous float32."""
        if not hasattr(self, "n_features_in_"):
            raise NotFittedError(f"this {self.name} protocol is not fitted yet: call fit(X, Y) "
                                 "before predicting")
        X = self._check_x(X)
        if X.shape[1] != self.n_features_in_:
            raise ValueError(f"{self.name}: X has {X.shape[1]} features, but the protocol was "
                             f"fitted on {self.n_features_in_}")
        return X

    def _fit(self, X: np.ndarray, Y: np.ndarray) -> None:
        raise NotImplementedError

    def _predict_proba(self, X: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    # -- helpers --------------------------------------------------------------------------------
    def _torch_device(self) -> torch.device:
        """'auto' is CUDA when this process sees a GPU (Ray hides GPUs from trials that asked for
        none), else CPU. An explicit 'cuda' without a GPU is a config error, not a silent CPU run."""
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise ConfigError(f"{self.name} hyperparameter device is {self.device!r}, but CUDA is not "
                              "available here; use 'auto' or 'cpu'")
        return torch.device(self.device)

    def _check_x(self, X: np.ndarray) -> np.ndarray:
        X = np.asarray(X)
        if X.ndim != 2:
            raise ValueError(f"{self.name}: X must be 2-D (n, D), got shape {X.shape}")
        # float32 is the feature cache's dtype; other floats are converted once, here.
        X = np.ascontiguousarray(X, dtype=np.float32)
        if not X.flags.writeable:  # a memory map or an Arrow view: torch cannot wrap read-only memory
            X = X.copy()
        if not np.isfinite(X).all():
            raise ValueError(f"{self.name}: X contains NaN or infinite values")
        return X

    def _check_xy(self, X: np.ndarray, Y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        X = self._check_x(X)
        Y = np.asarray(Y)
        if Y.ndim != 2:
            raise ValueError(f"{self.name}: Y must be 2-D (n, C) of 0/1, got shape {Y.shape}")
        if len(X) != len(Y):
            raise ValueError(f"{self.name}: X has {len(X)} rows but Y has {len(Y)}")
        if len(X) == 0:
            raise ValueError(f"{self.name}: cannot fit on an empty training set")
        if not np.isin(Y, (0, 1)).all():
            raise ValueError(f"{self.name}: Y must hold only 0 and 1")
        C = Y.shape[1]
        if self.task == "binary" and C != 1:
            raise ValueError(f"{self.name}: binary task needs Y of shape (n, 1), got (n, {C})")
        if self.task == "multiclass" and (C < 2 or not (Y.sum(axis=1) == 1).all()):
            raise ValueError(f"{self.name}: multiclass task needs one-hot Y with >= 2 columns "
                             "(exactly one 1 per row)")
        if self.task == "multilabel" and C < 1:
            raise ValueError(f"{self.name}: multilabel task needs at least one class column")
        return X, Y.astype(np.float32)
