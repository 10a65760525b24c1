"""DRAEM: Perlin noise and masks, synthetic anomalies, and the segmentation network on a toy case."""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np
import pytest
import torch
from scipy import ndimage
from sklearn.metrics import roc_auc_score

from anomri.errors import InputError
from anomri.images.settings import DRAEM_TEXTURES, ImageSettings
from anomri.images.training import train_image_model
from anomri.models.training import autocast_dtype
from anomri.models.synthetic_anomalies import (FAINT_CHANGES, TEXTURE_SOURCES, faint_anomalies, perlin_masks,
                                               perlin_noise, soft_masks, synthesize_anomalies)


def _brute_perlin(angles: np.ndarray, i: int, j: int, height: int, width: int) -> float:
    """Ken Perlin's gradient noise at the centre of pixel (i, j), written out for one point."""
    ry, rx = angles.shape[0] - 1, angles.shape[1] - 1
    u, v = (i + 0.5) * ry / height, (j + 0.5) * rx / width
    a, b = min(int(math.floor(u)), ry - 1), min(int(math.floor(v)), rx - 1)
    fu, fv = u - a, v - b

    def fade(t: float) -> float:
        return 6 * t**5 - 15 * t**4 + 10 * t**3

    def dot(ci: int, cj: int) -> float:
        angle = angles[a + ci, b + cj]
        return math.cos(angle) * (fu - ci) + math.sin(angle) * (fv - cj)

    top = dot(0, 0) + fade(fv) * (dot(0, 1) - dot(0, 0))
    bottom = dot(1, 0) + fade(fv) * (dot(1, 1) - dot(1, 0))
    return math.sqrt(2) * (top + fade(fu) * (bottom - top))


def test_perlin_noise_is_gradient_noise() -> None:
    rng = np.random.default_rng(0)
    angles = rng.uniform(0, 2 * np.pi, (4, 6))  # 3 x 5 lattice cells
    noise = perlin_noise(torch.from_numpy(angles), (21, 40)).numpy()
    expected = np.array([[_brute_perlin(angles, i, j, 21, 40) for j in range(40)] for i in range(21)])
    np.testing.assert_allclose(noise, expected, atol=1e-10)
    assert np.abs(noise).max() <= 1.0
    # At a lattice point every offset to it vanishes, and so does the noise: with half a pixel per cell,
    # pixel centres (i + 0.5) * 2 are the odd lattice points.
    on_lattice = perlin_noise(torch.from_numpy(rng.uniform(0, 2 * np.pi, (5, 7))), (2, 3))
    torch.testing.assert_close(on_lattice, torch.zeros(2, 3, dtype=torch.float64), atol=1e-12, rtol=0)


def test_perlin_masks_cover_their_drawn_area_in_smooth_blobs() -> None:
    size, low, high = 128, 0.01, 0.2
    masks = perlin_masks(48, size, (low, high), torch.Generator().manual_seed(0)).numpy()
    assert masks.shape == (48, size, size) and masks.dtype == bool
    areas = masks.mean(axis=(1, 2))
    half_pixel = 0.5 / size**2
    assert np.all(areas >= low - half_pixel) and np.all(areas <= high + half_pixel)
    assert areas.max() - areas.min() > 0.5 * (high - low)  # drawn across the range, not one value
    exact = perlin_masks(8, size, (0.05, 0.05), torch.Generator().manual_seed(1)).numpy()
    assert np.all(exact.sum(axis=(1, 2)) == round(0.05 * size**2))
    # Perlin-shaped: level sets of a smooth field are blobs with short borders. Measured against masks of
    # the same areas whose pixels are drawn independently: far fewer components, and fewer border pixels.
    rng = np.random.default_rng(0)
    border_ratios = []
    for mask in masks:
        scattered = rng.random(mask.shape) < mask.mean()
        assert ndimage.label(mask)[1] < 0.5 * ndimage.label(scattered)[1]
        border_ratios.append(_border_fraction(mask) / _border_fraction(scattered))
    assert np.median(border_ratios) < 0.6
    with pytest.raises(ValueError, match="area"):
        perlin_masks(1, size, (0.3, 0.1), torch.Generator())


