"""What the simulated scanner does: gradient scheme, head motion between volumes, receive bias, noise, ringing.

Everything here acts on the scanner side of the simulation: the gradient
directions stay fixed to the scanner while the head moves (so the b-vectors
of a moving head are *not* rotated, exactly as on a real scanner), the
receive-coil sensitivity is fixed to the scanner, and the noise is Rician
magnitude noise of a complex image. Gibbs ringing comes from truncating
k-space: the signal is simulated on a finer in-plane grid and only the
central k-space of the acquired matrix is kept.
"""

from __future__ import annotations

import io
import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np
from scipy import ndimage
from scipy.spatial.transform import Rotation

from anomri.dmri.gradients import read_bvals_bvecs
from anomri.errors import InputError

#: Gradient tables shipped in ``dipy/data/files`` (rows are q = b * g, comma separated).
SCHEMES = {"3shell": "gtab_3shell.txt", "isbi2013-2shell": "gtab_isbi2013_2shell.txt"}
#: Volumes with b below this are b0 (s/mm^2).
B0_THRESHOLD = 50.0
#: A shell specification such as ``1000:30,2500:30`` (b-value : directions).
_SHELL_SPEC = re.compile(r"^\d+(\.\d+)?:\d+(,\d+(\.\d+)?:\d+)*$")


@dataclass(frozen=True)
class Acquisition:
    """Gradient table of the simulated series.

    Attributes
    ----------
    bvals : ndarray, (V,)
        Integer-valued b-values, s/mm^2 (0 for b0 volumes).
    bvecs : ndarray, (V, 3)
        Unit gradient directions in scanner (RAS world) axes; zeros for b0.
    """

    bvals: np.ndarray
    bvecs: np.ndarray

    @property
    def is_b0(self) -> np.ndarray:
        """Boolean mask of the b0 volumes."""
        return self.bvals < B0_THRESHOLD


def _spread_subset(directions: np.ndarray, k: int) -> np.ndarray:
    """Indices of ``k`` well-spread axes among ``directions`` (N, 3), in table order.

    Greedy farthest-point sampling on the projective sphere (g and -g are the
    same measurement): each step adds the direction whose largest |cos| to the
    chosen ones is smallest. Starting from the first row makes it deterministic.
    """
    if k >= len(directions):
        return np.arange(len(directions))
    chosen = [0]
    closeness = np.abs(directions @ directions[0])
    for _ in range(k - 1):
        nxt = int(np.argmin(closeness))
        chosen.append(nxt)
        closeness = np.maximum(closeness, np.abs(directions @ directions[nxt]))
    return np.sort(chosen)


def _interleave_b0(bvals: np.ndarray, bvecs: np.ndarray, n_b0: int) -> Acquisition:
    """Put ``n_b0`` b0 volumes at regular positions through the series (the first volume is a b0).

    Scanners interleave b0 volumes so that drift and motion can be tracked.
    """
    n_volumes = len(bvals) + n_b0
    b0_positions = np.round(np.arange(n_b0) * n_volumes / n_b0).astype(int)
    is_dw = np.ones(n_volumes, bool)
    is_dw[b0_positions] = False
    all_bvals = np.zeros(n_volumes)
    all_bvecs = np.zeros((n_volumes, 3))
    all_bvals[is_dw] = np.round(bvals)
    all_bvecs[is_dw] = bvecs
    return Acquisition(bvals=all_bvals, bvecs=all_bvecs)


def load_scheme(scheme: str = "3shell", *, n_b0: int = 6, max_dirs_per_shell: int | None = 32) -> Acquisition:
    """Build the acquisition from a gradient table that dipy ships, or from a shell specification.

    Parameters
    ----------
    scheme : str
        A key of :data:`SCHEMES`, or shells as ``"b:n,b:n"`` (for example
        ``"1000:30,2500:30"``), whose ``n`` directions per shell are spread
        by dipy's electrostatic repulsion (``disperse_charges``) from a fixed
        start, so the same specification always gives the same table.
    n_b0 : int
        Number of b0 volumes; they replace the table's b0 row and are spread at
        regular positions through the series.
    max_dirs_per_shell : int or None
        Keep at most this many well-spread directions per shell of a dipy
        table (None: all).

    Returns
    -------
    Acquisition
    """
    if n_b0 < 1:
        raise ValueError(f"n_b0 must be >= 1, got {n_b0}")
    if max_dirs_per_shell is not None and max_dirs_per_shell < 1:
        raise ValueError(f"max_dirs_per_shell must be >= 1 or None, got {max_dirs_per_shell}")
    if _SHELL_SPEC.match(scheme):
        return _interleave_b0(*_shells_from_spec(scheme), n_b0)
    if scheme not in SCHEMES:
        raise ValueError(f"unknown scheme {scheme!r}; choose one of {sorted(SCHEMES)} or shells as 'b:n,b:n'")
    table = resources.files("dipy") / "data" / "files" / SCHEMES[scheme]
    q = np.loadtxt(io.StringIO(table.read_text()), delimiter=",")
    b = np.linalg.norm(q, axis=1)
    weighted = np.flatnonzero(b >= B0_THRESHOLD)
    shell_of = np.round(b[weighted] / 100.0)  # shells are nominal multiples of 100 s/mm^2
    keep = []
    for shell in np.unique(shell_of):
        rows = weighted[shell_of == shell]
        k = len(rows) if max_dirs_per_shell is None else max_dirs_per_shell
        keep.extend(rows[_spread_subset(q[rows] / b[rows, None], k)])
    keep = np.sort(keep)
    return _interleave_b0(b[keep], q[keep] / b[keep, None], n_b0)


