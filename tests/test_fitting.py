"""The shared epoch loop and checkpoint format: interrupted runs resume bit for bit, foreign checkpoints are ignored."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from anomri.errors import InputError
from anomri.models.checkpoint import CHECKPOINT_FORMAT, load_checkpoint, save_checkpoint
from anomri.models.fitting import EpochPlan, descend, fit, training_fingerprint

DATA = torch.from_numpy(np.random.default_rng(0).normal(size=(50, 3)).astype(np.float32))
HELD_OUT = torch.from_numpy(np.random.default_rng(1).normal(size=(10, 3)).astype(np.float32))
FINGERPRINT = training_fingerprint([DATA.numpy()], {"lr": 0.05})


def _run(plan: EpochPlan, resume: Path | None = None, die_at_step: int | None = None
         ) -> tuple[nn.Module, list[dict]]:
    """Fit a tiny denoising autoencoder (its step draws from the loop's generator); optionally die at a step."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 2), nn.Linear(2, 3))
    optimizer = torch.optim.Adam(model.parameters(), lr=0.05)
    steps = []

    def step(batch: torch.Tensor, generator: torch.Generator) -> dict[str, float]:
        steps.append(len(batch))
        if len(steps) == die_at_step:
            raise KeyboardInterrupt
        noisy = batch + 0.1 * torch.randn(batch.shape, generator=generator)
        loss = ((model(noisy) - batch) ** 2).mean()
        descend(optimizer, loss, clip_norm=1.0)
        return {"loss": loss.item()}

    @torch.no_grad()
    def validate() -> float:
        return float(((model(HELD_OUT) - HELD_OUT) ** 2).mean())

    history = fit(model, [optimizer], DATA, step, validate, plan, FINGERPRINT, resume, progress=False)
    return model, history


def _same_weights(a: nn.Module, b: nn.Module) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))


@pytest.mark.parametrize("reseed", [False, True])
def test_run_interrupted_mid_epoch_resumes_to_the_same_weights(reseed: bool, tmp_path) -> None:
    plan = EpochPlan(epochs=5, batch_size=16, seed=3, reseed_every_epoch=reseed)
    straight, history = _run(plan)
    resume = tmp_path / "run.resume.pt"
    with pytest.raises(KeyboardInterrupt):
        _run(plan, resume, die_at_step=2 * 4 + 2)  # 4 batches an epoch: dies in the second batch of epoch 3
    assert load_checkpoint(resume)[1]["epoch"] == 2
    resumed, resumed_history = _run(plan, resume)
    assert _same_weights(straight, resumed) and resumed_history == history
    assert [h["epoch"] for h in history] == [1, 2, 3, 4, 5]
    best = min(history, key=lambda h: h["val_loss"])
    assert load_checkpoint(resume)[1]["best_epoch"] == best["epoch"]


def test_patience_stops_the_run_and_keeps_the_best_epoch() -> None:
    # A learning rate too high to settle: the validation loss soon stops improving.
    plan = EpochPlan(epochs=40, batch_size=50, seed=0, patience=2)
    _, history = _run(plan)
    losses = [h["val_loss"] for h in history]
    best = int(np.argmin(losses))
    assert len(history) == best + 1 + 2 < 40


def test_checkpoints_of_other_runs_are_ignored(tmp_path) -> None:
    plan = EpochPlan(epochs=3, batch_size=16, seed=3)
    fresh, history = _run(plan)
    resume = tmp_path / "run.resume.pt"
    # A longer run of the same data: its weights are past this run's end.
    _run(EpochPlan(epochs=4, batch_size=16, seed=3), resume)
    model, again = _run(plan, resume)
    assert _same_weights(fresh, model) and again == history
    # A file of another format (or no checkpoint at all) is trained over, not read.
    torch.save({"fingerprint": FINGERPRINT, "state": {"epoch": 1}}, resume)
    with pytest.raises(InputError, match=f"checkpoint format None, this anomri reads {CHECKPOINT_FORMAT}"):
        load_checkpoint(resume)
    model, again = _run(plan, resume)
    assert _same_weights(fresh, model) and again == history
    resume.write_bytes(b"not a checkpoint")
    assert _same_weights(fresh, _run(plan, resume)[0])
    # A checkpoint of this run whose weights no longer fit the model (another architecture): trained afresh.
    save_checkpoint(resume, {"model": {"0.weight": torch.zeros(5, 5)}}, {"fingerprint": FINGERPRINT, "epoch": 1})
    assert _same_weights(fresh, _run(plan, resume)[0])


def test_checkpoint_round_trip(tmp_path) -> None:
    states = {"model": {"w": torch.arange(3.0)}}
    save_checkpoint(tmp_path / "c.pt", states, {"kind": "x", "history": [{"epoch": 1, "loss": 0.5}]})
    loaded, metadata = load_checkpoint(tmp_path / "c.pt")
    assert torch.equal(loaded["model"]["w"], states["model"]["w"])
    assert metadata == {"kind": "x", "history": [{"epoch": 1, "loss": 0.5}]}
    assert not list(tmp_path.glob(".tmp*"))  # written atomically, through a temporary file


def test_checkpoint_bytes_do_not_depend_on_the_file_name(tmp_path) -> None:
    """The same weights saved under two names (two processes' temporary files) give identical bytes, so the
    sha256 that every map's sidecar records is reproducible."""
    states = {"model": {"weight": torch.arange(12.0).reshape(3, 4)}}
    first, second = tmp_path / "vae.pt", tmp_path / "other" / "model-2.pt"
    save_checkpoint(first, states, {"epochs": 3})
    save_checkpoint(second, states, {"epochs": 3})
    assert first.read_bytes() == second.read_bytes()
