"""Patch memory: CutPaste's pasted patches, the greedy coreset, the memory bank's distances, and the method end
to end on a tiny folder."""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from scipy.spatial.distance import cdist
from sklearn.metrics import roc_auc_score
from torch.nn import functional as F

from anomri.errors import InputError
from anomri.images.outputs import ImageOutputs
from anomri.images.scoring import score_method
from anomri.images.settings import METHODS, MODEL_OF_METHOD, PRIMARY_SCORE, ImageSettings
from anomri.images.training import load_image_model, save_image_model, train_image_model, train_on_folder
from anomri.io.images import scan_mvtec
from anomri.models.cutpaste import CUT_AREA, CUT_ASPECT, SCAR_WIDTH, cut_paste, patch_outline, three_way_batch
from anomri.models.patch_memory import PatchMemory, greedy_coreset, random_projection
from anomri.scores.memory_bank import MemoryBankMap

TINY = {"patch_memory_width": 4, "patch_memory_epochs": 2, "patch_memory_batch_size": 8,
        "patch_memory_positions": 8, "patch_memory_coreset_size": 40, "batch_size": 8}


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """One torch thread: these networks are tiny, and threads on a busy machine cost far more than they give."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# --------------------------------------------------------------------------- CutPaste


@pytest.mark.parametrize("kind", ["cut-paste", "scar"])
def test_pasted_patches_are_jittered_copies_from_the_same_image_and_nothing_else_changes(kind: str) -> None:
    images = torch.rand(12, 2, 32, 32, dtype=torch.float64)
    before = images.clone()
    pasted = cut_paste(images, kind, torch.Generator().manual_seed(1))
    assert torch.equal(images, before)  # the input is left alone
    x, out, masks = images.numpy(), pasted.images.numpy(), pasted.masks.numpy()[:, 0]
    assert masks.shape == (12, 32, 32) and masks.any(axis=(1, 2)).all()
    for i in range(12):
        outside = ~masks[i]
        np.testing.assert_array_equal(out[i][:, outside], x[i][:, outside])  # bit for bit outside
        rows, cols = np.nonzero(masks[i])
        dy, dx = pasted.offsets[i].tolist()
        src_rows, src_cols = rows - dy, cols - dx
        assert src_rows.min() >= 0 and src_cols.min() >= 0 and src_rows.max() < 32 and src_cols.max() < 32
        gain, bias = float(pasted.gain[i]), float(pasted.bias[i])
        assert 0.9 <= gain <= 1.1 and -0.1 <= bias <= 0.1
        expected = np.clip(gain * x[i][:, src_rows, src_cols] + bias, 0, 1)
        np.testing.assert_allclose(out[i][:, rows, cols], expected, rtol=0, atol=1e-12)
        # The same image's pixels: another image of the batch at that offset would not match.
        other = np.clip(gain * x[(i + 1) % 12][:, src_rows, src_cols] + bias, 0, 1)
        assert not np.allclose(out[i][:, rows, cols], other)


def test_cut_paste_rectangles_have_cutpastes_area_and_aspect() -> None:
    size = 64
    for seed in range(40):
        outline = patch_outline("cut-paste", size, torch.Generator().manual_seed(seed))
        height, width = outline.shape
        assert outline.all()
        # Sides are rounded to whole pixels: allow half a pixel on each.
        assert (height - 0.5) * (width - 0.5) <= CUT_AREA[1] * size**2
        assert (height + 0.5) * (width + 0.5) >= CUT_AREA[0] * size**2
        assert (height - 0.5) / (width + 0.5) <= CUT_ASPECT[1] and (height + 0.5) / (width - 0.5) >= CUT_ASPECT[0]
    with pytest.raises(ValueError, match="patch kind"):
        patch_outline("blob", size, torch.Generator())


def test_scars_are_thin_bars() -> None:
    size = 128
    max_width = max(SCAR_WIDTH[1] * size, 1.0)
    angles = []
    for seed in range(60):
        outline = patch_outline("scar", size, torch.Generator().manual_seed(seed)).numpy()
        coords = np.argwhere(outline).astype(float)
        small, large = np.linalg.eigvalsh(np.cov(coords.T, bias=True))
        # Every pixel lies within width / 2 of the bar's axis, so the variance across it, and the smallest
        # variance of all, is at most (width / 2)^2.
        assert 2 * np.sqrt(small) <= max_width + 1e-9
        assert large > 4 * small  # and it is long
        axis = np.linalg.eigh(np.cov(coords.T, bias=True))[1][:, 1]
        angles.append(np.degrees(np.arctan2(axis[1], axis[0])) % 180)
    # Turned every way, not only near upright.
    assert np.histogram(angles, bins=4, range=(0, 180))[0].min() >= 5


def test_three_way_batch_holds_each_image_normal_pasted_and_scarred() -> None:
    images = torch.rand(8, 1, 64, 64)
    inputs, labels = three_way_batch(images, torch.Generator().manual_seed(0))
    assert inputs.shape == (24, 1, 64, 64) and labels.tolist() == [0] * 8 + [1] * 8 + [2] * 8
    assert torch.equal(inputs[:8], images)
    changed = (inputs[8:] != images.repeat(2, 1, 1, 1)).flatten(1).sum(1)
    assert torch.all(changed > 0)
    # A scar is a bar of at most 16 x 1.92 px: at most area + perimeter / 2 + 1 < 51 pixel centres. A rectangle
    # covers 2 % of the image (81.9 px) but for rounding its sides: at worst 5 x 15 (5.49 x 14.92 rounded).
    assert changed[8:].max() <= 50 < 75 <= changed[:8].min()


# --------------------------------------------------------------------------- coreset


def _brute_greedy(points: np.ndarray, first: int, size: int) -> list[int]:
    """Gonzalez's greedy k-center from the full float64 distance matrix."""
    distances = cdist(points, points)
    picks = [first]
    while len(picks) < size:
        picks.append(int(distances[:, picks].min(1).argmax()))
    return picks


