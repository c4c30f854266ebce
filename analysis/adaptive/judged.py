"""What the policy reads after a round: the ordinary analysis of the points so far.

The model-size, resolution and GFLOPs curves come from `analysis.study.build_study` (the same fits,
covariance and BH family as `medscale analyze`); the data curves - metric vs training cases, where
the grid has train sizes - from `analysis.data_axis`, their own BH family, as in the report.
"""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd

from analysis.bootstrap import CurveReplicates
from analysis.curves import CurveKey
from analysis.data_axis import DATA_AXIS, data_curves, full_data, has_data_axis, judge_data_curves
from analysis.study import Study, build_study


@dataclass
class Judged:
    """The analysis of the points so far: the study (model size, resolution, GFLOPs curves) and the
    data curves with their verdicts (their own BH family)."""

    study: Study
    data: dict  # CurveKey -> analysis.data_axis.DataCurve
    data_verdicts: dict
    counts: bool  # the points give training cases (a data curve's x): without them no data curve exists

    @property
    def verdicts(self) -> dict:
        return {**self.study.verdicts, **self.data_verdicts}

    def family(self, key: CurveKey) -> dict:
        return self.data_verdicts if key.axis == DATA_AXIS else self.study.verdicts

    def replicates(self, key: CurveKey) -> tuple[CurveReplicates | None, float]:
        """The curve's oriented points with their covariance parts, and its margin."""
        if key.axis == DATA_AXIS:
            c = self.data.get(key)
            return (c.rep, c.margin) if c is not None else (None, float("nan"))
        curve = self.study.curve(key)
        return curve.replicates, curve.margin


def judge_points(points: pd.DataFrame, n_boot: int) -> Judged:
    """Judge every curve of ``points``: verdicts only (no fitted forms - the policy reads none, and
    the verdicts are the same, `verdict.analyse_curve`); they read analytic tails, so ``n_boot``
    feeds nothing the policy uses."""
    sized = has_data_axis(points)
    main = full_data(points) if sized else points
    data = {c.key: c for c in data_curves(points, n_boot=n_boot)} if sized else {}
    counts = "n_train" in points.columns and bool(points["n_train"].notna().any())
    return Judged(build_study(main, n_boot=n_boot, every_metric=True, describe=False), data,
                  judge_data_curves(list(data.values()), describe=False) if data else {}, counts)
