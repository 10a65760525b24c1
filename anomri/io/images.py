"""2-D image folders in the MVTec-AD layout: listing, reading images and masks.

Layout (``<root>`` is one object or texture category)::

    <root>/train/good/*.png|jpg|tif      defect-free training images
    <root>/test/good/*                   defect-free test images
    <root>/test/<defect>/*               defective test images
    <root>/ground_truth/<defect>/<stem>_mask.png

Retinal OCT B-scans use the same layout. Images are read as float32 arrays
(C, H, W) in [0, 1]; masks as bool (H, W), binarised at 128 because real masks
are often anti-aliased. How images of any size become fixed-size model inputs,
and maps go back, is :mod:`anomri.images.geometry`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from anomri.errors import InputError

logger = logging.getLogger(__name__)

__all__ = [
    "IMAGE_SUFFIXES", "MASK_THRESHOLD", "ImageRecord", "MVTecFolder", "scan_mvtec", "read_image", "read_mask",
    "infer_channels",
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

