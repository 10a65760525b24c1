"""BIDS-derivatives layout of anomri's outputs (BIDS 1.11, checked with bids-validator 3).

Per scan, in ``<output_dir>/sub-<label>[/ses-<label>]/dwi/`` with
``<prefix>`` = ``sub-<label>[_ses-<label>]`` (and the entities that tell a session's scans apart),
each file with a ``.json`` sidecar:

==========================================================  ==================================
``<prefix>_space-dwi_desc-brain_mask.nii.gz``               brain mask (uint8)
``<prefix>_space-dwi_desc-meanb0_S0map.nii.gz``             mean b0 (float32)
``<prefix>_space-dwi_desc-qspace_features.nii.gz``          q-space features (4-D) [1]
``<prefix>_space-dwi_desc-<score label>_novelty.nii.gz``    novelty map per score [1]
``<prefix>_space-dwi_label-L_probseg.nii.gz``               lesion probability
``<prefix>_space-dwi_label-L_desc-neglog10p_novelty.nii.gz``  -log10 p of the same calibration [1]
``<prefix>_space-dwi_label-L_desc-learned_probseg.nii.gz``  learned lesion probability (opt-in)
``<prefix>_space-dwi_label-L_desc-<level>_mask.nii.gz``     lesions at a healthy false-positive
                                                            rate, e.g. ``p01`` = 1 % (uint8)
``<prefix>_space-dwi_label-L_desc-clusters_table.tsv``      the masks' clusters, one row each [1]
==========================================================  ==================================

[1] BIDS has no suffix for them: ``.bidsignore`` lists them (:data:`BIDSIGNORE`), with the cohort-level
files (``quality.tsv``, the figures, the cohort page ``cohort.html``). A score's
``desc`` label is its id without hyphens (:func:`desc_label`); ``descriptions.tsv`` at the root
maps every label back. Sidecars name their inputs as BIDS URIs: ``bids::<path>`` in this dataset,
``bids:raw:<path>`` in the input dataset (:data:`RAW`, a key of ``DatasetLinks``).
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from anomri import __version__
from anomri.io.atomic import write_json, write_text

#: Name of the input dataset in BIDS URIs (``bids:raw:sub-01/dwi/sub-01_dwi.nii.gz``).
RAW = "raw"
BIDS_VERSION = "1.11.0"
#: What BIDS has no place for, with the reason (docs/development.md, "BIDS validity").
BIDSIGNORE = """\
# anomri outputs that BIDS 1.11 has no file type for (anomri's docs/development.md, "BIDS validity", says why).
# Voxelwise novelty scores and -log10 p: BIDS has no suffix for a statistic map of diffusion data.
*_novelty.*
# The model's input: q-space features, one volume per feature.
*_features.*
# Per-scan tables of the lesion masks' clusters: BIDS has no suffix for a table of findings.
*_table.*
# Cohort tables, the trained model, calibration, figures, logs, run times, the image engine, the reports.
/evaluation*
/quality*
/cohort.html
/models
/calibration
/figures
/logs
/benchmarks
/images
/report.html
"""
#: The dataset's README.md (BIDS recommends one).
README = """\
# anomri lesion detection

