"""What a curve's verdict holds (`CurveVerdict`, `Effect`) and the constants of the rules
(analysis/verdict.py states the rules)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from analysis.fits import CurveFit

ALPHA = 0.05


CI_LEVEL = 0.95


MIN_EFFECT = 0.005


MIN_POINTS = 2


CORRECTION = "bh"


SHAPE_REPLICATES = 400


VAR_SOURCES = ("cases", "seeds")  # always-present columns of the variance split


VERDICTS = ("scales", "saturates", "peaks", "inverse", "mixed", "flat", "noisy", "degenerate")


DIRECTIONAL = ("scales", "saturates", "peaks", "inverse", "mixed")


@dataclass(frozen=True)
class Effect:
    """A contrast between curve points with its CI (lo == hi == estimate when there is no CI)."""

    estimate: float
    lo: float
    hi: float
    p_up: float = float("nan")  # one-sided p of "> 0"

    def classify(self, margin: float) -> str:
        if -margin < self.lo and self.hi < margin:
            return "negligible"
        if self.lo > 0:
            return "up"
        if self.hi < 0:
            return "down"
        return "unclear"


NAN_EFFECT = Effect(float("nan"), float("nan"), float("nan"))


@dataclass
class CurveVerdict:
    """Everything said about one curve; ``verdict``/``reason`` follow the module's rules."""

    verdict: str
    reason: str
    no_ci: bool
    method: str  # how the replicates were made: "cases+seeds", "seeds", "seeds-parametric", "printed-sd", "none"
    x: np.ndarray
    estimate: np.ndarray
    ci: tuple[np.ndarray, np.ndarray]
    fit: CurveFit
    gain_total: Effect = NAN_EFFECT
    gain_top: Effect = NAN_EFFECT
    rise_to_best: Effect = NAN_EFFECT
    drop_after_best: Effect = NAN_EFFECT
    max_drop: float = float("nan")
    slope_top: Effect = NAN_EFFECT  # fitted gain per doubling of x at the top
    claim: str = ""  # the shape the estimates show (module docstring), "" for none
    p_claim: float = float("nan")
    p_adj: float = float("nan")
    flat_ok: bool = False  # every pairwise difference's CI inside +-m
    margin: float = MIN_EFFECT
    var_split: dict[str, float] = field(default_factory=dict)  # share of the shape's variance per source
    p_increasing: float = float("nan")
    p_decreasing: float = float("nan")
    p_best_largest: float = float("nan")
    peak_x: float = float("nan")
    peak_ci: tuple[float, float] = (float("nan"), float("nan"))
    vertex_x: float = float("nan")
    vertex_ci: tuple[float, float] = (float("nan"), float("nan"))
    form_share: dict[str, float] = field(default_factory=dict)
    param_ci: dict[str, dict[str, tuple[float, float]]] = field(default_factory=dict)
    iso_stat: float = float("nan")
    iso_p: float = float("nan")
    iso_p_adj: float = float("nan")  # the corrected p of the claim (kept under its old name)

    @property
    def kind(self) -> str:
        """"degenerate", "ordering" (no intervals) or "ci"."""
        if self.verdict == "degenerate":
            return "degenerate"
        return "ordering" if self.no_ci else "ci"

    @property
    def label(self) -> str:
        return f"order: {self.verdict}" if self.kind == "ordering" else self.verdict
