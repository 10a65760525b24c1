"""Structural similarity (Wang et al. 2004) as a training loss, its Gaussian windows applied as matrix products.

SSIM compares two images through five local means, each a Gaussian-weighted average over a window: of x, y,
x², y² and xy. MONAI's ``SSIMLoss`` computes each with a 2-D convolution of one channel, which oneDNN runs at a
small fraction of a CPU's speed (and its backward slower still). A Gaussian window is separable, so each local
mean is ``G_h @ m @ G_w.T`` with banded matrices holding the 1-D window: the same numbers, computed as two batched
matrix products for all five maps at once. On a DRAEM batch of eight 128 px images the loss and its gradient
take about a quarter of the convolutions' time on 2 CPU cores (``benchmarks/time_draem.py``), and agree with
MONAI's to float rounding (``tests/test_ssim.py``).
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["GaussianSSIMLoss"]


def gaussian_window(size: int, sigma: float) -> torch.Tensor:
    """The normalised 1-D Gaussian window of ``size`` taps (float64), centred between its ends."""
    offsets = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    window = torch.exp(-0.5 * (offsets / sigma) ** 2)
    return window / window.sum()


def window_matrix(length: int, window: torch.Tensor) -> torch.Tensor:
    """(length - size + 1, length) matrix whose row i applies ``window`` at positions i .. i + size - 1.

    Multiplying a signal by it is the window's *valid* correlation, the positions where the whole window fits
    (the convolution MONAI's SSIM runs, without padding).
    """
    size = len(window)
    if length < size:
        raise ValueError(f"images of {length} px are smaller than the SSIM window of {size} px")
    rows = torch.arange(length - size + 1)
    matrix = torch.zeros(length - size + 1, length, dtype=window.dtype)
    matrix[rows[:, None], rows[:, None] + torch.arange(size)] = window
    return matrix


class GaussianSSIMLoss(nn.Module):
    """1 - SSIM of 2-D images, averaged per image over channels and window positions, then over the batch.

    Parameters
    ----------
    win_size : int
        Side of the Gaussian window, px.
    sigma : float
        Its standard deviation, px (1.5, Wang et al.'s and MONAI's).
    data_range : float
        Range of the images' values; sets the stability constants (k1 L)² and (k2 L)².
    k1, k2 : float
        Stability constants' factors (0.01 and 0.03, Wang et al.'s).
    """

    def __init__(self, win_size: int = 7, sigma: float = 1.5, data_range: float = 1.0, k1: float = 0.01,
                 k2: float = 0.03) -> None:
        super().__init__()
        self.window = gaussian_window(win_size, sigma)
        self.c1 = (k1 * data_range) ** 2
        self.c2 = (k2 * data_range) ** 2

    def local_means(self, maps: torch.Tensor) -> torch.Tensor:
        """Gaussian-windowed means of ``maps`` (..., H, W) at every valid window position."""
        rows = window_matrix(maps.shape[-2], self.window).to(maps)
        columns = window_matrix(maps.shape[-1], self.window).to(maps)
        return rows @ maps @ columns.T

    def forward(self, prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """1 - SSIM between ``prediction`` and ``target`` (N, C, H, W); higher = less alike.

        Computed in float32 whatever the inputs' dtype: the local variances, E[x²] - E[x]², cancel to noise
        at fewer bits.
        """
        if prediction.shape != target.shape or prediction.ndim != 4:
            raise ValueError(f"SSIM needs two (N, C, H, W) images of one shape, got {tuple(prediction.shape)} "
                             f"and {tuple(target.shape)}")
        x, y = prediction.float(), target.float()
        mean_x, mean_y, mean_xx, mean_yy, mean_xy = self.local_means(
            torch.stack([x, y, x * x, y * y, x * y])).unbind(0)
        var_x = mean_xx - mean_x * mean_x
        var_y = mean_yy - mean_y * mean_y
        covariance = mean_xy - mean_x * mean_y
        luminance = (2 * mean_x * mean_y + self.c1) / (mean_x ** 2 + mean_y ** 2 + self.c1)
        contrast_structure = (2 * covariance + self.c2) / (var_x + var_y + self.c2)
        ssim = (luminance * contrast_structure).flatten(1).mean(1)
        return 1 - ssim.mean()
