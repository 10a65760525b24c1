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

A share of the anomalies can instead be *large and faint* (:func:`faint_anomalies`):
a soft-edged region over 10-50 % of the image in which the image itself is
changed a little (brightness, gamma, contrast, blur, low-frequency shading, or
another normal image), ``x' = x + alpha (t(x) - x)`` with ``alpha`` in [0, 1]
falling smoothly to 0 at the border. Pasted textures are local and sharp-edged;
a surface that is uneven over a quarter of its area is neither, and a network
that only ever saw pasted textures does not flag it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch.nn import functional as F

__all__ = ["FAINT_CHANGES", "MAX_OPACITY", "PERLIN_CELLS", "TEXTURE_SOURCES", "SyntheticBatch", "faint_anomalies",
           "perlin_masks", "perlin_noise", "soft_masks", "synthesize_anomalies"]

#: Range of Perlin lattice cells per side, drawn as powers of two (DRAEM: 2^0 .. 2^5 on 256 px images).
PERLIN_CELLS = (1, 16)
#: Largest weight of the original image inside the mask (DRAEM's beta ~ U(0, 0.8)).
MAX_OPACITY = 0.8
TEXTURE_SOURCES = ("both", "self", "procedural")
#: What a large faint anomaly does to the image inside its region (:func:`faint_anomalies`).
FAINT_CHANGES = ("brightness", "gamma", "contrast", "blur", "shading", "other-image")
#: Lattice cells per side of the noise behind soft masks and shading: 2^0 .. 2^2, so regions are large and smooth.
FAINT_CELLS = (1, 4)


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
        # Rows, then columns: two index_selects copy the same values as one broadcast advanced index, ten times faster.
        g = gradients.index_select(0, i0 + di).index_select(1, j0 + dj)
        return g[..., 0] * (fu - di) + g[..., 1] * (fv - dj)

    def fade(t: torch.Tensor) -> torch.Tensor:
        return t * t * t * (t * (6 * t - 15) + 10)

    tu, tv = fade(fu), fade(fv)
    top = torch.lerp(corner(0, 0), corner(0, 1), tv)
    bottom = torch.lerp(corner(1, 0), corner(1, 1), tv)
    return math.sqrt(2.0) * torch.lerp(top, bottom, tu)


def _random_perlin(n: int, size: int, generator: torch.Generator, device: torch.device,
                   cells: Sequence[int] = PERLIN_CELLS) -> torch.Tensor:
    """``n`` noise fields (n, size, size), each with its own lattice size per axis, drawn from ``cells``."""
    low, high = (int(math.log2(c)) for c in cells)
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


def soft_masks(n: int, size: int, area: Sequence[float], generator: torch.Generator,
               device: str | torch.device = "cpu") -> torch.Tensor:
    """``n`` soft masks (n, size, size) in (0, 1): smooth regions whose 0.5 level covers a fraction U(``area``).

    A low-frequency Perlin field f (:data:`FAINT_CELLS`, rotated) is mapped to
    ``sigmoid((f - t) / w)``, t the quantile of f leaving the drawn fraction above
    it and w ~ U(0.1, 0.5) std(f) the border's width: a few pixels to most of the region.
    """
    low, high = float(area[0]), float(area[1])
    if not 0.0 < low <= high < 1.0:
        raise ValueError(f"soft mask area must satisfy 0 < min <= max < 1; got {list(area)}")
    device = torch.device(device)
    noise = _random_perlin(n, size, generator, device, FAINT_CELLS)
    noise = _rotate(noise[:, None], _uniform(n, -math.pi / 2, math.pi / 2, generator, device))[:, 0].flatten(1)
    fractions = _uniform(n, low, high, generator, device)
    thresholds = torch.stack([torch.quantile(f, 1 - a) for f, a in zip(noise, fractions)])
    widths = _uniform(n, 0.1, 0.5, generator, device) * noise.std(dim=1).clamp_min(1e-6)
    return torch.sigmoid((noise - thresholds[:, None]) / widths[:, None]).reshape(n, size, size)


def _signed(n: int, low: float, high: float, generator: torch.Generator, device: torch.device) -> torch.Tensor:
    """U(low, high) with a random sign: a change of at least ``low``, up or down."""
    sign = torch.where(torch.rand(n, generator=generator, device=device) < 0.5, -1.0, 1.0)
    return sign * _uniform(n, low, high, generator, device)


