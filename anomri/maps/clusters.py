"""Findings of a scan: the clusters of its lesion masks, one table row each, whether or not it has a label.

Every scan with a lesion probability map gets ``<prefix>_space-dwi_label-L_desc-clusters_table.tsv``
(:attr:`~anomri.io.derivatives.ScanDerivatives.clusters_table`) and its JSON sidecar: per level of its
lesion masks (``label-L_desc-p01_mask``, ...), every connected component of the mask, largest first,
with its size, volume, lesion probability, -log10 p and centroid. The components are those of the
masks' ``min_component_voxels`` filter (:data:`~anomri.maps.postprocess.MASK_CONNECTIVITY`). A scan
with nothing flagged gets a table with its header and no rows.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import nibabel as nib
import numpy as np

from anomri import __version__
from anomri.errors import InputError
from anomri.io.atomic import write_json
from anomri.io.derivatives import ScanDerivatives, level_label
from anomri.io.nifti import load_mask, load_nifti, read_data
from anomri.io.tables import write_table
from anomri.maps.postprocess import MASK_CONNECTIVITY, label_components

logger = logging.getLogger(__name__)

__all__ = ["CLUSTER_COLUMNS", "find_clusters", "cluster_rows", "write_cluster_table"]

#: The columns of the clusters table, described as BIDS describes a TSV's columns (its JSON sidecar).
CLUSTER_COLUMNS: dict[str, dict[str, str]] = {
    "level": {
        "LongName": "Healthy false-positive level",
        "Description": "The level of the lesion mask the cluster belongs to (label-L_desc-p<digits>_mask): its voxels "
                       "have a calibrated tail probability p <= level, a level that flags this fraction of a healthy "
                       "brain's voxels.",
    },
    "cluster_id": {
        "LongName": "Cluster id",
        "Description": "Rank of the cluster by size within its level: 1 is the largest; equal sizes in the order of "
                       "the clusters' first voxel in the image's voxel order. Ids of different levels are unrelated.",
    },
    "n_voxels": {
        "LongName": "Voxel count",
        "Description": "Number of voxels of the cluster, a 26-connected component of the lesion mask.",
    },
    "volume_mm3": {
        "LongName": "Volume",
        "Description": "Volume of the cluster: its voxel count times the voxel volume (|det| of the image affine's "
                       "3 x 3 part).",
        "Units": "mm^3",
    },
    "probability_peak": {
        "LongName": "Peak lesion probability",
        "Description": "Largest lesion probability 1 - p (label-L_probseg) in the cluster. float32 1 - p is 1 for "
                       "every p below about 3e-8: neglog10p_peak ranks such clusters.",
    },
    "probability_mean": {
        "LongName": "Mean lesion probability",
        "Description": "Mean lesion probability 1 - p (label-L_probseg) over the cluster's voxels.",
    },
    "neglog10p_peak": {
        "LongName": "Peak -log10 p",
        "Description": "Largest -log10 p (label-L_desc-neglog10p_novelty) in the cluster: 2 is p = 0.01, 3 is "
                       "p = 0.001.",
    },
    **{f"centroid_{axis}": {
        "LongName": f"Centroid, {axis} (world)",
        "Description": f"{axis} coordinate of the cluster's centroid (the mean of its voxel centres) in the image's "
                       "world space, RAS+ (x to the right, y anterior, z superior): the voxel centroid mapped by the "
                       "image affine (sform, else qform), the scanner coordinates for a scan in its acquisition space.",
        "Units": "mm",
    } for axis in "xyz"},
    **{f"centroid_{axis}": {
        "LongName": f"Centroid, {axis} (voxel)",
        "Description": f"Voxel index of the cluster's centroid along the image's {ordinal} array axis, counted from 0 "
                       "as in NIfTI; a fraction when the centroid falls between voxel centres.",
    } for axis, ordinal in zip("ijk", ("first", "second", "third"))},
}


def find_clusters(flagged: np.ndarray, probability: np.ndarray, evidence: np.ndarray,
                  affine: np.ndarray) -> list[dict[str, float | int]]:
    """The connected components of one mask, largest first, with their statistics.

    Parameters
    ----------
    flagged : ndarray of bool, shape (X, Y, Z)
        The lesion mask.
    probability : ndarray, shape (X, Y, Z)
        The lesion probability 1 - p on the same grid.
    evidence : ndarray, shape (X, Y, Z)
        -log10 p on the same grid.
    affine : ndarray, shape (4, 4)
        Voxel indices to world (RAS+) millimetres.

    Returns
    -------
    list of dict
        One dict per component (:data:`MASK_CONNECTIVITY`), largest first (ties: the component whose
        first voxel comes first in C order), with the columns of :data:`CLUSTER_COLUMNS` from
        ``cluster_id`` on.
    """
    labels, count = label_components(np.asarray(flagged, bool), MASK_CONNECTIVITY)
    if count == 0:
        return []
    # Statistics over the flagged voxels only: a whole-volume float64 array per statistic would dominate the
    # memory of a 1 mm scan.
    voxels = np.nonzero(labels)
    component = labels[voxels] - 1
    sizes = np.bincount(component, minlength=count)
    centroids = np.stack([np.bincount(component, weights=axis, minlength=count) for axis in voxels], 1) / sizes[:, None]
    world = nib.affines.apply_affine(affine, centroids)
    values = np.asarray(probability)[voxels].astype(float)
    mean_probability = np.bincount(component, weights=values, minlength=count) / sizes
    peak_probability = np.full(count, -np.inf)
    np.maximum.at(peak_probability, component, values)
    peak_evidence = np.full(count, -np.inf)
    np.maximum.at(peak_evidence, component, np.asarray(evidence)[voxels].astype(float))
    voxel_volume = abs(float(np.linalg.det(np.asarray(affine, float)[:3, :3])))
    rows = []
    for rank, c in enumerate(np.argsort(-sizes, kind="stable"), start=1):
        rows.append({
            "cluster_id": rank, "n_voxels": int(sizes[c]), "volume_mm3": float(sizes[c] * voxel_volume),
            "probability_peak": float(peak_probability[c]), "probability_mean": float(mean_probability[c]),
            "neglog10p_peak": float(peak_evidence[c]),
            **{f"centroid_{a}": float(v) for a, v in zip("xyz", world[c])},
            **{f"centroid_{a}": float(v) for a, v in zip("ijk", centroids[c])},
        })
    return rows


def cluster_rows(scan: ScanDerivatives, levels: Sequence[float]) -> list[dict[str, float | int]]:
    """The rows of a scan's clusters table: every cluster of each level's lesion mask.

    Parameters
    ----------
    scan : ScanDerivatives
        The scan: its lesion probability, -log10 p and lesion masks (``anomri probability``).
    levels : sequence of float
        The levels of the masks, in the order of the table.

    Returns
    -------
    list of dict
        :func:`find_clusters`'s rows of each level, with the ``level``.

    Raises
    ------
    InputError
        A missing or unreadable map, or maps on different grids.
    """
    img = load_nifti(scan.probseg, ndim=3)
    probability = read_data(img, scan.probseg)
    evidence_img = load_nifti(scan.neglog10p, ndim=3)
    if evidence_img.shape != img.shape or not np.allclose(evidence_img.affine, img.affine, atol=1e-3):
        raise InputError(scan.neglog10p, f"not on the grid of {scan.probseg.name}")
    evidence = read_data(evidence_img, scan.neglog10p)
    rows = []
    for level in levels:
        flagged = load_mask(scan.lesion_mask(level), img, scan.probseg)
        rows += [{"level": float(level), **row} for row in find_clusters(flagged, probability, evidence, img.affine)]
    return rows


def write_cluster_table(scan: ScanDerivatives, levels: Sequence[float]) -> list[dict[str, float | int]]:
    """Write a scan's clusters table and its JSON sidecar (:attr:`ScanDerivatives.clusters_table`).

    Parameters
    ----------
    scan : ScanDerivatives
        The scan.
    levels : sequence of float
        The levels of its lesion masks (``probability.levels``).

    Returns
    -------
    list of dict
        The rows written (:func:`cluster_rows`).
    """
    rows = cluster_rows(scan, levels)
    path = scan.clusters_table
    write_table(path, rows, list(CLUSTER_COLUMNS))
    write_json(Path(path).with_suffix(".json"), {
        **CLUSTER_COLUMNS,
        "Description": "The clusters of the scan's lesion masks: per level, every connected component "
                       f"({MASK_CONNECTIVITY}-connectivity, the components of the masks' min_component_voxels "
                       "filter), largest first. No rows: nothing flagged at any level.",
        "FalsePositiveLevels": [float(a) for a in levels],
        "Connectivity": MASK_CONNECTIVITY,
        "SpatialReference": scan.uri(scan.b0),
        "Sources": [scan.uri(p) for p in [scan.probseg, scan.neglog10p, *map(scan.lesion_mask, levels)]],
        "GeneratedBy": {"Name": "anomri", "Version": __version__},
    })
    summary = []
    for level in levels:
        found = [r for r in rows if r["level"] == float(level)]
        summary.append(f"{len(found)} at {level_label(level)} ({sum(r['volume_mm3'] for r in found):.0f} mm3)")
    logger.info("%s: clusters %s", scan.prefix, ", ".join(summary))
    return rows