def _radius(points: np.ndarray, centres: list[int]) -> float:
    return float(cdist(points, points[centres]).min(1).max())


def test_greedy_coreset_is_brute_force_greedy_and_within_twice_the_best_radius() -> None:
    rng = np.random.default_rng(0)
    points = rng.standard_normal((14, 5)).astype(np.float32)
    picks = greedy_coreset(torch.from_numpy(points), 4, torch.Generator().manual_seed(3), projection_dim=None)
    assert picks.tolist() == _brute_greedy(points.astype(np.float64), int(picks[0]), 4)
    best = min(_radius(points, list(c)) for c in itertools.combinations(range(14), 4))
    assert _radius(points, picks.tolist()) <= 2 * best + 1e-6
    # At least as many picks as points: all of them.
    assert greedy_coreset(torch.from_numpy(points), 20, torch.Generator()).tolist() == list(range(14))


def test_greedy_coreset_compares_features_in_a_random_projection() -> None:
    rng = np.random.default_rng(1)
    points = rng.standard_normal((60, 40)).astype(np.float32)
    picks = greedy_coreset(torch.from_numpy(points), 10, torch.Generator().manual_seed(5), projection_dim=8)
    # The projection is the first draw from the generator.
    projection = random_projection(40, 8, torch.Generator().manual_seed(5)).numpy()
    projected = points.astype(np.float64) @ projection.astype(np.float64)
    assert picks.tolist() == _brute_greedy(projected, int(picks[0]), 10)
    assert picks.tolist() != _brute_greedy(points.astype(np.float64), int(picks[0]), 10)
    # Johnson-Lindenstrauss: E ||P^T (a - b)||^2 = ||a - b||^2, the entries' variance 1 / n_components.
    big = random_projection(400, 200, torch.Generator().manual_seed(0)).numpy()
    assert abs(big.var() * 200 - 1) < 0.02 and abs(big.mean()) < 0.01


# --------------------------------------------------------------------------- memory bank and maps


def _built_model(seed: int = 0) -> tuple[PatchMemory, torch.Tensor]:
    torch.manual_seed(seed)
    model = PatchMemory((1, 32, 32), width=4)
    train = torch.rand(6, 1, 32, 32)
    model.standardizer.fit(train)
    model.build_memory(train, positions=10, coreset_size=25, generator=torch.Generator().manual_seed(seed))
    return model, train


def test_memory_bank_is_a_coreset_of_training_features_and_its_distances_are_brute_force() -> None:
    model, train = _built_model()
    assert model.memory.shape == (25, 6 * 4) and not model.training
    features = model.patch_features(train)
    assert features.shape == (6, 24, 8, 8)  # a stride-4 grid
    pool = features.permute(0, 2, 3, 1).reshape(-1, 24).double()
    # Every bank row is one of the training images' patch features.
    assert torch.cdist(model.memory.double(), pool).min(1).values.max() < 1e-5
    queries = model.patch_features(torch.rand(3, 1, 32, 32)).permute(0, 2, 3, 1).reshape(-1, 24)
    brute = torch.cdist(queries.double(), model.memory.double()).min(1).values
    torch.testing.assert_close(MemoryBankMap(model).nearest_distance(queries).double(), brute, rtol=1e-5, atol=1e-5)


