"""The one epoch loop of every model: seeding, shuffling, validation, early stopping and resume.

A model kind brings only its update step (one batch) and its validation loss;
:class:`EpochPlan` says how the loop runs. After every epoch the loop writes a
checkpoint (:mod:`anomri.models.checkpoint`) with the weights, the optimiser
and random-generator states and the history, so a run resumed from it ends
with the same weights, bit for bit, as an uninterrupted one.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import trange

from anomri.errors import InputError
from anomri.models.checkpoint import CHECKPOINT_FORMAT, load_checkpoint, save_checkpoint

logger = logging.getLogger(__name__)

__all__ = ["EpochPlan", "Step", "Validation", "descend", "fit", "training_fingerprint"]

#: One update on a batch, drawing any randomness from the generator; returns the batch's losses by name.
Step = Callable[[torch.Tensor, torch.Generator], dict[str, float]]
#: Loss on held-out data (lower is better), or None when there is none or the model's losses do not measure fit.
Validation = Callable[[], float | None]


@dataclass(frozen=True)
class EpochPlan:
    """How :func:`fit` runs.

    Attributes
    ----------
    epochs : int
        Epochs to train (fewer when ``patience`` stops the run).
    batch_size : int
    seed : int
        Seed of the generator that shuffles and that the step draws from.
    reseed_every_epoch : bool
        Seed each epoch's generator from (``seed``, epoch), instead of one
        generator running through all epochs (its state is checkpointed).
        Both resume exactly; they draw different numbers, and each model
        kind keeps the one it was tuned with.
    patience : int or None
        Stop once the validation loss has not improved for this many epochs;
        None trains every epoch.
    min_batch_size : int
        Smaller batches (the last of an epoch) are skipped: batch norm needs two samples.
    per_sample_means : bool
        History losses are means over samples (batch losses weighted by
        batch size); otherwise means over batches.
    learning_rate_factor : callable (epoch -> float), optional
        Multiplier of every optimiser's initial learning rate in an epoch
        (0-based); None leaves the rates alone.
    """

    epochs: int
    batch_size: int
    seed: int
    reseed_every_epoch: bool = False
    patience: int | None = None
    min_batch_size: int = 1
    per_sample_means: bool = True
    learning_rate_factor: Callable[[int], float] | None = None


def descend(optimizer: torch.optim.Optimizer, loss: torch.Tensor, clip_norm: float = 0.0) -> None:
    """One gradient step of ``optimizer`` on ``loss``, with the gradient norm capped at ``clip_norm`` when positive."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if clip_norm > 0:
        torch.nn.utils.clip_grad_norm_([p for group in optimizer.param_groups for p in group["params"]], clip_norm)
    optimizer.step()


def training_fingerprint(arrays: Sequence[np.ndarray], settings: Mapping[str, Any]) -> str:
    """What a resume checkpoint is valid for: the checkpoint format, the data and the settings that shape training.

    Parameters
    ----------
    arrays : sequence of ndarray
        Training (and validation) data, hashed with their shapes and dtypes.
    settings : mapping
        JSON-able values; leave out those that only say when to stop, so that a
        finished run can be resumed for more epochs.
    """
    digest = hashlib.sha256(f"anomri checkpoint format {CHECKPOINT_FORMAT}".encode())
    for array in arrays:
        array = np.ascontiguousarray(array)
        digest.update(f"{array.shape}{array.dtype.str}".encode())
        digest.update(array.tobytes())
    digest.update(json.dumps(dict(settings), sort_keys=True).encode())
    return digest.hexdigest()


def _restore(path: Path, fingerprint: str, plan: EpochPlan, model: nn.Module,
             optimizers: Sequence[torch.optim.Optimizer], generator: torch.Generator) -> dict | None:
    """The loop state of the checkpoint at ``path``, loaded into the arguments; None when it does not apply."""
    try:
        states, metadata = load_checkpoint(path, generator.device, "training checkpoint")
    except InputError as exc:
        logger.info("ignoring %s", exc)
        return None
    if metadata.get("fingerprint") != fingerprint or metadata["epoch"] > plan.epochs:
        logger.info("ignoring %s: it was written for other data or settings, or more epochs", path)
        return None
    pristine = copy.deepcopy((model.state_dict(), [o.state_dict() for o in optimizers]))
    try:
        model.load_state_dict(states["model"])
        for i, optimizer in enumerate(optimizers):
            optimizer.load_state_dict(states[f"optimizer{i}"])
        generator.set_state(states["generator"]["state"].cpu())
    except (RuntimeError, ValueError, KeyError):
        # Written by another version of the architecture: start afresh from the initial weights.
        model.load_state_dict(pristine[0])
        for optimizer, state in zip(optimizers, pristine[1]):
            optimizer.load_state_dict(state)
        logger.info("ignoring %s: its weights do not fit this model", path)
        return None
    logger.info("resuming training at epoch %d from %s", metadata["epoch"], path)
    return {k: metadata[k] for k in ("epoch", "history", "best_val", "best_epoch", "bad_epochs")} | {
        "best_state": states.get("best")}


