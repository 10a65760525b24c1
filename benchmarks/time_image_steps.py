"""How much faster does each image model train with channels-last weights than in PyTorch's default layout?

For every image model kind (or those named), builds two copies with the same initial weights, one in PyTorch's
default (contiguous, channels-first) layout, the one a user of plain PyTorch gets, and one channels-last (what
``build_model`` returns), and times the training's own step (``STEPS[kind]``: losses, backward, optimiser) on one
batch of the magnetic tiles' normal training images at the image settings' defaults. The two arms alternate step
by step, so a machine whose speed drifts slows both alike. Prints the median step of each arm, their ratio and
the training time each implies (steps per epoch x epochs; validation left out).

    python benchmarks/time_image_steps.py [--root DIR] [--threads 2] [--steps 10] [--kinds conv-vae patch-memory]
"""

from __future__ import annotations

import argparse
import copy
import math
import time

import numpy as np
import torch

from anomri.images.geometry import load_model_inputs, split_validation
from anomri.images.settings import ImageSettings
from anomri.images.training import MODEL_KINDS, STEPS, build_model, build_optimizers, training_batch_size
from anomri.io.images import scan_mvtec

LAYOUTS = {"default": torch.contiguous_format, "channels-last": torch.channels_last}


def time_kind(kind: str, x: torch.Tensor, s: ImageSettings, steps: int) -> dict[str, float]:
    """Median seconds of ``kind``'s training step on ``x`` in each layout, the first two steps left out."""
    torch.manual_seed(s.seed)
    built = build_model(kind, tuple(x.shape[1:]), s)
    if hasattr(built, "standardizer"):
        built.standardizer.fit(x)
    arms = {}
    for name, layout in LAYOUTS.items():
        model = copy.deepcopy(built).to(memory_format=layout).train()
        arms[name] = (model, build_optimizers(kind, model, s), torch.Generator().manual_seed(s.seed))
    step = STEPS[kind][0]
    times: dict[str, list[float]] = {name: [] for name in arms}
    for _ in range(steps + 2):
        for name, (model, optimizers, generator) in arms.items():
            start = time.perf_counter()
            step(model, optimizers, x, generator, s)
            times[name].append(time.perf_counter() - start)
    return {name: float(np.median(t[2:])) for name, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default="/work/shared/data/magnetic_tile")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--kinds", nargs="+", choices=list(MODEL_KINDS), default=list(MODEL_KINDS))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    s = ImageSettings()
    train, _ = split_validation(scan_mvtec(args.root).train, s.validation_fraction, s.seed)
    print(f"{len(train)} training images, {args.threads} threads, median of {args.steps} alternating steps")
    print("| model | batch | default layout | channels-last | speed-up | implied training, default / channels-last |")
    print("|---|---|---|---|---|---|")
    for kind in args.kinds:
        batch_size = training_batch_size(kind, s)
        x = torch.from_numpy(load_model_inputs(train[:batch_size], s.geometry_of(kind), 1, False).inputs)
        median = time_kind(kind, x, s, args.steps)
        n_steps = math.ceil(len(train) / batch_size) * getattr(s, STEPS[kind][1])
        implied = " / ".join(f"{median[name] * n_steps:.0f} s" for name in LAYOUTS)
        print(f"| {kind} | {batch_size} | {median['default']:.3f} s | {median['channels-last']:.3f} s | "
              f"{median['default'] / median['channels-last']:.2f}x | {implied} |", flush=True)


if __name__ == "__main__":
    main()
