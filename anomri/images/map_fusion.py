"""Method ``fusion``: several methods' anomaly maps, each calibrated on the normal validation images, fused per pixel.

A DRAEM map is a probability, a patch-memory map a feature distance: their
numbers cannot be averaged as they are. Each component map is divided by that
method's pixel threshold, the ``threshold_percentile`` of its maps of the
held-back normal validation images (never trained on), so 1 means "as high as
the top 1 % of normal pixels" for every method; the fused map is the mean (or
the maximum, ``map_fusion_rule``) of the calibrated maps. Evidence that adds
up: a defect two methods see moderately outranks one pixel a single method
over-reacts to.

The image scores: ``fused-primary``, the primary score of each method of
``score_fusion_methods`` as a z-score against the same normal validation
images, fused by the same rule (the method's primary score), and ``map-max`` of
the fused map. The score methods may differ from the map methods: a method
whose maps localise poorly can still rank images well (the VAE projection's
map-top). The method's pixel threshold is the same percentile of the fused
validation maps.

Why these components (measured on the magnetic tiles' development types;
every number, per seed, in benchmarks/README.md and docs/results.md):
fusing DRAEM's and patch memory's calibrated maps beat DRAEM alone in pixel
AUROC and AU-PRO, and the VAE projection's score and map added image AUROC
and AU-PRO, for 29 min of training on 2 cores. The default fuses patch
memory and the VAE projection only, at fewer epochs, so that training fits in
10 minutes with a margin: DRAEM, the costliest per epoch, lost the most when
its epochs were cut, and leaving it out costs pixel AUROC, mostly on breaks.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np

from anomri.errors import InputError
from anomri.evaluate.image_metrics import normal_threshold
from anomri.images.evaluation import read_scores
from anomri.images.fusion import NormalCalibration, fuse
from anomri.images.outputs import SCORE_COLUMNS, ImageOutputs, map_path, save_maps, score_rows
from anomri.images.settings import FUSION_METHOD, PRIMARY_SCORE, ImageSettings
from anomri.io.atomic import write_json
from anomri.io.tables import write_table

logger = logging.getLogger(__name__)

__all__ = ["FUSED_PRIMARY", "fuse_method_maps"]

#: The fused method's primary image score.
FUSED_PRIMARY = PRIMARY_SCORE[FUSION_METHOD]


def _component(out: ImageOutputs, method: str) -> tuple[dict, list[dict]]:
    """A component method's thresholds record and score rows, or an input error naming the missing file."""
    for path in (out.thresholds(method), out.scores(method)):
        if not path.is_file():
            raise InputError(path, f"missing: score method {method} (images-score) before fusing its maps")
    return json.loads(out.thresholds(method).read_text()), read_scores(out.scores(method))


def _keys(rows: list[dict], split: str, score: str) -> list[tuple[str, str]]:
    return [(r["label"], r["stem"]) for r in rows if r["split"] == split and r["score"] == score]


