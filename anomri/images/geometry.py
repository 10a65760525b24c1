"""The geometry between images of any size and fixed-size model inputs, and back.

:class:`ImageGeometry` maps an image (C, H, W) to model inputs: the whole
image resized, or tiles with overlap, optionally after cropping (and
flattening) the retina band of an OCT B-scan; anomaly maps of the inputs are
mapped back to each image's original size with the same object;
:func:`split_validation` says which normal images train and which are held out.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image
from scipy import ndimage
from tqdm.auto import tqdm

from anomri.errors import InputError
from anomri.io.images import ImageRecord, read_image

__all__ = ["ImageGeometry", "Placement", "ModelInputs", "load_model_inputs", "split_validation"]


@dataclass(frozen=True)
class Placement:
    """Where the model inputs of one image came from, to map results back.

    Attributes
    ----------
    original_shape : (H, W)
        The image as read.
    band : (row0, row1)
        Rows kept by the retina-band crop (all rows without it).
    working_shape : (H', W')
        Shape of the band after rescaling (tile mode) or the square model
        size (resize mode).
    padded_shape : (H'', W'')
        ``working_shape`` padded up to at least one tile.
    origins : list of (row, col)
        Top-left corner of each tile in the padded image.
    column_shifts : tuple of int
        Band flattening: column c of the flattened image holds rows
        ``r + column_shifts[c]`` of the original (empty without flattening).
    """

    original_shape: tuple[int, int]
    band: tuple[int, int]
    working_shape: tuple[int, int]
    padded_shape: tuple[int, int]
    origins: tuple[tuple[int, int], ...]
    column_shifts: tuple[int, ...] = ()


def _resize(array: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Bilinear resize of a (C, H, W) float array to (C, *shape); PIL widens the filter when shrinking (antialias)."""
    if tuple(array.shape[-2:]) == tuple(shape):
        return array
    size = (int(shape[1]), int(shape[0]))  # PIL sizes are (width, height)
    return np.stack([np.asarray(Image.fromarray(np.asarray(c, np.float32), mode="F").resize(size, Image.BILINEAR))
                     for c in array])


def _shift_columns(array: np.ndarray, shifts: np.ndarray) -> np.ndarray:
    """``out[..., r, c] = array[..., r + shifts[c], c]``, rows clamped to the image (edge values repeat)."""
    height, width = array.shape[-2:]
    rows = np.clip(np.arange(height)[:, None] + np.asarray(shifts, int)[None, :], 0, height - 1)
    return np.ascontiguousarray(array[..., rows, np.arange(width)[None, :]])


def _tile_starts(length: int, size: int, stride: int) -> list[int]:
    # Evenly strided starts, plus one flush with the far edge so every pixel is covered.
    starts = list(range(0, length - size + 1, stride))
    if starts[-1] != length - size:
        starts.append(length - size)
    return starts


