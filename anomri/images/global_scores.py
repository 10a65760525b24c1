"""Image-level scores beyond the map: global-descriptor novelty of a folder, and its fusion with a method's score.

:func:`descriptor_score_rows` fits :class:`~anomri.images.descriptors.GlobalDescriptorModel`
on the normal training images that train the models (the same
``validation_fraction`` / ``seed`` split) and scores the held-back normal
images (split ``val``) and the test images, as rows of a score table
(:data:`~anomri.images.outputs.SCORE_COLUMNS`, method
:data:`DESCRIPTOR_METHOD`). :func:`fused_score_rows` calibrates a method's
primary score and the descriptor score to z-scores against the same held-back
normal images and fuses them (:func:`~anomri.images.fusion.fuse`), as score
``<primary>+descriptors`` of that method.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from anomri.images.descriptors import GlobalDescriptorModel, extract_descriptors
from anomri.images.fusion import NormalCalibration, fuse
from anomri.images.geometry import split_validation
from anomri.images.settings import ImageSettings
from anomri.io.images import read_image, scan_mvtec

logger = logging.getLogger(__name__)

__all__ = ["DESCRIPTOR_METHOD", "DESCRIPTOR_SCORE", "FUSED_SUFFIX", "descriptor_score_rows", "fused_score_rows"]

#: Method and score names of the descriptor novelty in the score tables and ``evaluation.tsv``.
DESCRIPTOR_METHOD = "global-descriptors"
DESCRIPTOR_SCORE = "descriptor-novelty"
#: A method's fused score is named ``<its primary score><FUSED_SUFFIX>``.
FUSED_SUFFIX = "+descriptors"


def descriptor_score_rows(root: str | Path, settings: ImageSettings) -> list[dict]:
    """Descriptor novelty of the held-back normal (``val``) and test images of an MVTec folder, as score rows.

    Values are floats; higher = more novel.
    """
    folder = scan_mvtec(root)
    train, validation = split_validation(folder.train, settings.validation_fraction, settings.seed)

    def describe(records: list) -> np.ndarray:
        # Read lazily: extract_descriptors resizes each image as it comes.
        return extract_descriptors((read_image(r.path) for r in records), size=settings.descriptor_size,
                                   scales=settings.descriptor_scales)

    if len(train) < 2:
        logger.warning("%s: %d normal training image(s), fewer than the 2 a descriptor model needs: no descriptor "
                       "scores", DESCRIPTOR_METHOD, len(train))
        return []
    fit = GlobalDescriptorModel(settings.descriptor_estimator, seed=settings.seed).fit(describe(train))
    rows = []
    for split, records in (("val", validation), ("test", folder.test)):
        values = fit.score(describe(records)) if records else np.zeros(0)
        rows += [{"method": DESCRIPTOR_METHOD, "split": split, "label": r.label, "stem": r.stem,
                  "score": DESCRIPTOR_SCORE, "value": float(v)} for r, v in zip(records, values)]
    logger.info("%s: scored %d validation and %d test images", DESCRIPTOR_METHOD, len(validation), len(folder.test))
    return rows


def _calibrated(rows: list[dict], score: str, keys: list[tuple[str, str, str]]) -> np.ndarray:
    """z-scores of ``score`` at ``keys`` (split, label, stem) against its ``val`` rows."""
    chosen = [r for r in rows if r["score"] == score]
    calibration = NormalCalibration.fit([r["value"] for r in chosen if r["split"] == "val"])
    by_key = {(r["split"], r["label"], r["stem"]): r["value"] for r in chosen}
    return calibration.zscore([by_key[k] for k in keys])


def fused_score_rows(method_rows: list[dict], descriptor_rows: list[dict], primary: str, rule: str) -> list[dict]:
    """Rows of score ``<primary>+descriptors``: a method's ``primary`` score and the descriptor novelty, each
    as z-scores against the held-back normal images, fused by ``rule`` (``max`` or ``mean``).

    Both tables must score the same ``val`` and ``test`` images (the same split settings).
    """
    own = [r for r in method_rows if r["score"] == primary]
    for name, rows, score in (("method", own, primary), ("descriptor", descriptor_rows, DESCRIPTOR_SCORE)):
        if sum(r["split"] == "val" and r["score"] == score for r in rows) < 2:
            # A z-score needs a spread: too few held-back normal images (a tiny folder). Say so, fuse nothing.
            logger.warning("fewer than 2 held-back normal %s scores: no fused score %s%s", name, primary,
                           FUSED_SUFFIX)
            return []
    method = own[0]["method"] if own else ""
    keys = [(r["split"], r["label"], r["stem"]) for r in own]
    values = fuse([_calibrated(method_rows, primary, keys), _calibrated(descriptor_rows, DESCRIPTOR_SCORE, keys)],
                  rule)
    return [{"method": method, "split": s, "label": label, "stem": stem, "score": primary + FUSED_SUFFIX,
             "value": float(v)} for (s, label, stem), v in zip(keys, values)]
