"""2-D image folders in the MVTec-AD layout, and the geometry between images and model inputs.

Layout (``<root>`` is one object or texture category)::

    <root>/train/good/*.png|jpg|tif      defect-free training images
    <root>/test/good/*                   defect-free test images
    <root>/test/<defect>/*               defective test images
    <root>/ground_truth/<defect>/<stem>_mask.png

Retinal OCT B-scans use the same layout. Images are read as float32 arrays
(C, H, W) in [0, 1]; masks as bool (H, W), binarised at 128 because real masks
are often anti-aliased. Images of any size are mapped to fixed-size model
inputs by :class:`ImageGeometry` (resize, or tiles with overlap), and anomaly
maps are mapped back to each image's original size with the same object.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError
from scipy import ndimage
from tqdm.auto import tqdm

from anomri.errors import InputError

logger = logging.getLogger(__name__)

__all__ = [
    "IMAGE_SUFFIXES", "MASK_THRESHOLD", "ImageRecord", "MVTecFolder", "scan_mvtec", "read_image", "read_mask",
    "infer_channels", "split_validation", "ImageGeometry", "Placement", "ModelInputs", "load_model_inputs",
]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
MASK_THRESHOLD = 128
NORMAL_CLASS = "good"


@dataclass(frozen=True)
class ImageRecord:
    """One image of an MVTec-layout folder.

    Attributes
    ----------
    path : Path
    split : str
        ``"train"`` or ``"test"``.
    label : str
        ``"good"`` or the defect type (the test sub-folder name).
    mask_path : Path or None
        Ground-truth mask; None for good images (all pixels normal).
    """

    path: Path
    split: str
    label: str
    mask_path: Path | None = None

    @property
    def stem(self) -> str:
        return self.path.stem

    @property
    def is_anomalous(self) -> bool:
        return self.label != NORMAL_CLASS


@dataclass(frozen=True)
class MVTecFolder:
    """The images of one MVTec-layout category."""

    root: Path
    train: list[ImageRecord]
    test: list[ImageRecord]

    @property
    def defect_types(self) -> list[str]:
        """Defect labels present in the test split, sorted."""
        return sorted({r.label for r in self.test if r.is_anomalous})


def _image_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def scan_mvtec(root: str | Path) -> MVTecFolder:
    """List the images of an MVTec-layout folder and pair defective test images with their masks.

    Raises
    ------
    InputError
        When ``root`` or ``train/good`` is missing or holds no image, or a
        defective test image has no ``ground_truth/<defect>/<stem>_mask.*``.
    """
    root = Path(root)
    train_dir = root / "train" / NORMAL_CLASS
    if not train_dir.is_dir():
        raise InputError(train_dir, "missing: the MVTec layout needs <root>/train/good with defect-free images")
    train = [ImageRecord(p, "train", NORMAL_CLASS) for p in _image_files(train_dir)]
    if not train:
        raise InputError(train_dir, f"holds no image ({', '.join(IMAGE_SUFFIXES)})")
    test_dir = root / "test"
    test: list[ImageRecord] = []
    for class_dir in sorted(d for d in test_dir.iterdir() if d.is_dir()) if test_dir.is_dir() else []:
        for path in _image_files(class_dir):
            mask = None
            if class_dir.name != NORMAL_CLASS:
                mask = _find_mask(root / "ground_truth" / class_dir.name, path)
            test.append(ImageRecord(path, "test", class_dir.name, mask))
    logger.info("%s: %d training images, %d test images (%s)", root, len(train), len(test),
                ", ".join(sorted({r.label for r in test})) or "no test classes")
    return MVTecFolder(root, train, test)


def _find_mask(mask_dir: Path, image_path: Path) -> Path:
    for suffix in (".png", *IMAGE_SUFFIXES):
        candidate = mask_dir / f"{image_path.stem}_mask{suffix}"
        if candidate.is_file():
            return candidate
    raise InputError(image_path, f"defective test image without a mask: expected {mask_dir / image_path.stem}_mask.png")


def _open(path: Path) -> Image.Image:
    try:
        image = Image.open(path)
        image.load()
    except (OSError, UnidentifiedImageError, ValueError) as exc:
        raise InputError(path, f"unreadable image ({type(exc).__name__}: {exc})") from exc
    return image


def _to_unit_array(image: Image.Image, channels: int) -> np.ndarray:
    """Pixel values scaled to [0, 1] by the bit depth, as (H, W, channels) float32."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        # 16-bit and float TIFFs: PIL's "L" conversion would clip, so scale by the dtype instead.
        array = np.asarray(image)
        scale = 65535.0 if array.dtype.kind in "ui" else max(float(array.max()), 1e-12)
        array = np.clip(array.astype(np.float32) / scale, 0.0, 1.0)[..., None]
        return np.repeat(array, channels, axis=-1)
    converted = image.convert("L" if channels == 1 else "RGB")
    array = np.asarray(converted, dtype=np.float32) / 255.0
    return array[..., None] if channels == 1 else array


def read_image(path: str | Path, channels: int = 1) -> np.ndarray:
    """Read a png/jpg/tif/bmp image as float32 (channels, H, W) in [0, 1].

    Colour images are converted to luminance for ``channels=1``; grey images
    are repeated for ``channels=3``.
    """
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3; got {channels}")
    return np.ascontiguousarray(np.moveaxis(_to_unit_array(_open(Path(path)), channels), -1, 0))


def read_mask(record: ImageRecord, shape: tuple[int, int]) -> np.ndarray:
    """Ground-truth mask of ``record`` as bool (H, W): pixel >= 128 is anomalous.

    Good images get an all-False mask of ``shape``.

    Raises
    ------
    InputError
        When the mask is unreadable or its size differs from the image's ``shape``.
    """
    if record.mask_path is None:
        return np.zeros(shape, bool)
    mask = np.asarray(_open(record.mask_path).convert("L")) >= MASK_THRESHOLD
    if mask.shape != tuple(shape):
        raise InputError(record.mask_path, f"mask is {mask.shape[1]}x{mask.shape[0]} px but its image "
                                           f"{record.path.name} is {shape[1]}x{shape[0]} px")
    return mask


def infer_channels(records: list[ImageRecord]) -> int:
    """3 when any image is in colour, else 1 (reads only the file headers)."""
    for record in records:
        if _open(record.path).mode in ("RGB", "RGBA", "P", "CMYK", "YCbCr", "LAB", "HSV"):
            return 3
    return 1


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


# --------------------------------------------------------------------------- geometry


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
