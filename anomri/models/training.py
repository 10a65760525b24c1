"""Training a :class:`GaussianVAE` on healthy voxels, with early stopping and resume."""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from anomri import __version__
from anomri.io.tables import write_table
from anomri.models.checkpoint import save_vae
from anomri.models.fitting import EpochPlan, descend, fit, training_fingerprint
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


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The reduced dtype to autocast training to on ``device`` (None: plain float32).

    ``precision`` is ``float32``; ``bfloat16`` (autocast: convolutions and
    matrix products in bfloat16; weights, optimiser state and the reductions
    autocast keeps in float32 stay there); or ``auto``, which asks the
    hardware: bfloat16 on a CPU that computes it natively (AVX-512 BF16 or
    AMX, as oneDNN reports) or a CUDA device that supports it. Elsewhere
    bfloat16 is emulated and slower than float32, so ``auto`` stays in
    float32; an explicit ``bfloat16`` is honoured anyway.
    """
    if precision == "float32":
        return None
    if precision == "auto":
        native = (torch.cuda.is_bf16_supported() if device.type == "cuda"
                  else device.type == "cpu" and torch.ops.mkldnn._is_mkldnn_bf16_supported())
        return torch.bfloat16 if native else None
    if precision == "bfloat16":
        return torch.bfloat16
    raise ValueError(f"unknown precision {precision!r}; known: auto, float32, bfloat16")


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
        from it when it matches the data and settings and has not trained
        past ``max_epochs``.
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

    def step(batch: torch.Tensor, generator: torch.Generator) -> dict[str, float]:
        loss, rec, kl = model.loss(batch, config.kl_weight, config.n_latent_samples, generator)
        descend(optimizer, loss, config.grad_clip_norm)
        return {"train_loss": loss.item(), "train_rec": rec.item(), "train_kl": kl.item()}

    # A resume checkpoint is only valid for the same data and settings. The
    # stopping rule is left out: raising max_epochs may continue a finished run.
    settings = {k: v for k, v in asdict(config).items() if k not in ("max_epochs", "patience")}
    plan = EpochPlan(config.max_epochs, config.batch_size, config.seed, patience=config.patience)
    history = fit(model, [optimizer], x_train, step, lambda: _validation_loss(model, x_val, config, config.seed + 1),
                  plan, training_fingerprint([samples], settings), resume_path, progress)
    logger.info("training stopped after %d epochs", len(history))
    return model.eval(), history


def train_from_pool(pool: str | Path, out: str | Path, history_path: str | Path, config: TrainingConfig,
                    device: str = default("training.device")) -> None:
    """Train the VAE on a training pool and write the checkpoint and its training curve.

    Parameters
    ----------
    pool : str or Path
        The pool of :func:`anomri.dmri.features.pool_training_voxels` (.npz).
    out : str or Path
        Model checkpoint (.pt); its metadata holds the feature description,
        the training settings and the pooled scans. Training resumes from
        ``<out>.resume.pt``, written after every epoch and removed at the end.
    history_path : str or Path
        Training curve (.tsv), one row per epoch.
    config : TrainingConfig
    device : str
        ``auto``, ``cpu`` or ``cuda`` (:func:`resolve_device`).
    """
    with np.load(pool) as arrays:
        samples, scans = arrays["samples"], arrays["scans"].tolist()
        description = json.loads(str(arrays["description"]))
    resume_path = Path(out).with_suffix(".resume.pt")
    model, history = train_vae(samples, config, resume_path=resume_path, device=resolve_device(device))
    save_vae(out, model.cpu(), {"features": description, "training": vars(config) | {"scans": scans},
                                "anomri_version": __version__})
    write_table(history_path, history, list(history[0]))
    resume_path.unlink(missing_ok=True)
