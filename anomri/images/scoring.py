"""Scoring image folders: per-image anomaly scores and pixel anomaly maps for each method.

Methods (output folder names) and what they compute on each model input:

``vae``
    Conv VAE; image scores: the registry scores ``vae_scores`` (all by
    default, less the slow ``vae_skip_scores``), via
    :class:`~anomri.models.conv_vae.FlatImageVAE`; with
    ``vae_reference_scores`` also the reference-set scores, the normal
    training images as reference set; map: the per-pixel terms of
    ``vae_map_score`` (default ``det-rec-err``, the plain squared
    reconstruction error).
``vae-projection``
    Conv VAE + iterative energy-based projection; map
    :func:`~anomri.models.projection.projection_map`; score ``map-sum``, the sum of
    the map (primary: ``map-top``, below).
``anogan``
    DCGAN + batched latent search; map |x - G(z)|; scores ``anomaly-score``
    A(x), ``residual`` R(x), ``discrimination`` D(x).
``mhp-vae``
    Multiple-hypotheses VAE; map: best hypothesis's squared residual; score
    ``wta``.
``draem``
    DRAEM's reconstructive and discriminative networks; map: the
    segmentation network's anomaly probability; its image scores are the
    map scores below (primary: ``map-max``, as in DRAEM).
``patch-memory``
    CutPaste-trained CNN and PatchCore memory bank
    (:mod:`anomri.models.patch_memory`); map: each patch's distance to its
    nearest memory-bank feature, upsampled; image scores: the map scores
    below (primary: ``map-max``, as in PatchCore).

Every method also gets two scores from its map:

``map-max``
    the maximum of the saved map;
``map-top``
    the mean of the highest ``top_fraction`` of the map's pixels after
    ``score_normalization`` (by default each pixel as a z-score against the
    normal validation maps at that place, see
    :mod:`anomri.images.normalization`), so errors every normal image has
    (edges, borders) do not count.

Maps are smoothed with a Gaussian of ``map_sigma`` model pixels, normalised
as ``map_normalization`` says (none by default), stitched to the original size
and saved as float32 ``.npy``. In tile mode an image's model score is the
maximum over its tiles. Each model kind reads images in its own geometry
(:meth:`~anomri.images.settings.ImageSettings.geometry_of`).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage
from torch import nn
from tqdm.auto import tqdm

from anomri.errors import InputError
from anomri.evaluate.image_metrics import normal_threshold
from anomri.images.geometry import ImageGeometry, ModelInputs, load_model_inputs, split_validation
from anomri.images.normalization import NormalMapStatistics, top_fraction_mean
from anomri.images.outputs import SCORE_COLUMNS, ImageOutputs, save_maps, score_rows
from anomri.images.settings import MODEL_OF_METHOD, PRIMARY_SCORE, ImageSettings
from anomri.images.training import load_image_model
from anomri.io.atomic import write_json
from anomri.io.checksum import file_sha256
from anomri.io.images import ImageRecord, scan_mvtec
from anomri.io.tables import write_table
from anomri.models.anogan import DCGAN, latent_search
from anomri.models.conv_vae import ConvVAE, FlatImageVAE
from anomri.models.draem import DRAEM
from anomri.models.mhp_vae import MultiHypothesisVAE
from anomri.models.patch_memory import PatchMemory
from anomri.models.projection import project, projection_map
from anomri.models.training import resolve_device
from anomri.scores.context import ScoreContext
from anomri.scores.memory_bank import MemoryBankMap
from anomri.scores.pixelwise import PIXELWISE_SCORES, PixelwiseContext
from anomri.scores.reference import ReferenceSet
from anomri.scores.registry import NoveltyScore, get_scores
from anomri.settings import default

logger = logging.getLogger(__name__)

__all__ = ["AUTO_SEARCH_CHUNK", "anogan_search_chunk", "method_outputs", "score_folder", "score_method"]


Outputs = tuple[dict[str, np.ndarray], np.ndarray]


def _batches(n: int, size: int) -> range:
    return range(0, n, size)


def _vae_scores(s: ImageSettings) -> list[NoveltyScore]:
    """The registry scores of method ``vae``: ``vae_scores`` less ``vae_skip_scores``, and less the
    reference-set scores unless ``vae_reference_scores``."""
    return [sc for sc in get_scores(s.vae_scores)
            if sc.id not in s.vae_skip_scores and (s.vae_reference_scores or not sc.needs_reference)]


@torch.no_grad()
def _vae_outputs(model: ConvVAE, raw: torch.Tensor, s: ImageSettings, progress: bool,
                 reference_images: np.ndarray | None = None) -> Outputs:
    flat_model = FlatImageVAE(model).eval()
    scores = _vae_scores(s)
    if s.vae_map_score not in PIXELWISE_SCORES:
        raise ValueError(f"vae_map_score must be one of {PIXELWISE_SCORES}; got {s.vae_map_score!r}")
    map_score = get_scores([s.vae_map_score])[0]
    reference = None
    if any(sc.needs_reference for sc in scores):
        if reference_images is None:
            raise ValueError("reference-set scores need the training images")
        reference = ReferenceSet.build(flat_model, torch.from_numpy(reference_images).flatten(1), s.batch_size,
                                       raw.device)
    values = {sc.id: [] for sc in scores}
    maps = []
    for k, first in enumerate(tqdm(_batches(len(raw), s.batch_size), desc="vae", disable=not progress)):
        batch = raw[first:first + s.batch_size]
        x = flat_model.standardize(batch.flatten(1))
        generator = torch.Generator(device=x.device).manual_seed(s.seed + k)
        ctx = ScoreContext(flat_model, x, s.n_samples, generator, reference)
        for sc in scores:
            # Some registry scores optimise over z and enable gradients themselves.
            values[sc.id].append(sc.func(ctx).float())
        maps.append(map_score.func(PixelwiseContext(ctx)).reshape(batch.shape).sum(1))
    return {k: torch.cat(v).cpu().numpy() for k, v in values.items()}, torch.cat(maps).cpu().numpy()


def _projection_outputs(model: ConvVAE, raw: torch.Tensor, s: ImageSettings, progress: bool,
                        reference_images: np.ndarray | None = None) -> Outputs:
    maps = []
    for first in tqdm(_batches(len(raw), s.batch_size), desc="projection", disable=not progress):
        x0 = model.standardize(raw[first:first + s.batch_size])
        result = project(model, x0, s.projection_steps, s.projection_step_size, s.projection_l1_weight,
                         s.projection_tolerance)
        maps.append(projection_map(model, x0, result.projected, s.projection_map))
    pixel_maps = torch.cat(maps).cpu().numpy()
    return {"map-sum": pixel_maps.reshape(len(pixel_maps), -1).sum(-1)}, pixel_maps


#: ``anogan_search_batch_size: auto``: images searched at once on each kind of device. On a CPU a
#: 128 px image already keeps a core busy and large batches only add memory traffic (16 was fastest,
#: benchmarks/README.md); an accelerator gains from large batches, and 512 bounds their memory.
AUTO_SEARCH_CHUNK = {"cpu": 16, "cuda": 512}


def anogan_search_chunk(setting: str | int, device: torch.device) -> int:
    """Images per AnoGAN latent search: ``setting``, or for ``"auto"`` the :data:`AUTO_SEARCH_CHUNK` of ``device``."""
    if setting != "auto":
        return int(setting)
    return AUTO_SEARCH_CHUNK.get(device.type, AUTO_SEARCH_CHUNK["cuda"])


def _anogan_outputs(model: DCGAN, raw: torch.Tensor, s: ImageSettings, progress: bool,
                    reference_images: np.ndarray | None = None) -> Outputs:
    # Batched searches; the chunk size is the device's (see AUTO_SEARCH_CHUNK).
    generator = torch.Generator(device=raw.device).manual_seed(s.seed)
    parts: dict[str, list[torch.Tensor]] = {"anomaly-score": [], "residual": [], "discrimination": []}
    maps = []
    chunk = anogan_search_chunk(s.anogan_search_batch_size, raw.device)
    for first in _batches(len(raw), chunk):
        x = model.scale(raw[first:first + chunk])
        result = latent_search(model, x, s.anogan_search_steps, s.anogan_search_weight,
                               s.anogan_search_learning_rate, generator=generator, progress=progress)
        parts["anomaly-score"].append(result.score)
        parts["residual"].append(result.residual)
        parts["discrimination"].append(result.discrimination)
        maps.append(result.anomaly_map(x))
    return {k: torch.cat(v).cpu().numpy() for k, v in parts.items()}, torch.cat(maps).cpu().numpy()


@torch.no_grad()
def _mhp_outputs(model: MultiHypothesisVAE, raw: torch.Tensor, s: ImageSettings, progress: bool,
                 reference_images: np.ndarray | None = None) -> Outputs:
    scores, maps = [], []
    for first in tqdm(_batches(len(raw), s.batch_size), desc="mhp-vae", disable=not progress):
        score, pixel_map = model.score(model.standardize(raw[first:first + s.batch_size]))
        scores.append(score)
        maps.append(pixel_map)
    return {"wta": torch.cat(scores).cpu().numpy()}, torch.cat(maps).cpu().numpy()


def flip_averaged(anomaly_map: Callable[[torch.Tensor], torch.Tensor],
                  axes: tuple[int, ...]) -> Callable[[torch.Tensor], torch.Tensor]:
    """``anomaly_map`` averaged over the image flipped along every subset of ``axes``, each map flipped back.

    Images are (N, C, S, S) and maps (N, S, S), so axis -1 (left-right) and -2
    (top-bottom) mean the same on both. A model trained on randomly flipped
    images should see a flipped defect the same; averaging its maps of the
    flipped copies cancels part of what it sees by chance, at one more pass
    per flip.
    """
    flips = [()] + [(axis,) for axis in axes] + ([tuple(axes)] if len(axes) > 1 else [])

    def averaged(images: torch.Tensor) -> torch.Tensor:
        total = anomaly_map(images)
        for dims in flips[1:]:
            total = total + anomaly_map(images.flip(dims)).flip(dims)
        return total / len(flips)

    return averaged


@torch.no_grad()
def _maps_only(anomaly_map: Callable[[torch.Tensor], torch.Tensor], kind: str, raw: torch.Tensor, s: ImageSettings,
               progress: bool) -> Outputs:
    """``anomaly_map`` of every batch and no scores of its own (methods whose image scores are the map scores)."""
    maps = [anomaly_map(raw[first:first + s.batch_size])
            for first in tqdm(_batches(len(raw), s.batch_size), desc=kind, disable=not progress)]
    return {}, torch.cat(maps).cpu().numpy()


def _draem_outputs(model: DRAEM, raw: torch.Tensor, s: ImageSettings, progress: bool,
                   reference_images: np.ndarray | None = None) -> Outputs:
    anomaly_map = model.anomaly_map
    if s.draem_flip_averaging:
        anomaly_map = flip_averaged(anomaly_map, s.flip_axes)
    return _maps_only(anomaly_map, model.kind, raw, s, progress)


def _patch_memory_outputs(model: PatchMemory, raw: torch.Tensor, s: ImageSettings, progress: bool,
                          reference_images: np.ndarray | None = None) -> Outputs:
    # The map is each patch's distance to the memory bank, a score; the bank's index is built once here.
    return _maps_only(MemoryBankMap(model), model.kind, raw, s, progress)


METHOD_OUTPUTS: dict[str, Callable[..., Outputs]] = {
    "vae": _vae_outputs, "vae-projection": _projection_outputs, "anogan": _anogan_outputs, "mhp-vae": _mhp_outputs,
    "draem": _draem_outputs, "patch-memory": _patch_memory_outputs,
}


def method_outputs(method: str, model: nn.Module, raw: np.ndarray, settings: ImageSettings,
                   progress: bool = True, reference_images: np.ndarray | None = None) -> Outputs:
    """Scores {id: (P,)} and pixel maps (P, S, S) of ``method`` for model inputs ``raw`` (P, C, S, S) in [0, 1].

    ``reference_images`` (normal training inputs, same shape) form the healthy
    reference set of the registry scores that need one (method ``vae``).
    """
    if method not in METHOD_OUTPUTS:
        raise ValueError(f"unknown image method {method!r}; known: {', '.join(METHOD_OUTPUTS)}")
    model.eval()
    device = next(model.parameters()).device
    scores, maps = METHOD_OUTPUTS[method](model, torch.from_numpy(raw).to(device), settings, progress,
                                          reference_images)
    return {k: v.astype(np.float64) for k, v in scores.items()}, maps.astype(np.float32)


@dataclasses.dataclass
class _Scored:
    """A method's outputs for a list of images, maps still in model-input coordinates."""

    inputs: ModelInputs
    geometry: ImageGeometry
    scores: dict[str, np.ndarray]
    input_maps: np.ndarray

    def to_original(self, input_maps: np.ndarray) -> list[np.ndarray]:
        """Per-image maps at the original size from per-input maps (P, S, S)."""
        return [self.geometry.to_original(m, p)
                for m, p in zip(self.inputs.per_image(input_maps), self.inputs.placements)]


