"""Training the image models (conv VAE, AnoGAN's DCGAN, multiple-hypotheses VAE, DRAEM, patch memory), with
resume and checkpoints.

Every epoch draws its shuffling, flips, latent noise and synthetic anomalies
from a generator seeded by (seed, epoch), so a run resumed from its per-epoch
checkpoint ends with the same weights as an uninterrupted one.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn

from anomri import __version__
from anomri.images.geometry import load_model_inputs, split_validation
from anomri.images.settings import ImageSettings
from anomri.io.images import infer_channels, scan_mvtec
from anomri.io.tables import write_table
from anomri.models.anogan import DCGAN
from anomri.models.checkpoint import load_model, save_model
from anomri.models.conv_vae import ConvVAE
from anomri.models.cutpaste import three_way_batch
from anomri.models.draem import DRAEM
from anomri.models.fitting import EpochPlan, descend, fit, training_fingerprint
from anomri.models.mhp_vae import MultiHypothesisVAE
from anomri.models.patch_memory import PatchMemory
from anomri.models.synthetic_anomalies import synthesize_anomalies
from anomri.models.training import autocast_dtype, resolve_device
from anomri.settings import default

logger = logging.getLogger(__name__)

__all__ = ["MODEL_KINDS", "STEPS", "build_model", "build_optimizers", "build_patch_memory", "draem_losses",
           "train_image_model", "train_on_folder", "save_image_model", "load_image_model"]

MODEL_KINDS: dict[str, type[nn.Module]] = {"conv-vae": ConvVAE, "anogan": DCGAN, "mhp-vae": MultiHypothesisVAE,
                                           "draem": DRAEM, "patch-memory": PatchMemory}


def build_model(kind: str, in_shape: tuple[int, int, int], settings: ImageSettings) -> nn.Module:
    """A fresh, untrained model of ``kind`` for images of ``in_shape``, its weights channels-last."""
    return _channels_last(_new_model(kind, in_shape, settings))


def _new_model(kind: str, in_shape: tuple[int, int, int], settings: ImageSettings) -> nn.Module:
    if kind == "conv-vae":
        return ConvVAE(in_shape, settings.vae_latent_size, settings.vae_channels)
    if kind == "anogan":
        return DCGAN(in_shape, settings.anogan_latent_size, settings.anogan_channels)
    if kind == "mhp-vae":
        return MultiHypothesisVAE(in_shape, settings.mhp_latent_size, settings.mhp_channels, settings.mhp_hypotheses)
    if kind == "draem":
        return DRAEM(in_shape, settings.draem_reconstruction_channels, settings.draem_segmentation_channels)
    if kind == "patch-memory":
        return PatchMemory(in_shape, settings.patch_memory_width)
    raise ValueError(f"unknown model kind {kind!r}; known: {', '.join(MODEL_KINDS)}")


def _channels_last(model: nn.Module) -> nn.Module:
    # Channels-last weights make oneDNN run every convolution channels-last (the activations follow): training
    # steps 1.1-1.7x faster on a CPU, depending on the model (benchmarks/time_image_steps.py); .to(device) keeps it.
    return model.to(memory_format=torch.channels_last)


def save_image_model(path: str | Path, model: nn.Module, metadata: dict) -> None:
    """Write ``model`` (kind, constructor arguments, weights) and ``metadata`` atomically."""
    save_model(path, model, metadata | {"anomri_version": __version__})


def load_image_model(path: str | Path, device: str | torch.device = "cpu") -> tuple[nn.Module, dict]:
    """Rebuild an image model in eval mode from ``path`` (``torch.load(weights_only=True)``)."""
    model, metadata = load_model(path, MODEL_KINDS, device, "image-model checkpoint")
    return _channels_last(model), metadata


# --------------------------------------------------------------------------- one update per model kind

Step = Callable[[nn.Module, list[torch.optim.Optimizer], torch.Tensor, torch.Generator, ImageSettings],
                dict[str, float]]


def _vae_step(model: ConvVAE, optimizers: list[torch.optim.Optimizer], batch: torch.Tensor,
              generator: torch.Generator, s: ImageSettings) -> dict[str, float]:
    loss, rec, kl = model.loss(model.standardize(batch), s.vae_kl_weight, generator)
    descend(optimizers[0], loss)
    return {"loss": loss.item(), "rec": rec.item(), "kl": kl.item()}


def _gan_step(model: DCGAN, optimizers: list[torch.optim.Optimizer], batch: torch.Tensor,
              generator: torch.Generator, s: ImageSettings) -> dict[str, float]:
    g_opt, d_opt = optimizers
    real = model.scale(batch)

    def noise() -> torch.Tensor:
        return torch.randn((len(batch), model.latent_size), generator=generator, device=batch.device)

    d_loss = model.discriminator_loss(real, noise())
    descend(d_opt, d_loss)
    g_loss = model.generator_loss(noise())
    descend(g_opt, g_loss)  # also fills D's gradients, which the next descent of D clears
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


def draem_losses(model: DRAEM, batch: torch.Tensor, generator: torch.Generator, s: ImageSettings
                 ) -> dict[str, torch.Tensor]:
    """DRAEM's losses on ``batch`` with synthetic anomalies drawn from ``generator``, in ``draem_precision``."""
    corrupted = synthesize_anomalies(batch, generator, s.draem_anomaly_probability, s.draem_mask_area,
                                     s.draem_texture, s.draem_ridge_probability, s.draem_faint_probability,
                                     s.draem_faint_area)
    return model.losses(batch, corrupted.images, corrupted.masks, autocast_dtype(s.draem_precision, batch.device))


