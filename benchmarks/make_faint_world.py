"""A second world of large, faint defects on real normal images, made by a generator the models never train with.

Held-out magnetic-tile defects such as *uneven* cover about a quarter of the
image with a low-contrast change and soft borders; none of the development
types (blowhole, break, crack) looks like that, so a change aimed at them cannot
be judged there. This script writes an MVTec-layout folder from a real one:

* ``train/good``: the source's training images, linked, so that a model trained
  on the source scores this folder with the same validation split;
* ``test/good``: every normal test image of the source, as PNG;
* ``test/<kind>``: every one of them again with one elliptical Gaussian bump
  ``w = exp(-d^2 / 2)`` (d the Mahalanobis distance to a random centre, random
  axes and angle; the region w >= 0.5 covers ``--area`` of the image), and its
  mask w >= 0.5 in ``ground_truth/<kind>``. Kinds: ``bright`` x (1 + a w),
  ``dark`` x (1 - a w), ``flat`` x + min(1, 3 a) w (blur(x) - x) (local texture
  smoothed away, blur std 4 px), a ~ U(``--strength``).

Each bumped image is the same shot as a normal one, so the image AUROC compares
an image with itself changed, and the normal images' near duplicates in the
training set help neither side. The bumps are not Perlin regions and not any of
:func:`anomri.models.synthetic_anomalies.faint_anomalies`' changes applied the
same way: a different generator, not an independent one (both are smooth and
large); treat it as a second *tuning* world.

    python benchmarks/make_faint_world.py --root ../shared/data/magnetic_tile --out /tmp/faint_world
    # then score it with a model trained on the source (bench_images.py skips training when the model exists):
    mkdir -p /tmp/fw/images && ln -s /tmp/bi/draem/images/models /tmp/fw/images/models
    python benchmarks/bench_images.py --root /tmp/faint_world --out /tmp/fw --methods draem --held-out bright dark flat --dev
"""

from __future__ import annotations

import argparse
import math
import os
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage

from anomri.io.images import NORMAL_CLASS, scan_mvtec

KINDS = ("bright", "dark", "flat")
#: Std of the blur behind the ``flat`` change, px.
FLAT_BLUR = 4.0


def bump(shape: tuple[int, int], area: float, rng: np.random.Generator) -> np.ndarray:
    """An elliptical Gaussian weight (H, W) in (0, 1] whose region w >= 0.5 covers about ``area`` of the image."""
    height, width = shape
    aspect = math.exp(rng.uniform(-0.7, 0.7))
    # Ellipse d^2 <= 2 ln 2 has area pi * sa * sb * 2 ln 2; choose sa * sb to give the wanted area.
    product = area * height * width / (2 * math.log(2) * math.pi)
    sa, sb = math.sqrt(product * aspect), math.sqrt(product / aspect)
    angle = rng.uniform(0, math.pi)
    cy, cx = rng.uniform(0.25, 0.75) * height, rng.uniform(0.25, 0.75) * width
    y, x = np.mgrid[:height, :width].astype(float)
    u = (x - cx) * math.cos(angle) + (y - cy) * math.sin(angle)
    v = -(x - cx) * math.sin(angle) + (y - cy) * math.cos(angle)
    return np.exp(-0.5 * ((u / sa) ** 2 + (v / sb) ** 2))


def change(image: np.ndarray, weight: np.ndarray, kind: str, strength: float) -> np.ndarray:
    """``image`` (H, W[, C]) in [0, 255] with the change ``kind`` of ``strength`` under ``weight``."""
    x = image.astype(float)
    w = weight[..., None] if x.ndim == 3 else weight
    if kind == "bright":
        out = x * (1 + strength * w)
    elif kind == "dark":
        out = x * (1 - strength * w)
    else:
        sigma = (FLAT_BLUR, FLAT_BLUR, 0) if x.ndim == 3 else FLAT_BLUR
        out = x + min(1.0, 3 * strength) * w * (ndimage.gaussian_filter(x, sigma) - x)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def make_world(root: Path, out: Path, area: tuple[float, float], strength: tuple[float, float], seed: int) -> None:
    folder = scan_mvtec(root)
    rng = np.random.default_rng(seed)
    (out / "train").mkdir(parents=True, exist_ok=True)
    link = out / "train" / NORMAL_CLASS
    if not link.exists():
        os.symlink((root / "train" / NORMAL_CLASS).resolve(), link)
    normals = [r for r in folder.test if r.label == NORMAL_CLASS]
    for kind in (NORMAL_CLASS, *KINDS):
        (out / "test" / kind).mkdir(parents=True, exist_ok=True)
        if kind != NORMAL_CLASS:
            (out / "ground_truth" / kind).mkdir(parents=True, exist_ok=True)
    for record in normals:
        with Image.open(record.path) as opened:
            mode = opened.mode
            image = np.asarray(opened)
        Image.fromarray(image, mode).save(out / "test" / NORMAL_CLASS / f"{record.path.stem}.png")
        for kind in KINDS:
            weight = bump(image.shape[:2], rng.uniform(*area), rng)
            Image.fromarray(change(image, weight, kind, rng.uniform(*strength)), mode).save(
                out / "test" / kind / f"{record.path.stem}.png")
            Image.fromarray(np.where(weight >= 0.5, 255, 0).astype(np.uint8), "L").save(
                out / "ground_truth" / kind / f"{record.path.stem}_mask.png")
    print(f"{out}: {len(normals)} normal test images, each also with a bump of each of {', '.join(KINDS)}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, required=True, help="MVTec-layout folder with normal test images")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--area", type=float, nargs=2, default=(0.1, 0.4), help="range of the bump's area fraction")
    parser.add_argument("--strength", type=float, nargs=2, default=(0.15, 0.3), help="range of a")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    make_world(args.root, args.out, tuple(args.area), tuple(args.strength), args.seed)


if __name__ == "__main__":
    main()