def test_ridge_masks_are_thin_curves_of_the_same_area_and_mix_in_at_their_probability() -> None:
    size, area = 128, (0.002, 0.02)

    def masks(n: int, ridge_probability: float) -> np.ndarray:
        return perlin_masks(n, size, area, torch.Generator().manual_seed(3), ridge_probability=ridge_probability
                            ).numpy()

    blobs, ridges = masks(32, 0.0), masks(32, 1.0)
    # The ridge coin is drawn after the fields and areas, so one seed gives both shapes the same field and area.
    np.testing.assert_array_equal(ridges.sum(axis=(1, 2)), blobs.sum(axis=(1, 2)))

    def core(m: np.ndarray) -> float:
        """Share of the mask that survives a 3 x 3 erosion."""
        return float(ndimage.binary_erosion(m).sum() / m.sum())

    # Thin: an erosion leaves almost nothing of a ridge, while a blob of the same area keeps its core.
    assert np.mean([core(m) for m in ridges]) < 0.1 < 0.3 < np.mean([core(m) for m in blobs])
    # Each mask of a mixed draw is its field's blob or its ridge, ridges about half the time.
    mixed = masks(32, 0.5)
    is_ridge = [np.array_equal(m, r) for m, r in zip(mixed, ridges)]
    assert all(r or np.array_equal(m, b) for m, b, r in zip(mixed, blobs, is_ridge))
    assert 8 <= sum(is_ridge) <= 24
    with pytest.raises(ValueError, match="ridge"):
        perlin_masks(1, size, area, torch.Generator(), ridge_probability=1.5)


def _border_fraction(mask: np.ndarray) -> float:
    """Fraction of the mask's pixels with a 4-neighbour outside it."""
    return float((mask & ~ndimage.binary_erosion(mask, border_value=1)).sum() / max(mask.sum(), 1))


@pytest.mark.parametrize("source", TEXTURE_SOURCES)
def test_synthetic_anomalies_stay_inside_their_masks(source: str) -> None:
    images = torch.rand(16, 3, 32, 32)
    batch = synthesize_anomalies(images, torch.Generator().manual_seed(2), probability=0.5, area=(0.02, 0.3),
                                 source=source)
    masks = batch.masks.bool().expand_as(images)
    assert batch.masks.shape == (16, 1, 32, 32) and set(batch.masks.unique().tolist()) <= {0.0, 1.0}
    assert torch.equal(batch.images[~masks], images[~masks])  # bit for bit outside the masks
    assert (batch.images[masks] != images[masks]).float().mean() > 0.9  # and changed inside
    assert batch.images.min() >= 0 and batch.images.max() <= 1
    with_anomaly = batch.masks.flatten(1).any(1)
    assert 0 < int(with_anomaly.sum()) < 16  # probability 0.5: some images kept normal
    areas = batch.masks.flatten(1).mean(1)[with_anomaly]
    assert torch.all(areas >= 0.02 - 1 / 32**2) and torch.all(areas <= 0.3 + 1 / 32**2)
    none = synthesize_anomalies(images, torch.Generator().manual_seed(2), probability=0.0, source=source)
    assert torch.equal(none.images, images) and not none.masks.any()


def test_soft_masks_are_large_smooth_regions_of_their_drawn_area() -> None:
    size, low, high = 128, 0.1, 0.5
    alpha = soft_masks(40, size, (low, high), torch.Generator().manual_seed(0)).numpy()
    assert alpha.shape == (40, size, size) and alpha.min() >= 0 and alpha.max() <= 1
    areas = (alpha >= 0.5).mean(axis=(1, 2))
    assert np.all(areas >= low - 1 / size**2) and np.all(areas <= high + 1 / size**2)
    assert areas.max() - areas.min() > 0.5 * (high - low)
    # Soft: every mask has a border of intermediate weights, and neighbouring pixels differ by far less than 1.
    assert np.all(((alpha > 0.05) & (alpha < 0.95)).mean(axis=(1, 2)) > 0.01)
    assert np.abs(np.diff(alpha, axis=2)).max() < 0.5
    # Large: a few pieces of several per cent of the image each, not specks.
    piece_size = areas / np.array([ndimage.label(a >= 0.5)[1] for a in alpha])
    assert piece_size.min() >= 0.01 and np.median(piece_size) >= 0.03
    with pytest.raises(ValueError, match="soft mask area"):
        soft_masks(1, size, (0.2, 1.0), torch.Generator())


