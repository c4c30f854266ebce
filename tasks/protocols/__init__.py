"""Evaluation protocols on frozen features: registry and factory.

`create_protocol(name, **hparams)` is the one way the orchestrator builds a protocol: it is called
once per config at load time (without `task`, so the binary default is checked) to reject bad
hyperparameters before anything runs, and once per cell with the dataset's `task` and the seed.
"""

from __future__ import annotations

from typing import Any

from tasks.errors import ConfigError
from tasks.protocols.abmil import ABMIL
from tasks.protocols.base import PROTOCOLS, TASKS, Protocol, register_protocol
from tasks.protocols.convexadam_reg import ConvexAdamReg, MindConvexAdam
from tasks.protocols.em_affinity import EMAffinity
from tasks.protocols.knn import KNN
from tasks.protocols.linear_probe import LinearProbe
from tasks.protocols.seg2d_decoder import Seg2DDecoder
from tasks.protocols.seg2d_linear import Seg2DLinear
from tasks.protocols.seg3d_decoder import Seg3DDecoder

# Every protocol module is imported here: importing registers its class (@register_protocol).

__all__ = ["ABMIL", "KNN", "PROTOCOLS", "TASKS", "ConvexAdamReg", "EMAffinity", "LinearProbe", "MindConvexAdam",
           "Protocol", "Seg2DDecoder", "Seg2DLinear", "Seg3DDecoder", "create_protocol", "list_protocols",
           "protocols_for", "register_protocol"]


def list_protocols() -> list[str]:
    return sorted(PROTOCOLS)


def protocols_for(dataset_cls: Any) -> list[str]:
    """The registered protocols that can run on a dataset class (by target kind, item kind, task)."""
    return [n for n in list_protocols() if PROTOCOLS[n].accepts(dataset_cls) is None]


def create_protocol(name: str, **hparams: Any) -> Protocol:
    """A validated, unfitted protocol. ConfigError on an unknown protocol, an unknown
    hyperparameter or a bad value, naming it and listing what is valid."""
    cls = PROTOCOLS.get(name)
    if cls is None:
        raise ConfigError(f"unknown protocol {name!r}; valid protocols: {', '.join(list_protocols())}")
    cls.check_param_names(list(hparams))
    return cls(**hparams).validate()
