"""Dataset registry: every dataset a sweep can name, read in its official on-disk layout."""

from __future__ import annotations

import os

from tasks.datasets.acdc import ACDC
from tasks.datasets.autolaparo import AutoLaparo
from tasks.datasets.base import DATASETS, ImageDataset, Problem, register_dataset
from tasks.datasets.bcnb import BCNB
from tasks.datasets.camelyon import Camelyon16, Camelyon17
from tasks.datasets.camus import CAMUS
from tasks.datasets.ct_rate import CTRATE
from tasks.datasets.edd2020 import EDD2020
from tasks.datasets.em import AC3AC4, CREMI, CREMIA, CREMIB, CREMIC
from tasks.datasets.endovis18 import EndoVis18
from tasks.datasets.endovis18_types import EndoVis18Types
from tasks.datasets.kvasir_capsule import KvasirCapsule
from tasks.datasets.msd import MSD_DATASETS, MSDDataset
from tasks.datasets.nih14 import NIH14
from tasks.datasets.petct import HECKTOR22, AutoPET2
from tasks.datasets.rsna import RSNAPneumonia
from tasks.errors import ConfigError

# Every dataset module is imported here: importing registers its class (@register_dataset).
__all__ = ["AC3AC4", "ACDC", "BCNB", "CAMUS", "CREMI", "CREMIA", "CREMIB", "CREMIC", "CTRATE", "DATASETS",
           "EDD2020", "HECKTOR22", "MSD_DATASETS", "AutoLaparo", "AutoPET2", "Camelyon16", "Camelyon17",
           "EndoVis18", "EndoVis18Types", "ImageDataset", "KvasirCapsule", "MSDDataset", "NIH14", "Problem",
           "RSNAPneumonia", "dataset_class", "get_dataset", "list_datasets", "register_dataset"]


def list_datasets() -> list[str]:
    return sorted(DATASETS)


def dataset_class(name: str) -> type[ImageDataset]:
    try:
        return DATASETS[name]
    except KeyError:
        raise ConfigError(f"unknown dataset {name!r}; known: {', '.join(list_datasets())}") from None


def get_dataset(name: str, root: str | os.PathLike, **kwargs) -> ImageDataset:
    """`kwargs`: val_fraction, seed (how validation is carved where the release has none)."""
    return dataset_class(name)(root, **kwargs)