def _shells_from_spec(spec: str) -> tuple[np.ndarray, np.ndarray]:
    """b-values and directions of a ``"b:n,b:n"`` specification, shells one after another."""
    from dipy.core.sphere import HemiSphere, disperse_charges

    bvals, bvecs = [], []
    for k, item in enumerate(spec.split(",")):
        b, n = float(item.split(":")[0]), int(item.split(":")[1])
        if b < B0_THRESHOLD or n < 6:
            raise ValueError(f"shell {item!r}: b must be >= {B0_THRESHOLD:g} and n >= 6 directions")
        # A fixed start per shell (seeded by its position): reproducible, and shells rotated apart.
        start = np.random.default_rng(k).normal(size=(n, 3))
        hemisphere, _ = disperse_charges(HemiSphere(xyz=start / np.linalg.norm(start, axis=1, keepdims=True)), 500)
        bvals.append(np.full(n, b))
        bvecs.append(hemisphere.vertices)
    return np.concatenate(bvals), np.concatenate(bvecs)


def read_scheme(bval: str | Path, bvec: str | Path) -> Acquisition:
    """The acquisition of FSL ``.bval``/``.bvec`` files, taken as given (b0 positions included).

    The b-vectors are read as world (RAS) axes, the convention of the
    simulator's scanner; b0 volumes get zero vectors.

    Raises
    ------
    InputError
        Unreadable files, mismatched counts, no b0 or non-unit directions.
    """
    bvals, bvecs = read_bvals_bvecs(bval, bvec)
    if len(bvals) != len(bvecs):
        raise InputError(bvec, f"{len(bvecs)} b-vectors for {len(bvals)} b-values in {Path(bval).name}")
    is_b0 = bvals < B0_THRESHOLD
    if not is_b0.any():
        raise InputError(bval, f"no b0 volume (no b-value < {B0_THRESHOLD:g})")
    norms = np.linalg.norm(bvecs[~is_b0], axis=1)
    if (np.abs(norms - 1.0) > 0.05).any():
        raise InputError(bvec, "diffusion-weighted volumes need unit b-vectors")
    bvecs = np.where(is_b0[:, None], 0.0, bvecs / np.where(is_b0, 1.0, np.linalg.norm(bvecs, axis=1))[:, None])
    return Acquisition(bvals=np.where(is_b0, 0.0, np.round(bvals)), bvecs=bvecs)


