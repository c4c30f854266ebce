"""Training-set subsets for the data axis (config `grid.train_fractions` / `grid.train_shots`).

A cell trains on a subset of its training split; validation and test stay whole. The subset is

- patient-level: a patient's cases are taken together (no patient is split between "seen" and
  "unseen" rows, which would make a small subset look larger than it is);
- stratified: every label stratum is sampled at the same rate, within one patient;
- nested: for one seed, the subset of a smaller fraction (or fewer shots) is inside the subset of
  a larger one, so a curve over fractions measures data, not a reshuffle;
- a pure function of (patients, targets, size, seed): no file is read, so it runs on cached
  features and every protocol family (features, bags, dense cases) uses the same rule.

How nesting and stratification are had at once: each stratum's patients are shuffled by the seed and
given positions (i + 0.5) / n_stratum in [0, 1]; all patients are ordered by position (ties by a
seeded draw) and a fraction takes a prefix of that order. Any prefix holds each stratum in
proportion (within one patient), and prefixes are nested. The prefix is extended, for every size
alike, until it holds one positive patient of every class present (and one negative for binary
tasks): a head cannot learn a class it never sees, and the extension keeps nesting.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

NEGATIVE = "(none)"  # stratum of a patient with no positive label


@dataclass(frozen=True)
class TrainSize:
    """A point on the data axis: a fraction of the training patients, or k patients per class."""

    fraction: float = 1.0
    shots: int | None = None

    def __post_init__(self) -> None:
        if self.shots is not None:
            if self.shots < 1:
                raise ValueError(f"train_shots must be >= 1, got {self.shots}")
            if self.fraction != 1.0:
                raise ValueError("a train size is a fraction or a number of shots, not both")
        elif not 0.0 < self.fraction <= 1.0:
            raise ValueError(f"train_fraction must be in (0, 1], got {self.fraction}")

    @property
    def is_full(self) -> bool:
        return self.shots is None and self.fraction == 1.0

    @property
    def label(self) -> str:
        """As shown in cell ids: "" for the whole split, else f0.1 or k16."""
        if self.is_full:
            return ""
        return f"k{self.shots}" if self.shots is not None else f"f{self.fraction:g}"


@dataclass(frozen=True)
class Subset:
    """The rows of the training split a cell keeps, and what it holds."""

    mask: np.ndarray  # bool, one per training row
    n_cases: int
    n_patients: int
    positives: dict[str, int]  # class -> positive cases in the subset

    def params(self, size: TrainSize) -> dict[str, float | int | str]:
        """Run parameters (MLflow params of the cell)."""
        out: dict[str, float | int | str] = {"train_fraction": size.fraction,
                                             "train_shots": size.shots if size.shots is not None else "",
                                             "n_train_cases": self.n_cases, "n_train_patients": self.n_patients}
        # MLflow keys take letters, digits, _ - . / and spaces: BCNB's "ALN N+" becomes "ALN N_".
        out.update({"n_train_pos_" + re.sub(r"[^\w\-./ ]", "_", c): n for c, n in self.positives.items()})
        return out


def _patient_table(patients: Sequence[str], targets: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(unique patients sorted, row -> patient index, patient-level multi-hot (P, C) = any over cases)."""
    pats, inv = np.unique(np.asarray([str(p) for p in patients]), return_inverse=True)
    Y = np.asarray(targets, dtype=np.int64).reshape(len(inv), -1)
    P = np.zeros((len(pats), Y.shape[1]), dtype=bool)
    np.logical_or.at(P, inv, Y > 0)
    return pats, inv, P


def _strata(P: np.ndarray, classes: Sequence[str]) -> list[str]:
    """One stratum per patient: its rarest positive class (multi-label sets have too many label
    combinations to stratify on all of them), or NEGATIVE."""
    counts = P.sum(axis=0)
    out = []
    for row in P:
        pos = np.flatnonzero(row)
        out.append(classes[int(pos[np.argmin(counts[pos])])] if pos.size else NEGATIVE)
    return out


