# Shared definitions: the cohort plan, path helpers and the input functions of the rules.
import json
import math
import re
import os
import sys
from pathlib import Path

from snakemake.settings.types import DeploymentMethod

from anomri.demo.plan import planned_scans
from anomri.dmri.copies import copy_label
from anomri.errors import InputError
from anomri.evaluate.table import PROBABILITY
from anomri.io.bids import PREFIX_PATTERN
from anomri.io.cohort import plan_from_config
from anomri.io.derivatives import ScanDerivatives, desc_label, layout_digest, level_label
from anomri.report.figures import FigurePaths
from anomri.scores import get_scores

# Every rule runs `"$ANOMRI_PYTHON" -m anomri ...`. Every other value reaches a shell command through
# params/input/output/log with `:q` (shell-quoted, element by element for lists): paths may hold spaces, quotes and
# non-ASCII characters.
# Without a software deployment method, ANOMRI_PYTHON is the interpreter running Snakemake: anomri is installed there
# (this file imports it), whether or not its virtual environment is activated. With --software-deployment-method
# conda, it is the python of the rule's environment (envs/anomri.yaml), first on PATH once that is activated.
# An environment variable, not a param: as a param, another interpreter path (another virtual environment) would
# make Snakemake rerun every job. Jobs inherit it, on a cluster too, where every job parses this file again.
_conda = DeploymentMethod.CONDA in workflow.deployment_settings.deployment_method
os.environ.update(
    ANOMRI_PYTHON="python" if _conda else sys.executable,
    # What envs/anomri.yaml installs (editable; pip expands ${ANOMRI_SOURCE}): the anomri checkout of this workflow.
    ANOMRI_SOURCE=str(Path(workflow.basedir).parent),
)

OUT = Path(config["output_dir"])
LOGS = OUT / "logs"
# Every rule's `benchmark:` file (wall time, max RSS, CPU time of each job), the measurements behind mem_mb:
# each rule's mem_mb is about 1.5x the largest max RSS of its jobs on the demo cohort of config.yaml (8 controls,
# 4 patients, 3 mm, 3shell; issue 14 in benchmarks/README.md), rounded up to 500 MB. Where the peak grows with the
# job's input (scans' voxels, the number of maps a cohort-wide job reads), mem_mb follows it: measured_mem_mb.
# Read a first run's files (benchmarks/rule_table.py) and raise a rule with --set-resources if it needs more.
BENCHMARKS = OUT / "benchmarks"


def measured_mem_mb(base_mb: float, mb_per_input_mb: float):
    """A rule's mem_mb for a job: 1.5 x (base_mb + mb_per_input_mb x the job's input size in MB), rounded up to
    100 MB, at least 500. base and slope are a line on or above the max RSS of the rule's jobs against their input
    sizes on the demo cohort (3 mm) and generated 10- and 40-subject cohorts (6 mm): benchmarks/README.md."""

    def mem_mb(wildcards, input) -> int:
        return max(500, math.ceil(1.5 * (base_mb + mb_per_input_mb * input.size_mb) / 100) * 100)

    return mem_mb


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
    sys.exit(
        "anomri: error: config: probability.learned_combination needs at least 2 patients with lesion masks; "
        f"found {len(PLAN.evaluable)}"
    )

SCANS = {scan.prefix: scan for scan in PLAN.scans}

# Cross-fitting (anomri.io.cohort): fold k's model (k = 1..K, the folder models/fold-<k>) trains on the controls
# of every other fold. A control is scored by its own fold's model; everyone else gets its maps from the fold it
# is dealt to and its probability scores from all K.
FOLDS = [str(k + 1) for k in range(len(PLAN.folds))]
CONTROL_FOLD = {scan.prefix: str(PLAN.fold_of(scan) + 1) for scan in PLAN.controls}
SCORING_FOLD = {scan.prefix: str(PLAN.scoring_fold(scan) + 1) for scan in PLAN.scans}


def fold_dir(fold):
    return OUT / "models" / f"fold-{fold}"


def fold_training(fold):
    """The control scans that train fold ``fold``'s model."""
    return PLAN.training(int(fold) - 1)


def fold_maps(fold):
    """The derivatives tree where fold ``fold``'s model writes its own maps of the scans it scores with the others."""
    return fold_dir(fold) / "maps"


def fold_model(fold):
    return fold_dir(fold) / "vae.pt"


def fold_reference(fold):
    return fold_dir(fold) / "reference_set.pt"


def scoring_models(prefix):
    """The folds whose models never trained on scan ``prefix``: its own for a control; for anyone else, the one it
    is dealt to (its maps), then the others."""
    own = SCORING_FOLD[prefix]
    return [own] if prefix in CONTROL_FOLD else [own] + [k for k in FOLDS if k != own]


def scoring_inputs(wc):
    """The fold models that never trained on the scan (and their reference sets, when a score needs one)."""
    folds = scoring_models(wc.prefix)
    inputs = {"models": [fold_model(k) for k in folds]}
    if NEEDS_REFERENCE:
        inputs["references"] = [fold_reference(k) for k in folds]
    return inputs


def probability_maps(wc):
    """The maps a scan's p comes from: its own out-of-fold maps for a control, every fold model's for anyone else."""
    if wc.prefix in CONTROL_FOLD:
        return [derivatives(wc.prefix).novelty(k) for k in PROBABILITY_SCORES]
    return [ScanDerivatives(fold_maps(f), wc.prefix).novelty(k) for f in FOLDS for k in PROBABILITY_SCORES]


