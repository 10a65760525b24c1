"""Training the image models (conv VAE, AnoGAN's DCGAN, multiple-hypotheses VAE, DRAEM), with resume and
checkpoints.

Every epoch draws its shuffling, flips, latent noise and synthetic anomalies
from a generator seeded by (seed, epoch), so a run resumed from its per-epoch
checkpoint ends with the same weights as an uninterrupted one.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm.auto import trange

from anomri import __version__
from anomri.errors import InputError
from anomri.images.settings import ImageSettings
from anomri.io.atomic import atomic_path
from anomri.models.anogan import DCGAN
from anomri.models.conv_vae import ConvVAE
from anomri.models.draem import DRAEM
from anomri.models.mhp_vae import MultiHypothesisVAE
from anomri.models.synthetic_anomalies import synthesize_anomalies

logger = logging.getLogger(__name__)

__all__ = ["MODEL_KINDS", "build_model", "train_image_model", "save_image_model", "load_image_model"]

MODEL_KINDS: dict[str, type[nn.Module]] = {"conv-vae": ConvVAE, "anogan": DCGAN, "mhp-vae": MultiHypothesisVAE,
                                           "draem": DRAEM}


def build_model(kind: str, in_shape: tuple[int, int, int], settings: ImageSettings) -> nn.Module:
    """A fresh, untrained model of ``kind`` for images of ``in_shape``."""
    if kind == "conv-vae":
        return ConvVAE(in_shape, settings.vae_latent_size, settings.vae_channels)
    if kind == "anogan":
        return DCGAN(in_shape, settings.anogan_latent_size, settings.anogan_channels)
    if kind == "mhp-vae":
        return MultiHypothesisVAE(in_shape, settings.mhp_latent_size, settings.mhp_channels, settings.mhp_hypotheses)
    if kind == "draem":
        return DRAEM(in_shape, settings.draem_reconstruction_channels, settings.draem_segmentation_channels)
    raise ValueError(f"unknown model kind {kind!r}; known: {', '.join(MODEL_KINDS)}")


def save_image_model(path: str | Path, model: nn.Module, metadata: dict) -> None:
    """Write ``model`` (kind, constructor arguments, weights) and ``metadata`` atomically."""
    payload = {"kind": model.kind, "hparams": model.hparams(), "state_dict": model.state_dict(),
               "metadata": metadata | {"anomri_version": __version__}}
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)


def load_image_model(path: str | Path, device: str | torch.device = "cpu") -> tuple[nn.Module, dict]:
    """Rebuild an image model in eval mode from ``path`` (``torch.load(weights_only=True)``)."""
    try:
        payload = torch.load(path, map_location=device, weights_only=True)
        model = MODEL_KINDS[payload["kind"]](**payload["hparams"])
        model.load_state_dict(payload["state_dict"])
    except (OSError, RuntimeError, KeyError, TypeError) as exc:
        raise InputError(path, f"not a readable anomri image-model checkpoint ({type(exc).__name__})") from exc
    return model.to(device).eval(), payload["metadata"]


# --------------------------------------------------------------------------- one update per model kind

Step = Callable[[nn.Module, list[torch.optim.Optimizer], torch.Tensor, torch.Generator, ImageSettings],
                dict[str, float]]


def _vae_step(model: ConvVAE, optimizers: list[torch.optim.Optimizer], batch: torch.Tensor,
              generator: torch.Generator, s: ImageSettings) -> dict[str, float]:
    (optimizer,) = optimizers
    loss, rec, kl = model.loss(model.standardize(batch), s.vae_kl_weight, generator)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return {"loss": loss.item(), "rec": rec.item(), "kl": kl.item()}


def _gan_step(model: DCGAN, optimizers: list[torch.optim.Optimizer], batch: torch.Tensor,
              generator: torch.Generator, s: ImageSettings) -> dict[str, float]:
    g_opt, d_opt = optimizers
    real = model.scale(batch)

    def noise() -> torch.Tensor:
        return torch.randn((len(batch), model.latent_size), generator=generator, device=batch.device)

    d_loss = model.discriminator_loss(real, noise())
    d_opt.zero_grad(set_to_none=True)
    d_loss.backward()
    d_opt.step()
    g_loss = model.generator_loss(noise())
    g_opt.zero_grad(set_to_none=True)
    g_loss.backward()  # also fills D's gradients, which the next d_opt.zero_grad clears
    g_opt.step()
    return {"d_loss": d_loss.item(), "g_loss": g_loss.item()}


def _mhp_step(model: MultiHypothesisVAE, optimizers: list[torch.optim.Optimizer], batch: torch.Tensor,
              generator: torch.Generator, s: ImageSettings) -> dict[str, float]:
    g_opt, d_opt = optimizers
    losses = model.losses(model.standardize(batch), s.mhp_kl_weight, s.mhp_adversarial_weight, s.mhp_wta_epsilon,
                          generator)
    # One forward pass, two players: each loss is differentiated w.r.t. its own player's weights only.
    g_params = model.generator_parameters()
    d_params = list(model.discriminator.parameters())
    g_grads = torch.autograd.grad(losses["generator"], g_params, retain_graph=True)
    d_grads = torch.autograd.grad(losses["discriminator"], d_params)
    for param, grad in zip(g_params + d_params, g_grads + d_grads):
        param.grad = grad
    g_opt.step()
    d_opt.step()
    return {k: v.item() for k, v in losses.items()}


def _synthetic(model: DRAEM, batch: torch.Tensor, generator: torch.Generator, s: ImageSettings
               ) -> dict[str, torch.Tensor]:
    """DRAEM's losses on ``batch`` with synthetic anomalies drawn from ``generator``."""
    corrupted = synthesize_anomalies(batch, generator, s.draem_anomaly_probability, s.draem_mask_area,
                                     s.draem_texture)
    return model.losses(batch, corrupted.images, corrupted.masks)


