"""The target-kind contract: what a dense cell does with one case's prediction (metrics, the files
a researcher opens, figures), one handler per kind of target, registered by kind."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np

from tasks.dense import TARGET_KINDS, Sample


class TargetHandler(Protocol):
    """What a dense cell does with one test case's prediction, per target kind (mask2d, mask3d,
    instances; registered with `register_target_handler`, see tasks/targets/__init__.py). The dense cell runner is generic: it
    calls these and writes what they return.

    case_metrics -> rows of a per-case table (case_id, class, one column per metric): the table
        `medscale analyze` bootstraps over cases; aggregate -> the run's metrics from those rows;
    prediction_files -> {relative path: bytes}: the prediction as a researcher opens it (PNG at
        the image's size, NIfTI on the source affine, HDF5 with the resolution);
    figures -> {relative path: bytes}: PNGs of chosen cases (e.g. best and worst overlays)."""

    def case_metrics(self, sample: Sample, prediction: np.ndarray, classes: Sequence[str]) -> list[dict[str, Any]]: ...

    def aggregate(self, rows: Any, classes: Sequence[str]) -> dict[str, float]: ...

    def prediction_files(self, sample: Sample, prediction: np.ndarray) -> dict[str, bytes]: ...

    def figures(self, cases: Sequence[tuple[Sample, np.ndarray, float]]) -> dict[str, bytes]: ...


TARGET_HANDLERS: dict[str, TargetHandler] = {}


def register_target_handler(kind: str):
    """Class decorator: an instance of the class handles `kind` (one of TARGET_KINDS)."""
    if kind not in TARGET_KINDS:
        raise ValueError(f"unknown target kind {kind!r}; use one of {', '.join(TARGET_KINDS)}")

    def deco(cls: type) -> type:
        TARGET_HANDLERS[kind] = cls()
        return cls

    return deco