def _draem_step(model: DRAEM, optimizers: list[torch.optim.Optimizer], batch: torch.Tensor,
                generator: torch.Generator, s: ImageSettings) -> dict[str, float]:
    losses = draem_losses(model, batch, generator, s)
    descend(optimizers[0], losses["loss"])
    return {k: v.item() for k, v in losses.items()}


def _cutpaste_loss(model: PatchMemory, batch: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """CutPaste's three-way loss on ``batch`` with patches drawn from ``generator``."""
    return model.loss(*three_way_batch(batch, generator))


def _patch_memory_step(model: PatchMemory, optimizers: list[torch.optim.Optimizer], batch: torch.Tensor,
                       generator: torch.Generator, s: ImageSettings) -> dict[str, float]:
    loss = _cutpaste_loss(model, batch, generator)
    descend(optimizers[0], loss)
    return {"loss": loss.item()}


def build_optimizers(kind: str, model: nn.Module, s: ImageSettings) -> list[torch.optim.Optimizer]:
    """The Adam optimisers of a model of ``kind`` (the adversarial kinds: generator's, then discriminator's)."""
    if kind == "conv-vae":
        return [torch.optim.Adam(model.parameters(), lr=s.vae_learning_rate)]
    if kind == "draem":
        return [torch.optim.Adam(model.parameters(), lr=s.draem_learning_rate)]
    if kind == "patch-memory":
        return [torch.optim.Adam(model.parameters(), lr=s.patch_memory_learning_rate)]
    if kind == "anogan":
        # DCGAN's recipe: beta1 = 0.5 keeps the adversarial game from oscillating.
        return [torch.optim.Adam(model.generator.parameters(), lr=s.anogan_learning_rate, betas=(0.5, 0.999)),
                torch.optim.Adam(model.discriminator.parameters(), lr=s.anogan_learning_rate, betas=(0.5, 0.999))]
    return [torch.optim.Adam(model.generator_parameters(), lr=s.mhp_learning_rate),
            torch.optim.Adam(model.discriminator.parameters(), lr=s.mhp_learning_rate, betas=(0.5, 0.999))]


@torch.no_grad()
def _validation_loss(kind: str, model: nn.Module, validation: torch.Tensor, s: ImageSettings) -> float | None:
    """Mean loss on held-out normal images: deterministic negative ELBO (conv VAE), WTA error
    (multiple-hypotheses VAE), or DRAEM's and CutPaste's losses with the same synthetic anomalies or
    pasted patches every epoch (drawn from ``seed``). None for the GAN, whose losses do not measure fit."""
    if kind == "anogan" or validation is None or not len(validation):
        return None
    model.eval()
    generator = torch.Generator(device=validation.device).manual_seed(s.seed)
    total = 0.0
    for first in range(0, len(validation), s.batch_size):
        raw = validation[first:first + s.batch_size]
        if kind == "draem":
            total += float(draem_losses(model, raw, generator, s)["loss"]) * len(raw)
            continue
        if kind == "patch-memory":
            total += float(_cutpaste_loss(model, raw, generator)) * len(raw)
            continue
        x = model.standardize(raw)
        loss = model.reconstruct_with_loss(x)[1] if kind == "conv-vae" else model.score(x)[0]
        total += float(loss.sum())
    return total / len(validation)


#: Each kind's training step and the settings field holding its number of epochs.
STEPS: dict[str, tuple[Step, str]] = {
    "conv-vae": (_vae_step, "vae_epochs"), "anogan": (_gan_step, "anogan_epochs"), "mhp-vae": (_mhp_step, "mhp_epochs"),
    "draem": (_draem_step, "draem_epochs"), "patch-memory": (_patch_memory_step, "patch_memory_epochs"),
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
              "draem_lr_schedule", "draem_anomaly_probability", "draem_mask_area", "draem_texture",
              "draem_ridge_probability", "draem_faint_probability", "draem_faint_area", "draem_precision"),
    # The memory bank's settings are left out: the bank is built anew after every run, resumed or not.
    "patch-memory": ("patch_memory_width", "patch_memory_learning_rate"),
}
#: The learning-rate schedule setting of each model kind that has one (the others keep a constant rate).
LR_SCHEDULE_SETTING = {"conv-vae": "vae_lr_schedule", "draem": "draem_lr_schedule"}
COMMON_TRAINING_SETTINGS = ("seed", "horizontal_flip", "vertical_flip")
#: Model kinds that train on batches of their own size rather than ``batch_size``: DRAEM learns from many
#: small steps (benchmarks/README.md).
BATCH_SIZE_SETTING = {"draem": "draem_batch_size", "patch-memory": "patch_memory_batch_size"}


