"""Patch memory: local features learnt from normal images by CutPaste, kept in a PatchCore memory bank.

Two steps, both on normal training images only:

1. **Features.** A small residual CNN (MONAI ``Convolution`` and
   ``ResidualUnit`` blocks, four stride-2 levels of widths w, 2w, 4w, 8w) is
   trained on CutPaste's three-way proxy task (Li et al. 2021,
   :mod:`anomri.models.cutpaste`): normal image, image with a patch of itself
   pasted elsewhere, image with a thin scar of itself pasted elsewhere. To
   tell them apart it has to learn what normal local texture and its
   continuity look like, with no pretrained weights and nothing downloaded.
2. **Memory bank** (PatchCore, Roth et al. 2022, "Towards total recall in
   industrial anomaly detection"). The *locally aware patch features* are the
   feature maps of levels 2 and 3 (strides 4 and 8, 2w and 4w channels), each
   averaged over 3 x 3 neighbourhoods, the deeper one upsampled (bilinear) to
   the shallower one's grid, concatenated: a 6w-vector per position of an
   S/4 x S/4 grid. A random subset of ``positions`` per training image is
   pooled, and a greedy k-center coreset of it (:func:`greedy_coreset`, with
   distances in a random projection, as PatchCore) is kept: at most
   ``coreset_size`` features that cover the pool.

At test time each position's anomaly is the Euclidean distance from its
feature to the nearest feature of the bank (:class:`anomri.scores.memory_bank.MemoryBankMap`:
a score, so it lives in the scores layer).

Scaled down for a CPU: CutPaste trains a ResNet-18 for 256 epochs, PatchCore
uses an ImageNet WideResNet-50; the width, epochs, positions and coreset size
are settings (``patch_memory_*`` in ``config.yaml``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from monai.networks.blocks import Convolution, ResidualUnit
from torch import nn
from torch.nn import functional as F

from anomri.models.conv_vae import ChannelStandardizer, check_image_shape
from anomri.models.cutpaste import CLASSES

__all__ = ["CORESET_PROJECTION", "PatchMemory", "greedy_coreset", "random_projection"]

#: Dimensions of the random projection in which the coreset compares features (PatchCore's 128).
CORESET_PROJECTION = 128
#: Stride-2 levels of the network; the features come from levels 2 and 3 (1-based), strides 4 and 8.
N_LEVELS = 4
FEATURE_LEVELS = (1, 2)


def random_projection(n_features: int, n_components: int, generator: torch.Generator) -> torch.Tensor:
    """A Gaussian random projection (n_features, n_components), entries N(0, 1 / n_components).

    Squared distances between projected points are unbiased estimates of the
    original ones (Johnson-Lindenstrauss), at a fraction of the cost.
    """
    return torch.randn((n_features, n_components), generator=generator, device=generator.device) / n_components**0.5


def greedy_coreset(features: torch.Tensor, size: int, generator: torch.Generator,
                   projection_dim: int | None = CORESET_PROJECTION) -> torch.Tensor:
    """Indices of a greedy k-center coreset of ``features`` (M, D): at most ``size`` rows that cover the rest.

    Gonzalez's greedy: start from a random row, then repeatedly add the row
    farthest from those chosen, so the largest distance from any row to its
    nearest chosen one (the covering radius) is at most twice the smallest
    any ``size`` rows achieve. Distances are taken after a random projection to
    ``projection_dim`` dimensions (:func:`random_projection`; None, or at least
    D: the features themselves), as PatchCore does.

    Returns
    -------
    Tensor (min(size, M),), long
        The chosen rows in the order they were chosen; all rows, in order, when M <= ``size``.
    """
    n = len(features)
    if size >= n:
        return torch.arange(n, device=features.device)
    x = features.float()
    if projection_dim is not None and projection_dim < x.shape[1]:
        x = x @ random_projection(x.shape[1], projection_dim, generator).to(x.device)
    # ||x - c||^2 = ||x||^2 - 2 x.c + ||c||^2: one matrix-vector product per pick, no (M, D) temporary.
    sqnorm = (x * x).sum(1)
    first = int(torch.randint(0, n, (), generator=generator, device=generator.device))
    picks = [first]
    nearest = (sqnorm - 2.0 * (x @ x[first]) + sqnorm[first]).clamp_min(0.0)
    for _ in range(size - 1):
        pick = int(nearest.argmax())
        picks.append(pick)
        nearest = torch.minimum(nearest, (sqnorm - 2.0 * (x @ x[pick]) + sqnorm[pick]).clamp_min(0.0))
    return torch.tensor(picks, device=features.device)


class PatchMemory(nn.Module):
    """CutPaste-trained residual CNN, its locally aware patch features, and their memory bank.

    Parameters
    ----------
    in_shape : (C, S, S)
        Image shape; square, side divisible by 16.
    width : int
        Channels of the first level; each further level doubles them, and the
        patch features have 6 ``width`` dimensions.
    memory_size : int
        Rows of the memory bank (0 until :meth:`build_memory`; a checkpoint
        records it so that the bank can be loaded back).
    """

    kind = "patch-memory"

    def __init__(self, in_shape: Sequence[int], width: int = 16, memory_size: int = 0) -> None:
        super().__init__()
        self.in_shape = tuple(int(s) for s in in_shape)
        self.width = int(width)
        check_image_shape(self.in_shape, N_LEVELS)
        widths = [self.width * 2**level for level in range(N_LEVELS)]
        self.standardizer = ChannelStandardizer(self.in_shape[0])
        blocks: list[nn.Module] = [Convolution(2, self.in_shape[0], widths[0], strides=2, act="LEAKYRELU",
                                               norm="BATCH")]
        blocks += [ResidualUnit(2, widths[k - 1], widths[k], strides=2, act="LEAKYRELU", norm="BATCH")
                   for k in range(1, N_LEVELS)]
        self.levels = nn.ModuleList(blocks)
        # CutPaste's head: an MLP on the globally pooled last level, then the classes.
        self.head = nn.Sequential(nn.Linear(widths[-1], widths[-1]), nn.BatchNorm1d(widths[-1]),
                                  nn.LeakyReLU(), nn.Linear(widths[-1], len(CLASSES)))
        self.feature_size = sum(widths[k] for k in FEATURE_LEVELS)
        self.register_buffer("memory", torch.zeros(int(memory_size), self.feature_size))

    def _level_maps(self, images: torch.Tensor, last: int) -> list[torch.Tensor]:
        """Feature maps of levels 0 .. ``last`` of raw images (N, C, S, S)."""
        x = self.standardizer(images)
        maps = []
        for level in self.levels[:last + 1]:
            x = level(x)
            maps.append(x)
        return maps

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        """Class scores (N, 3) of raw images for the proxy task (:data:`~anomri.models.cutpaste.CLASSES`)."""
        deepest = self._level_maps(images, N_LEVELS - 1)[-1]
        return self.head(deepest.mean(dim=(-2, -1)))

    def loss(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy of the proxy task on raw images and their labels."""
        return F.cross_entropy(self.logits(images), labels)

    def patch_features(self, images: torch.Tensor) -> torch.Tensor:
        """Locally aware patch features (N, 6 width, S/4, S/4) of raw images (N, C, S, S)."""
        maps = self._level_maps(images, max(FEATURE_LEVELS))
        grid = maps[FEATURE_LEVELS[0]].shape[-2:]
        # 3 x 3 neighbourhood means; at the border, of the neighbours there are (zero padding would make
        # every border position look unlike the interior).
        pooled = [F.avg_pool2d(maps[k], 3, stride=1, padding=1, count_include_pad=False) for k in FEATURE_LEVELS]
        pooled = [p if p.shape[-2:] == grid else F.interpolate(p, size=grid, mode="bilinear", align_corners=False)
                  for p in pooled]
        return torch.cat(pooled, dim=1)

    @torch.no_grad()
    def build_memory(self, images: torch.Tensor, positions: int, coreset_size: int, generator: torch.Generator,
                     batch_size: int = 32) -> None:
        """Fill the memory bank from normal raw images (N, C, S, S).

        Takes ``positions`` random grid positions per image (all when there are
        fewer), then a greedy coreset (:func:`greedy_coreset`) of at most
        ``coreset_size`` of the pooled features. Leaves the model in eval mode.
        """
        self.eval()
        pool = []
        for first in range(0, len(images), batch_size):
            features = self.patch_features(images[first:first + batch_size]).flatten(2).transpose(1, 2)
            n, grid_size, _ = features.shape
            if positions < grid_size:
                keys = torch.rand((n, grid_size), generator=generator, device=generator.device)
                chosen = keys.argsort(dim=1)[:, :positions].to(features.device)
                features = torch.gather(features, 1, chosen[..., None].expand(-1, -1, features.shape[-1]))
            pool.append(features.reshape(-1, features.shape[-1]))
        bank = torch.cat(pool)
        self.memory = bank[greedy_coreset(bank, coreset_size, generator)].contiguous()

    def hparams(self) -> dict:
        """Constructor arguments, for rebuilding the model (and the bank's shape) from a checkpoint."""
        return {"in_shape": list(self.in_shape), "width": self.width, "memory_size": len(self.memory)}
