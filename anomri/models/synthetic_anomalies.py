"""Synthetic anomalies for self-supervised training (DRAEM, Zavrtanik et al. 2021): Perlin-noise masks
filled with a foreign texture.

A mask is a superlevel set of 2-D Perlin gradient noise (random lattice
sizes per axis, randomly rotated), thresholded at the quantile that gives a
random area fraction in a configured range, so masks range from one smooth
blob to scattered specks. A share of the masks can instead be *ridges*: the
pixels nearest the noise's zero level, the same area spent on thin winding
curves, shaped like cracks and scratches, which blobs never are. The texture
pasted under it is, per image, one of

``self``
    another training image of the batch, rotated by a multiple of 90 degrees,
    possibly mirrored, and with its intensities transformed (gamma, contrast,
    brightness): normal surface put where it does not belong (turned grinding
    marks, shifted shading);
``procedural``
    Perlin noise of another lattice size mapped to a random intensity range:
    smooth stains, dark or bright spots.

Nothing is downloaded: DRAEM's own texture source, the DTD texture set, is
replaced by these two. The texture is blended with opacity:
``x' = x (1 - m) + m ((1 - beta) t + beta x)``, beta ~ U(0, ``MAX_OPACITY``),
and pixels outside the mask are left exactly as they were.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch.nn import functional as F

__all__ = ["MAX_OPACITY", "PERLIN_CELLS", "TEXTURE_SOURCES", "SyntheticBatch", "perlin_masks", "perlin_noise",
           "synthesize_anomalies"]

#: Range of Perlin lattice cells per side, drawn as powers of two (DRAEM: 2^0 .. 2^5 on 256 px images).
PERLIN_CELLS = (1, 16)
#: Largest weight of the original image inside the mask (DRAEM's beta ~ U(0, 0.8)).
MAX_OPACITY = 0.8
TEXTURE_SOURCES = ("both", "self", "procedural")


def _uniform(n: int, low: float, high: float, generator: torch.Generator, device: torch.device) -> torch.Tensor:
    return low + (high - low) * torch.rand(n, generator=generator, device=device)


def perlin_noise(angles: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """2-D Perlin gradient noise (H, W) from the gradient directions ``angles`` (ry + 1, rx + 1) at the lattice.

    The image is covered by ry x rx lattice cells; pixel centres at lattice
    coordinates u = (i + 0.5) ry / H, v = (j + 0.5) rx / W. Each pixel sums the
    dot products of its four corners' unit gradients with its offsets from
    them, blended by the quintic fade 6t^5 - 15t^4 + 10t^3, times sqrt(2), so
    values lie in [-1, 1] and vanish at lattice points.
    """
    height, width = int(shape[0]), int(shape[1])
    ry, rx = angles.shape[0] - 1, angles.shape[1] - 1
    gradients = torch.stack([torch.cos(angles), torch.sin(angles)], dim=-1)  # (ry + 1, rx + 1, 2)
    u = (torch.arange(height, device=angles.device, dtype=angles.dtype) + 0.5) * ry / height
    v = (torch.arange(width, device=angles.device, dtype=angles.dtype) + 0.5) * rx / width
    i0 = u.floor().long().clamp(max=ry - 1)
    j0 = v.floor().long().clamp(max=rx - 1)
    fu = (u - i0)[:, None].expand(height, width)
    fv = (v - j0)[None, :].expand(height, width)

    def corner(di: int, dj: int) -> torch.Tensor:
        g = gradients[(i0 + di)[:, None], (j0 + dj)[None, :]]
        return g[..., 0] * (fu - di) + g[..., 1] * (fv - dj)

    def fade(t: torch.Tensor) -> torch.Tensor:
        return t * t * t * (t * (6 * t - 15) + 10)

    tu, tv = fade(fu), fade(fv)
    top = torch.lerp(corner(0, 0), corner(0, 1), tv)
    bottom = torch.lerp(corner(1, 0), corner(1, 1), tv)
    return math.sqrt(2.0) * torch.lerp(top, bottom, tu)


def _random_perlin(n: int, size: int, generator: torch.Generator, device: torch.device) -> torch.Tensor:
    """``n`` noise fields (n, size, size), each with its own lattice size per axis."""
    low, high = (int(math.log2(c)) for c in PERLIN_CELLS)
    exponents = torch.randint(low, high + 1, (n, 2), generator=generator, device=device)
    fields = []
    for ey, ex in exponents.tolist():
        angles = 2 * math.pi * torch.rand((2**ey + 1, 2**ex + 1), generator=generator, device=device)
        fields.append(perlin_noise(angles, (size, size)))
    return torch.stack(fields)


def _rotate(images: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
    """Rotate (N, C, S, S) by ``angles`` (N,) radians about the centre (reflected at the border)."""
    cos, sin = torch.cos(angles), torch.sin(angles)
    zero = torch.zeros_like(cos)
    theta = torch.stack([torch.stack([cos, -sin, zero], -1), torch.stack([sin, cos, zero], -1)], 1)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="reflection", align_corners=False)


def perlin_masks(n: int, size: int, area: Sequence[float], generator: torch.Generator,
                 device: str | torch.device = "cpu", ridge_probability: float = 0.0) -> torch.Tensor:
    """``n`` boolean Perlin masks (n, size, size), each covering a fraction of the image drawn from U(``area``).

    Each mask holds the k = round(a size^2) (at least one) highest values of a
    rotated Perlin noise field f (rotation ~ U(-90, 90) degrees, as DRAEM), a =
    its drawn area fraction; with probability ``ridge_probability`` it holds
    instead the k values of smallest ``|f|``, a band along the zero level of f:
    thin curves for small areas, a wide winding band for large ones.
    """
    low, high = float(area[0]), float(area[1])
    if not 0.0 < low <= high <= 1.0:
        raise ValueError(f"mask area must satisfy 0 < min <= max <= 1; got {list(area)}")
    if not 0.0 <= ridge_probability <= 1.0:
        raise ValueError(f"ridge probability must lie in [0, 1]; got {ridge_probability}")
    device = torch.device(device)
    noise = _random_perlin(n, size, generator, device)
    noise = _rotate(noise[:, None], _uniform(n, -math.pi / 2, math.pi / 2, generator, device))[:, 0]
    fractions = _uniform(n, low, high, generator, device)
    counts = (fractions * size * size).round().clamp(1, size * size).long()
    if ridge_probability > 0:
        # Drawn only when ridges are asked for, so that blob-only masks draw the numbers they drew before
        # ridges existed and earlier runs reproduce.
        ridge = torch.rand(n, generator=generator, device=device) < ridge_probability
        noise = torch.where(ridge[:, None, None], -noise.abs(), noise)
    order = noise.flatten(1).argsort(dim=1, descending=True)
    ranks = torch.empty_like(order).scatter_(1, order, torch.arange(size * size, device=device).expand(n, -1))
    return (ranks < counts[:, None]).reshape(n, size, size)


def _self_textures(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Another image of the batch per image, turned, mirrored and with transformed intensities."""
    n, device = len(images), images.device
    shift = int(torch.randint(1, max(n, 2), (1,), generator=generator, device=device)) % max(n, 1)
    source = images.roll(shift, dims=0)
    turns = torch.randint(0, 4, (n,), generator=generator, device=device)
    mirror = torch.rand(n, generator=generator, device=device) < 0.5
    textures = torch.stack([torch.rot90(s, int(k), dims=(-2, -1)) for s, k in zip(source, turns.tolist())])
    textures = torch.where(mirror[:, None, None, None], textures.flip(-1), textures)
    gamma = torch.exp(_uniform(n, math.log(0.5), math.log(2.0), generator, device))[:, None, None, None]
    textures = textures.clamp(0, 1) ** gamma
    mean = textures.mean(dim=(1, 2, 3), keepdim=True)
    contrast = _uniform(n, 0.5, 2.0, generator, device)[:, None, None, None]
    brightness = _uniform(n, -0.3, 0.3, generator, device)[:, None, None, None]
    return ((textures - mean) * contrast + mean + brightness).clamp(0, 1)


