"""Figures of the dMRI workflow's report: ROC and PR curves, lesion overlays, every scan's findings, training curves."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.image import AxesImage
from matplotlib.lines import Line2D
from matplotlib.ticker import MaxNLocator
from scipy import ndimage as ndi

from anomri.errors import InputError
from anomri.evaluate.table import CONNECTIVITY, POOLED, PROBABILITY, read_table
from anomri.io.derivatives import ScanDerivatives
from anomri.maps.postprocess import MASK_CONNECTIVITY, label_components
from anomri.io.nifti import load_mask, load_nifti, read_data
from anomri.report.plotting import display_range, pr_axes, roc_axes, save_figure

logger = logging.getLogger(__name__)

__all__ = ["FigurePaths", "plot_curves", "plot_findings", "plot_overlay", "plot_training"]

#: Colour map of the flagged probabilities over the b0: red to yellow, no dark end to vanish in the grey.
OVERLAY_COLORMAP = "autumn"
#: Colour of the ground-truth lesion contour: stands out from the overlay's colours and the grey b0.
LESION_COLOUR = "cyan"
#: Colour of the cross on the cluster a row of the findings figure goes through.
MARK_COLOUR = "lime"
#: (name, axis fixed) of the three orthogonal slices, in RAS voxel axes.
_VIEWS = (("sagittal", 0), ("coronal", 1), ("axial", 2))


@dataclass(frozen=True)
class FigurePaths:
    """Report figures below ``<output_dir>/figures``."""

    root: Path

    def curves(self, map_id: str) -> Path:
        return Path(self.root) / f"score-{map_id}_curves.png"

    def overlay(self, prefix: str) -> Path:
        return Path(self.root) / f"{prefix}_overlay.png"

    def findings(self, prefix: str) -> Path:
        return Path(self.root) / f"{prefix}_findings.png"

    @property
    def training(self) -> Path:
        return Path(self.root) / "training_curves.png"


# --------------------------------------------------------------------------- ROC and PR curves


def plot_curves(curves_path: str | Path, paths: FigurePaths) -> list[Path]:
    """One figure per map kind of ``evaluation_curves.json``: ROC (log FPR) and PR panels.

    Each panel shows every patient as a thin line and all patients' voxels
    pooled as a thick one, with the operating point at the healthy-FPR
    threshold set on the calibration controls.

    Returns
    -------
    list of Path
        The figures written.
    """
    content = json.loads(Path(curves_path).read_text())
    written = []
    for map_id, by_patient in content["maps"].items():
        patients = {k: v for k, v in by_patient.items() if k != POOLED}
        pooled = by_patient[POOLED]
        fig = Figure(figsize=(10, 4.4), layout="constrained")
        roc, pr = fig.subplots(1, 2)
        point = pooled["operating_point"]
        # Left of where the curves rise (and of the operating point) every curve is flat at TPR 0.
        lowest = min(_rise_fpr(by_patient.values()), point["fpr"] or 1.0)
        roc_axes(roc, log_fpr=True, min_fpr=10.0 ** np.floor(np.log10(lowest)))
        pr_axes(pr, pooled.get("prevalence"))
        for entry in patients.values():
            roc.plot(entry["roc"]["fpr"], entry["roc"]["tpr"], color="tab:blue", lw=0.7, alpha=0.45)
            pr.plot(entry["pr"]["recall"], entry["pr"]["precision"], color="tab:blue", lw=0.7, alpha=0.45)
        roc.plot(pooled["roc"]["fpr"], pooled["roc"]["tpr"], color="black", lw=2.0,
                 label=f"pooled: AUROC {_fmt(pooled['auroc'])}")
        pr.plot(pooled["pr"]["recall"], pooled["pr"]["precision"], color="black", lw=2.0,
                label=f"pooled: AUPRC {_fmt(pooled['auprc'])}")
        level = f"{content['fpr']:.3g} calibration-FPR threshold"
        # None (undefined) plots as nothing.
        roc.plot([_nan(point["fpr"])], [_nan(point["tpr"])], "o", color="tab:red", label=level)
        pr.plot([_nan(point["tpr"])], [_nan(point["precision"])], "o", color="tab:red", label=level)
        for ax in (roc, pr):
            ax.plot([], [], color="tab:blue", lw=0.7, label=f"{len(patients)} patients")
            # The corners a good detector leaves empty.
            ax.legend(fontsize=7, loc="lower right" if ax is roc else "lower left")
        roc.set_title("ROC (voxels)", fontsize=9)
        pr.set_title("precision–recall (voxels)", fontsize=9)
        fig.suptitle(map_id, fontsize=10)
        save_figure(fig, paths.curves(map_id))
        written.append(paths.curves(map_id))
    return written


def _rise_fpr(curves: Iterable[dict]) -> float:
    """The smallest positive FPR at which any ROC curve has a positive TPR (1e-4 without one)."""
    rises = [fpr[(fpr > 0) & (tpr > 0)].min() for fpr, tpr in
             ((np.array(c["roc"]["fpr"]), np.array(c["roc"]["tpr"])) for c in curves)
             if np.any((fpr > 0) & (tpr > 0))]
    return min(rises, default=1e-4)


def _nan(value: float | None) -> float:
    return float("nan") if value is None else value


def _fmt(value: float | str | None) -> str:
    """Three decimals, or ``n/a`` (JSON null, a TSV's ``n/a``, NaN)."""
    if value is None or value == "n/a" or not np.isfinite(float(value)):
        return "n/a"
    return f"{float(value):.3f}"


# --------------------------------------------------------------------------- overlays


def _canonical(img: nib.Nifti1Image, data: np.ndarray) -> np.ndarray:
    """``data`` (on ``img``'s grid) reoriented to the closest RAS voxel axes, so slices are true views."""
    orientation = nib.orientations.io_orientation(img.affine)
    return nib.orientations.apply_orientation(data, orientation)


def _canonical_zooms(img: nib.Nifti1Image) -> np.ndarray:
    """Voxel sizes (mm) along the axes of :func:`_canonical`."""
    zooms = np.empty(3)
    zooms[nib.orientations.io_orientation(img.affine)[:, 0].astype(int)] = img.header.get_zooms()[:3]
    return zooms


def _canonical_index(img: nib.Nifti1Image, index: Sequence[int]) -> tuple[int, int, int]:
    """The voxel ``index`` of ``img``'s grid on the grid of :func:`_canonical`."""
    found = [0, 0, 0]
    for axis, (new_axis, flip) in enumerate(nib.orientations.io_orientation(img.affine)):
        found[int(new_axis)] = int(img.shape[axis] - 1 - index[axis] if flip < 0 else index[axis])
    return found[0], found[1], found[2]


def _slice(volume: np.ndarray, axis: int, index: int) -> np.ndarray:
    """The slice ``index`` across ``axis``, transposed for ``imshow(origin="lower")``: anterior/superior up."""
    return np.take(volume, index, axis=axis).T


def _orthogonal_row(axes: Sequence[Axes], centre: Sequence[int], b0: np.ndarray, grey: tuple[float, float],
                    values: np.ndarray, shown: np.ndarray, value_range: tuple[float, float],
                    lesion: np.ndarray | None, zooms: np.ndarray, what: str, mark: bool = False) -> AxesImage:
    """Sagittal, coronal and axial slices through ``centre``: ``values`` where ``shown`` over the grey b0.

    Every volume is on the grid of :func:`_canonical`; extents are in mm, so anisotropic voxels keep
    their aspect. ``lesion``, when given, is drawn as a contour; ``mark`` puts a cross on ``centre``.
    Returns the last overlay (for a colour bar).
    """
    image = None
    for ax, (view, axis) in zip(axes, _VIEWS):
        plane = [a for a in range(3) if a != axis]
        extent = (0, b0.shape[plane[0]] * zooms[plane[0]], 0, b0.shape[plane[1]] * zooms[plane[1]])
        ax.imshow(_slice(b0, axis, centre[axis]), cmap="gray", vmin=grey[0], vmax=grey[1], origin="lower",
                  extent=extent, interpolation="nearest")
        overlay = np.ma.masked_where(~_slice(shown, axis, centre[axis]), _slice(values, axis, centre[axis]))
        image = ax.imshow(overlay, cmap=OVERLAY_COLORMAP, vmin=value_range[0], vmax=value_range[1], origin="lower",
                          extent=extent, interpolation="nearest", alpha=0.85)
        outline = _slice(lesion, axis, centre[axis]) if lesion is not None else None
        if outline is not None and outline.any():
            ax.contour(outline.astype(float), levels=[0.5], colors=LESION_COLOUR, linewidths=1.0,
                       origin="lower", extent=extent)
        if mark:
            ax.plot((centre[plane[0]] + 0.5) * zooms[plane[0]], (centre[plane[1]] + 0.5) * zooms[plane[1]], "+",
                    color=MARK_COLOUR, ms=12, mew=0.8)
        ax.set_title(f"{what}: {view} {'xyz'[axis]}={centre[axis]}", fontsize=8)
        ax.set_axis_off()
    return image


def lesion_centres(lesion: np.ndarray, n: int,
                   connectivity: int = CONNECTIVITY) -> list[tuple[tuple[int, int, int], int]]:
    """Centre voxels and sizes of the ``n`` largest lesions (connected components), largest first.

    The centre is the lesion voxel nearest the lesion's centroid: a
    non-convex lesion's centroid may lie outside it, and slices through it
    would miss the lesion. Equal sizes come in the order of the lesions'
    first voxels (C order), as in the clusters table.
    """
    labels, count = label_components(lesion, connectivity)
    if count == 0:
        return []
    sizes = np.bincount(labels.ravel(), minlength=count + 1)[1:]
    centres = []
    for index in np.argsort(-sizes, kind="stable")[:n]:
        voxels = np.argwhere(labels == index + 1)
        nearest = voxels[np.argmin(((voxels - voxels.mean(0)) ** 2).sum(1))]
        centres.append((tuple(int(v) for v in nearest), int(sizes[index])))
    return centres


def _patient_row(evaluation: list[dict[str, str]], prefix: str) -> dict[str, str]:
    participant, _, session = prefix.partition("_")
    for row in evaluation:
        if row["participant_id"] == participant and row["session"] == (session or "n/a") \
                and row["score"] == PROBABILITY:
            return row
    raise InputError(prefix, f"no '{PROBABILITY}' row for this scan in the evaluation table")


def plot_overlay(derivatives_dir: str | Path, prefix: str, lesion_path: str | Path, evaluation_path: str | Path,
                 out: str | Path, n_lesions: int = 2) -> None:
    """Lesion evidence (-log10 p) and lesion contour over the mean b0, three orthogonal slices per lesion.

    One row per lesion among the ``n_lesions`` largest (through the voxel
    nearest its centroid; through the most probable voxel when the mask is
    empty): sagittal, coronal and axial slices in RAS orientation, millimetre
    aspect. The lesion probability's -log10 p is drawn where it reaches the
    healthy-FPR threshold of the evaluation table (the voxels flagged), transparent
    elsewhere; the lesion mask is the cyan contour.
    """
    scan = ScanDerivatives(Path(derivatives_dir), prefix)
    b0_img = load_nifti(scan.b0, ndim=3)
    prob_img = load_nifti(scan.neglog10p, ndim=3)  # the map kind whose threshold the evaluation table holds
    if prob_img.shape != b0_img.shape:
        raise InputError(scan.neglog10p, f"shape {prob_img.shape} differs from {scan.b0.name} {b0_img.shape}")
    lesion = _canonical(b0_img, load_mask(lesion_path, b0_img, scan.b0))
    b0 = _canonical(b0_img, read_data(b0_img, scan.b0))
    prob = _canonical(b0_img, read_data(prob_img, scan.neglog10p))
    brain = _canonical(b0_img, load_mask(scan.mask, b0_img, scan.b0))
    zooms = _canonical_zooms(b0_img)
    row = _patient_row(read_table(evaluation_path), prefix)
    threshold = float(row["threshold"])
    centres = lesion_centres(lesion, n_lesions) or [
        (tuple(int(v) for v in np.unravel_index(np.argmax(np.where(brain, prob, -np.inf)), prob.shape)), 0)]
    grey = display_range([b0[brain]], 0.5, 99.5) if brain.any() else display_range([b0])
    top = max(float(prob[brain].max()) if brain.any() else threshold, threshold + 1e-6)

    fig = Figure(figsize=(10, 3.4 * len(centres) + 0.6), layout="constrained")
    axes = fig.subplots(len(centres), 3, squeeze=False)
    flagged = brain & (prob >= threshold)
    for r, (centre, size) in enumerate(centres):
        what = f"lesion {r + 1} ({size} voxels)" if size else "most probable voxel"
        image = _orthogonal_row(axes[r], centre, b0, grey, prob, flagged, (threshold, top), lesion, zooms, what)
    fig.colorbar(image, ax=axes, shrink=0.8, label="-log10 p of the lesion probability (≥ threshold)")
    axes[0, 0].legend(handles=[Line2D([], [], color=LESION_COLOUR, lw=1.0, label="lesion mask")], fontsize=7,
                      loc="lower left")
    fig.suptitle(f"{prefix}: {PROBABILITY} ≥ {threshold:.4g}, flagging {_fmt(row['healthy_fpr'])} of healthy brain; "
                 f"AUROC {_fmt(row['auroc'])}, AUPRC {_fmt(row['auprc'])}, Dice {_fmt(row['dice_at_fpr'])}",
                 fontsize=9)
    save_figure(fig, out, dpi=110)


# --------------------------------------------------------------------------- findings of any scan


def plot_findings(derivatives_dir: str | Path, prefix: str, levels: Sequence[float], out: str | Path,
                  lesion_path: str | Path | None = None, n_clusters: int = 3) -> None:
    """What a scan's lesion masks flag, labelled or not: -log10 p over the mean b0 through its largest clusters.

    One row per cluster among the ``n_clusters`` largest of the loosest level's lesion mask (the
    clusters and ids of the scan's clusters table, :mod:`anomri.maps.clusters`), through the cluster
    voxel nearest its centroid; a scan with no cluster gets one row through the brain's centre of mass.
    Each row shows sagittal, coronal and axial slices in RAS orientation with millimetre aspect:
    -log10 p where the mask flags (transparent elsewhere) over the grey mean b0, and the contour of
    the ground-truth lesion mask when ``lesion_path`` is given.

    Parameters
    ----------
    derivatives_dir : str or Path
        The derivatives root: the scan's mean b0, brain mask, -log10 p and lesion masks.
    prefix : str
        The scan (``sub-<label>[_ses-<label>...]``).
    levels : sequence of float
        The levels of its lesion masks; the loosest (largest) is drawn, every level counted in the title.
    out : str or Path
        The figure (``.png``).
    lesion_path : str, Path or None
        A ground-truth lesion mask on the scan's grid.
    n_clusters : int
        Rows: the largest clusters drawn.

    Raises
    ------
    InputError
        A missing or unreadable image, or images on different grids.
    """
    if not levels:
        raise InputError("--levels", "at least one lesion-mask level is needed")
    scan = ScanDerivatives(Path(derivatives_dir), prefix)
    b0_img = load_nifti(scan.b0, ndim=3)
    evidence_img = load_nifti(scan.neglog10p, ndim=3)
    if evidence_img.shape != b0_img.shape:
        raise InputError(scan.neglog10p, f"shape {evidence_img.shape} differs from {scan.b0.name} {b0_img.shape}")
    masks = {a: load_mask(scan.lesion_mask(a), b0_img, scan.b0) for a in levels}
    level = max(levels)
    # Clusters on the scan's own grid, so that their ids are those of the clusters table.
    largest = lesion_centres(masks[level], n_clusters, MASK_CONNECTIVITY)
    clusters = [(_canonical_index(b0_img, centre), size) for centre, size in largest]
    b0 = _canonical(b0_img, read_data(b0_img, scan.b0))
    evidence = _canonical(b0_img, read_data(evidence_img, scan.neglog10p))
    brain = _canonical(b0_img, load_mask(scan.mask, b0_img, scan.b0))
    flagged = _canonical(b0_img, masks[level])
    lesion = _canonical(b0_img, load_mask(lesion_path, b0_img, scan.b0)) if lesion_path is not None else None
    zooms = _canonical_zooms(b0_img)
    voxel_mm3 = abs(float(np.linalg.det(b0_img.affine[:3, :3])))  # the clusters table's voxel volume
    threshold = -np.log10(level)
    top = max(float(evidence[flagged].max()) if flagged.any() else threshold, threshold + 1e-6)
    grey = display_range([b0[brain]], 0.5, 99.5) if brain.any() else display_range([b0])
    if not clusters:
        centre = ndi.center_of_mass(brain) if brain.any() else (np.array(b0.shape) - 1) / 2
        clusters = [(tuple(int(round(c)) for c in centre), 0)]

    fig = Figure(figsize=(10, 3.4 * len(clusters) + 0.7), layout="constrained")
    axes = fig.subplots(len(clusters), 3, squeeze=False)
    for r, (centre, size) in enumerate(clusters):
        what = f"cluster {r + 1} ({size} voxels, {size * voxel_mm3:.0f} mm³)" if size else \
            f"no cluster at p ≤ {level:g}: brain centre"
        image = _orthogonal_row(axes[r], centre, b0, grey, evidence, flagged, (threshold, top), lesion, zooms, what,
                                mark=bool(size))
    fig.colorbar(image, ax=axes, shrink=0.8, label=f"-log10 p where flagged (p ≤ {level:g})")
    if lesion is not None:
        axes[0, 0].legend(handles=[Line2D([], [], color=LESION_COLOUR, lw=1.0, label="lesion mask")], fontsize=7,
                          loc="lower left")
    counts = []
    for a in sorted(levels, reverse=True):
        n = label_components(masks[a], MASK_CONNECTIVITY)[1]
        counts.append(f"p ≤ {a:g}: {n} cluster{'' if n == 1 else 's'}, {masks[a].sum() * voxel_mm3:.0f} mm³")
    truth = "cyan: ground-truth lesion mask" if lesion is not None else "no lesion mask"
    fig.suptitle(f"{prefix}: {'; '.join(counts)} ({truth})", fontsize=9)
    save_figure(fig, out, dpi=110)


# --------------------------------------------------------------------------- training curves


def plot_training(history_paths: str | Path | Sequence[str | Path], out: str | Path) -> None:
    """Training curves of one or more ``training_history.tsv`` (the cross-fitting folds' models), overlaid.

    Left panel: every ``*_loss`` column (training and validation objective);
    right panel: every other column (e.g. the reconstruction and KL terms).
    With several histories each line is labelled by its folder (``fold-1``...).
    ``n/a`` entries are gaps.
    """
    paths = [history_paths] if isinstance(history_paths, (str, Path)) else list(history_paths)
    fig = Figure(figsize=(10, 4), layout="constrained")
    panels = None
    epochs = []
    for path in paths:
        rows = read_table(path)
        if not rows or "epoch" not in rows[0]:
            raise InputError(path, "expected a TSV with an 'epoch' column and at least one row")
        epoch = np.array([float(r["epoch"]) for r in rows])
        epochs.append(len(rows))
        columns = [c for c in rows[0] if c != "epoch"]
        values = {c: np.array([np.nan if r[c] in ("", "n/a") else float(r[c]) for r in rows]) for c in columns}
        losses = [c for c in columns if c.endswith("_loss")]
        others = [c for c in columns if c not in losses]
        if panels is None:
            panels = fig.subplots(1, 2 if others else 1, squeeze=False)[0]
        tag = f"{Path(path).parent.name}: " if len(paths) > 1 else ""
        for ax, group, title in zip(panels, (losses, others), ("objective (negative ELBO)", "terms")):
            for column in group:
                ax.plot(epoch, values[column], marker="o", ms=3, label=tag + column)
            ax.set(xlabel="epoch", title=title)
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    for ax in panels:
        ax.legend(fontsize=7)
    models = f"{len(paths)} fold models, " if len(paths) > 1 else ""
    fig.suptitle(f"VAE training ({models}{'/'.join(map(str, epochs))} epochs)", fontsize=10)
    save_figure(fig, out)
