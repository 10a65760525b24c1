"""Does method patch-memory train and build its bank within its budget? Times a few pieces single-threaded and
extrapolates, without training the whole model.

On a slice of an MVTec-layout folder's normal training images (default: the magnetic tiles), with the image
settings' defaults unless ``--settings`` says otherwise, it times: CutPaste training steps, the validation loss
of an epoch, the patch features per image, the greedy coreset of a pool as large as the full training set's
(random numbers: its cost depends only on the sizes), and scoring (the map of one batch of test images against a
bank of the slice's features, from the untrained network). The estimate is
epochs x (steps per epoch x step + validation) + features + coreset.

    OMP_NUM_THREADS=1 python benchmarks/time_patch_memory.py [--root DIR] [--settings JSON]
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

from anomri.images.geometry import load_model_inputs, split_validation
from anomri.images.settings import ImageSettings
from anomri.images.training import build_model, build_patch_memory, training_batch_size
from anomri.io.images import scan_mvtec
from anomri.models.cutpaste import three_way_batch
from anomri.models.patch_memory import greedy_coreset
from anomri.scores.memory_bank import MemoryBankMap


def _seconds(func) -> float:
    start = time.perf_counter()
    func()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default="/work/shared/data/magnetic_tile")
    parser.add_argument("--settings", default="{}", help="JSON object of ImageSettings fields")
    parser.add_argument("--slice", type=int, default=96, help="training images timed")
    args = parser.parse_args()
    torch.set_num_threads(1)
    s = ImageSettings.from_json(args.settings)
    folder = scan_mvtec(args.root)
    train, validation = split_validation(folder.train, s.validation_fraction, s.seed)
    geometry = s.geometry_of("patch-memory")
    x = torch.from_numpy(load_model_inputs(train[:args.slice], geometry, 1, False).inputs)
    torch.manual_seed(s.seed)
    model = build_model("patch-memory", tuple(x.shape[1:]), s)
    model.standardizer.fit(x)
    optimizer = torch.optim.Adam(model.parameters(), lr=s.patch_memory_learning_rate)
    generator = torch.Generator().manual_seed(s.seed)
    batch_size = training_batch_size("patch-memory", s)

    def step(batch: torch.Tensor) -> None:
        loss = model.loss(*three_way_batch(batch, generator))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    model.train()
    steps = [_seconds(lambda k=k: step(x[k * batch_size:(k + 1) * batch_size])) for k in range(3)]
    step_time = float(np.median(steps[1:]))  # the first step pays for allocations
    model.eval()
    held_out = x[:len(validation)]
    with torch.no_grad():
        validation_time = _seconds(lambda: [model.loss(*three_way_batch(held_out[k:k + s.batch_size], generator))
                                            for k in range(0, len(held_out), s.batch_size)])
        feature_time = _seconds(lambda: [model.patch_features(x[k:k + s.batch_size])
                                         for k in range(0, len(x), s.batch_size)]) / len(x)
    pool = torch.randn(len(train) * s.patch_memory_positions, model.feature_size)
    coreset_time = _seconds(lambda: greedy_coreset(pool, s.patch_memory_coreset_size, generator))
    epoch = len(train) // batch_size * step_time + validation_time
    total = s.patch_memory_epochs * epoch + len(train) * feature_time + coreset_time
    build_patch_memory(model, x, s)
    test = torch.from_numpy(load_model_inputs(folder.test[:s.batch_size], geometry, 1, False).inputs)
    anomaly_map = MemoryBankMap(model)
    map_time = _seconds(lambda: anomaly_map(test)) / len(test)
    print(json.dumps({
        "training_images": len(train), "validation_images": len(validation), "test_images": len(folder.test),
        "step_s": round(step_time, 3), "images_per_step": batch_size, "validation_s": round(validation_time, 2),
        "epoch_s": round(epoch, 1), "features_ms_per_image": round(1000 * feature_time, 2),
        "pool": len(pool), "coreset": s.patch_memory_coreset_size, "coreset_s": round(coreset_time, 1),
        "train_and_bank_min_one_thread": round(total / 60, 1), "epochs": s.patch_memory_epochs,
        "bank_of_slice": len(model.memory), "map_s_per_test_image": round(map_time, 3),
    }, indent=1))


if __name__ == "__main__":
    main()