def prefix_regex(prefixes):
    """A wildcard constraint matching exactly these scan prefixes (nothing, for none)."""
    return "|".join(re.escape(p) for p in prefixes) or "(?!)"


def preprocess_inputs(wildcards):
    """A scan's input files, for the preprocess rules: its brain and lesion masks where it has them."""
    scan = SCANS[wildcards.prefix]
    inputs = {"dwi": scan.dwi, "bval": scan.bval, "bvec": scan.bvec}
    if scan.brain_mask:
        inputs["mask"] = scan.brain_mask
    if scan.lesion_mask:
        inputs["lesion"] = scan.lesion_mask
    return inputs


# BIDS labels are alphanumeric (anomri.io.bids rejects any other before the run starts). A prefix also
# holds the entities that tell a session's DWI scans apart (sub-01_ses-1_acq-b1000_run-2).
wildcard_constraints:
    subdir=r"sub-[a-zA-Z0-9]+(/ses-[a-zA-Z0-9]+)?",
    prefix=PREFIX_PATTERN,
    score=r"[a-z0-9-]+",
    fold=r"[0-9]+",


def benchmark_file(rule, *parts):
    """``<output_dir>/benchmarks/<rule>/<parts...>.tsv``, ``.../<rule>/<rule>.tsv`` for a rule without wildcards."""
    parts = parts or (rule,)
    return str(BENCHMARKS.joinpath(rule, *parts[:-1], f"{parts[-1]}.tsv"))


def derivatives(prefix):
    return ScanDerivatives(OUT, prefix)


# Copies of every control, each a derivatives tree models/augmented/<copy> (anomri.dmri.copies names them): noisier
# (noise-<100 x factor>) and, with training.diffusivity_augmentation / anisotropy_augmentation, with every
# diffusivity or the directional contrast scaled (diffusivity-<100 x factor>, anisotropy-<100 x factor>). The
# control's preprocess job makes them. Every copy of a fold's training controls joins its training pool; with
# probability.noise_matching, the noisier copies of every control also join the healthy null.
AUGMENTED = OUT / "models" / "augmented"
NOISE_COPIES = [copy_label("noise", f) for f in config["training"]["noise_augmentation"]]
TRAINING_COPIES = NOISE_COPIES + [
    copy_label(kind, f) for kind in ("diffusivity", "anisotropy") for f in config["training"][f"{kind}_augmentation"]
]
CALIBRATION_COPIES = NOISE_COPIES if config["probability"]["noise_matching"] else []


# The scans whose preprocess job (preprocess_control) also makes their copies: every control, when there are
# copies to make.
COPIED = list(CONTROL_FOLD) if TRAINING_COPIES else []


def copy_flags(prefix):
    """``anomri preprocess`` options that make a control's copies in the same job (none for anyone else)."""
    if prefix not in COPIED:
        return []
    return ["--copies", *TRAINING_COPIES, "--copies-dir", AUGMENTED, "--noise-seed", config["training"]["seed"]]


def augmented(copy, prefix):
    return ScanDerivatives(AUGMENTED / copy, prefix)


def copy_pattern(copy, suffix):
    """Pattern of a derivative of copy ``copy`` (its scan's {subdir} and {prefix} left as wildcards)."""
    return str(AUGMENTED / copy / "{subdir}" / "dwi" / f"{{prefix}}_space-dwi_{suffix}")


def novelty_maps(prefix):
    return [derivatives(prefix).novelty(s) for s in SCORES]


def scan_pattern(suffix):
    """Output pattern of a per-scan derivative, e.g. scan_pattern('desc-brain_mask.nii.gz')."""
    return str(OUT / "{subdir}" / "dwi" / f"{{prefix}}_space-dwi_{suffix}")


# What preprocessing writes for every scan, and for each copy of a control, by output name.
PREPROCESS_SUFFIXES = dict(
    mask="desc-brain_mask.nii.gz",
    mask_sidecar="desc-brain_mask.json",
    b0="desc-meanb0_S0map.nii.gz",
    b0_sidecar="desc-meanb0_S0map.json",
    features="desc-qspace_features.nii.gz",
    sidecar="desc-qspace_features.json",
)
PREPROCESS_OUTPUTS = {name: scan_pattern(suffix) for name, suffix in PREPROCESS_SUFFIXES.items()}


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


# The figures of the HTML report (rules/report.smk).
FIGURES = FigurePaths(OUT / "figures")
EVALUATED_MAPS = SCORES + [PROBABILITY]


def report_figures():
    """Every report figure the default target builds: a findings figure for every scan, labelled or not."""
    figures = [FIGURES.training] + [FIGURES.findings(s.prefix) for s in PLAN.scans]
    if PLAN.evaluable:
        figures += [FIGURES.curves(m) for m in EVALUATED_MAPS]
        figures += [FIGURES.overlay(s.prefix) for s in PLAN.evaluable]
    return figures


def findings_inputs(wildcards):
    """The maps a scan's findings figure draws (rule plot_findings), with its lesion mask where it has one."""
    scan = derivatives(wildcards.prefix)
    inputs = {
        "b0": scan.b0,
        "mask": scan.mask,
        "evidence": scan.neglog10p,
        "masks": [scan.lesion_mask(a) for a in config["probability"]["levels"]],
    }
    if SCANS[wildcards.prefix].lesion_mask:
        inputs["lesion"] = SCANS[wildcards.prefix].lesion_mask
    return inputs
