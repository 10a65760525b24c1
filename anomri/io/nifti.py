"""NIfTI reading with clear errors, and map writing that viewers display correctly."""

from __future__ import annotations

import zlib
from pathlib import Path

import nibabel as nib
import numpy as np

from anomri.errors import InputError
from anomri.io.atomic import atomic_path


def _reason(exc: Exception) -> str:
    """The library's message on one line: nibabel's can span several, and errors are one line."""
    return " ".join(str(exc).split())


def load_nifti(path: str | Path, ndim: int | None = None) -> nib.Nifti1Image:
    """Load a NIfTI image, checking that it exists, parses and has ``ndim`` dimensions.

    Raises
    ------
    InputError
        Missing, unreadable or corrupt file, or the wrong dimensionality.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "file not found")
    try:
        img = nib.load(path)
        if not isinstance(img, nib.Nifti1Image | nib.Nifti2Image):
            raise InputError(path, f"not a NIfTI image ({type(img).__name__})")
        shape = img.shape
    except (nib.filebasedimages.ImageFileError, OSError, EOFError, zlib.error, ValueError) as exc:
        raise InputError(path, f"unreadable or corrupt NIfTI file ({_reason(exc)})") from exc
    if ndim is not None and len(shape) != ndim:
        raise InputError(path, f"expected a {ndim}-D image, got {len(shape)}-D with shape {shape}")
    return img


def read_data(img: nib.Nifti1Image, path: str | Path, dtype: type = np.float32) -> np.ndarray:
    """Read the voxel array, rejecting truncated data and NaN/Inf values."""
    try:
        data = np.asarray(img.dataobj, dtype=dtype)
    except (OSError, EOFError, zlib.error, ValueError) as exc:
        raise InputError(path, f"unreadable or corrupt NIfTI data ({_reason(exc)})") from exc
    if not np.isfinite(data).all():
        bad = int((~np.isfinite(data)).sum())
        raise InputError(path, f"contains {bad} NaN/Inf values")
    return data


def load_mask(path: str | Path, reference: nib.Nifti1Image, reference_path: str | Path) -> np.ndarray:
    """Load a 3-D mask and check it lies on the reference image's grid (shape and affine)."""
    img = load_nifti(path)
    spatial = reference.shape[:3]
    if img.shape[:3] != spatial or (img.ndim > 3 and any(n != 1 for n in img.shape[3:])):
        raise InputError(path, f"mask shape {img.shape} differs from {Path(reference_path).name} {spatial}")
    if not np.allclose(img.affine, reference.affine, atol=1e-3):
        raise InputError(path, f"mask affine differs from the affine of {Path(reference_path).name}")
    # Real masks are often anti-aliased or stored as floats: threshold at half.
    return read_data(img, path).reshape(spatial) > 0.5


def save_volume(path: str | Path, data: np.ndarray, reference: nib.Nifti1Image, dtype: type = np.float32) -> None:
    """Write ``data`` on the grid of ``reference`` atomically.

    The source affine goes into both sform and qform (codes copied from the
    reference, or "scanner" when it had none) so every viewer places the map
    on the source scan.
    """
    img = nib.Nifti1Image(np.asarray(data, dtype=dtype), reference.affine)
    sform_code = int(reference.header["sform_code"]) or 1
    qform_code = int(reference.header["qform_code"]) or 1
    img.set_sform(reference.affine, code=sform_code)
    img.set_qform(reference.affine, code=qform_code)
    img.header.set_xyzt_units(*reference.header.get_xyzt_units())
    with atomic_path(path) as tmp:
        nib.save(img, tmp)