def _fingerprint(kind: str, images: np.ndarray, validation: np.ndarray | None, settings: ImageSettings) -> str:
    # A resume checkpoint is valid for the same model kind, data and training settings.
    kept = {k: getattr(settings, k) for k in COMMON_TRAINING_SETTINGS + TRAINING_SETTINGS[kind]}
    kept |= {"kind": kind, "batch_size": training_batch_size(kind, settings)}
    if _schedule(kind, settings) == "cosine":
        # The cosine schedule spans all epochs, so the epoch count changes every learning rate.
        epochs_field = STEPS[kind][1]
        kept[epochs_field] = getattr(settings, epochs_field)
    return training_fingerprint([images, validation if validation is not None else np.zeros(0)], kept)


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


def _flipped(batch: torch.Tensor, generator: torch.Generator, settings: ImageSettings) -> torch.Tensor:
    """``batch`` with each image flipped at random (probability 1/2 per enabled axis)."""
    for axis in settings.flip_axes:
        flip = torch.rand(len(batch), generator=generator, device=batch.device) < 0.5
        batch = torch.where(flip[:, None, None, None], batch.flip(axis), batch)
    return batch


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
    kind : {"conv-vae", "anogan", "mhp-vae", "draem", "patch-memory"}
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
        Held-out normal inputs. For the VAEs, DRAEM and patch memory the epoch
        with the lowest validation loss is returned, so one unstable late epoch
        (a learnt variance can spike) cannot spoil the model; the GAN keeps its
        last epoch. Patch memory then fills its memory bank from ``images``
        (:func:`build_patch_memory`).

    Returns
    -------
    model : nn.Module
        The trained model, in eval mode on ``device``.
    history : list of dict
        Per epoch: ``epoch``, the batch-mean losses and ``val_loss`` (VAEs, DRAEM, patch memory).
    """
    device = torch.device(device)
    step, epochs_field = STEPS[kind]
    n_epochs = getattr(settings, epochs_field)
    data = torch.from_numpy(np.ascontiguousarray(images, np.float32))
    torch.manual_seed(settings.seed)
    model = build_model(kind, tuple(data.shape[1:]), settings)
    if hasattr(model, "standardizer"):
        model.standardizer.fit(data)
    model.to(device)
    optimizers = build_optimizers(kind, model, settings)
    held_out = None if validation is None else torch.from_numpy(np.ascontiguousarray(validation, np.float32)).to(device)
    # Every epoch draws from a generator seeded by (seed, epoch); batches of one are skipped, as batch norm needs two.
    plan = EpochPlan(n_epochs, training_batch_size(kind, settings), settings.seed, reseed_every_epoch=True,
                     min_batch_size=2, per_sample_means=False,
                     learning_rate_factor=lambda epoch: learning_rate_factor(kind, settings, epoch, n_epochs))

    def flipped_step(batch: torch.Tensor, generator: torch.Generator) -> dict[str, float]:
        return step(model, optimizers, _flipped(batch, generator, settings), generator, settings)

    history = fit(model, optimizers, data.to(device), flipped_step,
                  lambda: _validation_loss(kind, model, held_out, settings), plan,
                  _fingerprint(kind, images, validation, settings), resume_path, progress, f"training {kind}")
    if kind == "patch-memory":
        build_patch_memory(model, data.to(device), settings)
    logger.info("trained %s for %d epochs on %d inputs of %s", kind, n_epochs, len(images), tuple(images.shape[1:]))
    return model.eval(), history


def build_patch_memory(model: PatchMemory, images: torch.Tensor, settings: ImageSettings) -> None:
    """Fill ``model``'s memory bank from the normal training inputs ``images`` (N, C, S, S), as the
    ``patch_memory_*`` settings say; positions and the coreset's start and projection are drawn from ``seed``."""
    generator = torch.Generator(device=images.device).manual_seed(settings.seed)
    model.build_memory(images, settings.patch_memory_positions, settings.patch_memory_coreset_size, generator,
                       settings.batch_size)
    logger.info("patch memory: %d features in the bank, from %d inputs", len(model.memory), len(images))


