"""Errors a user can act on. Each names the file or setting at fault and what to do."""

from __future__ import annotations


class MedscaleError(Exception):
    """Base class: messages are meant for the person running medscale."""


class ConfigError(MedscaleError):
    """A sweep config or an argument is invalid."""


class WeightsError(MedscaleError):
    """Encoder weights are missing, unreadable or unsafe."""


class DatasetError(MedscaleError):
    """A dataset file is missing or malformed. `path` names the file, `problem` says what is wrong."""

    def __init__(self, path: str, problem: str):
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")
