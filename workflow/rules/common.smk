# Shared definitions: the cohort plan and path helpers.
import json
import shlex
import sys
from pathlib import Path

from anomri.demo.plan import planned_scans
from anomri.errors import InputError
from anomri.io.cohort import plan_from_config
from anomri.io.derivatives import ScanDerivatives, level_label
from anomri.scores import get_scores

# The interpreter running Snakemake has anomri installed; calling it directly
# works whether or not the virtual environment is activated.
# Every other value reaches a shell command through params/input/output/log with `:q` (shell-quoted,
# element by element for lists): paths may hold spaces, quotes and non-ASCII characters.
# The command itself stays a global, already quoted, and not a param: as a param, a new interpreter path
# (another virtual environment) would make Snakemake rerun every job.
ANOMRI = f"{shlex.quote(sys.executable)} -m anomri"

OUT = Path(config["output_dir"])
LOGS = OUT / "logs"
# Every rule's `benchmark:` file (wall time, max RSS, CPU time of each job), the measurements behind mem_mb:
# each rule's mem_mb is about 1.5x the largest max RSS of its jobs on the demo cohort of config.yaml (8 controls,
# 4 patients, 3 mm, 3shell; issue 14 in benchmarks/README.md), rounded up to 500 MB. Larger scans and cohorts
# need more: read a first run's files (benchmarks/rule_table.py) and raise it with --set-resources.
BENCHMARKS = OUT / "benchmarks"

try:
    PLAN = plan_from_config(config, planned_scans(config))
    SELECTED_SCORES = get_scores(config["scoring"]["scores"])
except InputError as exc:
    sys.exit(f"anomri: error: {exc}")
except (KeyError, ValueError) as exc:
    sys.exit(f"anomri: error: config: {exc}")
SCORES = [s.id for s in SELECTED_SCORES]
# The scoring settings as the rules' params, less `threads`: changing a job's threads reruns nothing.
SCORING = {k: v for k, v in config["scoring"].items() if k != "threads"}
NEEDS_REFERENCE = any(s.needs_reference for s in SELECTED_SCORES)
PROBABILITY_SCORES = config["probability"]["scores"]
PROBABILITY_NEEDS_REFERENCE = any(s.needs_reference for s in SELECTED_SCORES if s.id in PROBABILITY_SCORES)
_missing = [s for s in PROBABILITY_SCORES if s not in SCORES]
if _missing:
    sys.exit(f"anomri: error: config: probability.scores {_missing} are not among the computed scores {SCORES}")
LEARNED = config["probability"]["learned_combination"]["enabled"]
if LEARNED and len(PLAN.evaluable) < 2:
    sys.exit("anomri: error: config: probability.learned_combination needs at least 2 patients with lesion masks; "
             f"found {len(PLAN.evaluable)}")

SCANS = {scan.prefix: scan for scan in PLAN.scans}

# BIDS labels are alphanumeric (anomri.io.bids rejects any other before the run starts).
wildcard_constraints:
    subdir=r"sub-[a-zA-Z0-9]+(/ses-[a-zA-Z0-9]+)?",
    prefix=r"sub-[a-zA-Z0-9]+(_ses-[a-zA-Z0-9]+)?",
    score=r"[a-z0-9-]+",
    level=r"[0-9]+",


def benchmark_file(rule, *parts):
    """``<output_dir>/benchmarks/<rule>/<parts...>.tsv``, ``.../<rule>/<rule>.tsv`` for a rule without wildcards."""
    parts = parts or (rule,)
    return str(BENCHMARKS.joinpath(rule, *parts[:-1], parts[-1] + ".tsv"))


def derivatives(prefix):
    return ScanDerivatives(OUT, prefix)


# Noisier copies of the training controls (and, with probability.noise_matching, of the calibration
# controls): one derivatives tree per noise level (noise std x level / 100).
AUGMENTED = OUT / "models" / "augmented"
NOISE_LEVELS = [str(round(100 * factor)) for factor in config["training"]["noise_augmentation"]]
CALIBRATION_LEVELS = NOISE_LEVELS if config["probability"]["noise_matching"] else []


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


# The helpers below return lists of arguments: a rule's shell command quotes each with `{params.x:q}`.
def prefixes(scans):
    return [scan.prefix for scan in scans]


def scan_args(scans):
    """``--scan PREFIX LESION_MASK`` for every scan."""
    return [arg for scan in scans for arg in ("--scan", scan.prefix, str(scan.lesion_mask))]


def optional_flag(flag, inputs, key):
    return [flag, str(inputs[key])] if key in inputs.keys() else []


def option_args(options):
    """``--key value`` for every item of a dict (underscores in keys become dashes)."""
    return [arg for k, v in options.items() for arg in (f"--{k.replace('_', '-')}", str(v))]


def settings_json(section, exclude=()):
    return json.dumps({k: v for k, v in config[section].items() if k not in exclude})