def _score_records(method: str, model: nn.Module, records: list[ImageRecord], geometry: ImageGeometry,
                   settings: ImageSettings, channels: int, progress: bool, reference_images: np.ndarray | None
                   ) -> _Scored:
    """Per-image model scores {id: (n_images,)} and smoothed per-input maps of ``records``."""
    inputs = load_model_inputs(records, geometry, channels, progress)
    if not records:
        return _Scored(inputs, geometry, {}, np.zeros((0, settings.image_size, settings.image_size), np.float32))
    input_scores, input_maps = method_outputs(method, model, inputs.inputs, settings, progress, reference_images)
    if settings.map_sigma > 0:
        input_maps = np.stack([ndimage.gaussian_filter(m, settings.map_sigma, mode="nearest") for m in input_maps])
    # In tile mode an image is as anomalous as its worst tile.
    scores = {k: np.array([v.max() for v in inputs.per_image(values)]) for k, values in input_scores.items()}
    return _Scored(inputs, geometry, scores, input_maps)


def _finish(part: _Scored, statistics: NormalMapStatistics | None, settings: ImageSettings, fitted: bool
            ) -> list[np.ndarray]:
    """Add the map scores ``map-max`` and ``map-top`` to ``part.scores``; return its maps at original size.

    ``fitted``: ``part`` holds the validation maps ``statistics`` came from
    (each is then normalised leaving itself out).
    """
    def normalized(kind: str) -> list[np.ndarray]:
        maps = part.input_maps
        if kind == "zscore":
            maps = statistics.normalize_left_out(maps) if fitted else statistics.normalize(maps)
        return part.to_original(maps)

    saved = normalized(settings.map_normalization)
    for_score = saved if settings.score_normalization == settings.map_normalization else normalized(
        settings.score_normalization)
    part.scores["map-max"] = np.array([m.max() for m in saved], np.float64)
    part.scores["map-top"] = np.array([top_fraction_mean(m, settings.top_fraction) for m in for_score], np.float64)
    return saved


