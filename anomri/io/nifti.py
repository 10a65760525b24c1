"""NIfTI reading with clear errors, and map writing that viewers display correctly."""

from __future__ import annotations

import gzip
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


#: gzip level of written ``.nii.gz`` files: maps and noisy int16 scans barely compress further, and
#: level 1 is ~4x faster than 6.
GZIP_LEVEL = 1


def write_nifti(path: str | Path, img: nib.Nifti1Image) -> None:
    """Write a NIfTI image atomically, ``.nii.gz`` as one deterministic gzip stream.

    The stream has no file name and mtime 0, so equal images give equal bytes
    whatever the (temporary) file name; every NIfTI file anomri writes goes through here.
    """
    path = Path(path)
    with atomic_path(path) as tmp:
        data = img.to_bytes()
        tmp.write_bytes(gzip.compress(data, compresslevel=GZIP_LEVEL, mtime=0) if path.name.endswith(".gz")
                        else data)


def save_volume(path: str | Path, data: np.ndarray, reference: nib.Nifti1Image, dtype: type = np.float32) -> None:
    """Write ``data`` on the grid of ``reference`` atomically.

    The reference's sform and qform are copied each with its own code (a
    sheared sform keeps its shear, and the qform its own rigid approximation),
    so every viewer places the map exactly where it places the source. A
    reference with neither code set gets its affine as a "scanner" sform and qform.
    """
    img = nib.Nifti1Image(np.asarray(data, dtype=dtype), reference.affine)
    sform, sform_code = reference.header.get_sform(coded=True)
    qform, qform_code = reference.header.get_qform(coded=True)
    if not sform_code and not qform_code:
        sform, sform_code, qform, qform_code = reference.affine, 1, reference.affine, 1
    img.set_sform(sform, code=int(sform_code))
    img.set_qform(qform, code=int(qform_code))
    img.header.set_xyzt_units(*reference.header.get_xyzt_units())
    write_nifti(path, img)
