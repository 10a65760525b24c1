"""How fast does DRAEM train on a CPU, in float32 against bfloat16 autocast, channels-first against channels-last?

Times DRAEM training steps (synthetic anomalies, both networks forward and backward, Adam) on a batch of the
magnetic tiles' normal training images at the image settings' defaults, in four arms: the plain float32
channels-first step a user of the reference implementation would run, channels-last alone, bfloat16 autocast
alone, and both (what ``train_image_model`` does with ``draem_precision: bfloat16``; ``auto`` picks bfloat16
where the CPU has it natively). Each step is the training's own (``draem_losses``, then Adam). It prints the
median step, the ratio to the plain step, and the training time that step implies for the full set (685
inputs, ``draem_epochs``, validation left out).

    python benchmarks/time_draem.py [--root DIR] [--threads 2] [--steps 8]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time

import numpy as np
import torch

from anomri.images.geometry import load_model_inputs, split_validation
from anomri.images.settings import ImageSettings
from anomri.images.training import build_model, draem_losses, training_batch_size
from anomri.io.images import scan_mvtec
from anomri.models.fitting import descend

#: Arms: the networks' weight layout (DRAEM's own is channels-last) and ``draem_precision``.
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default="/work/shared/data/magnetic_tile")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=8)
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
    for name, (memory_format, precision) in ARMS.items():
        step = median_step(x, dataclasses.replace(s, draem_precision=precision), memory_format, args.steps)
        plain = plain or step
        result[name] = {"step_s": round(step, 3), "speed-up": round(plain / step, 2),
                        "training_min": round(step * steps_per_epoch * s.draem_epochs / 60, 1)}
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