def _draem_step(model: DRAEM, optimizers: list[torch.optim.Optimizer], batch: torch.Tensor,
                generator: torch.Generator, s: ImageSettings) -> dict[str, float]:
    (optimizer,) = optimizers
    losses = _synthetic(model, batch, generator, s)
    optimizer.zero_grad(set_to_none=True)
    losses["loss"].backward()
    optimizer.step()
    return {k: v.item() for k, v in losses.items()}


def _optimizers(kind: str, model: nn.Module, s: ImageSettings) -> list[torch.optim.Optimizer]:
    if kind == "conv-vae":
        return [torch.optim.Adam(model.parameters(), lr=s.vae_learning_rate)]
    if kind == "draem":
        return [torch.optim.Adam(model.parameters(), lr=s.draem_learning_rate)]
    if kind == "anogan":
        # DCGAN's recipe: beta1 = 0.5 keeps the adversarial game from oscillating.
        return [torch.optim.Adam(model.generator.parameters(), lr=s.anogan_learning_rate, betas=(0.5, 0.999)),
                torch.optim.Adam(model.discriminator.parameters(), lr=s.anogan_learning_rate, betas=(0.5, 0.999))]
    return [torch.optim.Adam(model.generator_parameters(), lr=s.mhp_learning_rate),
            torch.optim.Adam(model.discriminator.parameters(), lr=s.mhp_learning_rate, betas=(0.5, 0.999))]


@torch.no_grad()
def _validation_loss(kind: str, model: nn.Module, validation: torch.Tensor, s: ImageSettings) -> float | None:
    """Mean loss on held-out normal images: deterministic negative ELBO (conv VAE), WTA error
    (multiple-hypotheses VAE), or DRAEM's loss with the same synthetic anomalies every epoch (drawn
    from ``seed``). None for the GAN, whose losses do not measure fit."""
    if kind == "anogan" or validation is None or not len(validation):
        return None
    model.eval()
    generator = torch.Generator(device=validation.device).manual_seed(s.seed)
    total = 0.0
    for first in range(0, len(validation), s.batch_size):
        raw = validation[first:first + s.batch_size]
        if kind == "draem":
            total += float(_synthetic(model, raw, generator, s)["loss"]) * len(raw)
            continue
        x = model.standardize(raw)
        loss = model.reconstruct_with_loss(x)[1] if kind == "conv-vae" else model.score(x)[0]
        total += float(loss.sum())
    return total / len(validation)


STEPS: dict[str, tuple[Step, str]] = {
    "conv-vae": (_vae_step, "vae_epochs"), "anogan": (_gan_step, "anogan_epochs"), "mhp-vae": (_mhp_step, "mhp_epochs"),
    "draem": (_draem_step, "draem_epochs"),
}


