# Shared definitions: the cohort plan and path helpers.
import json
import shlex
import sys
from pathlib import Path

from anomri.errors import InputError
from anomri.io.cohort import plan_from_config
from anomri.io.derivatives import ScanDerivatives, level_label
from anomri.scores import get_scores

# The interpreter running Snakemake has anomri installed; calling it directly
# works whether or not the virtual environment is activated.
ANOMRI = f"{shlex.quote(sys.executable)} -m anomri"

OUT = Path(config["output_dir"])
LOGS = OUT / "logs"

try:
    PLAN = plan_from_config(config)
    SELECTED_SCORES = get_scores(config["scoring"]["scores"])
except InputError as exc:
    sys.exit(f"anomri: error: {exc}")
except (KeyError, ValueError) as exc:
    sys.exit(f"anomri: error: config: {exc}")
SCORES = [s.id for s in SELECTED_SCORES]
NEEDS_REFERENCE = any(s.needs_reference for s in SELECTED_SCORES)
PROBABILITY_SCORES = config["probability"]["scores"]
_missing = [s for s in PROBABILITY_SCORES if s not in SCORES]
if _missing:
    sys.exit(f"anomri: error: config: probability.scores {_missing} are not among the computed scores {SCORES}")
LEARNED = config["probability"]["learned_combination"]["enabled"]
if LEARNED and len(PLAN.evaluable) < 2:
    sys.exit("anomri: error: config: probability.learned_combination needs at least 2 patients with lesion masks; "
             f"found {len(PLAN.evaluable)}")

SCANS = {scan.prefix: scan for scan in PLAN.scans}

wildcard_constraints:
    subdir=r"sub-[^/_]+(/ses-[^/_]+)?",
    prefix=r"sub-[^/_]+(_ses-[^/_]+)?",
    score=r"[a-z0-9-]+",
    level=r"[0-9]+",


def derivatives(prefix):
    return ScanDerivatives(OUT, prefix)


# Noisier copies of the training controls: one derivatives tree per noise level (noise std x level / 100).
AUGMENTED = OUT / "models" / "augmented"
NOISE_LEVELS = [str(round(100 * factor)) for factor in config["training"]["noise_augmentation"]]


def augmented(level, prefix):
    return ScanDerivatives(AUGMENTED / f"noise-{level}", prefix)


def augmented_pattern(suffix):
    """Output pattern of a noisier copy's derivative, e.g. augmented_pattern('dwiref.nii.gz')."""
    return str(AUGMENTED / "noise-{level}" / "{subdir}" / "dwi" / ("{prefix}_space-dwi_" + suffix))


def novelty_maps(prefix):
    return [derivatives(prefix).novelty(s) for s in SCORES]


def scan_pattern(suffix):
    """Output pattern of a per-scan derivative, e.g. scan_pattern('dwiref.nii.gz')."""
    return str(OUT / "{subdir}" / "dwi" / ("{prefix}_space-dwi_" + suffix))


def prefixes(scans):
    return " ".join(scan.prefix for scan in scans)


def optional_flag(flag, inputs, key):
    return f"{flag} {inputs[key]}" if key in inputs.keys() else ""


def settings_json(section, exclude=()):
    return shlex.quote(json.dumps({k: v for k, v in config[section].items() if k not in exclude}))