def score_folder(
    method: str,
    model: nn.Module,
    model_metadata: dict,
    root: str | Path,
    settings: ImageSettings,
    maps_dir: str | Path,
    scores_path: str | Path,
    thresholds_path: str | Path,
    validation_maps_dir: str | Path,
    progress: bool = True,
) -> None:
    """Score the validation and test images of an MVTec folder with ``method``; write maps, scores, thresholds.

    Writes ``maps_dir/<class>/<stem>.npy`` for every test image (float32,
    original size, higher = more anomalous) and the same under
    ``validation_maps_dir`` for the normal validation images (what the pixel
    threshold and method ``fusion`` are calibrated on); ``scores_path``, a TSV with
    columns :data:`SCORE_COLUMNS` for the held-out normal validation images
    (split ``val``) and the test images; and ``thresholds_path``, JSON with
    the pixel threshold from the validation maps and the normalisation
    settings. The normal validation maps also provide the per-pixel
    statistics of the normalisation; each of them is normalised by the
    statistics of the others.
    """
    if MODEL_OF_METHOD[method] != model.kind:
        raise ValueError(f"method {method} needs a {MODEL_OF_METHOD[method]} model, not {model.kind}")
    folder = scan_mvtec(root)
    train, validation = split_validation(folder.train, settings.validation_fraction, settings.seed)
    channels = int(model.in_shape[0])
    geometry = settings.geometry_of(model.kind)
    reference_images = None
    if method == "vae" and any(sc.needs_reference for sc in _vae_scores(settings)):
        reference_images = load_model_inputs(train, geometry, channels, progress).inputs
        if len(reference_images) > settings.vae_reference_size:
            keep = np.random.default_rng(settings.seed).choice(len(reference_images), settings.vae_reference_size,
                                                               replace=False)
            reference_images = reference_images[np.sort(keep)]
    val = _score_records(method, model, validation, geometry, settings, channels, progress, reference_images)
    test = _score_records(method, model, folder.test, geometry, settings, channels, progress, reference_images)
    statistics = None
    if "zscore" in (settings.map_normalization, settings.score_normalization):
        if len(val.input_maps) < 2:
            # Too few normal maps for per-pixel statistics (a tiny folder): score unnormalised, and say so.
            logger.warning("%s: %d normal validation input(s), fewer than the 2 that map normalisation needs: "
                           "maps and map-top are not normalised", method, len(val.input_maps))
            settings = dataclasses.replace(settings, map_normalization="none", score_normalization="none")
        else:
            statistics = NormalMapStatistics.fit(val.input_maps, settings.normalization_floor)
    val_maps = _finish(val, statistics, settings, fitted=True)
    test_maps = _finish(test, statistics, settings, fitted=False)
    keys = {split: [(r.label, r.stem) for r in records] for split, records in (("val", validation),
                                                                                ("test", folder.test))}
    rows = []
    for split, scores in (("val", val.scores), ("test", test.scores)):
        for score_id, values in scores.items():
            rows += score_rows(method, split, keys[split], score_id, values)
    save_maps(maps_dir, keys["test"], test_maps)
    save_maps(validation_maps_dir, keys["val"], val_maps)
    write_table(scores_path, rows, SCORE_COLUMNS)
    pixel_threshold = normal_threshold(np.concatenate([m.ravel() for m in val_maps]), settings.threshold_percentile)
    write_json(thresholds_path, {
        "method": method, "primary_score": PRIMARY_SCORE[method], "pixel_threshold": pixel_threshold,
        "threshold_percentile": settings.threshold_percentile, "n_validation_images": len(validation),
        "map_normalization": settings.map_normalization, "score_normalization": settings.score_normalization,
        "normalization_floor": settings.normalization_floor, "top_fraction": settings.top_fraction,
        "validation_images": [str(r.path) for r in validation], "model": model_metadata,
    })
    logger.info("%s: scored %d validation and %d test images", method, len(validation), len(folder.test))