def train_on_folder(kind: str, root: str | Path, settings: ImageSettings, out: str | Path, history_path: str | Path,
                    device: str = default("images.device")) -> None:
    """Train a model of ``kind`` on the normal training images of an MVTec folder; write it and its curve.

    The held-out normal images (:func:`~anomri.images.geometry.split_validation`)
    give the validation loss and never train the model.

    Parameters
    ----------
    kind : {"conv-vae", "anogan", "mhp-vae", "draem", "patch-memory"}
    root : str or Path
        MVTec-layout image folder.
    settings : ImageSettings
    out : str or Path
        Model checkpoint (.pt); its metadata holds the folder, the settings
        and the validation images. Training resumes from ``<out>.resume.pt``,
        written after every epoch and removed at the end.
    history_path : str or Path
        Training curve (.tsv), one row per epoch.
    device : str
        ``auto``, ``cpu`` or ``cuda``.
    """
    folder = scan_mvtec(root)
    train, validation = split_validation(folder.train, settings.validation_fraction, settings.seed)
    channels = infer_channels(folder.train) if settings.channels == "auto" else int(settings.channels)
    geometry = settings.geometry_of(kind)
    inputs = load_model_inputs(train, geometry, channels).inputs
    held_out = load_model_inputs(validation, geometry, channels).inputs
    resume = Path(out).with_suffix(".resume.pt")
    model, history = train_image_model(kind, inputs, settings, resume, resolve_device(device), validation=held_out)
    save_image_model(out, model.cpu(), {"root": str(root), "settings": json.loads(settings.to_json()),
                                        "n_training_images": len(train), "n_training_inputs": len(inputs),
                                        "validation_images": [str(r.path) for r in validation]})
    write_table(history_path, history, list(history[0]) if history else ["epoch"])
    resume.unlink(missing_ok=True)
