"""Training a :class:`GaussianVAE` on healthy voxels, with early stopping and resume."""

from __future__ import annotations

import hashlib
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import trange

from anomri.io.atomic import atomic_path
from anomri.models.vae import GaussianVAE
from anomri.settings import default

logger = logging.getLogger(__name__)


@dataclass
class TrainingConfig:
    """Hyper-parameters of VAE training; the defaults are the pipeline's (``config.yaml`` ``training:``)."""

    latent_size: int = default("training.latent_size")
    hidden_channels: list[int] = field(default_factory=lambda: default("training.hidden_channels"))
    kl_weight: float = default("training.kl_weight")
    n_latent_samples: int = default("training.n_latent_samples")
    batch_size: int = default("training.batch_size")
    learning_rate: float = default("training.learning_rate")
    max_epochs: int = default("training.max_epochs")
    patience: int = default("training.patience")
    validation_fraction: float = default("training.validation_fraction")
    seed: int = default("training.seed")
    # The Gaussian decoder's variance floor makes the likelihood's gradient up to
    # exp(-2 * min_log_sigma) times larger for well-fitted voxels; without a cap a
    # single such batch can throw the weights (and the KL) off by orders of magnitude.
    grad_clip_norm: float = default("training.grad_clip_norm")


def resolve_device(name: str = "auto") -> torch.device:
    """``"auto"`` picks CUDA when available, else CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _fingerprint(samples: np.ndarray, config: TrainingConfig) -> str:
    # A resume checkpoint is only valid for the same data and settings. The
    # stopping rule is left out: raising max_epochs may continue a finished run.
    settings = {k: v for k, v in asdict(config).items() if k not in ("max_epochs", "patience")}
    digest = hashlib.sha256(np.ascontiguousarray(samples).tobytes())
    digest.update(repr(sorted(settings.items())).encode())
    return digest.hexdigest()


def _split(n: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    order = np.random.default_rng(seed).permutation(n)
    n_val = max(1, int(round(fraction * n)))
    return np.sort(order[n_val:]), np.sort(order[:n_val])


@torch.no_grad()
def _validation_loss(model: GaussianVAE, x: torch.Tensor, config: TrainingConfig, seed: int) -> float:
    model.eval()
    generator = torch.Generator(device=x.device).manual_seed(seed)
    total = 0.0
    for start in range(0, len(x), 8192):
        batch = x[start : start + 8192]
        loss, _, _ = model.loss(batch, config.kl_weight, config.n_latent_samples, generator)
        total += float(loss) * len(batch)
    return total / len(x)


def train_vae(
    samples: np.ndarray,
    config: TrainingConfig,
    resume_path: str | Path | None = None,
    device: str | torch.device = "cpu",
    progress: bool = True,
) -> tuple[GaussianVAE, list[dict]]:
    """Train a VAE on healthy feature vectors.

    A random ``validation_fraction`` of the samples is held out; training stops
    when its loss has not improved for ``patience`` epochs, and the best model
    is returned. The seed fixes initialisation, the split, shuffling and the
    latent samples.

    Parameters
    ----------
    samples : ndarray, (N, D)
        Raw (unstandardised) healthy feature vectors.
    config : TrainingConfig
    resume_path : path, optional
        Where a checkpoint is written after every epoch; training resumes
        from it when it matches the data and settings.
    device : str or torch.device
    progress : bool
        Show a progress bar with the losses.

    Returns
    -------
    model : GaussianVAE
        The best model (lowest validation loss), in eval mode on ``device``.
    history : list of dict
        Per epoch: ``epoch``, ``train_loss``, ``train_rec``, ``train_kl``, ``val_loss``.
    """
    device = torch.device(device)
    samples = np.asarray(samples, np.float32)
    torch.manual_seed(config.seed)
    train_idx, val_idx = _split(len(samples), config.validation_fraction, config.seed)
    model = GaussianVAE(samples.shape[1], config.latent_size, config.hidden_channels)
    model.set_standardization(
        torch.from_numpy(samples[train_idx].mean(0)), torch.from_numpy(samples[train_idx].std(0))
    )
    model.to(device)
    x_all = model.standardize(torch.from_numpy(samples).to(device))
    x_train, x_val = x_all[train_idx], x_all[val_idx]
    optimizer = torch.optim.Adam(model.parameters(), lr=config.learning_rate)
    generator = torch.Generator(device=device).manual_seed(config.seed)
    fingerprint = _fingerprint(samples, config)

    state = {"epoch": 0, "history": [], "best_val": float("inf"), "best_state": None, "bad_epochs": 0}
    if resume_path is not None and Path(resume_path).is_file():
        saved = torch.load(resume_path, map_location=device, weights_only=True)
        if saved.get("fingerprint") == fingerprint:
            model.load_state_dict(saved["model"])
            optimizer.load_state_dict(saved["optimizer"])
            generator.set_state(saved["generator"].cpu() if device.type == "cpu" else saved["generator"])
            state = saved["state"]
            logger.info("resuming training at epoch %d from %s", state["epoch"], resume_path)
        else:
            logger.info("ignoring %s: it was written for other data or settings", resume_path)

    bar = trange(state["epoch"], config.max_epochs, desc="training", unit="epoch", disable=not progress)
    for epoch in bar:
        if state["bad_epochs"] >= config.patience:
            break
        model.train()
        order = torch.randperm(len(x_train), generator=generator, device=device)
        sums = np.zeros(3)
        for start in range(0, len(order), config.batch_size):
            batch = x_train[order[start : start + config.batch_size]]
            loss, rec, kl = model.loss(batch, config.kl_weight, config.n_latent_samples, generator)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if config.grad_clip_norm > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip_norm)
            optimizer.step()
            sums += np.array([loss.item(), rec.item(), kl.item()]) * len(batch)
        train_loss, train_rec, train_kl = (float(v) for v in sums / len(x_train))
        val_loss = _validation_loss(model, x_val, config, config.seed + 1)
        state["history"].append({"epoch": epoch + 1, "train_loss": train_loss, "train_rec": train_rec,
                                 "train_kl": train_kl, "val_loss": val_loss})
        if val_loss < state["best_val"]:
            state.update(best_val=val_loss, bad_epochs=0,
                         best_state={k: v.detach().clone() for k, v in model.state_dict().items()})
        else:
            state["bad_epochs"] += 1
        state["epoch"] = epoch + 1
        bar.set_postfix(train=f"{train_loss:.3f}", val=f"{val_loss:.3f}", best=f"{state['best_val']:.3f}")
        if resume_path is not None:
            with atomic_path(resume_path) as tmp:
                torch.save({"fingerprint": fingerprint, "model": model.state_dict(),
                            "optimizer": optimizer.state_dict(), "generator": generator.get_state(),
                            "state": state}, tmp)
    model.load_state_dict(state["best_state"])
    logger.info("training stopped after %d epochs; best validation loss %.4f", state["epoch"], state["best_val"])
    return model.eval(), state["history"]
