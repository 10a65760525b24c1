"""A small synthetic OCT-like image set in the MVTec-AD layout, so the image workflow runs out of the box.

Each image is a retinal B-scan caricature:

* **Anatomy**: a retina band that follows a smooth random curve, with a foveal
  pit, made of layers of alternating reflectivity (bright nerve-fibre layer,
  plexiform layers, dark nuclear layers, bright photoreceptor line and RPE),
  above a textured choroid and below a dark vitreous.
* **Acquisition**: multiplicative speckle (gamma-distributed, as in coherent
  imaging), a little axial blur and additive noise; widths vary between
  images, as B-scans of different protocols do.
* **Anomalies** (test only): ``fluid`` — dark, rounded intraretinal fluid
  pockets; ``drusen`` — dome-shaped RPE elevations over moderately bright
  deposits. The ground-truth mask is the changed region.

Everything is deterministic from one integer seed.
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage

from anomri.io.atomic import atomic_path, write_text

logger = logging.getLogger(__name__)

__all__ = ["DEFECT_TYPES", "make_demo_images", "simulate_bscan"]

DEFECT_TYPES = ("fluid", "drusen")

#: (thickness fraction of the retina, reflectivity) from the vitreous side down to Bruch's membrane.
RETINA_LAYERS = (
    (0.10, 0.85),  # nerve-fibre layer
    (0.12, 0.45),  # ganglion cell layer
    (0.12, 0.60),  # inner plexiform layer
    (0.10, 0.25),  # inner nuclear layer
    (0.08, 0.55),  # outer plexiform layer
    (0.26, 0.18),  # outer nuclear layer
    (0.06, 0.90),  # photoreceptor (IS/OS) line
    (0.16, 1.00),  # retinal pigment epithelium
)
VITREOUS_LEVEL = 0.04
CHOROID_LEVEL = 0.45
SPECKLE_SHAPE = 6.0  # gamma shape: smaller = harsher speckle
NOISE_SD = 0.02


@dataclass(frozen=True)
class BScan:
    """One simulated B-scan: intensities in [0, 1] and the anomaly mask."""

    image: np.ndarray
    mask: np.ndarray


def _smooth_curve(rng: np.random.Generator, width: int, amplitude: float, n_modes: int = 3) -> np.ndarray:
    # A few low-frequency sinusoids: the gentle tilt and curvature of a real retina.
    x = np.linspace(0.0, 1.0, width)
    curve = np.zeros(width)
    for k in range(1, n_modes + 1):
        curve += rng.normal(0.0, amplitude / k) * np.sin(np.pi * k * x + rng.uniform(0, 2 * np.pi))
    return curve


def simulate_bscan(rng: np.random.Generator, height: int, width: int, defect: str | None = None) -> BScan:
    """Simulate one B-scan of ``height`` x ``width`` pixels, optionally with a ``defect`` of DEFECT_TYPES."""
    rows = np.arange(height)[:, None].astype(float)
    cols = np.arange(width)
    thickness = height * rng.uniform(0.28, 0.34)
    top = height * rng.uniform(0.25, 0.32) + _smooth_curve(rng, width, 0.04 * height)
    fovea = rng.uniform(0.35, 0.65) * width
    pit = 0.35 * thickness * np.exp(-0.5 * ((cols - fovea) / (0.06 * width)) ** 2)
    inner = top + pit  # the pit thins the inner retina only
    bottom = top + thickness
    depth = (rows - inner) / (bottom - inner)  # 0 at the inner surface, 1 at Bruch's membrane

    image = np.full((height, width), VITREOUS_LEVEL)
    edges = np.cumsum([0.0] + [t for t, _ in RETINA_LAYERS])
    for (lo, hi), (_, level) in zip(zip(edges[:-1], edges[1:]), RETINA_LAYERS):
        image[(depth >= lo) & (depth < hi)] = level * rng.uniform(0.9, 1.1)
    choroid = rows >= bottom
    texture = ndimage.gaussian_filter(rng.normal(0.0, 1.0, (height, width)), (1.5, 4.0))
    image[choroid] = CHOROID_LEVEL * (1.0 + 0.6 * texture[choroid]) * np.exp(-(rows - bottom) / (0.5 * height))[choroid]

    mask = np.zeros((height, width), bool)
    if defect == "fluid":
        for _ in range(rng.integers(1, 3)):
            c = rng.uniform(0.2, 0.8) * width
            centre_row = inner[int(c)] + rng.uniform(0.45, 0.7) * (bottom[int(c)] - inner[int(c)])
            a, b = rng.uniform(0.04, 0.08) * width, rng.uniform(0.10, 0.18) * thickness
            pocket = ((cols - c) / a) ** 2 + ((rows - centre_row) / b) ** 2 <= 1.0
            image[pocket] = VITREOUS_LEVEL * 1.5
            mask |= pocket
    elif defect == "drusen":
        for _ in range(rng.integers(1, 3)):
            c = rng.uniform(0.2, 0.8) * width
            half_width = rng.uniform(0.04, 0.08) * width
            lift = rng.uniform(0.12, 0.22) * thickness * np.clip(1.0 - ((cols - c) / half_width) ** 2, 0.0, None)
            rpe_top = top + thickness * edges[-2]
            deposit = (rows >= rpe_top - lift) & (rows < bottom) & (lift > 0.5)
            lifted_rpe = (rows >= rpe_top - lift) & (rows < bottom - lift) & (lift > 0.5)
            image[deposit] = 0.6
            image[lifted_rpe] = RETINA_LAYERS[-1][1]
            mask |= deposit
    image = ndimage.gaussian_filter(image, (0.8, 0.5))
    speckled = image * rng.gamma(SPECKLE_SHAPE, 1.0 / SPECKLE_SHAPE, image.shape)
    noisy = speckled + rng.normal(0.0, NOISE_SD, image.shape)
    return BScan(np.clip(noisy, 0.0, 1.0).astype(np.float32), mask)


def _write_png(path: Path, array: np.ndarray) -> None:
    with atomic_path(path) as tmp:
        Image.fromarray(array).save(tmp)


def _to_uint8(image: np.ndarray) -> np.ndarray:
    return np.round(np.clip(image, 0.0, 1.0) * 255.0).astype(np.uint8)


def make_demo_images(
    out: str | Path,
    n_train: int = 60,
    n_test_good: int = 12,
    n_test_per_defect: int = 12,
    height: int = 128,
    width_range: tuple[int, int] = (160, 224),
    seed: int = 0,
) -> Path:
    """Write the synthetic OCT-like set to ``out`` in the MVTec-AD layout.

    Parameters
    ----------
    out : path
        Created (replaced when it exists).
    n_train, n_test_good, n_test_per_defect : int
        Image counts: ``train/good``, ``test/good`` and each ``test/<defect>``.
    height : int
        B-scan height in pixels.
    width_range : (int, int)
        Widths are drawn uniformly from this inclusive range.
    seed : int
        Fixes every image bit for bit.

    Returns
    -------
    Path
        ``out``.
    """
    out = Path(out)
    if out.exists():
        shutil.rmtree(out)
    plan = [("train", "good", None, n_train), ("test", "good", None, n_test_good)]
    plan += [("test", d, d, n_test_per_defect) for d in DEFECT_TYPES]
    for group, (split, label, defect, count) in enumerate(plan):
        for i in range(count):
            # One stream per image: adding images to one class never changes another.
            rng = np.random.default_rng([seed, group, i])
            width = int(rng.integers(width_range[0], width_range[1] + 1))
            scan = simulate_bscan(rng, height, width, defect)
            stem = f"{i:03d}"
            _write_png(out / split / label / f"{stem}.png", _to_uint8(scan.image))
            if defect is not None:
                _write_png(out / "ground_truth" / label / f"{stem}_mask.png", scan.mask.astype(np.uint8) * 255)
    write_text(out / "README.md", (
        "# anomri synthetic OCT-like demo images\n\n"
        "Simulated retinal B-scans (layered retina, speckle) in the MVTec-AD layout. "
        f"Anomalies in test: {', '.join(DEFECT_TYPES)}; masks in ground_truth/. "
        f"Generated by `anomri demo-images` with seed {seed}.\n"
    ))
    logger.info("wrote %d demo images to %s", sum(p[3] for p in plan), out)
    return out
