"""The one checkpoint format of trained models and of resumable training runs.

A checkpoint holds named state dicts (tensors) and a JSON-like metadata dict,
is written atomically (an interrupted run never leaves half a file) and is read
with ``torch.load(weights_only=True)``, which only rebuilds tensors and plain
containers: opening a checkpoint can never run code.
"""

from __future__ import annotations

import pickle
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from anomri.errors import InputError
from anomri.io.atomic import atomic_path
from anomri.models.vae import GaussianVAE

__all__ = ["CHECKPOINT_FORMAT", "save_checkpoint", "load_checkpoint", "save_model", "load_model", "save_vae",
           "load_vae"]

#: Version of the layout below. Format 1 (unnumbered) kept voxel models, image models and their resume files in
#: four layouts of their own; it is not read, and every resume fingerprint includes this number, so no run ever
#: continues from a checkpoint of another format.
CHECKPOINT_FORMAT = 2


def save_checkpoint(path: str | Path, states: Mapping[str, Mapping[str, Any]], metadata: Mapping[str, Any]) -> None:
    """Write named state dicts and JSON-like ``metadata`` to ``path`` atomically.

    Parameters
    ----------
    path : path
    states : mapping of str to state dict
        Tensors and plain containers only (model, optimiser, generator states).
    metadata : mapping
        Plain values only (str, numbers, bool, None, lists, dicts).
    """
    payload = {"format": CHECKPOINT_FORMAT, "states": dict(states), "metadata": dict(metadata)}
    # Saved through a file object: torch then names the archive's root folder "archive" instead of after the
    # (process-specific) temporary file, so the same weights give the same bytes and sha256 on every run.
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        torch.save(payload, fh)


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu", what: str = "checkpoint"
                    ) -> tuple[dict[str, Any], dict[str, Any]]:
    """Read the state dicts (on ``device``) and metadata that :func:`save_checkpoint` wrote.

    Raises
    ------
    InputError
        When ``path`` cannot be read, is no anomri checkpoint or has another format; the message
        names ``what`` was expected.
    """
    try:
        payload = torch.load(path, map_location=device, weights_only=True)
        found = payload.get("format") if isinstance(payload, dict) else None
    except (OSError, RuntimeError, TypeError, ValueError, EOFError, pickle.UnpicklingError) as exc:
        raise InputError(path, f"not a readable anomri {what} ({type(exc).__name__})") from exc
    if found != CHECKPOINT_FORMAT:
        raise InputError(path, f"not a readable anomri {what} (checkpoint format {found}, this anomri reads "
                               f"{CHECKPOINT_FORMAT}): train it again")
    return payload["states"], payload["metadata"]


def save_model(path: str | Path, model: nn.Module, metadata: Mapping[str, Any]) -> None:
    """Write a trained ``model`` (its ``kind``, constructor arguments and weights) and ``metadata``."""
    save_checkpoint(path, {"model": model.state_dict()},
                    {"kind": model.kind, "hparams": model.hparams(), "metadata": dict(metadata)})


def load_model(path: str | Path, classes: Mapping[str, type[nn.Module]], device: str | torch.device = "cpu",
               what: str = "model checkpoint") -> tuple[nn.Module, dict]:
    """Rebuild a model of one of ``classes`` (by kind) in eval mode on ``device``; return it and its metadata.

    Raises
    ------
    InputError
        When ``path`` is unreadable or holds no model of ``classes``.
    """
    states, metadata = load_checkpoint(path, device, what)
    try:
        model = classes[metadata["kind"]](**metadata["hparams"])
        model.load_state_dict(states["model"])
    except (RuntimeError, KeyError, TypeError, ValueError) as exc:
        raise InputError(path, f"not a readable anomri {what} ({type(exc).__name__})") from exc
    return model.to(device).eval(), metadata["metadata"]


def save_vae(path: str | Path, model: GaussianVAE, metadata: dict) -> None:
    """Write a voxel VAE and JSON-like ``metadata`` to ``path`` atomically."""
    save_model(path, model, metadata)


def load_vae(path: str | Path, device: str | torch.device = "cpu") -> tuple[GaussianVAE, dict]:
    """Rebuild a :class:`GaussianVAE` in eval mode from ``path``; return it and its metadata."""
    return load_model(path, {GaussianVAE.kind: GaussianVAE}, device)
