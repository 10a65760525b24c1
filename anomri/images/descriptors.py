"""Image-level novelty from global descriptors: evidence that does not sit in a map's peak.

Map-based image scores (``map-max``, ``map-top``) look at the most anomalous
few pixels. A defect that covers a large part of the image with low contrast
and soft borders (the magnetic tiles' *uneven* type) raises no peak: every
pixel is only a little off, but the image as a whole is unlike the normal
ones. This module describes each image by a vector of global statistics and
models the normal vectors:

``intensity``
    mean, standard deviation and quantiles of the pixel values;
``spectrum``
    the mean-square power of the image (mean removed, periodic Hann window of
    unit mean square) in radial frequency bands an octave wide, log10: a
    large, soft change adds power to the lowest bands;
``local``
    at each Gaussian scale sigma: the local mean ``G * x``, the local standard
    deviation ``sqrt(G * x^2 - (G * x)^2)`` and the gradient magnitude of
    ``G * x``, each summarised by its mean, standard deviation and quantiles
    over the image.

Images are first reduced to one channel (the mean of the colour channels) and
resized to ``size`` x ``size``, so descriptors of images of any size are
comparable; ``scales`` and the spectrum's bands are in pixels and cycles of
that grid.

:class:`GlobalDescriptorModel` fits normal descriptor vectors (dipy's Model /
Fit style): a robust standardisation (median, MAD) and then one of

``ledoit-wolf``
    Mahalanobis distance under the Ledoit-Wolf shrunk covariance (many
    descriptors are strongly correlated, and 60 dimensions from a few
    hundred images need shrinkage);
``mcd``
    Mahalanobis distance under the minimum covariance determinant (robust to
    a few odd normal images);
``knn``
    mean Euclidean distance to the ``k`` nearest normal vectors (no Gaussian
    assumption).

Higher scores are more novel. Calibration against held-back normal images and
fusion with other image scores are in :mod:`anomri.images.fusion`.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image
from scipy import ndimage
from scipy.spatial.distance import cdist
from sklearn.covariance import LedoitWolf, MinCovDet

from anomri.images.settings import DESCRIPTOR_ESTIMATORS

logger = logging.getLogger(__name__)

__all__ = ["DESCRIPTOR_GROUPS", "ESTIMATORS", "GlobalDescriptorFit", "GlobalDescriptorModel", "band_edges",
           "descriptor_names", "extract_descriptors", "local_maps", "prepare_image", "radial_band_power"]

#: The descriptor groups, in the order of the vector.
DESCRIPTOR_GROUPS = ("intensity", "spectrum", "local")
#: Estimators of the normal descriptor distribution.
ESTIMATORS = DESCRIPTOR_ESTIMATORS
#: Quantiles of the pixel values (group ``intensity``).
INTENSITY_QUANTILES = (0.01, 0.05, 0.25, 0.5, 0.75, 0.95, 0.99)
#: Quantiles of each local map over the image (group ``local``), besides its mean and standard deviation.
LOCAL_QUANTILES = (0.01, 0.5, 0.99)
#: The local maps at each scale (group ``local``).
LOCAL_MAPS = ("mean", "std", "gradient")
#: Power below this is log10'd as this (a constant image has no power at all).
POWER_FLOOR = 1e-12
#: Scale of the MAD of a Gaussian (MAD * 1.4826 = sigma), for the robust standardisation.
MAD_TO_SIGMA = 1.4826


def prepare_image(image: np.ndarray, size: int) -> np.ndarray:
    """One channel of a (C, H, W) or (H, W) image, resized to (size, size), float64.

    Colour images become the mean of their channels; the resize is bilinear
    with PIL's antialiasing when shrinking (as the model inputs'
    :mod:`anomri.images.geometry`).
    """
    array = np.asarray(image, np.float32)
    if array.ndim == 3:
        array = array.mean(axis=0)
    if array.ndim != 2:
        raise ValueError(f"expected a (C, H, W) or (H, W) image; got shape {np.shape(image)}")
    if array.shape != (size, size):
        array = np.asarray(Image.fromarray(array, mode="F").resize((size, size), Image.BILINEAR))
    return array.astype(np.float64)


def band_edges(size: int) -> np.ndarray:
    """Radial frequency band edges in cycles per image: 1, 2, 4, ... octaves, the last band reaching the corner
    of the spectrum (size / sqrt(2) cycles)."""
    edges = [1.0]
    while edges[-1] * 2 < size / 2:
        edges.append(edges[-1] * 2)
    edges.append(size / np.sqrt(2.0) + 1.0)
    return np.array(edges)


def _hann(size: int) -> np.ndarray:
    # Periodic Hann (its DFT has three non-zero bins), scaled to unit mean square so that windowing keeps
    # the mean-square power of content above two cycles per image exactly.
    window = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(size) / size)
    return window / np.sqrt(np.mean(window**2))


def radial_band_power(images: np.ndarray) -> np.ndarray:
    """Mean-square power (N, B) of square images (N, S, S) in the radial bands of :func:`band_edges`.

    Each image's mean is removed and a separable periodic Hann window of
    unit mean square applied; by Parseval the power of the frequency bins
    k with edge[b] <= |k| < edge[b + 1] (cycles per image) is
    ``sum |F_k|^2 / S^4``, so a sinusoid of amplitude A and frequency f >= 2
    cycles (away from the band edges) puts A^2 / 2 in f's band and nothing
    elsewhere.
    """
    images = np.asarray(images, np.float64)
    n, size = images.shape[0], images.shape[-1]
    window = _hann(size)
    centred = images - images.mean(axis=(1, 2), keepdims=True)
    spectrum = np.abs(np.fft.fft2(centred * window[:, None] * window[None, :])) ** 2 / float(size) ** 4
    frequencies = np.fft.fftfreq(size, d=1.0 / size)  # cycles per image
    radius = np.hypot(frequencies[:, None], frequencies[None, :])
    edges = band_edges(size)
    band = np.digitize(radius, edges) - 1  # -1 below the first edge (the DC bin), len(edges) - 1 above the last
    power = np.zeros((n, len(edges) - 1))
    for b in range(len(edges) - 1):
        power[:, b] = spectrum[:, band == b].sum(axis=1)
    return power


def local_maps(images: np.ndarray, sigma: float) -> dict[str, np.ndarray]:
    """Local mean, local standard deviation and gradient magnitude (each (N, S, S)) at Gaussian scale ``sigma``.

    The filters run over the last two axes only (``sigma`` 0 along the
    first), reflecting at the border.
    """
    images = np.asarray(images, np.float64)
    sigmas = (0.0, sigma, sigma)
    mean = ndimage.gaussian_filter(images, sigmas, mode="reflect")
    second = ndimage.gaussian_filter(images**2, sigmas, mode="reflect")
    std = np.sqrt(np.clip(second - mean**2, 0.0, None))
    # Central differences (one-sided at the border) of the smoothed image: per pixel of the grid.
    gradient = np.hypot(*np.gradient(mean, axis=(1, 2)))
    return {"mean": mean, "std": std, "gradient": gradient}


def _summary(maps: np.ndarray, quantiles: Sequence[float]) -> np.ndarray:
    """Per image of (N, S, S): mean, standard deviation and ``quantiles`` of its values, (N, 2 + Q)."""
    flat = maps.reshape(len(maps), -1)
    return np.column_stack([flat.mean(1), flat.std(1), np.quantile(flat, quantiles, axis=1).T])


def descriptor_names(size: int, scales: Sequence[float]) -> list[str]:
    """Names of the descriptors of :func:`extract_descriptors`, in order."""
    names = ["intensity-mean", "intensity-std", *(f"intensity-q{q:g}" for q in INTENSITY_QUANTILES)]
    edges = band_edges(size)
    names += [f"spectrum-log10-power-{lo:g}-{hi:.3g}" for lo, hi in zip(edges[:-1], edges[1:])]
    for sigma in scales:
        for kind in LOCAL_MAPS:
            names += [f"local-{kind}-s{sigma:g}-{stat}"
                      for stat in ("mean", "std", *(f"q{q:g}" for q in LOCAL_QUANTILES))]
    return names


def extract_descriptors(images: np.ndarray | Iterable[np.ndarray], size: int = 128,
                        scales: Sequence[float] = (2.0, 4.0, 8.0), batch_size: int = 64) -> np.ndarray:
    """Global descriptors (N, D) of images, each (C, H, W) or (H, W) of any size, in the order of
    :func:`descriptor_names`.

    ``images`` may be a stacked array (N, ...) or any iterable of images
    (read lazily, ``batch_size`` at a time, so a folder need not fit in
    memory at full size).
    """
    rows = []
    batch: list[np.ndarray] = []

    def flush() -> None:
        stack = np.stack(batch)
        parts = [_summary(stack, ()), np.quantile(stack.reshape(len(stack), -1), INTENSITY_QUANTILES, axis=1).T,
                 np.log10(np.maximum(radial_band_power(stack), POWER_FLOOR))]
        for sigma in scales:
            parts += [_summary(m, LOCAL_QUANTILES) for m in local_maps(stack, sigma).values()]
        rows.append(np.column_stack(parts))
        batch.clear()

    for image in images:
        batch.append(prepare_image(image, size))
        if len(batch) == batch_size:
            flush()
    if batch:
        flush()
    if not rows:
        return np.zeros((0, len(descriptor_names(size, scales))))
    return np.concatenate(rows)


@dataclass(frozen=True)
class GlobalDescriptorFit:
    """A model of normal descriptor vectors; :meth:`score` says how novel others are.

    Attributes
    ----------
    center, scale : (D,)
        Robust standardisation: ``(x - center) / scale``.
    estimator : str
        One of :data:`ESTIMATORS`.
    location : (D,)
        Mean of the standardised normal vectors under the estimator (zeros for ``knn``).
    precision : (D, D) or None
        Inverse covariance of the standardised normal vectors (None for ``knn``).
    reference : (N, D) or None
        The standardised normal vectors (``knn`` only).
    k : int
        Neighbours averaged by ``knn``.
    """

    center: np.ndarray
    scale: np.ndarray
    estimator: str
    location: np.ndarray
    precision: np.ndarray | None
    reference: np.ndarray | None
    k: int

    def standardize(self, descriptors: np.ndarray) -> np.ndarray:
        return (np.asarray(descriptors, np.float64) - self.center) / self.scale

    def score(self, descriptors: np.ndarray) -> np.ndarray:
        """Novelty (N,) of descriptor vectors (N, D): Mahalanobis distance, or mean distance to the k nearest
        normal vectors; higher = more novel."""
        z = self.standardize(descriptors)
        if self.estimator == "knn":
            distances = cdist(z, self.reference)
            k = min(self.k, distances.shape[1])
            return np.sort(distances, axis=1)[:, :k].mean(axis=1)
        centred = z - self.location
        return np.sqrt(np.clip(np.einsum("nd,de,ne->n", centred, self.precision, centred), 0.0, None))


@dataclass(frozen=True)
class GlobalDescriptorModel:
    """How to model normal descriptor vectors (:data:`ESTIMATORS`); :meth:`fit` learns them.

    Parameters
    ----------
    estimator : str
        ``ledoit-wolf``, ``mcd`` or ``knn``.
    k : int
        Neighbours of ``knn``.
    seed : int
        Random state of ``mcd``.
    scale_floor : float
        Descriptors whose normal MAD is 0 (constant on normal images) are
        divided by this fraction of the median scale instead, so that they
        count without dividing by zero.
    """

    estimator: str = "ledoit-wolf"
    k: int = 5
    seed: int = 0
    scale_floor: float = 0.01

    def __post_init__(self) -> None:
        if self.estimator not in ESTIMATORS:
            raise ValueError(f"estimator must be one of {ESTIMATORS}; got {self.estimator!r}")
        if self.k < 1:
            raise ValueError(f"k must be >= 1; got {self.k}")

    def fit(self, descriptors: np.ndarray) -> GlobalDescriptorFit:
        """Fit normal descriptor vectors (N, D), N >= 2."""
        x = np.asarray(descriptors, np.float64)
        if x.ndim != 2 or len(x) < 2:
            raise ValueError(f"need at least two normal descriptor vectors (N, D); got shape {x.shape}")
        if not np.isfinite(x).all():
            raise ValueError("descriptors must be finite")
        center = np.median(x, axis=0)
        scale = MAD_TO_SIGMA * np.median(np.abs(x - center), axis=0)
        positive = scale[scale > 0]
        floor = self.scale_floor * (float(np.median(positive)) if positive.size else 1.0)
        scale = np.where(scale > 0, scale, floor)
        z = (x - center) / scale
        location, precision, reference = np.zeros(x.shape[1]), None, None
        if self.estimator == "knn":
            reference = z
        elif self.estimator == "ledoit-wolf":
            fitted = LedoitWolf().fit(z)
            location, precision = fitted.location_, fitted.precision_
        else:
            # Many descriptors are nearly collinear (neighbouring quantiles), so MCD's concentration steps meet
            # near-singular subsets and warn that a determinant rose; the fit is still its best subset.
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always", RuntimeWarning)
                fitted = MinCovDet(random_state=self.seed).fit(z)
            if caught:
                logger.info("minimum covariance determinant: %d numerical warning(s) on near-singular subsets",
                            len(caught))
            location, precision = fitted.location_, fitted.precision_
        logger.info("global descriptors: fitted %s on %d normal images, %d descriptors", self.estimator, *x.shape)
        return GlobalDescriptorFit(center, scale, self.estimator, location, precision, reference, self.k)
