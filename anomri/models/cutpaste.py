"""CutPaste (Li et al. 2021, "CutPaste: self-supervised learning for anomaly detection and localization"):
a proxy task that teaches a network what local irregularities look like, from normal images only.

A patch is cut from an image and pasted back into the *same* image somewhere
else, its intensities jittered; the network learns to tell three kinds of
images apart (:func:`three_way_batch`):

``normal`` (label 0)
    the image as it is;
``cut-paste`` (label 1)
    a rectangle of 2 % to 15 % of the image, aspect ratio 0.3 to 3.3
    (log-uniform), pasted elsewhere (CutPaste's);
``scar`` (label 2)
    a thin rotated bar, 1 % to 3 % of the side wide and 8 % to 25 % long,
    pasted elsewhere.

CutPaste's scars (2-16 px by 10-25 px on 256 px images) can be as wide as
they are long; here they are kept thin, like the cracks and scratches they
stand for, since the cut-paste class already covers blobs. CutPaste turns the
scar's content with its outline; here the content is only translated (the
outline is turned), so every pasted pixel is a jittered copy of the pixel at
one fixed offset: the normal texture, in the wrong place. The jitter is an
affine change of intensity, gain U(0.9, 1.1) and bias U(-0.1, 0.1) (CutPaste's
colour jitter is 0.1 in brightness and contrast), clipped to [0, 1]; pixels
outside the pasted region stay exactly as they were.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

__all__ = ["CLASSES", "CUT_AREA", "CUT_ASPECT", "JITTER", "SCAR_LENGTH", "SCAR_WIDTH", "PastedPatches",
           "cut_paste", "patch_outline", "three_way_batch"]

#: The proxy task's classes, in label order.
CLASSES = ("normal", "cut-paste", "scar")
#: Area of a cut-paste rectangle, as a fraction of the image (CutPaste's).
CUT_AREA = (0.02, 0.15)
#: Height / width of a cut-paste rectangle, drawn log-uniformly (CutPaste's).
CUT_ASPECT = (0.3, 3.3)
#: Width and length of a scar, as fractions of the image side (widths below one pixel are raised to one).
SCAR_WIDTH = (0.01, 0.03)
SCAR_LENGTH = (0.08, 0.25)
#: Half-range of the intensity jitter of a pasted patch: gain in 1 +- JITTER, bias in +- JITTER.
JITTER = 0.1


def _draw(low: float, high: float, generator: torch.Generator) -> float:
    """One number from U(low, high)."""
    return low + (high - low) * float(torch.rand((), generator=generator, device=generator.device))


def _corner(height: int, width: int, size: int, generator: torch.Generator) -> tuple[int, int]:
    """A random top-left corner at which a ``height`` x ``width`` box lies inside a ``size`` px image."""
    return tuple(int(torch.randint(0, size - side + 1, (), generator=generator, device=generator.device))
                 for side in (height, width))


def patch_outline(kind: str, size: int, generator: torch.Generator) -> torch.Tensor:
    """The boolean outline (h, w) of one patch of ``kind`` ("cut-paste" or "scar") for a ``size`` px image.

    A cut-paste outline fills its box. A scar is the set of pixel centres
    within length / 2 along and width / 2 across a bar through the box's
    centre, turned by an angle drawn from U(-90, 90) degrees (every
    orientation: surfaces have no upright), so its box is the bar's bounding box.
    """
    if kind == "cut-paste":
        area = _draw(*CUT_AREA, generator) * size * size
        aspect = math.exp(_draw(math.log(CUT_ASPECT[0]), math.log(CUT_ASPECT[1]), generator))
        height = min(max(round(math.sqrt(area * aspect)), 1), size)
        width = min(max(round(math.sqrt(area / aspect)), 1), size)
        return torch.ones((height, width), dtype=torch.bool)
    if kind != "scar":
        raise ValueError(f"patch kind must be 'cut-paste' or 'scar'; got {kind!r}")
    length = _draw(*SCAR_LENGTH, generator) * size
    width = max(_draw(*SCAR_WIDTH, generator) * size, 1.0)
    angle = _draw(-math.pi / 2, math.pi / 2, generator)
    cos, sin = math.cos(angle), math.sin(angle)
    # Half sides of the bar's bounding box (the bar runs along (cos, sin) in (row, column) coordinates).
    half_rows = min(math.ceil(0.5 * (length * abs(cos) + width * abs(sin))), (size - 1) // 2)
    half_cols = min(math.ceil(0.5 * (length * abs(sin) + width * abs(cos))), (size - 1) // 2)
    rows = torch.arange(-half_rows, half_rows + 1, dtype=torch.float64)[:, None]
    cols = torch.arange(-half_cols, half_cols + 1, dtype=torch.float64)[None, :]
    along = rows * cos + cols * sin
    across = -rows * sin + cols * cos
    return (along.abs() <= 0.5 * length) & (across.abs() <= 0.5 * width)


@dataclass
class PastedPatches:
    """Images with one patch of their own pasted in, and how.

    Attributes
    ----------
    images : Tensor (N, C, S, S)
        The images with the patch pasted, in [0, 1].
    masks : Tensor (N, 1, S, S), bool
        Where a patch was pasted; the only pixels that may differ from the input.
    offsets : Tensor (N, 2), long
        (rows, columns) from each patch's source to its destination: pasted pixel
        p holds the jittered input pixel p - offset.
    gain, bias : Tensor (N,)
        The jitter: pasted value = clip(gain * source value + bias, 0, 1).
    """

    images: torch.Tensor
    masks: torch.Tensor
    offsets: torch.Tensor
    gain: torch.Tensor
    bias: torch.Tensor


def cut_paste(images: torch.Tensor, kind: str, generator: torch.Generator) -> PastedPatches:
    """Paste one patch of ``kind`` ("cut-paste" or "scar"), cut from the same image, into each of ``images``.

    Parameters
    ----------
    images : Tensor (N, C, S, S)
        Square images in [0, 1]; left unchanged.
    kind : {"cut-paste", "scar"}
    generator : torch.Generator
        All randomness (outlines, source and destination places, jitter).
    """
    n, size = images.shape[0], images.shape[-1]
    out = images.clone()
    masks = torch.zeros((n, 1, size, size), dtype=torch.bool, device=images.device)
    offsets = torch.zeros((n, 2), dtype=torch.long)
    gain, bias = torch.empty(n), torch.empty(n)
    for i in range(n):
        outline = patch_outline(kind, size, generator)
        height, width = outline.shape
        source, target = _corner(height, width, size, generator), _corner(height, width, size, generator)
        gain[i] = _draw(1.0 - JITTER, 1.0 + JITTER, generator)
        bias[i] = _draw(-JITTER, JITTER, generator)
        offsets[i] = torch.tensor([target[0] - source[0], target[1] - source[1]])
        where = outline.to(images.device)
        patch = images[i, :, source[0]:source[0] + height, source[1]:source[1] + width]
        pasted = (gain[i] * patch + bias[i]).clamp(0.0, 1.0)
        region = out[i, :, target[0]:target[0] + height, target[1]:target[1] + width]
        region[:, where] = pasted[:, where]
        masks[i, 0, target[0]:target[0] + height, target[1]:target[1] + width] = where
    return PastedPatches(out, masks, offsets.to(images.device), gain.to(images.device), bias.to(images.device))


def three_way_batch(images: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """CutPaste's three-way task on ``images`` (N, C, S, S): (inputs (3N, C, S, S), labels (3N,)).

    Every image comes three times, as it is, with a cut-paste patch and with a
    scar (labels 0, 1, 2, :data:`CLASSES`), so each batch is balanced.
    """
    n = len(images)
    inputs = torch.cat([images, cut_paste(images, "cut-paste", generator).images,
                        cut_paste(images, "scar", generator).images])
    labels = torch.arange(len(CLASSES), device=images.device).repeat_interleave(n)
    return inputs, labels
