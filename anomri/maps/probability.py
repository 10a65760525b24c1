"""Lesion probability from novelty scores, calibrated on healthy controls never seen in training."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from anomri.io.atomic import atomic_path
from anomri.maps.postprocess import PostProcessing


class EmpiricalNull:
    """Empirical distribution of each score over healthy calibration voxels.

    Parameters
    ----------
    values : dict of str to ndarray
        Score id to the healthy voxels' scores.
    postprocessing : PostProcessing
        The spatial post-processing the scores went through; patients' maps
        must go through the same before :meth:`cdf`.
    """

    def __init__(self, values: dict[str, np.ndarray], postprocessing: PostProcessing = PostProcessing()) -> None:
        self.sorted = {k: np.sort(np.asarray(v, np.float64).ravel()) for k, v in values.items()}
        self.postprocessing = postprocessing

    def cdf(self, score_id: str, scores: np.ndarray) -> np.ndarray:
        """F(s) = #{healthy voxels with score <= s} / #{healthy voxels}, in [0, 1].

        A voxel scoring above every healthy voxel gets 1; with higher = more
        novel, 1 - F(s) is the empirical tail probability of a healthy voxel
        scoring at least as high.
        """
        null = self.sorted[score_id]
        return (np.searchsorted(null, scores, side="right") / len(null)).astype(np.float32)

    def save(self, path: str | Path) -> None:
        """Write the sorted null values to an ``.npz`` file atomically."""
        arrays = {f"score/{k}": v.astype(np.float32) for k, v in self.sorted.items()}
        with atomic_path(path) as tmp, open(tmp, "wb") as fh:
            np.savez_compressed(fh, postprocessing=json.dumps(self.postprocessing.record()), **arrays)

    @classmethod
    def load(cls, path: str | Path) -> EmpiricalNull:
        with np.load(path) as data:
            values = {k.removeprefix("score/"): data[k] for k in data.files if k.startswith("score/")}
            return cls(values, PostProcessing(**json.loads(str(data["postprocessing"]))))
