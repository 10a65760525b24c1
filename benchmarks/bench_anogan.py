"""AnoGAN latent search: batched over all test images at once vs one image at a time (PyOD's way).

Both runs use the same code, model, images, starting latents and number of
steps; only the batching differs. Images do not interact (eval mode) and Adam
is per coordinate, so both should reach the same final loss; the table shows
how much time batching saves. One-at-a-time time is measured on a subset of
images and scaled to all of them (each image costs the same alone). Both paths
run one untimed warm-up step first, so neither pays for the one-off set-up of
the convolution kernels of its input shape. By default every test image is
searched in one batch, as the workflow does.

    python benchmarks/bench_anogan.py                      # demo images, untrained DCGAN
    python benchmarks/bench_anogan.py --root ../shared/data/magnetic_tile --model results/anomri/images/models/anogan.pt
    python benchmarks/bench_anogan.py --append-readme      # add the table to benchmarks/README.md
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from anomri.demo.images import make_demo_images
from anomri.images.geometry import ImageGeometry, load_model_inputs
from anomri.images.training import load_image_model
from anomri.io.images import scan_mvtec
from anomri.models.anogan import DCGAN, latent_search
from anomri.models.training import resolve_device

README = Path(__file__).resolve().parent / "README.md"
HEADING = "## Image engine"
#: Test images of the generated demo set when no folder is given.
DEMO_IMAGES = 128


def _images(root: Path | None, size: int, n_images: int) -> np.ndarray:
    if root is None:
        per_class = (n_images or DEMO_IMAGES) // 3 + 1
        root = make_demo_images(Path(tempfile.mkdtemp()) / "demo", n_train=2, n_test_good=per_class,
                                n_test_per_defect=per_class)
    records = scan_mvtec(root).test[:n_images or None]
    return load_model_inputs(records, ImageGeometry("resize", size), 1, progress=False).inputs


def _timed(fn):
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    result = fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return result, time.perf_counter() - start


def main(argv: list[str] | None = None) -> list[str]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, help="MVTec-layout folder (default: demo images)")
    parser.add_argument("--model", type=Path, help="trained anogan checkpoint (default: untrained DCGAN)")
    parser.add_argument("--size", type=int, default=64, help="image side, px (AnoGAN used 64 px patches)")
    parser.add_argument("--channels", type=int, nargs="+", default=[16, 32, 64, 128])
    parser.add_argument("--latent-size", type=int, default=64)
    parser.add_argument("--n-images", type=int, default=0, help="test images searched (0: all)")
    parser.add_argument("--single-subset", type=int, default=16, help="images timed one at a time")
    parser.add_argument("--steps", type=int, default=300, help="gamma")
    parser.add_argument("--chunks", type=int, nargs="*", default=[],
                        help="also time batching in chunks of these sizes (anogan_search_batch_size)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--append-readme", action="store_true")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    torch.manual_seed(args.seed)
    if args.model:
        gan, _ = load_image_model(args.model, device)
        size = gan.in_shape[-1]
    else:
        gan, size = DCGAN((1, args.size, args.size), args.latent_size, args.channels).to(device).eval(), args.size
    x = gan.scale(torch.from_numpy(_images(args.root, size, args.n_images)).to(device))
    n = len(x)
    z0 = torch.randn((n, gan.latent_size), generator=torch.Generator().manual_seed(args.seed)).to(device)
    k = min(args.single_subset, n)
    for warm_up in (x, x[:1], *(x[:c] for c in args.chunks)):
        latent_search(gan, warm_up, 1, z0=z0[:len(warm_up)])
    batched, t_batched = _timed(lambda: latent_search(gan, x, args.steps, z0=z0))
    chunked = {c: _timed(lambda c=c: torch.cat([latent_search(gan, x[i:i + c], args.steps, z0=z0[i:i + c]).score
                                                for i in range(0, n, c)])) for c in args.chunks}
    singles, t_subset = _timed(lambda: [latent_search(gan, x[i:i + 1], args.steps, z0=z0[i:i + 1]) for i in range(k)])
    t_single = t_subset * n / k
    single_loss = torch.cat([s.score for s in singles])
    rel_diff = float(((batched.score[:k] - single_loss).abs() / single_loss.abs()).max())
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else (
        f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)")
    lines = [
        f"AnoGAN latent search, {n} images of {size}x{size} px, gamma = {args.steps} Adam steps, "
        f"lambda = 0.1, DCGAN channels {gan.channels}, {'trained' if args.model else 'untrained'} model, "
        f"on {device_name}:",
        "",
        "| search | time (s) | per image (s) | mean final loss A(x) |",
        "|---|---|---|---|",
        f"| one image at a time (PyOD's way){' *' if k < n else ''} | {t_single:.1f} | {t_single / n:.3f} "
        f"| {float(single_loss.mean()):.4f} (first {k}) |",
        f"| batched, all images at once | {t_batched:.1f} | {t_batched / n:.3f} "
        f"| {float(batched.score.mean()):.4f} (first {k}: {float(batched.score[:k].mean()):.4f}) |",
        *(f"| batched in chunks of {c} | {seconds:.1f} | {seconds / n:.3f} | {float(score.mean()):.4f} |"
          for c, (score, seconds) in chunked.items()),
        "",
        f"Speed-up of the whole batch {t_single / t_batched:.1f}x"
        + "".join(f", of chunks of {c} {t_single / seconds:.1f}x" for c, (_, seconds) in chunked.items())
        + f"; largest relative difference of the final loss between batched and one-at-a-time {rel_diff:.1e}."
        + (f" (* timed on {k} images, scaled to {n}.)" if k < n else ""),
    ]
    print("\n".join(lines))
    if args.append_readme:
        append_to_readme(f"bench_anogan.py ({time.strftime('%Y-%m-%d')})", lines)
    return lines


def append_to_readme(title: str, lines: list[str]) -> None:
    """Add a ``### title`` block at the end of the README's "## Image engine" section (created if missing)."""
    text = README.read_text() if README.exists() else "# Benchmarks\n"
    if HEADING not in text:
        text = text.rstrip("\n") + f"\n\n{HEADING}\n"
    start = text.index(HEADING) + len(HEADING)
    end = text.find("\n## ", start)
    end = len(text) if end < 0 else end
    block = f"\n\n### {title}\n\n" + "\n".join(lines) + "\n"
    README.write_text(text[:end].rstrip("\n") + block + text[end:])


if __name__ == "__main__":
    main()