def score_method(method: str, model_path: str | Path, root: str | Path, settings: ImageSettings,
                 images_dir: str | Path, device: str = default("images.device")) -> None:
    """Score an MVTec folder with ``method`` and the trained model at ``model_path`` (:func:`score_folder`).

    The maps (test and validation), scores and thresholds go to the method's place under
    ``images_dir`` (:class:`~anomri.images.outputs.ImageOutputs`); the
    thresholds name the model file and its SHA-256.
    """
    out = ImageOutputs(images_dir)
    model, metadata = load_image_model(model_path, resolve_device(device))
    trained = metadata.get("settings", {})
    # A model has learnt inputs of one geometry; maps of inputs cut another way would be meaningless.
    # Checkpoints written before a kind had a geometry of its own hold only the shared settings.
    for name, shared in zip(ImageSettings.geometry_fields(model.kind), ImageSettings.geometry_fields(None)):
        value = trained.get(name, trained.get(shared))
        if value is not None and value != getattr(settings, name):
            raise InputError(model_path, f"was trained with {name} {value!r} but is asked to score with "
                             f"{getattr(settings, name)!r}: score with its training settings or retrain")
    score_folder(method, model, {"path": str(model_path), "sha256": file_sha256(model_path)}, root, settings,
                 out.maps(method), out.scores(method), out.thresholds(method), out.validation_maps(method))
