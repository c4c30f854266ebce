"""Dense feature sources (tasks.dense.FeatureSource) that need no Ray: the online source, and the
one function that turns a Sample's images into patch-token maps, shared by the online source and
the dense extraction pipeline (so cached and online features are the same numbers).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from tasks.dense import Sample


def prepare_slices(images: np.ndarray, resolution: int, interpolation: str = "bicubic") -> np.ndarray:
    """uint8 (M, S, H, W[, 3]) -> uint8 (M, S, 3, r, r): every slice of every modality resized to the
    encoder's square input (tasks.preprocess.prepare_image; grey replicated to 3 channels)."""
    from tasks.preprocess import prepare_image

    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim not in (4, 5):
        raise ValueError(f"expected uint8 images (M, S, H, W[, 3]), got {images.shape} {images.dtype}")
    m, s = images.shape[:2]
    out = np.empty((m, s, 3, resolution, resolution), dtype=np.uint8)
    for i in range(m):
        for z in range(s):
            out[i, z] = prepare_image(images[i, z], resolution, interpolation)
    return out


def encode_prepared(encoder: Any, pixels: np.ndarray, layers: Sequence[int] | None = None,
                    batch_size: int = 16) -> torch.Tensor:
    """uint8 (M, S, 3, r, r) -> float32 (S, M*C, r/p, r/p) on the encoder's device: modalities
    concatenated on channels (each modality a grey image through the same encoder, the paper's
    handling of multi-modal MRI). The maps stay where they were computed: a head on the same GPU
    takes them without a round trip through host memory."""
    m, s = pixels.shape[:2]
    flat = pixels.reshape(m * s, *pixels.shape[2:])
    maps = [encoder.dense(torch.from_numpy(np.ascontiguousarray(flat[i:i + batch_size])), layers=layers)
            for i in range(0, len(flat), batch_size)]
    f = torch.cat(maps, dim=0)  # (M*S, C, h, w)
    c, h, w = f.shape[1:]
    return f.reshape(m, s, c, h, w).permute(1, 0, 2, 3, 4).reshape(s, m * c, h, w).contiguous()


def encode_sample(encoder: Any, sample: Sample, resolution: int, layers: Sequence[int] | None = None,
                  interpolation: str | None = None, batch_size: int = 16) -> torch.Tensor:
    """A Sample's patch-token maps, float32 (S, C, h, w), on the encoder's device."""
    interp = interpolation or getattr(encoder, "interpolation", "bicubic")
    return encode_prepared(encoder, prepare_slices(sample.images, resolution, interp), layers, batch_size)


class OnlineFeatures:
    """The frozen encoder runs beside the head: `features(case_id)` encodes the case on demand (an
    LRU of `keep` cases avoids re-encoding within an epoch when memory allows), and `encode` turns
    augmented pixels into maps for heads that augment (3D segmentation).

    dataset: a dense dataset (read_sample, index); modalities: how many grey images a case has."""

    kind = "online"

    def __init__(self, encoder: Any, dataset: Any, resolution: int, layers: Sequence[int] | None = None,
                 keep: int = 0, batch_size: int = 16):
        self.encoder, self.dataset, self.resolution = encoder, dataset, int(resolution)
        encoder.check_resolution(self.resolution)
        self.layers = encoder.check_layers(layers) or ()
        self.batch_size, self.keep = batch_size, keep
        per_layer = encoder.spec.embed_dim
        self.channels = int(getattr(dataset, "n_modalities", 1)) * max(1, len(self.layers)) * per_layer
        self.grid = self.resolution // encoder.spec.patch_size
        self._lru: OrderedDict[str, np.ndarray] = OrderedDict()
        self.n_encoded_slices = 0  # grey slices through the encoder so far (what a shared group saves)

    def case_ids(self, split: str | None = None) -> list[str]:
        idx = self.dataset.index()
        return [str(c) for c in (idx if split is None else idx[idx["split"] == split])["case_id"]]

    def sample(self, case_id: str) -> Sample:
        return self.dataset.read_sample(case_id)

    def encode(self, images: np.ndarray) -> torch.Tensor:
        """uint8 (M, S, H, W[, 3]) -> float32 (S, C, h, w), on the encoder's device."""
        pixels = prepare_slices(images, self.resolution, self.encoder.interpolation)
        self.n_encoded_slices += int(images.shape[0]) * int(images.shape[1])
        return encode_prepared(self.encoder, pixels, self.layers or None, self.batch_size)

    def features(self, case_id: str) -> np.ndarray:
        if case_id in self._lru:
            self._lru.move_to_end(case_id)
            return self._lru[case_id]
        f = self.encode(self.sample(case_id).images).cpu().numpy()  # the FeatureSource contract: host arrays
        if self.keep:
            self._lru[case_id] = f
            while len(self._lru) > self.keep:
                self._lru.popitem(last=False)
        return f
