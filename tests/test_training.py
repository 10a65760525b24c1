"""VAE training: determinism, resume, checkpoints, threads."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch.optim.optimizer import register_optimizer_step_pre_hook

from anomri.cli import main
from anomri.errors import InputError
from anomri.models.checkpoint import load_vae, save_vae
from anomri.models.training import TrainingConfig, train_vae


@pytest.fixture(scope="module")
def samples() -> np.ndarray:
    rng = np.random.default_rng(0)
    latent = rng.normal(size=(3000, 2))
    return (np.tanh(latent @ rng.normal(size=(2, 12))) + 0.05 * rng.normal(size=(3000, 12))).astype(np.float32)


CONFIG = dict(latent_size=2, hidden_channels=[16], batch_size=256, max_epochs=4, patience=10)


def _assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        torch.testing.assert_close(x, y, rtol=0, atol=0, msg=name)


def test_same_seed_same_model(samples: np.ndarray) -> None:
    a, history_a = train_vae(samples, TrainingConfig(**CONFIG), progress=False)
    b, history_b = train_vae(samples, TrainingConfig(**CONFIG), progress=False)
    _assert_same_weights(a, b)
    assert history_a == history_b
    c, _ = train_vae(samples, TrainingConfig(**CONFIG | {"seed": 1}), progress=False)
    assert not torch.equal(a.net.mu.weight, c.net.mu.weight)


def test_training_lowers_validation_loss(samples: np.ndarray) -> None:
    _, history = train_vae(samples, TrainingConfig(**CONFIG | {"max_epochs": 6}), progress=False)
    assert history[-1]["val_loss"] < history[0]["val_loss"]


def test_interrupted_training_resumes_to_the_same_model(samples: np.ndarray, tmp_path) -> None:
    straight, history = train_vae(samples, TrainingConfig(**CONFIG), progress=False)
    resume = tmp_path / "vae.resume.pt"
    # An "interrupted" run: it stopped after 2 epochs, leaving its checkpoint behind.
    train_vae(samples, TrainingConfig(**CONFIG | {"max_epochs": 2}), resume_path=resume, progress=False)
    resumed, resumed_history = train_vae(samples, TrainingConfig(**CONFIG), resume_path=resume, progress=False)
    _assert_same_weights(straight, resumed)
    assert [h["epoch"] for h in resumed_history] == [1, 2, 3, 4]
    assert resumed_history == history


def test_resume_ignores_checkpoint_of_other_data(samples: np.ndarray, tmp_path) -> None:
    resume = tmp_path / "vae.resume.pt"
    train_vae(samples[::-1].copy(), TrainingConfig(**CONFIG | {"max_epochs": 2}), resume_path=resume,
              progress=False)
    fresh, _ = train_vae(samples, TrainingConfig(**CONFIG), progress=False)
    resumed, history = train_vae(samples, TrainingConfig(**CONFIG), resume_path=resume, progress=False)
    _assert_same_weights(fresh, resumed)
    assert len(history) == CONFIG["max_epochs"]


def test_checkpoint_round_trip(samples: np.ndarray, tmp_path) -> None:
    model, _ = train_vae(samples, TrainingConfig(**CONFIG | {"max_epochs": 1}), progress=False)
    path = tmp_path / "vae.pt"
    save_vae(path, model, {"features": {"Representation": "raw"}})
    loaded, metadata = load_vae(path)
    _assert_same_weights(model, loaded)
    assert metadata == {"features": {"Representation": "raw"}}
    assert not loaded.training
    x = loaded.standardize(torch.from_numpy(samples[:5]))
    torch.testing.assert_close(x, (torch.from_numpy(samples[:5]) - model.feature_mean) / model.feature_std)


def test_corrupt_checkpoint_is_an_input_error(tmp_path) -> None:
    path = tmp_path / "vae.pt"
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(InputError, match="vae.pt"):
        load_vae(path)


@pytest.mark.parametrize("cap", [0.5, 0.0])
def test_gradient_norm_is_capped(samples: np.ndarray, cap: float) -> None:
    norms: list[float] = []

    def record(optimizer: torch.optim.Optimizer, args: tuple, kwargs: dict) -> None:
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        norms.append(float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))))

    handle = register_optimizer_step_pre_hook(record)
    try:
        train_vae(samples, TrainingConfig(max_epochs=2, batch_size=64, grad_clip_norm=cap), progress=False)
    finally:
        handle.remove()
    if cap > 0:
        assert max(norms) <= cap * (1 + 1e-5)
    else:  # uncapped, the same training does take larger steps: the cap above really acts
        assert max(norms) > 0.5


def test_train_command_trains_on_the_threads_it_is_given(samples: np.ndarray, tmp_path, capsys,
                                                      restore_threads) -> None:
    pool = tmp_path / "pool.npz"
    np.savez(pool, samples=samples, description=json.dumps({"Representation": "raw"}), scans=np.array(["sub-01"]))
    wanted = torch.get_num_threads() + 1  # differs from torch's own choice on any machine
    seen: list[int] = []
    handle = register_optimizer_step_pre_hook(lambda *_: seen.append(torch.get_num_threads()))

    def train(threads: int) -> int:
        return main(["train", "--pool", str(pool), "--out", str(tmp_path / "vae.pt"), "--history",
                     str(tmp_path / "history.tsv"), "--settings", json.dumps(CONFIG | {"max_epochs": 1}),
                     "--device", "cpu", "--threads", str(threads)])

    before = torch.get_num_threads()
    try:
        assert train(0) == 2
        assert "anomri: error: --threads: must be positive" in capsys.readouterr().err
        assert not (tmp_path / "vae.pt").exists() and seen == []
        assert train(wanted) == 0
    finally:
        handle.remove()
        torch.set_num_threads(before)
    assert seen and set(seen) == {wanted}


def test_decoder_in_chunks_equals_the_layers_by_hand() -> None:
    """Decoding more rows than one chunk gives, row by row, MONAI's layers written out in float64."""
    from anomri.models.vae import DECODE_ROWS, GaussianVAE

    torch.manual_seed(0)
    model = GaussianVAE(5, latent_size=3, hidden_channels=(7, 4)).eval()
    z = torch.randn(2, DECODE_ROWS + 17, 3)
    with torch.no_grad():
        mean, log_sigma = model.decode(z)
    w = {k: v.double().numpy() for k, v in model.net.state_dict().items()}

    def elu(a: np.ndarray) -> np.ndarray:
        return np.where(a > 0, a, np.expm1(np.minimum(a, 0)))

    h = np.maximum(z.double().numpy() @ w["decodeL.weight"].T + w["decodeL.bias"], 0)
    h = elu(h @ w["decode.decode0.0.weight"].T + w["decode.decode0.0.bias"])
    h = elu(h @ w["decode.decode1.0.weight"].T + w["decode.decode1.0.bias"])
    out = h @ w["decode.final.weight"].T + w["decode.final.bias"]
    softplus = np.logaddexp(0.0, out[..., 5:] + 5.0)  # min_log_sigma -5: log s = -5 + softplus(raw + 5)
    np.testing.assert_allclose(mean.numpy(), out[..., :5], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(log_sigma.numpy(), -5.0 + softplus, rtol=1e-5, atol=1e-6)
