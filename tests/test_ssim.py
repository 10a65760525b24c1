"""The SSIM loss DRAEM trains with, against MONAI's and against SSIM's formula evaluated by hand."""

import numpy as np
import pytest
import torch
from monai.losses import SSIMLoss as MonaiSSIMLoss

from anomri.models.ssim import GaussianSSIMLoss


def hand_ssim(x: np.ndarray, y: np.ndarray, sigma: float = 1.5, data_range: float = 1.0) -> float:
    """SSIM of two equal-sized single-channel windows: Wang et al.'s formula with Gaussian weights, summed by hand."""
    size = x.shape[0]
    offsets = np.arange(size) - (size - 1) / 2
    g = np.exp(-0.5 * (offsets / sigma) ** 2)
    w = np.outer(g, g) / np.outer(g, g).sum()
    mx, my = (w * x).sum(), (w * y).sum()
    vx, vy = (w * (x - mx) ** 2).sum(), (w * (y - my) ** 2).sum()
    cov = (w * (x - mx) * (y - my)).sum()
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    return (2 * mx * my + c1) * (2 * cov + c2) / ((mx ** 2 + my ** 2 + c1) * (vx + vy + c2))


def test_one_window_position_matches_the_formula_by_hand():
    rng = np.random.default_rng(0)
    for _ in range(5):
        x, y = rng.random((7, 7)), rng.random((7, 7))
        loss = GaussianSSIMLoss(7)(torch.tensor(x[None, None]), torch.tensor(y[None, None]))
        # The loss is computed in float32.
        assert loss.item() == pytest.approx(1 - hand_ssim(x, y), abs=1e-5)


def test_mean_over_window_positions_channels_and_batch_by_hand():
    rng = np.random.default_rng(1)
    x, y = rng.random((2, 2, 9, 8)), rng.random((2, 2, 9, 8))
    by_hand = np.mean([hand_ssim(x[n, c, i:i + 5, j:j + 5], y[n, c, i:i + 5, j:j + 5])
                       for n in range(2) for c in range(2) for i in range(5) for j in range(4)])
    loss = GaussianSSIMLoss(5, data_range=1.0)(torch.tensor(x), torch.tensor(y))
    assert loss.item() == pytest.approx(1 - by_hand, abs=1e-5)


@pytest.mark.parametrize("shape,win_size,data_range", [((4, 1, 32, 32), 7, 1.0), ((2, 3, 40, 24), 11, 2.0)])
def test_loss_and_gradient_agree_with_monai(shape, win_size, data_range):
    torch.manual_seed(0)
    target = torch.rand(shape) * data_range
    prediction = (target + 0.2 * torch.randn(shape)).requires_grad_(True)
    ours = GaussianSSIMLoss(win_size, data_range=data_range)(prediction, target)
    (ours_grad,) = torch.autograd.grad(ours, prediction)
    theirs = MonaiSSIMLoss(2, data_range=data_range, win_size=win_size)(prediction, target)
    (theirs_grad,) = torch.autograd.grad(theirs, prediction)
    assert ours.item() == pytest.approx(theirs.item(), abs=1e-6)
    # float32 sums in another order: agreement to 1e-4 of the largest gradient.
    assert torch.allclose(ours_grad, theirs_grad, rtol=0, atol=1e-4 * theirs_grad.abs().max().item())


def test_identical_images_have_zero_loss_and_channels_last_inputs_work():
    x = torch.rand(3, 1, 16, 16).to(memory_format=torch.channels_last)
    assert GaussianSSIMLoss(7)(x, x.clone()).item() == pytest.approx(0.0, abs=1e-6)


def test_refuses_images_smaller_than_the_window_and_mismatched_shapes():
    with pytest.raises(ValueError, match="smaller than the SSIM window"):
        GaussianSSIMLoss(7)(torch.rand(1, 1, 6, 16), torch.rand(1, 1, 6, 16))
    with pytest.raises(ValueError, match="one shape"):
        GaussianSSIMLoss(7)(torch.rand(1, 1, 16, 16), torch.rand(1, 1, 16, 15))