def test_anomaly_map_is_the_upsampled_distance_grid() -> None:
    model, _ = _built_model()
    images = torch.rand(2, 1, 32, 32)
    anomaly_map = MemoryBankMap(model)(images)
    assert anomaly_map.shape == (2, 32, 32) and torch.isfinite(anomaly_map).all() and anomaly_map.min() >= 0
    features = model.patch_features(images)
    grid = torch.cdist(features.permute(0, 2, 3, 1).reshape(-1, 24).double(), model.memory.double())
    grid = grid.min(1).values.reshape(2, 1, 8, 8)
    expected = F.interpolate(grid, size=(32, 32), mode="bilinear", align_corners=False)[:, 0]
    torch.testing.assert_close(anomaly_map.double(), expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(RuntimeError, match="memory bank is empty"):
        MemoryBankMap(PatchMemory((1, 32, 32), width=4))


def test_training_is_deterministic_and_the_bank_survives_a_checkpoint(tmp_path: Path) -> None:
    images = np.random.default_rng(0).random((12, 1, 32, 32)).astype(np.float32)
    settings = ImageSettings(**TINY)
    first, history = train_image_model("patch-memory", images, settings, progress=False, validation=images[:4])
    second, _ = train_image_model("patch-memory", images, settings, progress=False, validation=images[:4])
    assert len(history) == 2 and {"loss", "val_loss"} <= set(history[0])
    assert first.memory.shape == (40, 24)
    for (name, a), b in zip(first.state_dict().items(), second.state_dict().values()):
        assert torch.equal(a, b), name
    other, _ = train_image_model("patch-memory", images, ImageSettings(**TINY | {"seed": 1}), progress=False)
    assert not torch.equal(other.memory, first.memory)
    save_image_model(tmp_path / "model.pt", first, {})
    loaded, _ = load_image_model(tmp_path / "model.pt")
    assert torch.equal(loaded.memory, first.memory)
    probe = torch.rand(2, 1, 32, 32)
    assert torch.equal(MemoryBankMap(loaded)(probe), MemoryBankMap(first)(probe))


@pytest.mark.parametrize(("name", "value"), [
    ("patch_memory_width", 0), ("patch_memory_epochs", -1), ("patch_memory_batch_size", 1),
    ("patch_memory_positions", 2.5), ("patch_memory_coreset_size", True), ("patch_memory_learning_rate", 0.0),
    ("patch_memory_learning_rate", "fast"),
])
def test_bad_patch_memory_settings_are_refused(name: str, value: object) -> None:
    with pytest.raises(InputError, match=f"{name} must be") as error:
        ImageSettings(**{name: value})
    assert repr(value) in str(error.value)


def test_patch_memory_is_a_method() -> None:
    assert "patch-memory" in METHODS and MODEL_OF_METHOD["patch-memory"] == "patch-memory"


# --------------------------------------------------------------------------- end to end

SIZE = 64


def _texture(rng: np.random.Generator) -> np.ndarray:
    """A constant texture: diagonal stripes at a random phase, with a little noise."""
    rows, cols = np.mgrid[0:SIZE, 0:SIZE]
    return 0.45 + 0.1 * np.sin(2 * np.pi * (rows + cols + rng.uniform(0, 8)) / 8) + rng.normal(0, 0.01, (SIZE, SIZE))


def _save(path: Path, image: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray((np.clip(image, 0, 1) * 255).astype(np.uint8)).save(path)


def test_a_bright_square_on_a_constant_texture_stands_out(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    root = tmp_path / "stripes"
    for i in range(16):
        _save(root / "train" / "good" / f"{i:02d}.png", _texture(rng))
    for i in range(3):
        _save(root / "test" / "good" / f"g{i}.png", _texture(rng))
        image, mask = _texture(rng), np.zeros((SIZE, SIZE))
        top, left = rng.integers(4, SIZE - 16, 2)
        image[top:top + 10, left:left + 10] = 0.95
        mask[top:top + 10, left:left + 10] = 1
        _save(root / "test" / "square" / f"s{i}.png", image)
        _save(root / "ground_truth" / "square" / f"s{i}_mask.png", mask)
    settings = ImageSettings(**TINY | {"image_size": SIZE, "validation_fraction": 0.25, "patch_memory_epochs": 3})
    model_path = tmp_path / "model.pt"
    train_on_folder("patch-memory", root, settings, model_path, tmp_path / "history.tsv", device="cpu")
    score_method("patch-memory", model_path, root, settings, tmp_path / "images", device="cpu")
    out = ImageOutputs(tmp_path / "images")
    labels, values, max_good, max_square = [], [], [], []
    for record in scan_mvtec(root).test:
        pixel_map = np.load(out.maps("patch-memory") / record.label / f"{record.stem}.npy")
        assert pixel_map.shape == (SIZE, SIZE) and np.isfinite(pixel_map).all() and pixel_map.min() >= 0
        truth = np.zeros((SIZE, SIZE), bool)
        if record.label == "square":
            truth = np.array(Image.open(root / "ground_truth" / "square" / f"{record.stem}_mask.png")) > 127
        labels.append(truth.ravel())
        values.append(pixel_map.ravel())
        (max_square if record.label == "square" else max_good).append(pixel_map.max())
    assert roc_auc_score(np.concatenate(labels), np.concatenate(values)) > 0.95
    assert min(max_square) > max(max_good)
    thresholds = json.loads(out.thresholds("patch-memory").read_text())
    assert thresholds["primary_score"] == PRIMARY_SCORE["patch-memory"]
