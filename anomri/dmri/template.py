"""Where each voxel is in the brain: the MNI152 template registered to the scan with dipy.

A voxel's q-space features alone cannot tell rare-but-normal tissue from a
lesion: healthy white matter next to a ventricle shares its free water with
CSF by partial volume, and so does a periventricular lesion. What tells them
apart is *where* the voxel is. The tissue priors of the MNI ICBM152 2009a
template (white matter, grey matter, CSF; shipped offline with nilearn) are
registered to each scan's mean b0 (a T2-weighted image) with dipy: an affine
stage with mutual information, then symmetric diffeomorphic normalisation
(SyN) with cross-correlation. The registration's moving image is a T2-like
contrast made from the priors (CSF bright, grey above white matter), so SyN
can use a correlation metric. The priors warped to the scan say which
tissue each voxel *should* be, which the model and the per-tissue healthy
nulls then condition on.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

logger = logging.getLogger(__name__)

#: Tissue priors, in the order of the prior channels.
TISSUES = ("wm", "gm", "csf")
#: Relative b0 (T2-weighted, long TE) brightness of the pure tissues in the registration template.
T2_CONTRAST = {"wm": 0.4, "gm": 0.55, "csf": 1.0}
#: Template resolution (mm) that nilearn ships besides 1 mm; registration to 2-3 mm scans needs no more.
TEMPLATE_RESOLUTION = 2
#: Registration settings: affine pyramid (iterations, smoothing, shrink factors) and SyN iterations per level.
AFFINE_LEVEL_ITERS = (100, 50)
AFFINE_SIGMAS = (2.0, 1.0)
AFFINE_FACTORS = (4, 2)
AFFINE_SAMPLING = 0.25
SYN_LEVEL_ITERS = (20, 10, 5)


@dataclass(frozen=True)
class Template:
    """The MNI152 tissue priors and their T2-like registration contrast.

    Attributes
    ----------
    priors : ndarray, (X, Y, Z, 3) float32
        WM, GM and CSF probability (CSF: the brain mask minus WM and GM).
    contrast : ndarray, (X, Y, Z) float32
    affine : ndarray, (4, 4)
    """

    priors: np.ndarray
    contrast: np.ndarray
    affine: np.ndarray


@lru_cache(maxsize=1)
def load_template() -> Template:
    """The 2 mm MNI ICBM152 2009a priors shipped with nilearn (no download)."""
    from nilearn import datasets  # slow import, only needed here

    mask = np.asarray(datasets.load_mni152_brain_mask(resolution=TEMPLATE_RESOLUTION).dataobj, np.float32) > 0
    wm_img = datasets.load_mni152_wm_template(resolution=TEMPLATE_RESOLUTION)
    wm = np.clip(np.asarray(wm_img.dataobj, np.float32), 0, 1) * mask
    gm = np.clip(np.asarray(datasets.load_mni152_gm_template(resolution=TEMPLATE_RESOLUTION).dataobj, np.float32),
                 0, 1) * mask
    csf = np.clip(mask - wm - gm, 0, 1)
    priors = np.stack([wm, gm, csf], -1).astype(np.float32)
    contrast = sum(T2_CONTRAST[t] * priors[..., k] for k, t in enumerate(TISSUES)).astype(np.float32)
    return Template(priors, contrast, wm_img.affine)


@dataclass(frozen=True)
class TemplateFit:
    """The template registered to one scan.

    Attributes
    ----------
    priors : ndarray, (X, Y, Z, 3) float32
        WM, GM and CSF priors on the scan's grid.
    affine : ndarray, (4, 4)
        The affine stage: template world to scan world.
    correlation : float
        Correlation of the warped contrast with the scan's b0 inside the brain mask: a registration check.
    """

    priors: np.ndarray
    affine: np.ndarray
    correlation: float

    def record(self) -> dict[str, object]:
        """Settings and quality, for the sidecar."""
        return {"Template": "MNI ICBM152 2009a tissue priors (nilearn), 2 mm",
                "Registration": "dipy: affine (mutual information) then SyN (cross-correlation) of a T2-like "
                                "template contrast to the mean b0",
                "CorrelationWithB0": round(self.correlation, 4)}


def register_template(b0: np.ndarray, affine: np.ndarray, mask: np.ndarray) -> TemplateFit:
    """Register the MNI152 template to a scan's mean b0 and warp its tissue priors onto the scan's grid.

    Parameters
    ----------
    b0 : ndarray, (X, Y, Z)
        Mean b0 of the scan.
    affine : ndarray, (4, 4)
        Its voxel-to-world affine.
    mask : ndarray of bool, (X, Y, Z)
        Brain mask (the registration check is computed inside it).
    """
    from dipy.align import affine_registration
    from dipy.align.imwarp import SymmetricDiffeomorphicRegistration
    from dipy.align.metrics import CCMetric

    template = load_template()
    static = np.where(mask, b0, 0.0).astype(np.float32)  # skull and background would only mislead the metrics
    _, prealign = affine_registration(
        template.contrast, static, moving_affine=template.affine, static_affine=affine,
        pipeline=["center_of_mass", "rigid", "affine"], level_iters=list(AFFINE_LEVEL_ITERS),
        sigmas=list(AFFINE_SIGMAS), factors=list(AFFINE_FACTORS), sampling_proportion=AFFINE_SAMPLING)
    syn = SymmetricDiffeomorphicRegistration(CCMetric(3), level_iters=list(SYN_LEVEL_ITERS))
    mapping = syn.optimize(static, template.contrast, static_grid2world=affine, moving_grid2world=template.affine,
                           prealign=prealign)
    priors = np.stack([mapping.transform(template.priors[..., k]) for k in range(len(TISSUES))], -1)
    warped = mapping.transform(template.contrast)
    correlation = float(np.corrcoef(warped[mask], static[mask])[0, 1]) if mask.sum() > 2 else float("nan")
    logger.info("template registered: correlation with the b0 %.3f", correlation)
    return TemplateFit(np.clip(priors, 0.0, 1.0).astype(np.float32), prealign, correlation)
