"""Image folders in the MVTec layout: reading, masks, bad input, the demo set; the geometry of model inputs."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from anomri.demo.images import DEFECT_TYPES, make_demo_images
from anomri.errors import InputError
from anomri.images.geometry import ImageGeometry, load_model_inputs, split_validation
from anomri.io.images import infer_channels, read_image, read_mask, scan_mvtec

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def _save(path: Path, array: np.ndarray, **kwargs) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, **kwargs)


@pytest.fixture
def tiny_mvtec(tmp_path: Path) -> Path:
    """Three training images of different sizes and formats, a good and a defective test image."""
    rng = np.random.default_rng(0)
    root = tmp_path / "tiny"
    _save(root / "train" / "good" / "a.png", rng.integers(0, 256, (20, 30), dtype=np.uint8))
    _save(root / "train" / "good" / "b.jpg", rng.integers(0, 256, (25, 17), dtype=np.uint8))
    _save(root / "train" / "good" / "c.tif", (rng.integers(0, 65536, (18, 22))).astype(np.uint16))
    _save(root / "test" / "good" / "d.png", rng.integers(0, 256, (20, 30), dtype=np.uint8))
    _save(root / "test" / "scratch" / "e.png", rng.integers(0, 256, (12, 16), dtype=np.uint8))
    # Anti-aliased mask: grey levels on both sides of 128.
    mask = np.zeros((12, 16), np.uint8)
    mask[2:5, 3:8] = [[0, 100, 127, 128, 200], [255, 255, 129, 1, 128], [127, 128, 0, 0, 255]]
    _save(root / "ground_truth" / "scratch" / "e_mask.png", mask)
    return root


def test_scan_pairs_images_and_masks(tiny_mvtec: Path) -> None:
    folder = scan_mvtec(tiny_mvtec)
    assert [r.path.name for r in folder.train] == ["a.png", "b.jpg", "c.tif"]
    assert [(r.label, r.path.name) for r in folder.test] == [("good", "d.png"), ("scratch", "e.png")]
    assert folder.test[0].mask_path is None
    assert folder.test[1].mask_path == tiny_mvtec / "ground_truth" / "scratch" / "e_mask.png"
    assert folder.defect_types == ["scratch"]


def test_read_image_scales_by_bit_depth(tiny_mvtec: Path) -> None:
    raw8 = np.asarray(Image.open(tiny_mvtec / "train" / "good" / "a.png"))
    image = read_image(tiny_mvtec / "train" / "good" / "a.png")
    assert image.shape == (1, 20, 30) and image.dtype == np.float32
    np.testing.assert_allclose(image[0], raw8 / 255.0, atol=1e-7)
    raw16 = np.asarray(Image.open(tiny_mvtec / "train" / "good" / "c.tif"))
    np.testing.assert_allclose(read_image(tiny_mvtec / "train" / "good" / "c.tif")[0], raw16 / 65535.0, atol=1e-6)
    rgb = read_image(tiny_mvtec / "train" / "good" / "a.png", channels=3)
    assert rgb.shape == (3, 20, 30) and np.array_equal(rgb[0], rgb[2])


def test_mask_binarised_at_128(tiny_mvtec: Path) -> None:
    record = scan_mvtec(tiny_mvtec).test[1]
    raw = np.asarray(Image.open(record.mask_path))
    mask = read_mask(record, (12, 16))
    assert mask.dtype == bool
    np.testing.assert_array_equal(mask, raw >= 128)
    assert mask.sum() == 8  # by hand: 128, 200 | 255, 255, 129, 128 | 128, 255
    assert not read_mask(scan_mvtec(tiny_mvtec).test[0], (20, 30)).any()


def test_channels_inferred_from_colour(tiny_mvtec: Path) -> None:
    assert infer_channels(scan_mvtec(tiny_mvtec).train) == 1
    _save(tiny_mvtec / "train" / "good" / "f.png", np.zeros((8, 8, 3), np.uint8))
    assert infer_channels(scan_mvtec(tiny_mvtec).train) == 3


@pytest.mark.parametrize("problem", ["no_train", "empty_train", "missing_mask", "mask_size", "unreadable"])
def test_bad_input_names_the_file(tiny_mvtec: Path, problem: str) -> None:
    if problem == "no_train":
        for p in (tiny_mvtec / "train" / "good").iterdir():
            p.unlink()
        (tiny_mvtec / "train" / "good").rmdir()
        with pytest.raises(InputError, match="train/good"):
            scan_mvtec(tiny_mvtec)
    elif problem == "empty_train":
        for p in (tiny_mvtec / "train" / "good").iterdir():
            p.unlink()
        with pytest.raises(InputError, match="no image"):
            scan_mvtec(tiny_mvtec)
    elif problem == "missing_mask":
        (tiny_mvtec / "ground_truth" / "scratch" / "e_mask.png").unlink()
        with pytest.raises(InputError, match="e.png.*without a mask"):
            scan_mvtec(tiny_mvtec)
    elif problem == "mask_size":
        _save(tiny_mvtec / "ground_truth" / "scratch" / "e_mask.png", np.zeros((13, 16), np.uint8))
        record = scan_mvtec(tiny_mvtec).test[1]
        with pytest.raises(InputError, match="e_mask.png.*16x13"):
            read_mask(record, read_image(record.path).shape[1:])
    else:
        bad = tiny_mvtec / "train" / "good" / "z.png"
        bad.write_bytes(b"not an image")
        with pytest.raises(InputError, match="z.png: unreadable image"):
            read_image(bad)


def test_split_validation_is_deterministic_and_disjoint(tiny_mvtec: Path) -> None:
    records = scan_mvtec(tiny_mvtec).train
    train, val = split_validation(records, 0.34, seed=3)
    assert len(val) == 1 and len(train) == 2 and not set(train) & set(val)
    assert split_validation(records, 0.34, seed=3) == (train, val)


@pytest.mark.parametrize("shape", [(37, 53), (16, 16), (9, 40)])
def test_tiles_stitch_back_to_the_original(shape: tuple[int, int]) -> None:
    """Stitching each tile's own pixels must rebuild the image exactly, at its original size."""
    image = np.random.default_rng(1).random((1, *shape), dtype=np.float32)
    geometry = ImageGeometry(mode="tile", size=16, tile_overlap=0.5)
    tiles, placement = geometry.to_inputs(image)
    assert tiles.shape[1:] == (1, 16, 16)
    np.testing.assert_allclose(geometry.to_original(tiles[:, 0], placement), image[0], atol=1e-6)