def _procedural_textures(n: int, channels: int, size: int, generator: torch.Generator,
                         device: torch.device) -> torch.Tensor:
    """Perlin noise mapped to a random intensity range per image and channel."""
    noise = _random_perlin(n * channels, size, generator, device).reshape(n, channels, size, size)
    ends = torch.rand((2, n, channels, 1, 1), generator=generator, device=device)
    return ends[0] + (ends[1] - ends[0]) * (noise + 1) / 2


@dataclass
class SyntheticBatch:
    """Images with synthetic anomalies and where they are.

    Attributes
    ----------
    images : Tensor (N, C, S, S)
        The inputs with anomalies pasted in, in [0, 1].
    masks : Tensor (N, 1, S, S), float
        1 where an anomaly was pasted, else 0 (all 0 for images left normal).
    """

    images: torch.Tensor
    masks: torch.Tensor


def synthesize_anomalies(images: torch.Tensor, generator: torch.Generator, probability: float = 0.5,
                         area: Sequence[float] = (0.001, 0.3), source: str = "both",
                         ridge_probability: float = 0.0) -> SyntheticBatch:
    """Paste a Perlin-masked foreign texture into each of ``images`` (N, C, S, S) in [0, 1] with ``probability``.

    Parameters
    ----------
    images : Tensor (N, C, S, S)
        Normal images (square).
    generator : torch.Generator
        All randomness (masks, textures, opacities, which images get one).
    probability : float
        Chance that an image gets an anomaly; the others stay as they are
        (DRAEM: 0.5), so the networks also learn that normal images are normal.
    area : (min, max)
        Range of the masks' area, as fractions of the image.
    source : {"both", "self", "procedural"}
        Texture source (see the module docstring); ``both`` picks one per image.
    ridge_probability : float
        Chance that a mask is a ridge (thin curves) rather than blobs (:func:`perlin_masks`).
    """
    if source not in TEXTURE_SOURCES:
        raise ValueError(f"texture source must be one of {TEXTURE_SOURCES}; got {source!r}")
    n, channels, size = images.shape[0], images.shape[1], images.shape[-1]
    device = images.device
    masks = perlin_masks(n, size, area, generator, device, ridge_probability)[:, None]
    masks &= (torch.rand(n, generator=generator, device=device) < probability)[:, None, None, None]
    own = _self_textures(images, generator)
    procedural = _procedural_textures(n, channels, size, generator, device)
    if source == "both":
        use_own = (torch.rand(n, generator=generator, device=device) < 0.5)[:, None, None, None]
    else:
        use_own = torch.full((n, 1, 1, 1), source == "self", device=device)
    textures = torch.where(use_own, own, procedural)
    beta = _uniform(n, 0.0, MAX_OPACITY, generator, device)[:, None, None, None]
    blended = (1 - beta) * textures + beta * images
    return SyntheticBatch(torch.where(masks, blended, images), masks.to(images.dtype))
