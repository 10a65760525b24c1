"""Settings of the image engine: the ``images:`` section of ``config.yaml``, as one dataclass.

Imports nothing heavy, so the command-line parser and the Snakefile can read it cheaply.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from anomri.errors import InputError

if TYPE_CHECKING:
    from anomri.images.geometry import ImageGeometry

__all__ = ["ALL_METHODS", "CHOICES", "DESCRIPTOR_ESTIMATORS", "DRAEM_TEXTURES", "FUSION_METHOD", "FUSION_RULES",
           "GEOMETRIES", "GEOMETRY_SETTINGS", "ImageSettings", "LR_SCHEDULES", "MAP_NORMALIZATIONS", "METHODS",
           "MINIMUM_INTEGERS", "MODEL_OF_METHOD", "POSITIVE_NUMBERS", "PRIMARY_SCORE", "PROJECTION_MAPS",
           "SLOW_IMAGE_SCORES", "fused_methods"]

#: Method id (output folder) -> the trained model it needs.
MODEL_OF_METHOD = {"vae": "conv-vae", "vae-projection": "conv-vae", "anogan": "anogan", "mhp-vae": "mhp-vae",
                   "draem": "draem", "patch-memory": "patch-memory"}
METHODS = tuple(MODEL_OF_METHOD)
#: The method that fuses other methods' calibrated maps (:mod:`anomri.images.map_fusion`); it trains nothing.
FUSION_METHOD = "fusion"
#: Every method with maps and scores: those with a model, then the fusion.
ALL_METHODS = (*METHODS, FUSION_METHOD)
#: Registry scores that optimise over z for every image (minutes per 128 px image on a CPU).
SLOW_IMAGE_SCORES = ("closest-generated", "max-generated-lik")
#: Per-pixel normalisations of anomaly maps (:mod:`anomri.images.normalization`).
MAP_NORMALIZATIONS = ("none", "zscore")
#: Pixel maps of method vae-projection (:func:`anomri.models.projection.projection_map`).
PROJECTION_MAPS = ("standardized", "residual", "reconstruction")
#: Learning-rate schedules of the conv VAE and DRAEM: constant, or cosine annealing over their epochs.
LR_SCHEDULES = ("constant", "cosine")
#: DRAEM's training precisions (:func:`anomri.models.training.autocast_dtype`).
PRECISIONS = ("auto", "float32", "bfloat16")
#: The score each method's paper defines; the one the report ranks methods by.
#: Dehaene et al. evaluate projection maps only; its image score is the robust top of its normalised map.
#: DRAEM's is the maximum of its smoothed segmentation map (on the magnetic tiles' development types 0.831
#: image AUROC against 0.796 for map-top: the U-Net's probabilities need no normalisation by normal maps).
#: Patch memory's is PatchCore's: the largest distance of any patch to its nearest normal patch.
#: Patch memory's is map-top, not PatchCore's maximum: leave one development type out, over two seeds, every pair
#: of types preferred it (pooled image AUROC 0.756 against 0.664): the bank's distances are larger at some places
#: of every normal image, which the normalisation by normal maps discounts.
#: The fusion's is the fusion of its components' primary scores (:mod:`anomri.images.map_fusion`).
PRIMARY_SCORE = {"vae": "det-rec-err", "vae-projection": "map-top", "anogan": "anomaly-score", "mhp-vae": "wta",
                 "draem": "map-max", "patch-memory": "map-top", FUSION_METHOD: "fused-primary"}
#: How images become model inputs (:class:`~anomri.images.geometry.ImageGeometry`).
GEOMETRIES = ("resize", "tile")
#: Model kinds with a geometry of their own: (mode setting, tile-scale setting) in place of ``geometry`` and
#: ``tile_scale``, so that DRAEM can segment tiles at native resolution (where a crack one pixel wide stays a
#: pixel wide) while the VAEs, whose projection costs per input, see whole resized images.
GEOMETRY_SETTINGS = {"draem": ("draem_geometry", "draem_tile_scale")}
#: Texture sources of DRAEM's synthetic anomalies (:mod:`anomri.models.synthetic_anomalies`).
DRAEM_TEXTURES = ("both", "self", "procedural")
#: Models of the normal global descriptors (:class:`~anomri.images.descriptors.GlobalDescriptorModel`).
DESCRIPTOR_ESTIMATORS = ("ledoit-wolf", "mcd", "knn")
#: How calibrated image scores are fused (:func:`~anomri.images.fusion.fuse`).
FUSION_RULES = ("max", "mean")


#: Whole-number settings and their smallest allowed value (the command line takes JSON past the config schema).
MINIMUM_INTEGERS = {"patch_memory_width": 1, "patch_memory_epochs": 0, "patch_memory_batch_size": 2,
                    "patch_memory_positions": 1, "patch_memory_coreset_size": 1}
#: Settings that must be positive numbers.
POSITIVE_NUMBERS = ("patch_memory_learning_rate",)


#: Settings that take one of a few values, and those values.
CHOICES = {"geometry": GEOMETRIES, "draem_geometry": GEOMETRIES, "map_normalization": MAP_NORMALIZATIONS,
           "score_normalization": MAP_NORMALIZATIONS, "vae_lr_schedule": LR_SCHEDULES,
           "projection_map": PROJECTION_MAPS, "draem_lr_schedule": LR_SCHEDULES, "draem_texture": DRAEM_TEXTURES,
           "draem_precision": PRECISIONS,
           "descriptor_estimator": DESCRIPTOR_ESTIMATORS, "descriptor_fusion": FUSION_RULES,
           "map_fusion_rule": FUSION_RULES}


def fused_methods(map_methods: Sequence[str], score_methods: Sequence[str]) -> tuple[str, ...]:
    """Every method method ``fusion`` reads: those whose maps it fuses, then those whose scores it fuses, once each."""
    return tuple(dict.fromkeys([*map_methods, *score_methods]))


def _invalid(name: str, expected: str, value: object) -> None:
    raise InputError("--settings", f"{name} must be {expected}; got {value!r}")


@dataclass
class ImageSettings:
    """Every knob of the image engine, with the defaults of ``config.yaml`` (see its comments)."""

    seed: int = 0
    channels: str | int = "auto"
    geometry: str = "resize"
    image_size: int = 128
    tile_overlap: float = 0.5
    tile_scale: float = 1.0
    oct_band: str = "none"
    validation_fraction: float = 0.1
    horizontal_flip: bool = True
    vertical_flip: bool = False  # random top-bottom flips while training (surfaces, textures; not OCT B-scans)
    batch_size: int = 32
    # conv VAE (methods vae and vae-projection)
    vae_latent_size: int = 128
    vae_channels: list[int] = field(default_factory=lambda: [16, 32, 64, 128])
    vae_epochs: int = 40
    vae_learning_rate: float = 5e-4
    vae_kl_weight: float = 1.0
    vae_lr_schedule: str = "constant"  # or cosine: anneal the learning rate to ~0 over vae_epochs
    vae_scores: str | list[str] = "all"
    vae_skip_scores: list[str] = field(default_factory=lambda: list(SLOW_IMAGE_SCORES))
    vae_reference_scores: bool = False
    vae_reference_size: int = 2000
    vae_map_score: str = "det-rec-err"
    n_samples: int = 8
    # iterative energy-based projection
    projection_steps: int = 50
    projection_step_size: float = 0.002
    projection_l1_weight: float = 1.0
    projection_tolerance: float = 1e-4
    projection_map: str = "standardized"
    # AnoGAN
    anogan_latent_size: int = 64
    anogan_channels: list[int] = field(default_factory=lambda: [16, 32, 64, 128])
    anogan_epochs: int = 30
    anogan_learning_rate: float = 2e-4
    anogan_search_steps: int = 300
    anogan_search_weight: float = 0.1
    anogan_search_learning_rate: float = 0.02
    anogan_search_batch_size: str | int = "auto"
    # multiple-hypotheses VAE
    mhp_hypotheses: int = 4
    mhp_latent_size: int = 128
    mhp_channels: list[int] = field(default_factory=lambda: [16, 32, 64, 128])
    mhp_epochs: int = 20
    mhp_learning_rate: float = 5e-4
    mhp_kl_weight: float = 1.0
    mhp_adversarial_weight: float = 10.0
    mhp_wta_epsilon: float = 0.05
    # DRAEM: reconstructive + discriminative network trained on synthetic anomalies
    draem_reconstruction_channels: list[int] = field(default_factory=lambda: [32, 64, 128, 256])
    draem_segmentation_channels: list[int] = field(default_factory=lambda: [16, 32, 64, 128])
    draem_epochs: int = 35
    draem_batch_size: int = 8
    draem_learning_rate: float = 5e-4
    draem_lr_schedule: str = "cosine"
    draem_precision: str = "auto"
    draem_anomaly_probability: float = 0.5
    draem_mask_area: list[float] = field(default_factory=lambda: [0.001, 0.3])
    draem_texture: str = "both"
    draem_ridge_probability: float = 0.5
    draem_faint_probability: float = 0.0
    draem_flip_averaging: bool = True  # maps averaged over the image flipped as in training, flipped back
    draem_faint_area: list[float] = field(default_factory=lambda: [0.1, 0.5])
    draem_geometry: str = "resize"
    draem_tile_scale: float = 1.0
    # patch memory: CutPaste-trained CNN features in a PatchCore memory bank
    patch_memory_width: int = 16
    patch_memory_epochs: int = 16
    patch_memory_batch_size: int = 32
    patch_memory_learning_rate: float = 1e-3
    patch_memory_positions: int = 128
    patch_memory_coreset_size: int = 8192
    # image-level global descriptors (anomri.images.descriptors): their own score, and fused with each primary
    descriptor_score: bool = True
    descriptor_estimator: str = "ledoit-wolf"
    descriptor_size: int = 128
    descriptor_scales: list[float] = field(default_factory=lambda: [2.0, 4.0, 8.0])
    descriptor_fusion: str = "max"
    # method fusion: these methods' maps, each divided by its normal pixel threshold, fused per pixel; and these
    # methods' primary image scores, each a z-score on the normal validation images, fused per image
    map_fusion_methods: list[str] = field(default_factory=lambda: ["patch-memory", "vae-projection"])
    score_fusion_methods: list[str] = field(default_factory=lambda: ["patch-memory", "vae-projection"])
    map_fusion_rule: str = "mean"
    # maps and evaluation
    map_sigma: float = 1.0
    map_normalization: str = "none"
    score_normalization: str = "zscore"
    normalization_floor: float = 0.1
    top_fraction: float = 0.001
    threshold_percentile: float = 99.0
    aupro_fpr_limit: float = 0.3

    def __post_init__(self) -> None:
        # The command line takes settings as JSON, past the config schema: check what scoring branches on.
        for name, choices in CHOICES.items():
            if getattr(self, name) not in choices:
                _invalid(name, f"one of {choices}", getattr(self, name))
        if self.anogan_search_batch_size != "auto" and not (
                isinstance(self.anogan_search_batch_size, int) and self.anogan_search_batch_size >= 1):
            _invalid("anogan_search_batch_size", "'auto' or a positive integer", self.anogan_search_batch_size)
        if not 0.0 < self.top_fraction <= 1.0:
            _invalid("top_fraction", "in (0, 1]", self.top_fraction)
        area = self.draem_mask_area
        if not (len(area) == 2 and 0.0 < area[0] <= area[1] <= 1.0):
            _invalid("draem_mask_area", "[min, max] with 0 < min <= max <= 1", area)
        if not 0.0 <= self.draem_ridge_probability <= 1.0:
            _invalid("draem_ridge_probability", "in [0, 1]", self.draem_ridge_probability)
        if not 0.0 <= self.draem_faint_probability <= 1.0:
            _invalid("draem_faint_probability", "in [0, 1]", self.draem_faint_probability)
        faint = self.draem_faint_area
        if not (len(faint) == 2 and 0.0 < faint[0] <= faint[1] < 1.0):
            _invalid("draem_faint_area", "[min, max] with 0 < min <= max < 1", faint)
        for name, fewest in (("map_fusion_methods", 2), ("score_fusion_methods", 1)):
            fused = getattr(self, name)
            if any(m not in METHODS for m in fused) or len(fused) < fewest or len(set(fused)) != len(fused):
                _invalid(name, f"{'two' if fewest == 2 else 'one'} or more different methods of {METHODS}", fused)
        for name, minimum in MINIMUM_INTEGERS.items():
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                _invalid(name, f"an integer >= {minimum}", value)
        for name in POSITIVE_NUMBERS:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                _invalid(name, "a number > 0", value)

    @classmethod
    def from_json(cls, text: str) -> ImageSettings:
        """Parse a JSON object of fields; unknown keys are an input error."""
        values = json.loads(text)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise InputError("--settings", f"unknown image setting(s) {unknown}")
        return cls(**values)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @property
    def flip_axes(self) -> tuple[int, ...]:
        """The image axes training flips at random: -1 (left-right) with ``horizontal_flip``, -2 (top-bottom) with
        ``vertical_flip``; the same axes flip averaging undoes at scoring."""
        return tuple(axis for enabled, axis in ((self.horizontal_flip, -1), (self.vertical_flip, -2)) if enabled)

    @property
    def fused_methods(self) -> tuple[str, ...]:
        """Every method method ``fusion`` reads (:func:`fused_methods`)."""
        return fused_methods(self.map_fusion_methods, self.score_fusion_methods)

    @staticmethod
    def geometry_fields(kind: str | None) -> tuple[str, ...]:
        """Names of the settings that make the geometry of a model of ``kind`` (None: the shared ones), in
        :class:`~anomri.images.geometry.ImageGeometry`'s argument order."""
        mode, scale = GEOMETRY_SETTINGS.get(kind, ("geometry", "tile_scale"))
        return mode, "image_size", "tile_overlap", scale, "oct_band"

    def geometry_of(self, kind: str) -> ImageGeometry:
        """How images become inputs of a model of ``kind``: its own geometry (:data:`GEOMETRY_SETTINGS`) or the
        shared ``geometry``."""
        from anomri.images.geometry import ImageGeometry

        return ImageGeometry(*(getattr(self, name) for name in self.geometry_fields(kind)))