def test_faint_anomalies_blend_a_change_of_the_image_under_a_soft_mask() -> None:
    # Black images, white "other" images: of the changes, only brightness (by at most 0.25, upwards) and the
    # other image (to exactly 1) move a black pixel, so an image whose change reaches past 0.25 took the other
    # image, and there the result is x + alpha (1 - x) = alpha, the soft mask itself.
    n, size = 120, 32
    black, white = torch.zeros(n, 1, size, size), torch.ones(n, 1, size, size)
    batch = faint_anomalies(black, torch.Generator().manual_seed(3), area=(0.1, 0.5), others=white)
    assert batch.images.min() >= 0 and batch.images.max() <= 1
    other = batch.images.flatten(1).amax(1) > 0.25
    assert abs(float(other.float().mean()) - 1 / len(FAINT_CHANGES)) < 0.1  # one change in six
    alpha = batch.images[other]
    torch.testing.assert_close(batch.masks[other], (alpha >= 0.5).float())
    areas = batch.masks[other].flatten(1).mean(1)
    assert torch.all(areas >= 0.1 - 1 / size**2) and torch.all(areas <= 0.5 + 1 / size**2)
    brightness = ~other & (batch.images.flatten(1).amax(1) > 0)
    assert torch.all(batch.images[brightness] <= 0.25 + 1e-6)
    # On a mid-grey image every change moves pixels, and never by more than the soft mask allows: |x' - x| <= 1 * alpha
    # with alpha < 0.5 outside the mask.
    grey = torch.full((n, 1, size, size), 0.5) + 0.1 * torch.rand(n, 1, size, size)
    moved = faint_anomalies(grey, torch.Generator().manual_seed(4), others=torch.rand(n, 1, size, size))
    outside = moved.masks.expand_as(grey) == 0
    assert (moved.images - grey).abs()[outside].max() < 0.5


def test_faint_anomalies_replace_a_share_of_the_pasted_ones() -> None:
    images = torch.rand(64, 1, 32, 32)
    generator = torch.Generator().manual_seed(5)
    every = synthesize_anomalies(images, generator, probability=1.0, area=(0.001, 0.01), faint_probability=1.0)
    areas = every.masks.flatten(1).mean(1)
    assert torch.all(areas >= 0.1 - 1 / 32**2)  # all large: none of the pasted masks' 0.1-1 %
    half = synthesize_anomalies(images, torch.Generator().manual_seed(6), probability=1.0, area=(0.001, 0.01),
                                faint_probability=0.5)
    share = float((half.masks.flatten(1).mean(1) >= 0.05).float().mean())
    assert 0.3 < share < 0.7
    kept = synthesize_anomalies(images, torch.Generator().manual_seed(7), probability=0.0, faint_probability=1.0)
    assert torch.equal(kept.images, images) and not kept.masks.any()  # only images chosen for an anomaly get one
    with pytest.raises(ValueError, match="faint anomaly probability"):
        synthesize_anomalies(images, generator, faint_probability=1.5)


def test_texture_choices_agree_and_bad_draem_settings_are_refused() -> None:
    assert DRAEM_TEXTURES == TEXTURE_SOURCES
    with pytest.raises(InputError, match="draem_texture"):
        ImageSettings(draem_texture="dtd")
    with pytest.raises(InputError, match="draem_mask_area"):
        ImageSettings(draem_mask_area=[0.5, 0.1])
    with pytest.raises(InputError, match="draem_ridge_probability"):
        ImageSettings(draem_ridge_probability=-0.1)
    with pytest.raises(InputError, match="draem_faint_probability"):
        ImageSettings(draem_faint_probability=2.0)
    with pytest.raises(InputError, match="draem_faint_area"):
        ImageSettings(draem_faint_area=[0.2, 1.0])