def _gaussian_blur(images: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """Blur each of (N, C, S, S) with its own Gaussian std ``sigmas`` (N,) px, reflected at the border."""
    radius = int(math.ceil(3 * float(sigmas.max())))
    offsets = torch.arange(-radius, radius + 1, device=images.device, dtype=images.dtype)
    kernels = torch.exp(-0.5 * (offsets[None] / sigmas[:, None]) ** 2)
    kernels = kernels / kernels.sum(dim=1, keepdim=True)
    out = []
    for image, kernel in zip(images, kernels):
        channels = image.shape[0]
        x = F.pad(image[None], (radius, radius, radius, radius), mode="reflect")
        x = F.conv2d(x, kernel.view(1, 1, 1, -1).expand(channels, 1, 1, -1), groups=channels)
        out.append(F.conv2d(x, kernel.view(1, 1, -1, 1).expand(channels, 1, -1, 1), groups=channels))
    return torch.cat(out)


def faint_anomalies(images: torch.Tensor, generator: torch.Generator, area: Sequence[float] = (0.1, 0.5),
                    others: torch.Tensor | None = None) -> SyntheticBatch:
    """A large, faint, soft-edged change of each of ``images`` (N, C, S, S) in [0, 1].

    Per image a soft mask alpha (:func:`soft_masks`) and one change t(x) of
    :data:`FAINT_CHANGES`, with its strength drawn away from no change:
    brightness x + d, |d| ~ U(0.05, 0.25); gamma x^g, |log g| ~ U(log 1.25, log 2);
    contrast m + c (x - m) around the image mean m, |log c| ~ U(log 1.25, log 2.5);
    Gaussian blur, std U(1.5, 5) px; shading x (1 + s g), g low-frequency Perlin
    noise in [-1, 1], s ~ U(0.15, 0.5); or another normal image, the same index
    of ``others`` (default: another image of the batch). The result
    ``x + alpha (t(x) - x)``, t(x) clipped to [0, 1], has the mask ``alpha >= 0.5``.
    """
    n, channels, size = images.shape[0], images.shape[1], images.shape[-1]
    device = images.device
    alpha = soft_masks(n, size, area, generator, device)[:, None]
    changes = torch.randint(0, len(FAINT_CHANGES), (n,), generator=generator, device=device)
    per_image = (n, 1, 1, 1)
    mean = images.mean(dim=(1, 2, 3), keepdim=True)
    shading = _random_perlin(n, size, generator, device, FAINT_CELLS)[:, None]
    if others is None:
        shift = int(torch.randint(1, max(n, 2), (1,), generator=generator, device=device)) % max(n, 1)
        others = images.roll(shift, dims=0)
    candidates = torch.stack([
        images + _signed(n, 0.05, 0.25, generator, device).view(per_image),
        images.clamp(0, 1) ** torch.exp(_signed(n, math.log(1.25), math.log(2.0), generator, device)).view(per_image),
        mean + (images - mean) * torch.exp(_signed(n, math.log(1.25), math.log(2.5), generator, device)).view(per_image),
        _gaussian_blur(images, _uniform(n, 1.5, 5.0, generator, device)),
        images * (1 + _uniform(n, 0.15, 0.5, generator, device).view(per_image) * shading),
        others,
    ])
    changed = candidates[changes, torch.arange(n, device=device)].clamp(0, 1)
    return SyntheticBatch(images + alpha * (changed - images), (alpha >= 0.5).to(images.dtype))


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


def synthesize_anomalies(images: torch.Tensor, generator: torch.Generator, probability: float = 0.5,
                         area: Sequence[float] = (0.001, 0.3), source: str = "both",
                         ridge_probability: float = 0.0, faint_probability: float = 0.0,
                         faint_area: Sequence[float] = (0.1, 0.5)) -> SyntheticBatch:
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
    faint_probability : float
        Chance that an image's anomaly is large and faint (:func:`faint_anomalies`) instead of a pasted texture.
    faint_area : (min, max)
        Range of the faint anomalies' area (their mask's 0.5 level), as fractions of the image.
    """
    if source not in TEXTURE_SOURCES:
        raise ValueError(f"texture source must be one of {TEXTURE_SOURCES}; got {source!r}")
    n, channels, size = images.shape[0], images.shape[1], images.shape[-1]
    device = images.device
    if not 0.0 <= faint_probability <= 1.0:
        raise ValueError(f"faint anomaly probability must lie in [0, 1]; got {faint_probability}")
    masks = perlin_masks(n, size, area, generator, device, ridge_probability)[:, None]
    chosen = (torch.rand(n, generator=generator, device=device) < probability)[:, None, None, None]
    masks &= chosen
    own = _self_textures(images, generator)
    procedural = _procedural_textures(n, channels, size, generator, device)
    if source == "both":
        use_own = (torch.rand(n, generator=generator, device=device) < 0.5)[:, None, None, None]
    else:
        use_own = torch.full((n, 1, 1, 1), source == "self", device=device)
    textures = torch.where(use_own, own, procedural)
    beta = _uniform(n, 0.0, MAX_OPACITY, generator, device)[:, None, None, None]
    blended = (1 - beta) * textures + beta * images
    result = SyntheticBatch(torch.where(masks, blended, images), masks.to(images.dtype))
    if faint_probability > 0:
        # Drawn last and only when asked for, so that runs without faint anomalies reproduce earlier ones.
        # Only the images that get one are changed (the changes cost as much as the rest of the batch).
        faint = (chosen[:, 0, 0, 0] & (torch.rand(n, generator=generator, device=device) < faint_probability))
        index = faint.nonzero()[:, 0]
        if len(index):
            large = faint_anomalies(images[index], generator, faint_area, others=images.roll(1, dims=0)[index])
            result.images[index], result.masks[index] = large.images, large.masks
    return result