def _save(path: Path, fingerprint: str, state: dict, model: nn.Module, optimizers: Sequence[torch.optim.Optimizer],
          generator: torch.Generator) -> None:
    states = {"model": model.state_dict(), "generator": {"state": generator.get_state()}}
    states |= {f"optimizer{i}": optimizer.state_dict() for i, optimizer in enumerate(optimizers)}
    if state["best_state"] is not None:
        states["best"] = state["best_state"]
    save_checkpoint(path, states, {"fingerprint": fingerprint} | {k: v for k, v in state.items() if k != "best_state"})


def fit(model: nn.Module, optimizers: Sequence[torch.optim.Optimizer], data: torch.Tensor, step: Step,
        validate: Validation, plan: EpochPlan, fingerprint: str, resume_path: str | Path | None = None,
        progress: bool = True, desc: str = "training") -> list[dict]:
    """Train ``model`` on ``data`` epoch by epoch and leave the weights of its best epoch in it.

    Parameters
    ----------
    model : nn.Module
        Freshly initialised, on the device of ``data``.
    optimizers : sequence of Optimizer
        The optimisers ``step`` uses (checkpointed and resumed with the model).
    data : Tensor (N, ...)
        Training inputs; every epoch visits them in a new random order.
    step : Step
        One update on a batch; the losses it returns make the history.
    validate : Validation
        Called after every epoch. The weights of the epoch with the lowest
        validation loss are kept; when it always returns None, those of the last.
    plan : EpochPlan
    fingerprint : str
        :func:`training_fingerprint` of the data and settings; a checkpoint is resumed only when it matches
        and has not trained past ``plan.epochs``.
    resume_path : path, optional
        Checkpoint written after every epoch and resumed from.
    progress : bool
        Show a progress bar with the losses.
    desc : str
        Label of the progress bar.

    Returns
    -------
    list of dict
        Per epoch: ``epoch`` (1-based), the mean losses of ``step`` and ``val_loss`` (when there is one).
    """
    generator = torch.Generator(device=data.device).manual_seed(plan.seed)
    state = None
    if resume_path is not None and Path(resume_path).is_file():
        state = _restore(Path(resume_path), fingerprint, plan, model, optimizers, generator)
    if state is None:
        state = {"epoch": 0, "history": [], "best_val": float("inf"), "best_epoch": 0, "bad_epochs": 0,
                 "best_state": None}

    bar = trange(state["epoch"], plan.epochs, desc=desc, unit="epoch", disable=not progress)
    for epoch in bar:
        if plan.patience is not None and state["bad_epochs"] >= plan.patience:
            break
        model.train()
        if plan.learning_rate_factor is not None:
            factor = plan.learning_rate_factor(epoch)
            for optimizer in optimizers:
                for group in optimizer.param_groups:
                    group["lr"] = group.setdefault("initial_lr", group["lr"]) * factor
        if plan.reseed_every_epoch:
            generator.manual_seed(plan.seed * 100_003 + epoch)
        order = torch.randperm(len(data), generator=generator, device=data.device)
        sums: dict[str, float] = {}
        weight = 0
        for first in range(0, len(order), plan.batch_size):
            batch = data[order[first:first + plan.batch_size]]
            if len(batch) < plan.min_batch_size:
                continue
            share = len(batch) if plan.per_sample_means else 1
            for name, value in step(batch, generator).items():
                sums[name] = sums.get(name, 0.0) + value * share
            weight += share
        record = {"epoch": epoch + 1} | {k: v / max(weight, 1) for k, v in sums.items()}
        val_loss = validate()
        if val_loss is not None:
            record["val_loss"] = val_loss
            if val_loss < state["best_val"]:
                state.update(best_val=val_loss, best_epoch=epoch + 1, bad_epochs=0,
                             best_state={k: v.detach().clone() for k, v in model.state_dict().items()})
            else:
                state["bad_epochs"] += 1
        state["history"].append(record)
        state["epoch"] = epoch + 1
        bar.set_postfix({k: f"{v:.4g}" for k, v in record.items() if k != "epoch"})
        if resume_path is not None:
            _save(Path(resume_path), fingerprint, state, model, optimizers, generator)
    if state["best_state"] is not None:
        model.load_state_dict(state["best_state"])
        logger.info("kept the weights of epoch %d of %d, the lowest validation loss (%.4g)", state["best_epoch"],
                    state["epoch"], state["best_val"])
    return state["history"]