@pytest.fixture
def one_thread() -> Iterator[None]:
    """One torch thread: these networks are tiny, and threads on a busy machine cost far more than they give."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_segmentation_network_finds_a_square_it_never_saw(one_thread: None) -> None:
    # Trained on flat noisy images with Perlin-masked anomalies only, tested on squares pasted in.
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    size = 32
    normal = (0.5 + 0.02 * rng.standard_normal((48, 1, size, size))).astype(np.float32)
    settings = ImageSettings(batch_size=16, draem_epochs=80, draem_learning_rate=2e-3,
                             draem_reconstruction_channels=[8, 16], draem_segmentation_channels=[8, 16, 32])
    model, history = train_image_model("draem", normal, settings, progress=False)
    assert history[-1]["focal"] < history[0]["focal"]
    test = (0.5 + 0.02 * rng.standard_normal((8, 1, size, size))).astype(np.float32)
    masks = np.zeros((8, size, size), bool)
    for image, mask in zip(test, masks):
        top, left, side = rng.integers(2, 20), rng.integers(2, 20), rng.integers(4, 10)
        image[0, top:top + side, left:left + side] = rng.choice([0.1, 0.9])
        mask[top:top + side, left:left + side] = True
    anomaly_map = model.anomaly_map(torch.from_numpy(test)).numpy()
    assert anomaly_map.shape == (8, size, size) and anomaly_map.min() >= 0 and anomaly_map.max() <= 1
    assert roc_auc_score(masks.ravel(), anomaly_map.ravel()) > 0.95


def test_autocast_dtype_follows_the_precision_setting() -> None:
    cpu = torch.device("cpu")
    assert autocast_dtype("float32", cpu) is None
    assert autocast_dtype("bfloat16", cpu) is torch.bfloat16
    assert autocast_dtype("auto", cpu) in (None, torch.bfloat16)
    with pytest.raises(ValueError, match="float16"):
        autocast_dtype("float16", cpu)
    with pytest.raises(InputError, match="draem_precision"):
        ImageSettings(draem_precision="half")


def test_bfloat16_training_is_deterministic_and_keeps_its_losses_in_float32(one_thread: None) -> None:
    # Smooth, nearly flat images: their local variances (4e-4) are below bfloat16's rounding of a local mean
    # of 0.5 (2e-3), so an SSIM computed in bfloat16 would be noise.
    rng = np.random.default_rng(0)
    normal = (0.5 + 0.02 * rng.standard_normal((16, 1, 32, 32))).astype(np.float32)
    settings = ImageSettings(batch_size=8, draem_epochs=2, draem_precision="bfloat16",
                             draem_reconstruction_channels=[8, 16], draem_segmentation_channels=[8, 16, 32])
    first, history = train_image_model("draem", normal, settings, progress=False)
    second, again = train_image_model("draem", normal, settings, progress=False)
    assert history == again
    for (name, a), b in zip(first.state_dict().items(), second.state_dict().values()):
        assert (a.dtype == torch.float32 or not a.is_floating_point()) and torch.equal(a, b), name
    x = torch.from_numpy(normal[:8])
    masks = torch.zeros(8, 1, 32, 32)
    with torch.no_grad():
        exact = first.losses(x, x, masks)
        reduced = first.losses(x, x, masks, torch.bfloat16)
    for name, value in reduced.items():
        assert value.dtype == torch.float32
        assert abs(float(value) - float(exact[name])) < 0.02 + 0.02 * abs(float(exact[name])), name


def test_flip_averaging_is_the_mean_of_the_maps_of_the_flipped_images_flipped_back() -> None:
    from anomri.images.scoring import flip_averaged

    weights = torch.arange(1.0, 1.0 + 5 * 7).reshape(5, 7)  # not symmetric: every flip changes the map

    def anomaly_map(images: torch.Tensor) -> torch.Tensor:
        return images[:, 0] ** 2 * weights + images[:, 1]

    images = torch.rand(3, 2, 5, 7, generator=torch.Generator().manual_seed(0))
    x = images.numpy()
    w = weights.numpy()
    by_hand = [x[:, 0] ** 2 * w + x[:, 1],
               (x[:, 0, :, ::-1] ** 2 * w + x[:, 1, :, ::-1])[:, :, ::-1],
               (x[:, 0, ::-1] ** 2 * w + x[:, 1, ::-1])[:, ::-1],
               (x[:, 0, ::-1, ::-1] ** 2 * w + x[:, 1, ::-1, ::-1])[:, ::-1, ::-1]]
    np.testing.assert_allclose(flip_averaged(anomaly_map, (-1,))(images).numpy(), np.mean(by_hand[:2], axis=0),
                               rtol=1e-6)
    np.testing.assert_allclose(flip_averaged(anomaly_map, (-1, -2))(images).numpy(), np.mean(by_hand, axis=0),
                               rtol=1e-6)
    np.testing.assert_array_equal(flip_averaged(anomaly_map, ())(images).numpy(), anomaly_map(images).numpy())