def test_resize_maps_return_at_original_size() -> None:
    image = np.random.default_rng(2).random((3, 45, 70), dtype=np.float32)
    geometry = ImageGeometry(mode="resize", size=32)
    inputs, placement = geometry.to_inputs(image)
    assert inputs.shape == (1, 3, 32, 32)
    # A map varying smoothly from left to right keeps that order after resizing back.
    ramp = np.tile(np.linspace(0, 1, 32, dtype=np.float32), (32, 1))[None]
    restored = geometry.to_original(ramp, placement)
    assert restored.shape == (45, 70) and np.all(np.diff(restored[10]) >= 0)


def test_retina_band_crop_keeps_the_bright_rows() -> None:
    image = np.full((1, 60, 40), 0.05, np.float32)
    image[:, 25:35] = 0.9
    geometry = ImageGeometry(mode="resize", size=16, band="crop", band_margin=0.1)
    row0, row1 = geometry.band_rows(image)
    assert 22 <= row0 <= 25 and 35 <= row1 <= 38
    _, placement = geometry.to_inputs(image)
    rows = np.repeat(np.linspace(1.0, 2.0, 16, dtype=np.float32)[:, None], 16, 1)[None]
    restored = geometry.to_original(rows, placement)
    assert restored.shape == (60, 40)
    band = restored[row0:row1]
    assert band[0, 0] < band[-1, 0]  # the map's rows land on the band's rows, in order
    # Nothing outside the band was scored: it gets the band's lowest value.
    np.testing.assert_allclose(restored[:row0], band.min())
    np.testing.assert_allclose(restored[row1:], band.min())


