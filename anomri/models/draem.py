"""DRAEM (Zavrtanik et al. 2021, "DRAEM: a discriminatively trained reconstruction embedding for surface
anomaly detection"): learn to segment anomalies from synthetic ones, on normal images only.

Two networks, trained jointly on normal images with synthetic anomalies pasted
in (:func:`~anomri.models.synthetic_anomalies.synthesize_anomalies`):

* the **reconstructive network** R, a MONAI ``AutoEncoder`` (strided
  convolutions down and transposed convolutions up, no skip connections, so it
  cannot copy its input through), maps an image with anomalies to the normal
  image, loss L2 + (1 - SSIM) in the images' own [0, 1] units;
* the **discriminative network** D, a MONAI ``UNet``, sees the image and its
  reconstruction side by side (2C channels) and segments where they disagree
  in a way normal images never do, focal loss (gamma 2) against the pasted
  mask. Its gradient also reaches R, as in DRAEM.

At test time the anomaly map is D's probability sigmoid(D(x, R(x))) per pixel;
no synthetic anomalies are involved. Because D learns the *difference* between
an image and its normal reconstruction, it generalises to defects unlike the
synthetic ones.

Scaled down for a CPU (DRAEM: widths up to 1024, 700 epochs): widths,
epochs and learning rate are settings (``draem_*`` in ``config.yaml``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from monai.losses import FocalLoss
from monai.networks.nets import AutoEncoder, UNet
from torch import nn

from anomri.models.conv_vae import ChannelStandardizer, check_image_shape
from anomri.models.ssim import GaussianSSIMLoss

__all__ = ["DRAEM"]

#: Focusing parameter of the focal loss (DRAEM's); the easy, normal pixels count little.
FOCAL_GAMMA = 2.0
#: SSIM window, px: DRAEM's 11 px on 256 px images, scaled to the 128 px default.
SSIM_WINDOW = 7


class DRAEM(nn.Module):
    """Reconstructive auto-encoder and discriminative U-Net of DRAEM, with input standardisation.

    Parameters
    ----------
    in_shape : (C, S, S)
        Image shape; square, side divisible by ``2 ** len(reconstruction_channels)``.
    reconstruction_channels : sequence of int
        Widths of R, one stride-2 level each.
    segmentation_channels : sequence of int
        Widths of D, one level each: the first at full resolution (as DRAEM's, so
        thin defects keep their width in the map), each further one at half the
        previous resolution.
    """

    kind = "draem"

    def __init__(self, in_shape: Sequence[int], reconstruction_channels: Sequence[int] = (32, 64, 128, 256),
                 segmentation_channels: Sequence[int] = (16, 32, 64, 128)) -> None:
        super().__init__()
        self.in_shape = tuple(int(s) for s in in_shape)
        self.reconstruction_channels = tuple(int(c) for c in reconstruction_channels)
        self.segmentation_channels = tuple(int(c) for c in segmentation_channels)
        if len(self.segmentation_channels) < 2:
            raise ValueError("the segmentation U-Net needs at least two levels")
        check_image_shape(self.in_shape, max(len(self.reconstruction_channels), len(self.segmentation_channels) - 2))
        n_channels = self.in_shape[0]
        self.standardizer = ChannelStandardizer(n_channels)
        self.reconstructor = AutoEncoder(2, n_channels, n_channels, self.reconstruction_channels,
                                         [2] * len(self.reconstruction_channels), act="LEAKYRELU", norm="BATCH")
        self.segmenter = UNet(2, 2 * n_channels, 1, self.segmentation_channels,
                              [1] + [2] * (len(self.segmentation_channels) - 2), act="LEAKYRELU", norm="BATCH")
        self.focal = FocalLoss(gamma=FOCAL_GAMMA)
        self.ssim = GaussianSSIMLoss(SSIM_WINDOW)

    def standardize(self, images: torch.Tensor) -> torch.Tensor:
        """Raw images (N, C, S, S) in [0, 1] to the networks' standardised inputs."""
        return self.standardizer(images)

    def reconstruct(self, images: torch.Tensor) -> torch.Tensor:
        """R's normal version of raw images (N, C, S, S), in raw [0, 1] units."""
        s = self.standardizer
        return self.reconstructor(self.standardize(images)) * s.channel_std + s.channel_mean

    def segment(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(reconstruction (N, C, S, S), anomaly logits (N, 1, S, S)) of raw images."""
        reconstruction = self.reconstruct(images)
        pair = torch.cat([self.standardize(images), self.standardize(reconstruction)], dim=1)
        return reconstruction, self.segmenter(pair)

    def losses(self, normal: torch.Tensor, corrupted: torch.Tensor, masks: torch.Tensor,
               autocast: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        """DRAEM's losses on one batch: raw normal images, the same with synthetic anomalies, and their masks.

        Returns ``loss`` = ``l2`` + ``ssim`` + ``focal`` (batch means; ``ssim``
        is 1 - SSIM between reconstruction and normal image). With ``autocast``
        (a reduced dtype) the networks run autocast to it, the losses in float32:
        SSIM's local variances, E[x^2] - E[x]^2, cancel to noise in bfloat16.
        """
        with torch.autocast(corrupted.device.type, dtype=autocast or torch.bfloat16, enabled=autocast is not None):
            reconstruction, logits = self.segment(corrupted)
        reconstruction, logits = reconstruction.float(), logits.float()
        l2 = ((reconstruction - normal) ** 2).mean()
        ssim = self.ssim(reconstruction, normal)
        focal = self.focal(logits, masks)
        return {"loss": l2 + ssim + focal, "l2": l2, "ssim": ssim, "focal": focal}

    @torch.no_grad()
    def anomaly_map(self, images: torch.Tensor) -> torch.Tensor:
        """Per-pixel anomaly probability (N, S, S) of raw images."""
        return torch.sigmoid(self.segment(images)[1])[:, 0]

    def hparams(self) -> dict:
        """Constructor arguments, for rebuilding the model from a checkpoint."""
        return {"in_shape": list(self.in_shape), "reconstruction_channels": list(self.reconstruction_channels),
                "segmentation_channels": list(self.segmentation_channels)}
