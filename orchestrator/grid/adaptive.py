"""The `adaptive:` block of a sweep config: how `medscale sweep --adaptive` spends the grid.

None of it enters a cell's identity (orchestrator/grid/identity.py): a cell an adaptive round runs
is the same cell a full sweep of the config runs, so either resumes from the other.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class AdaptiveSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    budget: float | None = Field(default=None, gt=0, description="share of the full grid's planned cost "
                                 "(GFLOPs x items) the rounds may spend; >= 1: the whole grid (default 0.5)")
    budget_hours: float | None = Field(default=None, gt=0, description="the budget in the plan's device-hours "
                                       "instead of a share (needs item counts for every extraction)")
    confidence: float = Field(default=0.9995, gt=0, lt=1, description="a claim settles at an interim look "
                              "when its BH-adjusted p <= 1 - confidence")
    max_rounds: int = Field(default=12, ge=1, description="rounds at most, round 0 included")
    round_share: float = Field(default=0.05, gt=0, le=1, description="the most one round after round 0 may "
                               "spend, as a share of the full grid's cost (more when the budget left would not fit "
                               "in the rounds left at that pace): smaller rounds look more often "
                               "(fewer wasted cells), larger ones wait less on a cluster with room")

    pricing: Literal["extraction", "cell"] = Field(
        default="extraction", description="extraction: a cell pays its head (head_share of its dataset's mean "
        "extraction) and "
        "the extraction only when no cell chosen before needed it (features are cached); cell: every cell pays "
        "its extraction in full (what `medscale adaptive replay` counts by default)")
    head_share: float = Field(default=0.05, ge=0, description="with pricing: extraction, a head's cost as a "
                              "share of its dataset's mean extraction (a probe or kNN on cached features: "
                              "seconds against minutes of encoding; raise it for heads that train long, e.g. "
                              "seg3d)")

    @model_validator(mode="after")
    def _one_budget(self) -> AdaptiveSettings:
        if self.budget is not None and self.budget_hours is not None:
            raise ValueError("give budget (a share of the grid's cost) or budget_hours, not both")
        return self

    def with_overrides(self, budget: float | None = None, budget_hours: float | None = None) -> AdaptiveSettings:
        """The command line's `--budget` / `--budget-hours` replace the config's budget (either kind)."""
        if budget is not None and budget_hours is not None:
            raise ValueError("--budget and --budget-hours: give one")
        if budget is None and budget_hours is None:
            return self
        return self.model_copy(update={"budget": budget, "budget_hours": budget_hours})