def _curved_band(height: int = 90, width: int = 120) -> tuple[np.ndarray, np.ndarray]:
    """A speckled B-scan whose bright layer follows a curve; returns the image (1, H, W) and the curve."""
    rng = np.random.default_rng(3)
    columns = np.arange(width)
    curve = np.round(45 + 18 * np.sin(2 * np.pi * columns / width)).astype(int)
    rows = np.arange(height)[:, None]
    image = 0.1 + 0.3 * (np.abs(rows - curve - 6) <= 8) + 0.5 * (np.abs(rows - curve) <= 2)
    image = image * rng.gamma(8.0, 1 / 8.0, image.shape)  # multiplicative speckle
    return np.clip(image, 0, 1).astype(np.float32)[None], curve


def test_band_flattening_straightens_a_curved_band_and_maps_go_back() -> None:
    image, curve = _curved_band()
    geometry = ImageGeometry(mode="tile", size=16, tile_overlap=0.5, band="flatten")
    assert np.abs(geometry.band_curve(image) - curve).max() <= 2  # smoothing rounds the ends a little
    tiles, placement = geometry.to_inputs(image)
    # The flattened band is straight: its brightest layer sits on one row in every column.
    straight = np.zeros(placement.padded_shape)
    for tile, (r, c) in zip(tiles[:, 0], placement.origins):
        straight[r:r + 16, c:c + 16] = tile
    flat_curve = ImageGeometry.band_curve(straight[None, : placement.working_shape[0]])
    assert flat_curve.max() - flat_curve.min() <= 1
    # The crop after flattening is tighter than the curved band's full row range.
    assert placement.band[1] - placement.band[0] < curve.max() - curve.min() + 17
    # A map equal to the inputs themselves comes back as the image, in its original (curved) geometry.
    restored = geometry.to_original(tiles[:, 0], placement)
    assert restored.shape == image.shape[1:]
    # Exactly so at every pixel that the shifted crop kept; the bright layer is among them.
    flat_rows = np.arange(image.shape[1])[:, None] - np.array(placement.column_shifts)
    kept = (flat_rows >= placement.band[0]) & (flat_rows < placement.band[1])
    assert kept[np.abs(np.arange(image.shape[1])[:, None] - curve) <= 2].all()
    np.testing.assert_allclose(restored[kept], image[0][kept], atol=1e-6)


def test_load_model_inputs_tracks_owners(tiny_mvtec: Path) -> None:
    records = scan_mvtec(tiny_mvtec).train
    inputs = load_model_inputs(records, ImageGeometry(mode="tile", size=16, tile_overlap=0.0), 1, progress=False)
    counts = [len(p.origins) for p in inputs.placements]
    assert len(inputs.inputs) == sum(counts)
    assert [len(v) for v in inputs.per_image(inputs.inputs)] == counts
    assert counts == [2 * 2, 2 * 2, 2 * 2]  # 20x30, 25x17, 18x22 with 16 px tiles and an edge-flush tile


def test_demo_images_are_deterministic(tmp_path: Path) -> None:
    def digest(root: Path) -> str:
        h = hashlib.sha256()
        for p in sorted(root.rglob("*.png")):
            h.update(str(p.relative_to(root)).encode() + p.read_bytes())
        return h.hexdigest()

    kwargs = {"n_train": 3, "n_test_good": 1, "n_test_per_defect": 2, "height": 48, "width_range": (50, 70)}
    a = make_demo_images(tmp_path / "a", seed=5, **kwargs)
    b = make_demo_images(tmp_path / "b", seed=5, **kwargs)
    c = make_demo_images(tmp_path / "c", seed=6, **kwargs)
    assert digest(a) == digest(b) != digest(c)
    folder = scan_mvtec(a)
    assert len(folder.train) == 3 and folder.defect_types == sorted(DEFECT_TYPES)
    for record in folder.test:
        image = read_image(record.path)
        mask = read_mask(record, image.shape[1:])
        assert 50 <= image.shape[2] <= 70
        assert mask.any() == record.is_anomalous


def test_magnetic_tile_masks_match_images() -> None:
    root = SHARED_DATA / "magnetic_tile"
    if not root.is_dir():
        pytest.skip("shared magnetic_tile data absent")
    folder = scan_mvtec(root)
    assert len(folder.train) == 761 and folder.defect_types == ["blowhole", "break", "crack"]
    for record in [r for r in folder.test if r.is_anomalous][::20]:
        image = read_image(record.path)
        mask = read_mask(record, image.shape[1:])
        assert mask.any() and not mask.all()