#: The settings, besides the data, that change what training a model kind produces. Epoch counts are
#: left out: they only say when to stop, so a finished run can be resumed for more epochs (except under
#: a cosine schedule, which spans all the epochs: see :func:`_fingerprint`).
TRAINING_SETTINGS = {
    "conv-vae": ("vae_latent_size", "vae_channels", "vae_learning_rate", "vae_kl_weight", "vae_lr_schedule"),
    "anogan": ("anogan_latent_size", "anogan_channels", "anogan_learning_rate"),
    "mhp-vae": ("mhp_hypotheses", "mhp_latent_size", "mhp_channels", "mhp_learning_rate", "mhp_kl_weight",
                "mhp_adversarial_weight", "mhp_wta_epsilon"),
    "draem": ("draem_reconstruction_channels", "draem_segmentation_channels", "draem_learning_rate",
              "draem_lr_schedule", "draem_anomaly_probability", "draem_mask_area", "draem_texture"),
}
#: The learning-rate schedule setting of each model kind that has one (the others keep a constant rate).
LR_SCHEDULE_SETTING = {"conv-vae": "vae_lr_schedule", "draem": "draem_lr_schedule"}
COMMON_TRAINING_SETTINGS = ("seed", "horizontal_flip", "vertical_flip")
#: Model kinds that train on batches of their own size rather than ``batch_size``: DRAEM learns from many
#: small steps (benchmarks/README.md).
BATCH_SIZE_SETTING = {"draem": "draem_batch_size"}


def _fingerprint(kind: str, images: np.ndarray, validation: np.ndarray | None, settings: ImageSettings) -> str:
    # A resume checkpoint is valid for the same model kind, data and training settings.
    digest = hashlib.sha256(kind.encode())
    for array in (images, validation if validation is not None else np.zeros(0)):
        digest.update(np.ascontiguousarray(array).tobytes())
    kept = {k: getattr(settings, k) for k in COMMON_TRAINING_SETTINGS + TRAINING_SETTINGS[kind]}
    kept["batch_size"] = training_batch_size(kind, settings)
    if _schedule(kind, settings) == "cosine":
        # The cosine schedule spans all epochs, so the epoch count changes every learning rate.
        epochs_field = STEPS[kind][1]
        kept[epochs_field] = getattr(settings, epochs_field)
    digest.update(json.dumps(kept, sort_keys=True).encode())
    return digest.hexdigest()


def training_batch_size(kind: str, settings: ImageSettings) -> int:
    """Images per training step of ``kind``: its own setting (:data:`BATCH_SIZE_SETTING`), else ``batch_size``."""
    return int(getattr(settings, BATCH_SIZE_SETTING.get(kind, "batch_size")))


def _schedule(kind: str, settings: ImageSettings) -> str:
    return getattr(settings, LR_SCHEDULE_SETTING[kind]) if kind in LR_SCHEDULE_SETTING else "constant"


def learning_rate_factor(kind: str, settings: ImageSettings, epoch: int, n_epochs: int) -> float:
    """Multiplier of the base learning rate in ``epoch`` (0-based) of ``n_epochs``.

    A model kind whose schedule (:data:`LR_SCHEDULE_SETTING`) is ``cosine``
    anneals it from 1 to near 0 over the run (cosine, evaluated at the middle
    of each epoch, so the last epoch still learns). For the conv VAE, with its
    learnt variance, constant-rate epochs jump between much better and much
    worse fits; annealing settles them and reaches a lower validation loss,
    though on magnetic tiles not better anomaly maps (benchmarks/README.md), so
    its default is ``constant``; DRAEM's is ``cosine``. A function of the epoch
    only, so a resumed run follows the same schedule.
    """
    if _schedule(kind, settings) == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * (epoch + 0.5) / n_epochs))
    return 1.0


def _fresh(kind: str, data: torch.Tensor, settings: ImageSettings, device: torch.device
           ) -> tuple[nn.Module, list[torch.optim.Optimizer]]:
    """A newly initialised model (seeded, standardised on ``data``) on ``device`` and its optimisers."""
    torch.manual_seed(settings.seed)
    model = build_model(kind, tuple(data.shape[1:]), settings)
    if hasattr(model, "standardizer"):
        model.standardizer.fit(data)
    model.to(device)
    return model, _optimizers(kind, model, settings)