@dataclass(frozen=True)
class VolumeMotion:
    """Rigid head motion of every volume relative to the subject's reference pose.

    x_volume = R_v (x - c) + c + t_v for a point x of the head at its
    reference pose. The first volume (a b0) is the reference: R_0 = I, t_0 = 0.

    Attributes
    ----------
    rotations : ndarray, (V, 3, 3)
    translations : ndarray, (V, 3)
        mm.
    centre : ndarray, (3,)
        Pivot, mm.
    """

    rotations: np.ndarray
    translations: np.ndarray
    centre: np.ndarray

    @classmethod
    def draw(cls, rng: np.random.Generator, n_volumes: int, max_rotation_deg: float, max_translation_mm: float,
             centre: np.ndarray) -> VolumeMotion:
        """Slow drift plus small jerks, bounded by ``max_rotation_deg`` per axis and ``max_translation_mm``.

        Half of the budget is a linear drift over the series, half an
        independent uniform jitter per volume, as in a cooperative subject.
        """
        t = np.linspace(0.0, 1.0, n_volumes)[:, None]
        angles = 0.5 * max_rotation_deg * (t * rng.uniform(-1, 1, 3) + rng.uniform(-1, 1, (n_volumes, 3)))
        shifts = 0.5 * max_translation_mm * (t * rng.uniform(-1, 1, 3) + rng.uniform(-1, 1, (n_volumes, 3)))
        shifts *= max_translation_mm / np.maximum(np.linalg.norm(shifts, axis=1, keepdims=True), max_translation_mm)
        angles[0], shifts[0] = 0.0, 0.0
        return cls(Rotation.from_euler("xyz", angles, degrees=True).as_matrix(), shifts, np.asarray(centre, float))

    def head_frame(self, bvecs: np.ndarray) -> np.ndarray:
        """Each volume's gradient direction as the moved head sees it, R_v^T g_v (V, 3)."""
        return np.einsum("vji,vj->vi", self.rotations, bvecs)

    def apply(self, volumes: np.ndarray, affine: np.ndarray) -> np.ndarray:
        """Move the head in each volume of ``volumes`` (X, Y, Z, V) on a grid with ``affine`` (cubic spline).

        The image of volume v at scanner point x is the reference-pose image at
        the head point M_v^-1 x.
        """
        out = np.empty_like(volumes)
        inv_affine = np.linalg.inv(affine)
        for v in range(volumes.shape[-1]):
            if not self.translations[v].any() and np.allclose(self.rotations[v], np.eye(3)):
                out[..., v] = volumes[..., v]
                continue
            # voxel -> world -> head (inverse motion) -> voxel, as one affine for scipy.
            head = np.eye(4)
            head[:3, :3] = self.rotations[v].T
            head[:3, 3] = self.centre - self.rotations[v].T @ (self.centre + self.translations[v])
            matrix = inv_affine @ head @ affine
            out[..., v] = ndimage.affine_transform(volumes[..., v], matrix[:3, :3], matrix[:3, 3], order=3,
                                                   mode="constant", cval=0.0)
        return out

    def record(self) -> dict[str, float]:
        """Largest rotation (degrees) and translation (mm) of any volume, for the sidecar."""
        degrees = np.degrees(Rotation.from_matrix(self.rotations).magnitude())
        return {"MaxVolumeRotationDeg": round(float(degrees.max()), 4),
                "MaxVolumeTranslationMm": round(float(np.linalg.norm(self.translations, axis=1).max()), 4)}


def coil_sensitivity(rng: np.random.Generator, xyz: np.ndarray, centre: np.ndarray, strength: float,
                     radius_mm: float = 100.0) -> np.ndarray:
    """Smooth receive-coil gain at ``xyz`` (N, 3): exp of a random quadratic, fixed to the scanner.

    ``strength`` is the standard deviation of the linear and quadratic
    log-coefficients over ``radius_mm``; 0.2 gives the +-20-40 % bias of a
    multi-channel head coil.
    """
    u = (xyz - centre) / radius_mm
    terms = np.concatenate([u, u**2, u[:, [0, 0, 1]] * u[:, [1, 2, 2]]], axis=1)
    return np.exp(terms @ rng.normal(0.0, strength, terms.shape[1]))


def truncate_kspace(volumes: np.ndarray, factor: int) -> np.ndarray:
    """Keep the central 1/``factor`` of k-space along the first two (in-plane) axes: Gibbs ringing.

    ``volumes`` (X, Y, Z, ...) were simulated ``factor`` times finer in plane;
    the result is on the acquired grid, (X / factor, Y / factor, Z, ...). A
    sharp edge then rings with the sinc of the acquired resolution, as in a
    real acquisition that samples a band-limited part of k-space.
    """
    if factor == 1:
        return volumes
    from scipy import fft

    out_shape = (volumes.shape[0] // factor, volumes.shape[1] // factor)
    lo = [(n - m) // 2 for n, m in zip(volumes.shape[:2], out_shape)]
    out = np.empty(out_shape + volumes.shape[2:], np.float32)
    # One volume at a time in single precision: the oversampled 4-D spectrum would not fit comfortably.
    for index in np.ndindex(volumes.shape[3:]):
        spectrum = fft.fftshift(fft.fft2(volumes[(...,) + index], axes=(0, 1)), axes=(0, 1))
        central = spectrum[lo[0]: lo[0] + out_shape[0], lo[1]: lo[1] + out_shape[1]]
        out[(...,) + index] = fft.ifft2(fft.ifftshift(central, axes=(0, 1)), axes=(0, 1)).real / factor**2
    return out


def add_rician_noise(signal: np.ndarray, inside: np.ndarray, sigma: float, rng: np.random.Generator,
                     shape: tuple[int, ...]) -> np.ndarray:
    """Magnitude |S + sigma (n1 + i n2)| on the full grid, rounded to int16 as scanners store it.

    ``signal`` holds the noise-free values of the ``inside`` voxels (N, V), or
    the whole 4-D grid when ``inside`` is None; built in place, since these
    are the cohort's largest arrays.
    """
    real = rng.standard_normal(shape, dtype=np.float32)
    real *= sigma
    if inside is None:
        real += signal
    else:
        real[inside] += signal
    imag = rng.standard_normal(shape, dtype=np.float32)
    imag *= sigma
    magnitude = np.hypot(real, imag, out=real)
    np.clip(np.rint(magnitude, out=magnitude), 0, np.iinfo(np.int16).max, out=magnitude)
    return magnitude.astype(np.int16)