@dataclass(frozen=True)
class ImageGeometry:
    """How an image of any size becomes fixed-size model inputs, and maps go back.

    Parameters
    ----------
    mode : {"resize", "tile"}
        ``resize``: the whole image is resized to ``size`` x ``size`` (one
        input per image). ``tile``: the image, scaled by ``tile_scale``, is cut
        into ``size`` x ``size`` tiles overlapping by ``tile_overlap``; tile
        maps are averaged where they overlap. Training in tile mode uses every
        tile of every training image: patch-based training, as AnoGAN used on
        OCT B-scans.
    size : int
        Side of a model input, in pixels.
    tile_overlap : float
        Fraction of a tile shared with its neighbour, in [0, 1).
    tile_scale : float
        Rescale factor applied before tiling (1 keeps the native resolution).
    band : {"none", "crop", "flatten"}
        ``crop`` keeps only the rows of the bright retina band of an OCT
        B-scan (plus ``band_margin``), so the model does not spend capacity on
        the empty vitreous and choroid; outside the band a map takes its
        lowest value inside it (nothing there was scored). ``flatten`` first
        straightens the band (:meth:`band_curve`): each column is shifted
        vertically so that the band's brightest layer lies on one row, the
        usual OCT flattening, which removes the retina's curvature and tilt
        from what the model must learn; then it crops as ``crop``. Maps are
        shifted back to the original geometry.
    band_threshold : float
        A row belongs to the band when its smoothed mean intensity exceeds
        ``min + band_threshold * (max - min)`` of the row profile.
    band_margin : float
        Rows added above and below the band, as a fraction of its height.
    """

    mode: str = "resize"
    size: int = 128
    tile_overlap: float = 0.5
    tile_scale: float = 1.0
    band: str = "none"
    band_threshold: float = 0.3
    band_margin: float = 0.1

    def __post_init__(self) -> None:
        if self.mode not in ("resize", "tile"):
            raise ValueError(f"geometry mode must be 'resize' or 'tile'; got {self.mode!r}")
        if self.band not in ("none", "crop", "flatten"):
            raise ValueError(f"band must be 'none', 'crop' or 'flatten'; got {self.band!r}")
        if not 0.0 <= self.tile_overlap < 1.0:
            raise ValueError(f"tile_overlap must lie in [0, 1); got {self.tile_overlap}")
        if self.size < 4 or self.tile_scale <= 0:
            raise ValueError("size must be >= 4 and tile_scale > 0")

    def band_rows(self, image: np.ndarray) -> tuple[int, int]:
        """Rows ``[row0, row1)`` of the retina band of a (C, H, W) image (all rows without ``band``)."""
        height = image.shape[1]
        if self.band == "none":
            return 0, height
        profile = ndimage.gaussian_filter1d(image.mean(axis=(0, 2)), sigma=max(1.0, height / 100))
        low, high = float(profile.min()), float(profile.max())
        rows = np.flatnonzero(profile > low + self.band_threshold * (high - low))
        if rows.size == 0:  # a flat image has no band: keep it whole
            return 0, height
        margin = int(round(self.band_margin * (rows[-1] + 1 - rows[0])))
        return max(0, int(rows[0]) - margin), min(height, int(rows[-1]) + 1 + margin)

    @staticmethod
    def band_curve(image: np.ndarray) -> np.ndarray:
        """Row of the brightest layer in each column of a (C, H, W) image, as int (W,).

        The argmax of each column after Gaussian smoothing (speckle averages
        out), then a running median and a Gaussian along the columns, so
        that a few columns where a lesion or shadow wins the argmax do not
        bend the curve.
        """
        height, width = image.shape[1:]
        smoothed = ndimage.gaussian_filter(image.mean(axis=0), (max(1.0, height / 50), max(1.0, width / 100)))
        peak = smoothed.argmax(axis=0).astype(np.float64)
        median_width = max(1, width // 10) | 1  # odd
        curve = ndimage.gaussian_filter1d(ndimage.median_filter(peak, median_width, mode="nearest"),
                                          max(1.0, width / 50), mode="nearest")
        return np.round(curve).astype(int)

    def to_inputs(self, image: np.ndarray) -> tuple[np.ndarray, Placement]:
        """Cut a (C, H, W) image into model inputs (P, C, size, size) and remember where they came from."""
        original = (int(image.shape[1]), int(image.shape[2]))
        shifts: tuple[int, ...] = ()
        if self.band == "flatten":
            curve = self.band_curve(image)
            # Straighten onto the curve's median row: the smallest total shift.
            shift_array = curve - int(np.median(curve))
            image = _shift_columns(image, shift_array)
            shifts = tuple(int(s) for s in shift_array)
        row0, row1 = self.band_rows(image)
        work = np.ascontiguousarray(image[:, row0:row1], np.float32)
        if self.mode == "resize":
            work = _resize(work, (self.size, self.size))
        elif self.tile_scale != 1.0:
            work = _resize(work, (max(1, round(work.shape[-2] * self.tile_scale)),
                                  max(1, round(work.shape[-1] * self.tile_scale))))
        working = (int(work.shape[-2]), int(work.shape[-1]))
        pad_rows, pad_cols = max(0, self.size - working[0]), max(0, self.size - working[1])
        if pad_rows or pad_cols:
            # Replicate edges: a black border would look like an anomaly to the model.
            work = np.pad(work, ((0, 0), (0, pad_rows), (0, pad_cols)), mode="edge")
        padded = (int(work.shape[-2]), int(work.shape[-1]))
        stride = max(1, int(round(self.size * (1.0 - self.tile_overlap))))
        origins = tuple((r, c) for r in _tile_starts(padded[0], self.size, stride)
                        for c in _tile_starts(padded[1], self.size, stride))
        tiles = np.stack([work[:, r:r + self.size, c:c + self.size] for r, c in origins])
        return tiles, Placement(original, (row0, row1), working, padded, origins, shifts)

    def to_original(self, maps: np.ndarray, placement: Placement) -> np.ndarray:
        """Stitch per-input maps (P, size, size) back to one float32 map at the original (H, W)."""
        maps = np.asarray(maps, np.float32)
        if maps.shape != (len(placement.origins), self.size, self.size):
            raise ValueError(f"expected {len(placement.origins)} maps of {self.size}x{self.size}; got {maps.shape}")
        total = np.zeros(placement.padded_shape, np.float64)
        count = np.zeros(placement.padded_shape, np.float64)
        for tile_map, (r, c) in zip(maps, placement.origins):
            total[r:r + self.size, c:c + self.size] += tile_map
            count[r:r + self.size, c:c + self.size] += 1.0
        stitched = (total / count)[: placement.working_shape[0], : placement.working_shape[1]]
        row0, row1 = placement.band
        band = _resize(stitched.astype(np.float32)[None], (row1 - row0, placement.original_shape[1]))[0]
        # Outside the band nothing was scored: give it the least anomalous value seen.
        full = np.full(placement.original_shape, band.min(), np.float32)
        full[row0:row1] = band
        if placement.column_shifts:
            full = _shift_columns(full, -np.asarray(placement.column_shifts))
        return full


@dataclass
class ModelInputs:
    """The model inputs of a list of images, with the way back to each image.

    Attributes
    ----------
    inputs : ndarray (P, C, size, size)
        All inputs of all images, float32 in [0, 1].
    owner : ndarray (P,) of int
        Index (into the image list) of the image each input came from.
    placements : list of Placement
        One per image.
    """

    inputs: np.ndarray
    owner: np.ndarray
    placements: list[Placement]

    def per_image(self, values: np.ndarray) -> list[np.ndarray]:
        """Split per-input ``values`` (P, ...) into one array per image."""
        return [values[self.owner == i] for i in range(len(self.placements))]


def load_model_inputs(records: list[ImageRecord], geometry: ImageGeometry, channels: int, progress: bool = True
                      ) -> ModelInputs:
    """Read every image of ``records`` and cut it into model inputs with ``geometry``."""
    inputs, owner, placements = [], [], []
    for i, record in enumerate(tqdm(records, desc="reading images", unit="image", disable=not progress)):
        tiles, placement = geometry.to_inputs(read_image(record.path, channels))
        inputs.append(tiles)
        owner.append(np.full(len(tiles), i))
        placements.append(placement)
    if not records:
        return ModelInputs(np.zeros((0, channels, geometry.size, geometry.size), np.float32), np.zeros(0, int), [])
    return ModelInputs(np.concatenate(inputs), np.concatenate(owner), placements)


def split_validation(records: list[ImageRecord], fraction: float, seed: int
                     ) -> tuple[list[ImageRecord], list[ImageRecord]]:
    """Hold out a random ``fraction`` of the good training images for validation.

    The held-out normal images set the decision thresholds and never train a
    model. Deterministic in ``seed``; at least one image stays on each side.
    """
    if len(records) < 2:
        raise InputError(records[0].path.parent if records else "train/good",
                         "needs at least two training images to hold one out for validation")
    order = np.random.default_rng(seed).permutation(len(records))
    n_val = min(len(records) - 1, max(1, int(round(fraction * len(records)))))
    val = sorted(order[:n_val])
    train = sorted(order[n_val:])
    return [records[i] for i in train], [records[i] for i in val]
