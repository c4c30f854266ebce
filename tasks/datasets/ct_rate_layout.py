"""CT-RATE's published tree: the 18 label names, the label and metadata CSVs, where a volume lives.

Shared by the reader (ct_rate.py) and the synthetic writer (ct_rate_synth.py), so neither imports
the other's module to learn the layout (docs in ct_rate.py).
"""

from __future__ import annotations

from pathlib import Path

LABELS = ("Medical material", "Arterial wall calcification", "Cardiomegaly", "Pericardial effusion",
          "Coronary artery wall calcification", "Hiatal hernia", "Lymphadenopathy", "Emphysema",
          "Atelectasis", "Lung nodule", "Lung opacity", "Pulmonary fibrotic sequela", "Pleural effusion",
          "Mosaic attenuation pattern", "Peribronchial thickening", "Consolidation", "Bronchiectasis",
          "Interlobular septal thickening")
D = "dataset"
LABEL_FILES = {"train": f"{D}/multi_abnormality_labels/train_predicted_labels.csv",
               "valid": f"{D}/multi_abnormality_labels/valid_predicted_labels.csv"}
META_FILES = {"train": f"{D}/metadata/train_metadata.csv", "valid": f"{D}/metadata/validation_metadata.csv"}


def volume_path(root: Path, name: str) -> Path:
    """train_12_a_1.nii.gz -> root/dataset/train/train_12/train_12_a/train_12_a_1.nii.gz"""
    split, pid, scan = name.split("_")[:3]
    return root / D / split / f"{split}_{pid}" / f"{split}_{pid}_{scan}" / name
