"""Saving and loading trained models as plain tensors (``torch.load(weights_only=True)``)."""

from __future__ import annotations

import hashlib
import pickle
from pathlib import Path

import torch

from anomri.errors import InputError
from anomri.io.atomic import atomic_path
from anomri.models.vae import GaussianVAE


def save_vae(path: str | Path, model: GaussianVAE, metadata: dict) -> None:
    """Write ``model`` and JSON-like ``metadata`` to ``path`` atomically."""
    payload = {"hparams": model.hparams(), "state_dict": model.state_dict(), "metadata": metadata}
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)


def load_vae(path: str | Path, device: str | torch.device = "cpu") -> tuple[GaussianVAE, dict]:
    """Rebuild a :class:`GaussianVAE` in eval mode from ``path``; return it and its metadata."""
    try:
        payload = torch.load(path, map_location=device, weights_only=True)
        model = GaussianVAE(**payload["hparams"])
        model.load_state_dict(payload["state_dict"])
    except (OSError, RuntimeError, KeyError, TypeError, ValueError, EOFError, pickle.UnpicklingError) as exc:
        raise InputError(path, f"not a readable anomri model checkpoint ({type(exc).__name__})") from exc
    return model.to(device).eval(), payload["metadata"]


def file_sha256(path: str | Path) -> str:
    """Hex SHA-256 of a file, recorded in sidecars as the model's provenance."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
