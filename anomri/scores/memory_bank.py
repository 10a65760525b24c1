"""Per-pixel anomaly of a patch-memory model: each position's distance to the model's memory bank.

For a position with locally aware patch feature f (see
:meth:`~anomri.models.patch_memory.PatchMemory.patch_features`) and the memory
bank M of normal features,

    a(f) = min_{m in M} ||f - m||_2      (higher = more novel),

found exactly by the engine's own search
(:class:`~anomri.scores.indexes.EuclideanIndex`, the one the nearest-neighbour
scores use). The map is a(f) on the model's stride-4 grid, upsampled
(bilinear) to the input size, as PatchCore.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

from anomri.models.patch_memory import PatchMemory
from anomri.scores.indexes import EuclideanIndex

__all__ = ["MemoryBankMap"]


class MemoryBankMap:
    """The anomaly map of a :class:`PatchMemory` model, with its bank's index built once.

    Parameters
    ----------
    model : PatchMemory
        A trained model whose memory bank is filled
        (:meth:`~anomri.models.patch_memory.PatchMemory.build_memory`).
    """

    def __init__(self, model: PatchMemory) -> None:
        if not len(model.memory):
            raise RuntimeError("the memory bank is empty: build it (build_memory) before scoring")
        self.model = model
        self.index = EuclideanIndex(model.memory)

    @torch.no_grad()
    def nearest_distance(self, features: torch.Tensor) -> torch.Tensor:
        """Euclidean distance (Q,) from each of ``features`` (Q, 6 width) to its nearest memory-bank feature."""
        return self.index.min_sqdist(features).clamp_min(0.0).sqrt().to(features.dtype)

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """Per-pixel anomaly (N, S, S) of raw images (N, C, S, S)."""
        features = self.model.patch_features(images)
        n, dims, rows, cols = features.shape
        distance = self.nearest_distance(features.permute(0, 2, 3, 1).reshape(-1, dims)).reshape(n, 1, rows, cols)
        return F.interpolate(distance, size=self.model.in_shape[1:], mode="bilinear", align_corners=False)[:, 0]
