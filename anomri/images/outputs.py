"""Where the image engine writes, under ``<output_dir>/images`` (shared by the CLI and the Snakemake rules)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from anomri.io.atomic import atomic_path

#: Columns of the per-method score tables and of ``image_scores.tsv``.
SCORE_COLUMNS = ["method", "split", "label", "stem", "score", "value"]


def map_path(maps_dir: str | Path, label: str, stem: str) -> Path:
    """``<maps_dir>/<test class>/<stem>.npy``."""
    return Path(maps_dir) / label / f"{stem}.npy"


def score_rows(method: str, split: str, keys: Sequence[tuple[str, str]], score: str,
               values: Iterable[float]) -> list[dict]:
    """Rows of :data:`SCORE_COLUMNS`: one score of the images ``keys`` ((class, stem) pairs) of ``split``."""
    return [{"method": method, "split": split, "label": label, "stem": stem, "score": score, "value": f"{v:.10g}"}
            for (label, stem), v in zip(keys, values, strict=True)]


def save_maps(maps_dir: str | Path, keys: Sequence[tuple[str, str]], maps: Iterable[np.ndarray]) -> None:
    """Write each map as float32 to :func:`map_path` of its (class, stem), atomically; the folder exists even empty."""
    for (label, stem), pixel_map in zip(keys, maps, strict=True):
        with atomic_path(map_path(maps_dir, label, stem)) as tmp, open(tmp, "wb") as fh:
            np.save(fh, np.asarray(pixel_map, np.float32))
    Path(maps_dir).mkdir(parents=True, exist_ok=True)


@dataclass(frozen=True)
class ImageOutputs:
    """Paths of the image engine's outputs below ``root``."""

    root: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))

    @property
    def demo(self) -> Path:
        """The synthetic demo image set, when no ``images_root`` is given."""
        return self.root / "demo"

    def model(self, kind: str) -> Path:
        return self.root / "models" / f"{kind}.pt"

    def history(self, kind: str) -> Path:
        return self.root / "models" / f"{kind}_history.tsv"

    def maps(self, method: str) -> Path:
        """Folder of ``<test class>/<stem>.npy`` anomaly maps."""
        return self.root / "maps" / method

    def validation_maps(self, method: str) -> Path:
        """Folder of ``<class>/<stem>.npy`` maps of the held-back normal validation images."""
        return self.root / "validation_maps" / method

    def scores(self, method: str) -> Path:
        return self.root / "scores" / f"{method}.tsv"

    def thresholds(self, method: str) -> Path:
        return self.root / "scores" / f"{method}.json"

    def overlays(self, method: str) -> Path:
        """Folder of ``<test class>/<stem>.png`` image | map | mask strips."""
        return self.root / "overlays" / method

    @property
    def image_scores(self) -> Path:
        return self.root / "image_scores.tsv"

    @property
    def evaluation(self) -> Path:
        return self.root / "evaluation.tsv"

    @property
    def curves(self) -> Path:
        return self.root / "roc_curves.json"

    @property
    def roc_figure(self) -> Path:
        return self.root / "report" / "roc.png"

    def examples_figure(self, method: str) -> Path:
        return self.root / "report" / f"examples_{method}.png"
