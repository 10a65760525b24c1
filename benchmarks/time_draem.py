"""How fast does DRAEM train on a CPU, in float32 against bfloat16 autocast, channels-first against channels-last?

Times DRAEM training steps (synthetic anomalies, both networks forward and backward, Adam) on a batch of the
magnetic tiles' normal training images at the image settings' defaults, in four arms: the plain float32
channels-first step a user of the reference implementation would run, channels-last alone, bfloat16 autocast
alone, and both (what ``train_image_model`` does with ``draem_precision: bfloat16``; ``auto`` picks bfloat16
where the CPU has it natively). Each step is the training's own (``draem_losses``, then Adam). It prints the
median step, the ratio to the plain step, and the training time that step implies for the full set (685
inputs, ``draem_epochs``, validation left out). It also times the reconstruction's SSIM loss with its gradient
on the same batch, DRAEM's (Gaussian windows as matrix products) against MONAI's ``SSIMLoss`` (one-channel
convolutions), the loss a user of MONAI would pick.

    python benchmarks/time_draem.py [--root DIR] [--threads 2] [--steps 8] [--arms float32 channels-last]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time

import numpy as np
import torch
from monai.losses import SSIMLoss

from anomri.images.geometry import load_model_inputs, split_validation
from anomri.images.settings import ImageSettings
from anomri.images.training import build_model, draem_losses, training_batch_size
from anomri.io.images import scan_mvtec
from anomri.models.draem import SSIM_WINDOW
from anomri.models.fitting import descend
from anomri.models.ssim import GaussianSSIMLoss

#: Arms: the networks' weight layout (``build_model`` gives channels-last) and ``draem_precision``.
ARMS = {"float32": (torch.contiguous_format, "float32"), "channels-last": (torch.channels_last, "float32"),
        "bfloat16": (torch.contiguous_format, "bfloat16"), "both": (torch.channels_last, "bfloat16")}


def median_step(x: torch.Tensor, s: ImageSettings, memory_format: torch.memory_format, steps: int) -> float:
    """Median seconds of a DRAEM training step on ``x``, the first two (allocations) left out."""
    torch.manual_seed(s.seed)
    model = build_model("draem", tuple(x.shape[1:]), s)
    model.standardizer.fit(x)
    model.to(memory_format=memory_format).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=s.draem_learning_rate)
    generator = torch.Generator().manual_seed(s.seed)
    times = []
    for _ in range(steps + 2):
        start = time.perf_counter()
        descend(optimizer, draem_losses(model, x, generator, s)["loss"])
        times.append(time.perf_counter() - start)
    return float(np.median(times[2:]))


def median_ssim(loss: torch.nn.Module, x: torch.Tensor, steps: int) -> float:
    """Median seconds of ``loss`` between a perturbed copy of ``x`` and ``x``, with its gradient."""
    generator = torch.Generator().manual_seed(0)
    times = []
    for _ in range(steps + 2):
        prediction = (x + 0.05 * torch.randn(x.shape, generator=generator)).requires_grad_(True)
        start = time.perf_counter()
        loss(prediction, x).backward()
        times.append(time.perf_counter() - start)
    return float(np.median(times[2:]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default="/work/shared/data/magnetic_tile")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--arms", nargs="+", choices=list(ARMS), default=list(ARMS),
                        help="arms to time (bfloat16 without native support is slow); the first is the reference")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    s = ImageSettings()
    train, _ = split_validation(scan_mvtec(args.root).train, s.validation_fraction, s.seed)
    batch_size = training_batch_size("draem", s)
    x = torch.from_numpy(load_model_inputs(train[:batch_size], s.geometry_of("draem"), 1, False).inputs)
    steps_per_epoch = len(train) // batch_size
    result = {"threads": args.threads, "batch": batch_size, "training_inputs": len(train), "epochs": s.draem_epochs,
              "native_bfloat16": bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())}
    plain = None
    for name in args.arms:
        memory_format, precision = ARMS[name]
        step = median_step(x, dataclasses.replace(s, draem_precision=precision), memory_format, args.steps)
        plain = plain or step
        result[name] = {"step_s": round(step, 3), "speed-up": round(plain / step, 2),
                        "training_min": round(step * steps_per_epoch * s.draem_epochs / 60, 1)}
    monai_ssim = median_ssim(SSIMLoss(2, data_range=1.0, win_size=SSIM_WINDOW), x, args.steps)
    ours = median_ssim(GaussianSSIMLoss(SSIM_WINDOW), x, args.steps)
    result["ssim_loss_and_gradient"] = {"monai_ms": round(1e3 * monai_ssim, 1), "anomri_ms": round(1e3 * ours, 1),
                                        "speed-up": round(monai_ssim / ours, 1)}
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