Derivatives written by anomri {version} from the diffusion MRI dataset {source}
(`bids:raw:` in the sidecars' BIDS URIs; `DatasetLinks` in `dataset_description.json`).

Per scan, in `sub-<label>/[ses-<label>/]dwi/`: the brain mask and mean b0, one novelty map per score
(`desc-<score label>_novelty`), the lesion probability (`label-L_probseg`), its -log10 p
(`label-L_desc-neglog10p_novelty`) and the lesion masks at healthy false-positive levels
(`label-L_desc-p01_mask`, ...) with a table of their clusters (`label-L_desc-clusters_table.tsv`).
`cohort.html` lists every scan's findings and quality checks, with links to its figure and table.
`descriptions.tsv` explains every `desc` label and maps each score's
label to its id, formula and sign convention. At the top level: the evaluation and quality
tables (`evaluation*.tsv`, `quality.tsv`), the trained model (`models/`), the calibration (`calibration/`), the report's
figures (`figures/`), logs and run times; `.bidsignore` lists what BIDS has no file type for.
"""


def prefix_to_subdir(prefix: str) -> str:
    """``sub-01_ses-2`` → ``sub-01/ses-2``; ``sub-01_ses-2_acq-b1000_run-1`` → ``sub-01/ses-2`` (runs share a folder)."""
    return "/".join(part for part in prefix.split("_") if part.startswith(("sub-", "ses-")))


def sidecar_path(nifti: str | Path) -> Path:
    """The JSON sidecar beside a ``.nii.gz`` file."""
    nifti = Path(nifti)
    return nifti.with_name(nifti.name.removesuffix(".nii.gz") + ".json")


def desc_label(score_id: str) -> str:
    """BIDS ``desc`` label of a score id: the id without its hyphens, ``vae-reg`` → ``vaereg``.

    BIDS labels are alphanumeric. Every file name and ``descriptions.tsv`` take a score's label from
    here; ``descriptions.tsv`` maps each label back to its id.
    """
    label = score_id.replace("-", "")
    if not label.isascii() or not label.isalnum():
        raise ValueError(f"score id {score_id!r} gives no alphanumeric BIDS label")
    return label


@dataclass(frozen=True)
class ScanDerivatives:
    """Output paths of one scan below ``output_dir``."""

    output_dir: Path
    prefix: str

    @property
    def dir(self) -> Path:
        return Path(self.output_dir) / prefix_to_subdir(self.prefix) / "dwi"

    def _file(self, entities: str) -> Path:
        return self.dir / f"{self.prefix}_space-dwi_{entities}"

    @property
    def mask(self) -> Path:
        return self._file("desc-brain_mask.nii.gz")

    @property
    def b0(self) -> Path:
        return self._file("desc-meanb0_S0map.nii.gz")

    @property
    def features(self) -> Path:
        return self._file("desc-qspace_features.nii.gz")

    def novelty(self, score_id: str) -> Path:
        return self._file(f"desc-{desc_label(score_id)}_novelty.nii.gz")

    @property
    def probseg(self) -> Path:
        return self._file("label-L_probseg.nii.gz")

    @property
    def neglog10p(self) -> Path:
        return self._file("label-L_desc-neglog10p_novelty.nii.gz")

    @property
    def learned_probseg(self) -> Path:
        return self._file("label-L_desc-learned_probseg.nii.gz")

    def lesion_mask(self, level: float) -> Path:
        return self._file(f"label-L_desc-{level_label(level)}_mask.nii.gz")

    @property
    def clusters_table(self) -> Path:
        """The lesion masks' clusters (:mod:`anomri.maps.clusters`); its sidecar: ``.with_suffix(".json")``."""
        return self._file("label-L_desc-clusters_table.tsv")

    def uri(self, path: str | Path) -> str:
        """BIDS URI of a file below ``output_dir``: ``bids::sub-01/dwi/...``.

        A noisier copy's tree (``models/augmented/noise-<level>``) is its own root here.
        """
        return "bids::" + Path(path).relative_to(self.output_dir).as_posix()


def level_label(level: float) -> str:
    """BIDS ``desc`` label of a false-positive level: 0.01 → ``p01``, 0.001 → ``p001``."""
    if not 0.0 < level < 1.0:
        raise ValueError(f"a false-positive level lies in (0, 1); got {level}")
    return "p" + f"{level:.10f}".rstrip("0").split(".")[1]


def source_uri(path: str | Path, source_dir: str | Path | None) -> str:
    """BIDS URI of an input file.

    Parameters
    ----------
    path : str or Path
        The file.
    source_dir : str, Path or None
        The input dataset, named :data:`RAW` in ``DatasetLinks``.

    Returns
    -------
    str
        ``bids:raw:<path within source_dir>``, or the file URI of a file outside it.
    """
    path = Path(path).resolve()
    if source_dir is not None and path.is_relative_to(Path(source_dir).resolve()):
        return f"bids:{RAW}:{path.relative_to(Path(source_dir).resolve()).as_posix()}"
    return path.as_uri()


class Score(Protocol):
    """What ``descriptions.tsv`` needs of a novelty score (:class:`anomri.scores.NoveltyScore`)."""

    id: str
    formula: str

    @property
    def description(self) -> str: ...


#: ``descriptions.tsv``'s columns after ``desc_id`` and ``description``, with their meaning.
DESCRIPTION_COLUMNS = {
    "score_id": "The novelty score's id in anomri's registry and config (scoring.scores); n/a for other files.",
    "formula": "The score's formula; n/a for other files.",
    "sign_convention": "How the map's values order voxels; n/a for masks and inputs.",
}
NOVEL = "higher = more novel; 0 outside the brain mask"


def description_rows(scores: Iterable[Score], levels: Sequence[float], learned: bool) -> list[dict[str, str]]:
    """The rows of ``descriptions.tsv``: one per ``desc`` label a run writes.

    Parameters
    ----------
    scores : iterable of Score
        The scores whose novelty maps the run writes.
    levels : sequence of float
        The healthy false-positive levels of its lesion masks.
    learned : bool
        Whether it writes the learned lesion probability.

    Returns
    -------
    list of dict
        ``desc_id`` (``desc-<label>``), ``description``, ``score_id``, ``formula`` and
        ``sign_convention`` (:data:`DESCRIPTION_COLUMNS`; ``n/a`` where they do not apply).

    Raises
    ------
    ValueError
        When two files would share a label.
    """
    def row(label: str, text: str, score_id: str = "n/a", formula: str = "n/a", sign: str = "n/a") -> dict:
        return {"desc_id": f"desc-{label}", "description": " ".join(text.split()), "score_id": score_id,
                "formula": " ".join(formula.split()), "sign_convention": sign}

    rows = [
        row("brain", "Brain mask: the voxels with a usable b0 signal (uint8)."),
        row("meanb0", "Mean of the b = 0 volumes of the preprocessed scan (S0map): the reference image of "
                       "every map."),
        row("qspace", "q-space features, the model's input: per shell, the rotation-invariant spherical-harmonic "
                      "power of S/S0 (one volume per feature; names in the sidecar)."),
    ]
    # A score's summary is the first paragraph of its docstring; the sidecars keep the whole of it.
    rows += [row(desc_label(s.id), s.description.split("\n\n")[0], s.id, s.formula, NOVEL) for s in scores]
    rows.append(row("neglog10p", "-log10 p, p the calibrated healthy tail probability behind the lesion "
                                 "probability (label-L): its ranking without float32 saturation.",
                    sign="higher = less likely healthy; 0 outside the post-processed brain mask"))
    if learned:
        rows.append(row("learned", "Lesion probability (label-L) of a logistic model of every score's evidence, "
                                   "fitted on labelled patients, leave-one-patient-out (opt-in).",
                        sign="higher = more likely lesion"))
    rows += [row(level_label(a), f"Lesion mask (label-L): voxels with p <= {a:g}, flagging a fraction {a:g} of "
                                 "healthy calibration voxels.") for a in levels]
    if levels:
        rows.append(row("clusters", "Table of the lesion masks' clusters (label-L; connected components): per "
                                    "level, each cluster's size, volume, lesion probability, -log10 p and centroid."))
    labels = [r["desc_id"] for r in rows]
    if len(set(labels)) != len(labels):
        raise ValueError(f"two files share a desc label: {sorted(x for x in labels if labels.count(x) > 1)}")
    return rows


def layout_digest() -> str:
    """A short digest of what :func:`write_dataset_description` writes whatever the run's settings.

    ``.bidsignore``, the README template and the fixed rows of ``descriptions.tsv``: the workflow passes it to
    its ``dataset_description`` rule as a parameter, so that a finished run whose dataset-level files an older
    anomri wrote gets them rewritten (a new output listed in ``.bidsignore``, a new ``desc`` label).
    """
    fixed = json.dumps(description_rows([], [0.5], learned=True))
    return hashlib.sha256((BIDSIGNORE + README + fixed).encode()).hexdigest()[:12]


def _code_url() -> dict[str, str]:
    """``CodeURL`` from the package's ``Source`` project URL (pyproject.toml), when it declares one."""
    try:
        urls = importlib.metadata.metadata("anomri").get_all("Project-URL") or []
    except importlib.metadata.PackageNotFoundError:
        return {}
    found = dict(entry.split(",", 1) for entry in urls if "," in entry)
    return {"CodeURL": found["Source"].strip()} if "Source" in found else {}


def write_dataset_description(output_dir: str | Path, source: str | Path, scores: Iterable[Score] = (),
                              levels: Sequence[float] = (), learned: bool = False) -> None:
    """Write the dataset-level files of the derivatives.

    ``dataset_description.json``, ``descriptions.tsv`` (+ ``.json``, its columns), ``.bidsignore``
    and ``README.md``.

    Parameters
    ----------
    output_dir : str or Path
        The derivatives dataset.
    source : str or Path
        The input dataset (``SourceDatasets``; :data:`RAW` in ``DatasetLinks``).
    scores, levels, learned
        Which ``desc`` labels the run writes (:func:`description_rows`).
    """
    output_dir, source_url = Path(output_dir), Path(source).resolve().as_uri()
    write_json(output_dir / "dataset_description.json", {
        "Name": "anomri lesion detection",
        "BIDSVersion": BIDS_VERSION,
        "DatasetType": "derivative",
        "GeneratedBy": [{
            "Name": "anomri",
            "Version": __version__,
            "Description": "Unsupervised lesion detection with VAE novelty scores on q-space features",
            **_code_url(),
        }],
        "SourceDatasets": [{"URL": source_url}],
        "DatasetLinks": {RAW: source_url},
    })
    rows = description_rows(scores, levels, learned)
    # Cells hold no tab or newline (description_rows collapses whitespace), and BIDS TSV has no quoting.
    lines = ["\t".join(rows[0])] + ["\t".join(row.values()) for row in rows]
    write_text(output_dir / "descriptions.tsv", "\n".join(lines) + "\n")
    write_json(output_dir / "descriptions.json", {
        "Description": "The desc labels of this dataset's file names; a score's label is its id without hyphens.",
        **{column: {"Description": text} for column, text in DESCRIPTION_COLUMNS.items()},
    })
    write_text(output_dir / ".bidsignore", BIDSIGNORE)
    write_text(output_dir / "README.md", README.format(version=__version__, source=source_url))

