"""BIDS-derivatives layout of anomri's outputs.

Per scan, in ``<output_dir>/sub-<label>[/ses-<label>]/dwi/`` with
``<prefix>`` = ``sub-<label>[_ses-<label>]``:

======================================================  ==================================
``<prefix>_space-dwi_desc-brain_mask.nii.gz``           brain mask (uint8)
``<prefix>_space-dwi_dwiref.nii.gz``                    mean b0 (float32)
``<prefix>_space-dwi_desc-qspace_features.nii.gz``      q-space features (4-D) + ``.json``
``<prefix>_space-dwi_desc-<score>_novelty.nii.gz``      novelty map per score + ``.json``
``<prefix>_space-dwi_label-L_probseg.nii.gz``           lesion probability + ``.json``
``<prefix>_space-dwi_label-L_desc-neglog10p_novelty.nii.gz`` -log10 p of the same calibration + ``.json``
``<prefix>_space-dwi_label-L_desc-learned_probseg.nii.gz`` learned lesion probability (opt-in) + ``.json``
``<prefix>_space-dwi_label-L_desc-<level>_mask.nii.gz`` lesions at a healthy false-positive
                                                        rate, e.g. ``p01`` = 1 % (uint8) + ``.json``
======================================================  ==================================
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from anomri import __version__
from anomri.io.atomic import write_json


def prefix_to_subdir(prefix: str) -> str:
    """``sub-01_ses-2`` → ``sub-01/ses-2``."""
    return "/".join(prefix.split("_"))


def sidecar_path(nifti: str | Path) -> Path:
    """The JSON sidecar beside a ``.nii.gz`` file."""
    nifti = Path(nifti)
    return nifti.with_name(nifti.name.removesuffix(".nii.gz") + ".json")


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
        return self._file("dwiref.nii.gz")

    @property
    def features(self) -> Path:
        return self._file("desc-qspace_features.nii.gz")

    def novelty(self, score_id: str) -> Path:
        return self._file(f"desc-{score_id}_novelty.nii.gz")

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


def level_label(level: float) -> str:
    """BIDS ``desc`` label of a false-positive level: 0.01 → ``p01``, 0.001 → ``p001``."""
    if not 0.0 < level < 1.0:
        raise ValueError(f"a false-positive level lies in (0, 1); got {level}")
    return "p" + f"{level:.10f}".rstrip("0").split(".")[1]


def write_dataset_description(output_dir: str | Path, source: str | Path) -> None:
    """``dataset_description.json`` of the derivatives dataset."""
    write_json(
        Path(output_dir) / "dataset_description.json",
        {
            "Name": "anomri novelty maps",
            "BIDSVersion": "1.9.0",
            "DatasetType": "derivative",
            "GeneratedBy": [{
                "Name": "anomri",
                "Version": __version__,
                "Description": "Unsupervised lesion detection with VAE novelty scores on q-space features",
            }],
            "SourceDatasets": [{"URL": Path(source).resolve().as_uri()}],
        },
    )