def train_image_model(
    kind: str,
    images: np.ndarray,
    settings: ImageSettings,
    resume_path: str | Path | None = None,
    device: str | torch.device = "cpu",
    progress: bool = True,
    validation: np.ndarray | None = None,
) -> tuple[nn.Module, list[dict]]:
    """Train a model of ``kind`` on normal images for a fixed number of epochs.

    Parameters
    ----------
    kind : {"conv-vae", "anogan", "mhp-vae", "draem"}
    images : ndarray (N, C, S, S)
        Normal training inputs in [0, 1] (whole resized images, or tiles).
    settings : ImageSettings
        Epochs, learning rates and architecture of ``kind``; ``seed`` fixes
        initialisation, shuffling, flips, latent noise and synthetic anomalies.
    resume_path : path, optional
        Checkpoint written after every epoch and resumed from when it
        matches ``kind``, ``images`` and ``settings``.
    device : str or torch.device
    progress : bool
        Show a progress bar with the losses.
    validation : ndarray (M, C, S, S), optional
        Held-out normal inputs. For the VAEs and DRAEM the epoch with the
        lowest validation loss is returned, so one unstable late epoch (a
        learnt variance can spike) cannot spoil the model; the GAN keeps its
        last epoch.

    Returns
    -------
    model : nn.Module
        The trained model, in eval mode on ``device``.
    history : list of dict
        Per epoch: ``epoch``, the batch-mean losses and ``val_loss`` (VAEs, DRAEM).
    """
    device = torch.device(device)
    step, epochs_field = STEPS[kind]
    n_epochs = getattr(settings, epochs_field)
    batch_size = training_batch_size(kind, settings)
    data = torch.from_numpy(np.ascontiguousarray(images, np.float32))
    model, optimizers = _fresh(kind, data, settings, device)
    data = data.to(device)
    held_out = None if validation is None else torch.from_numpy(np.ascontiguousarray(validation, np.float32)).to(device)
    fingerprint = _fingerprint(kind, images, validation, settings)
    state = {"epoch": 0, "history": [], "best_val": float("inf"), "best_state": None}
    if resume_path is not None and Path(resume_path).is_file():
        saved = torch.load(resume_path, map_location=device, weights_only=True)
        if saved.get("fingerprint") == fingerprint and saved["state"]["epoch"] <= n_epochs:
            try:
                model.load_state_dict(saved["model"])
                for optimizer, optimizer_state in zip(optimizers, saved["optimizers"]):
                    optimizer.load_state_dict(optimizer_state)
                state = saved["state"]
                logger.info("resuming %s training at epoch %d from %s", kind, state["epoch"], resume_path)
            except (RuntimeError, ValueError, KeyError):
                # Written by another version of the architecture: start afresh.
                model, optimizers = _fresh(kind, data.cpu(), settings, device)
                logger.info("ignoring %s: its weights do not fit this model", resume_path)
        else:
            logger.info("ignoring %s: it was written for other data or settings, or more epochs", resume_path)

    bar = trange(state["epoch"], n_epochs, desc=f"training {kind}", unit="epoch", disable=not progress)
    for epoch in bar:
        model.train()
        factor = learning_rate_factor(kind, settings, epoch, n_epochs)
        for optimizer in optimizers:
            for group in optimizer.param_groups:
                group["lr"] = group.setdefault("initial_lr", group["lr"]) * factor
        generator = torch.Generator(device=device).manual_seed(settings.seed * 100_003 + epoch)
        order = torch.randperm(len(data), generator=generator, device=device)
        sums: dict[str, float] = {}
        n_batches = 0
        for first in range(0, len(order), batch_size):
            batch = data[order[first:first + batch_size]]
            if len(batch) < 2:  # batch norm needs two samples
                continue
            for enabled, axis in ((settings.horizontal_flip, -1), (settings.vertical_flip, -2)):
                if enabled:
                    flip = torch.rand(len(batch), generator=generator, device=device) < 0.5
                    batch = torch.where(flip[:, None, None, None], batch.flip(axis), batch)
            for name, value in step(model, optimizers, batch, generator, settings).items():
                sums[name] = sums.get(name, 0.0) + value
            n_batches += 1
        record = {"epoch": epoch + 1} | {k: v / max(n_batches, 1) for k, v in sums.items()}
        val_loss = _validation_loss(kind, model, held_out, settings)
        if val_loss is not None:
            record["val_loss"] = val_loss
            if val_loss < state["best_val"]:
                state["best_val"] = val_loss
                state["best_state"] = {k: v.detach().clone() for k, v in model.state_dict().items()}
        state["history"].append(record)
        state["epoch"] = epoch + 1
        bar.set_postfix({k: f"{v:.4g}" for k, v in record.items() if k != "epoch"})
        if resume_path is not None:
            with atomic_path(resume_path) as tmp:
                torch.save({"fingerprint": fingerprint, "state": state, "model": model.state_dict(),
                            "optimizers": [o.state_dict() for o in optimizers]}, tmp)
    if state["best_state"] is not None:
        model.load_state_dict(state["best_state"])
        logger.info("kept the %s weights of the epoch with the lowest validation loss (%.4g)", kind,
                    state["best_val"])
    logger.info("trained %s for %d epochs on %d inputs of %s", kind, n_epochs, len(images), tuple(images.shape[1:]))
    return model.eval(), state["history"]