def _order(strata: list[str], rng: np.random.Generator) -> np.ndarray:
    """Patients in draw order: every prefix samples each stratum in proportion (module doc)."""
    strata_arr = np.asarray(strata)
    pos = np.empty(len(strata))
    for s in sorted(set(strata)):
        members = np.flatnonzero(strata_arr == s)
        perm = rng.permutation(members.size)
        pos[members[perm]] = (np.arange(members.size) + 0.5) / members.size
    ties = rng.random(len(strata))
    return np.lexsort((ties, pos))


def _coverage(order: np.ndarray, P: np.ndarray, binary: bool) -> int:
    """Shortest prefix of `order` with a positive patient of every class present (and a negative
    one for a binary task)."""
    need = [P[:, j] for j in range(P.shape[1]) if P[:, j].any()]
    if binary and (~P.any(axis=1)).any():
        need.append(~P.any(axis=1))
    k = 0
    for col in need:
        k = max(k, int(np.flatnonzero(col[order])[0]) + 1)
    return k


def train_subset(patients: Sequence[str], targets: np.ndarray, size: TrainSize, seed: int,
                 classes: Sequence[str] | None = None, task: str = "multilabel") -> Subset:
    """The training rows a cell of `size` keeps (module doc). `patients`, `targets` (n, C): the
    training split's rows in any order; the result depends on their set, not their order."""
    Y = np.asarray(targets, dtype=np.int64).reshape(len(patients), -1)
    classes = list(classes) if classes is not None else [str(j) for j in range(Y.shape[1])]
    if len(classes) != Y.shape[1]:
        raise ValueError(f"{len(classes)} class names for {Y.shape[1]} target columns")
    pats, inv, P = _patient_table(patients, Y)
    if size.is_full or len(pats) == 0:
        keep = np.ones(len(pats), dtype=bool)
    elif size.shots is not None:
        keep = _shots(P, size.shots, np.random.default_rng([seed, 1]), binary=task == "binary")
    else:
        order = _order(_strata(P, classes), np.random.default_rng([seed, 0]))
        k = max(1, round(size.fraction * len(pats)), _coverage(order, P, binary=task == "binary"))
        keep = np.zeros(len(pats), dtype=bool)
        keep[order[:k]] = True
    mask = keep[inv]
    return Subset(mask, int(mask.sum()), int(keep.sum()),
                  {c: int((Y[mask, j] > 0).sum()) for j, c in enumerate(classes)})


def subset_ids(case_ids: Sequence[str], patients: Sequence[str], targets: np.ndarray, size: TrainSize, seed: int,
               classes: Sequence[str] | None = None, task: str = "multilabel") -> list[str]:
    """`train_subset` for heads that take case ids (dense heads: `fit(source, train_ids, val_ids)`):
    the training case ids a cell of `size` keeps, in their given order."""
    mask = train_subset(patients, targets, size, seed, classes, task).mask
    return [c for c, k in zip(case_ids, mask, strict=True) if k]


def _shots(P: np.ndarray, shots: int, rng: np.random.Generator, binary: bool) -> np.ndarray:
    """k patients positive for each class (and k with no positive label), the first k of one seeded
    order: nested in k, and a class with fewer than k positive patients gives all it has."""
    order = rng.permutation(len(P))
    groups = [P[:, j] for j in range(P.shape[1])] + [~P.any(axis=1)]
    keep = np.zeros(len(P), dtype=bool)
    for col in groups:
        keep[order[col[order]][:shots]] = True
    return keep


def train_sizes(fractions: Sequence[float] | None, shots: Sequence[int] | None) -> list[TrainSize]:
    """The data axis of a grid: fractions, or shots; the whole split when neither is given."""
    if shots:
        return [TrainSize(shots=int(k)) for k in shots]
    return [TrainSize(fraction=float(f)) for f in (fractions or [1.0])]


__all__ = ["Subset", "TrainSize", "subset_ids", "train_sizes", "train_subset"]