def fuse_method_maps(images_dir: str | Path, settings: ImageSettings) -> None:
    """Write method :data:`~anomri.images.settings.FUSION_METHOD`'s maps, scores and thresholds under ``images_dir``.

    Reads the maps (test and normal validation) of every method of
    ``settings.map_fusion_methods`` and the score tables and thresholds of
    those and of ``settings.score_fusion_methods``, as ``images-score`` wrote
    them; writes the fused method's in the same layout
    (:class:`~anomri.images.outputs.ImageOutputs`), so evaluation and the
    report treat it as one more method. Raises
    :class:`~anomri.errors.InputError` when a component is missing or the
    components scored different images.
    """
    out = ImageOutputs(images_dir)
    methods = list(settings.fused_methods)
    rule = settings.map_fusion_rule
    components = {m: _component(out, m) for m in methods}
    map_components = {m: components[m] for m in settings.map_fusion_methods}
    first_rows = components[methods[0]][1]
    primary0 = components[methods[0]][0]["primary_score"]
    keys = {split: _keys(first_rows, split, primary0) for split in ("val", "test")}
    for method, (record, rows) in components.items():
        if any(sorted(_keys(rows, s, record["primary_score"])) != sorted(keys[s]) for s in keys):
            raise InputError(out.scores(method), f"scores other images than {out.scores(methods[0])}: fuse methods "
                                                 "scored on the same folder with the same validation split")
    if len(keys["val"]) < 2:
        raise InputError(out.scores(methods[0]), f"{len(keys['val'])} normal validation image(s): calibrating "
                                                  "maps and scores needs at least 2")

    folder_of = {"val": out.validation_maps, "test": out.maps}

    def fused_maps(split: str) -> list[np.ndarray]:
        maps = []
        for label, stem in keys[split]:
            calibrated = []
            for method, (record, _) in map_components.items():
                path = map_path(folder_of[split](method), label, stem)
                if not path.is_file():
                    raise InputError(path, f"missing: re-run images-score for method {method}")
                calibrated.append(np.load(path).astype(np.float64) / max(record["pixel_threshold"], 1e-12))
            if len({m.shape for m in calibrated}) != 1:
                raise InputError(map_path(folder_of[split](methods[0]), label, stem),
                                 f"maps of {', '.join(map_components)} differ in size: "
                                 f"{[m.shape for m in calibrated]}")
            maps.append(fuse([m.ravel() for m in calibrated], rule).reshape(calibrated[0].shape).astype(np.float32))
        return maps

    # Every score component's primary score by (split, class, stem), and its calibration on the normal validation
    # images.
    primaries = [{(r["split"], r["label"], r["stem"]): r["value"] for r in rows
                  if r["score"] == record["primary_score"]}
                 for record, rows in (components[m] for m in settings.score_fusion_methods)]
    calibrations = [NormalCalibration.fit([values[("val", *k)] for k in keys["val"]]) for values in primaries]

    maps = {split: fused_maps(split) for split in keys}
    rows = []
    for split in keys:
        primary_z = [c.zscore([values[(split, *k)] for k in keys[split]]) for values, c in zip(primaries, calibrations)]
        rows += score_rows(FUSION_METHOD, split, keys[split], FUSED_PRIMARY, fuse(primary_z, rule))
        rows += score_rows(FUSION_METHOD, split, keys[split], "map-max", [m.max() for m in maps[split]])
        save_maps(folder_of[split](FUSION_METHOD), keys[split], maps[split])
    write_table(out.scores(FUSION_METHOD), rows, SCORE_COLUMNS)
    pixel_threshold = normal_threshold(np.concatenate([m.ravel() for m in maps["val"]]),
                                       settings.threshold_percentile)
    write_json(out.thresholds(FUSION_METHOD), {
        "method": FUSION_METHOD, "primary_score": FUSED_PRIMARY, "pixel_threshold": pixel_threshold,
        "threshold_percentile": settings.threshold_percentile, "n_validation_images": len(keys["val"]),
        "rule": rule,
        "components": {m: {"pixel_threshold": r["pixel_threshold"], "primary_score": r["primary_score"],
                           "model": r.get("model")} for m, (r, _) in components.items()},
        "map_components": list(settings.map_fusion_methods),
        "score_components": list(settings.score_fusion_methods),
        "description": f"{rule} of the maps of {', '.join(settings.map_fusion_methods)}, each divided by its pixel "
                       f"threshold (the {settings.threshold_percentile:g}th percentile of its normal validation "
                       f"maps); {FUSED_PRIMARY}: the {rule} of the primary scores of "
                       f"{', '.join(settings.score_fusion_methods)} as z-scores against the normal validation images",
    })
    logger.info("%s: %s of the maps of %s and the scores of %s on %d validation and %d test images", FUSION_METHOD,
                rule, " + ".join(settings.map_fusion_methods), " + ".join(settings.score_fusion_methods),
                len(keys["val"]), len(keys["test"]))
