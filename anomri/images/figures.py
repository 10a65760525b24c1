"""Figures of the image engine: per-image overlays, ROC curves and best/worst examples (matplotlib)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import matplotlib
import numpy as np
from matplotlib.figure import Figure
from matplotlib.image import imsave
from tqdm.auto import tqdm

from anomri.images.evaluation import read_scores
from anomri.images.outputs import ImageOutputs, map_path
from anomri.images.settings import PRIMARY_SCORE
from anomri.io.atomic import atomic_path
from anomri.io.images import ImageRecord, read_image, read_mask, scan_mvtec

logger = logging.getLogger(__name__)

__all__ = ["write_overlays", "plot_roc_curves", "plot_examples", "write_figures"]

MAP_COLORMAP = "inferno"
GAP_PX = 4


def _display_range(maps: list[np.ndarray]) -> tuple[float, float]:
    # One range per method, so that brightness compares across its images.
    pooled = np.concatenate([m.ravel()[:: max(1, m.size // 20000)] for m in maps])
    low, high = np.percentile(pooled, [1.0, 99.9])
    return float(low), float(max(high, low + 1e-12))


def _as_rgb(image: np.ndarray) -> np.ndarray:
    return np.repeat(image[0][..., None], 3, -1) if image.shape[0] == 1 else np.moveaxis(image, 0, -1)


def overlay_strip(image: np.ndarray, pixel_map: np.ndarray, mask: np.ndarray, display: tuple[float, float]
                  ) -> np.ndarray:
    """One RGB strip: the image | its anomaly map (colour-mapped in ``display``) | the mask."""
    low, high = display
    coloured = matplotlib.colormaps[MAP_COLORMAP](np.clip((pixel_map - low) / (high - low), 0.0, 1.0))[..., :3]
    gap = np.ones((image.shape[1], GAP_PX, 3))
    return np.concatenate([_as_rgb(image), gap, coloured, gap, np.repeat(mask[..., None], 3, -1).astype(float)], 1)


def write_overlays(root: str | Path, maps_dir: str | Path, out_dir: str | Path, progress: bool = True) -> None:
    """Write ``out_dir/<class>/<stem>.png`` (image | map | mask) for every test image of ``root``."""
    test = scan_mvtec(root).test
    maps = [np.load(map_path(maps_dir, r.label, r.stem)) for r in test]
    display = _display_range(maps) if maps else (0.0, 1.0)
    for record, pixel_map in tqdm(list(zip(test, maps)), desc="overlays", unit="image", disable=not progress):
        image = read_image(record.path, 3)
        strip = overlay_strip(image, pixel_map, read_mask(record, pixel_map.shape), display)
        with atomic_path(Path(out_dir) / record.label / f"{record.stem}.png") as tmp:
            imsave(tmp, np.clip(strip, 0.0, 1.0))
    Path(out_dir).mkdir(parents=True, exist_ok=True)


def plot_roc_curves(curves_path: str | Path, out: str | Path) -> None:
    """Image-level and pixel-level ROC curves of every method's primary score, one panel each."""
    curves = json.loads(Path(curves_path).read_text())
    # The object-oriented Figure needs no pyplot state or display backend.
    fig = Figure(figsize=(10, 4.6), layout="constrained")
    axes = fig.subplots(1, 2)
    for ax, level in zip(axes, ("image", "pixel")):
        for method, entry in curves.items():
            fpr, tpr = np.array(entry[level]["fpr"]), np.array(entry[level]["tpr"])
            ax.plot(fpr, tpr, label=f"{method} ({entry['score']}): AUC {np.trapezoid(tpr, fpr):.3f}")
        ax.plot([0, 1], [0, 1], color="0.7", lw=0.8, ls="--")
        ax.set(xlabel="false-positive rate", ylabel="true-positive rate", title=f"{level}-level ROC",
               xlim=(0, 1), ylim=(0, 1.01), aspect="equal")
        ax.legend(fontsize=7, loc="lower right")
    with atomic_path(out) as tmp:
        fig.savefig(tmp, dpi=120)


def _pick_examples(rows: list[dict], score: str, n: int) -> list[tuple[str, tuple[str, str], float]]:
    """(caption, (label, stem), value): highest-scored anomalies, lowest-scored anomalies, highest-scored normals."""
    test = [r for r in rows if r["split"] == "test" and r["score"] == score]
    anomalies = sorted((r for r in test if r["label"] != "good"), key=lambda r: -r["value"])
    normals = sorted((r for r in test if r["label"] == "good"), key=lambda r: -r["value"])
    picks = [("best: detected", r) for r in anomalies[:n]]
    picks += [("worst: missed", r) for r in anomalies[::-1][:n]]
    picks += [("worst: false alarm", r) for r in normals[:n]]
    return [(caption, (r["label"], r["stem"]), r["value"]) for caption, r in picks]


def plot_examples(root: str | Path, method: str, scores_path: str | Path, score: str, maps_dir: str | Path,
                  out: str | Path, n: int = 3) -> None:
    """Best and worst test examples of ``method`` ranked by ``score``: image | map | mask per row."""
    records: dict[tuple[str, str], ImageRecord] = {(r.label, r.stem): r for r in scan_mvtec(root).test}
    picks = _pick_examples(read_scores(scores_path), score, n)
    maps = [np.load(map_path(maps_dir, *key)) for _, key, _ in picks]
    display = _display_range(maps) if maps else (0.0, 1.0)
    fig = Figure(figsize=(7.5, 2.2 * max(len(picks), 1)), layout="constrained")
    axes = fig.subplots(max(len(picks), 1), 3, squeeze=False)
    for row, ((caption, key, value), pixel_map) in enumerate(zip(picks, maps)):
        record = records[key]
        image = read_image(record.path, 3)
        axes[row, 0].imshow(_as_rgb(image))
        axes[row, 0].set_title(f"{caption}\n{record.label}/{record.stem}, {score} = {value:.4g}", fontsize=7)
        axes[row, 1].imshow(pixel_map, cmap=MAP_COLORMAP, vmin=display[0], vmax=display[1])
        axes[row, 1].set_title("anomaly map", fontsize=7)
        axes[row, 2].imshow(read_mask(record, pixel_map.shape), cmap="gray", vmin=0, vmax=1)
        axes[row, 2].set_title("ground truth", fontsize=7)
    for ax in axes.ravel():
        ax.set_axis_off()
    fig.suptitle(f"{method}: best and worst examples", fontsize=9)
    with atomic_path(out) as tmp:
        fig.savefig(tmp, dpi=100)


def write_figures(root: str | Path, methods: list[str], images_dir: str | Path) -> None:
    """The ROC curves of ``methods``, and each method's best/worst examples (by its primary score) and overlays.

    Reads and writes under ``images_dir`` (:class:`~anomri.images.outputs.ImageOutputs`).
    """
    out = ImageOutputs(images_dir)
    plot_roc_curves(out.curves, out.roc_figure)
    for method in methods:
        plot_examples(root, method, out.scores(method), PRIMARY_SCORE[method], out.maps(method),
                      out.examples_figure(method))
        write_overlays(root, out.maps(method), out.overlays(method))
