"""``anomri bids BIDS_DIR OUTPUT_DIR {participant,group}``: the BIDS-App entry point to the workflow.

It runs ``workflow/Snakefile`` in this process, through Snakemake's own translation of command-line
settings into its Python API (``snakemake.cli.parse_args`` and ``args_to_api``, which drive
``snakemake.api.SnakemakeApi``). ``SnakemakeApi`` alone cannot take a ``--profile``: a profile is a set
of defaults for Snakemake's command-line flags, and executor plugins (SLURM's account, partition, ...)
read their settings from that parsed command line.

Levels
------
participant
    The whole pipeline for the selected participants, as snakebids apps do: preprocessing, training
    on the selected controls, calibration, every map and every scan's findings (clusters table and
    figure), and the evaluation when patients have masks.
group
    The cohort-level outputs (dataset description, quality and evaluation tables, report figures, the
    cohort page ``<OUTPUT_DIR>/cohort.html``; any map they need is built when missing), then the
    self-contained HTML report ``<OUTPUT_DIR>/report.html``.

Exit codes follow the BIDS Apps execution specification; see :class:`ExitCode`. The input dataset
is checked before anything is written, and never written to.
"""

from __future__ import annotations

import argparse
import logging
import sys
from enum import IntEnum
from pathlib import Path

import yaml

from anomri.cli.registry import command, report_error
from anomri.errors import InputError
from anomri.io.atomic import write_text
from anomri.io.bids import SelectionError
from anomri.io.cohort import plan_from_config
from anomri.settings import defaults

logger = logging.getLogger(__name__)

#: The workflow of a source checkout (an editable install): the package sits beside ``workflow/``.
SNAKEFILE = Path(__file__).resolve().parents[2] / "workflow" / "Snakefile"
SCHEMA = SNAKEFILE.parent / "schemas" / "config.schema.yaml"
#: The workflow rule of the group level.
GROUP_RULE = "group_level"
#: The run's configuration, below OUTPUT_DIR: cluster jobs read it again, so it lives on the shared output.
CONFIG_FILE = Path("logs") / "bids_config.yaml"
REPORT_FILE = "report.html"


class ExitCode(IntEnum):
    """Exit status of ``anomri bids`` (BIDS Apps execution specification, "Exit codes")."""

    SUCCESS = 0
    #: The workflow failed (a job's log says why).
    FAILURE = 1
    #: The dataset breaks a rule anomri reads it by (labels, participants.tsv, a participant without a DWI
    #: scan, gradient files, ambiguous inheritance: "an input dataset failed BIDS validation"), or has too
    #: few controls to train and calibrate.
    INVALID_DATASET = 16
    UNKNOWN_LEVEL = 17
    #: ``--participant-label``, ``--exclude-participant-label`` or ``dwi_filters`` select nothing.
    EMPTY_SELECTION = 18
    #: Bad ``--config``, profile or output folder.
    USAGE = 64
    #: BIDS_DIR does not exist.
    NO_INPUT = 66


class AppError(Exception):
    """Why ``anomri bids`` stops before the run: its exit code and one line for the user."""

    def __init__(self, code: ExitCode, message: str) -> None:
        self.code = code
        super().__init__(message)


@command("bids")
def run_bids_app(args: argparse.Namespace) -> int:
    """Check the dataset and selection, then run the workflow's targets of the analysis level."""
    try:
        argv = _snakemake_argv(args)
    except AppError as exc:
        report_error(exc)
        return exc.code
    return _run_snakemake(argv)


def _snakemake_argv(args: argparse.Namespace) -> list[str]:
    """Snakemake's command line for this run, after every check; writes only the run's config file."""
    if args.analysis_level not in ("participant", "group"):
        raise AppError(ExitCode.UNKNOWN_LEVEL, f"analysis level {args.analysis_level!r} is neither participant "
                                               f"nor group")
    bids_dir, output_dir = args.bids_dir.resolve(), args.output_dir.resolve()
    if not bids_dir.is_dir():
        raise AppError(ExitCode.NO_INPUT, f"{bids_dir}: BIDS directory not found")
    inside = output_dir.is_relative_to(bids_dir) and not output_dir.is_relative_to(bids_dir / "derivatives")
    if inside:
        raise AppError(ExitCode.USAGE, f"{output_dir}: inside the input dataset {bids_dir}, which is never written "
                                       f"to; choose a folder outside it or below its derivatives/")
    if not SNAKEFILE.is_file():
        raise AppError(ExitCode.USAGE, f"{SNAKEFILE}: not found; anomri bids runs the workflow of a source "
                                       f"checkout (pip install -e)")
    profile = _profile(args.profile)
    config = _config(args.config, bids_dir, output_dir, args.participant_label, args.exclude_participant_label)
    try:
        plan = plan_from_config(config)
    except SelectionError as exc:
        raise AppError(ExitCode.EMPTY_SELECTION, str(exc)) from exc
    except InputError as exc:
        raise AppError(ExitCode.INVALID_DATASET, str(exc)) from exc
    except ValueError as exc:  # too few controls to split
        raise AppError(ExitCode.INVALID_DATASET, f"{bids_dir}: {exc}") from exc

    config_file = output_dir / CONFIG_FILE
    write_text(config_file, yaml.safe_dump(config, sort_keys=False, allow_unicode=True))
    argv = ["--snakefile", str(SNAKEFILE), "--directory", str(output_dir), "--configfile", str(config_file),
            "--replace-workflow-config"]
    if profile:
        argv += ["--profile", profile]
    if args.cores or not profile:
        argv += ["--cores", args.cores or "all"]
    if args.analysis_level == "group":
        argv += [GROUP_RULE, "--report", str(output_dir / REPORT_FILE), "--report-after-run"]
    logger.info("%s level: %d scans of %d participants, config %s", args.analysis_level, len(plan.scans),
                len({s.participant_id for s in plan.scans}), config_file)
    return argv


def _profile(profile: str | None) -> str | None:
    """The profile as Snakemake finds it (a folder, or a name in its config folders); checked now, before
    anything is written."""
    if profile is None:
        return None
    from snakemake.cli import get_profile_dir

    path = Path(profile)
    if path.is_dir():
        if not (path / "config.yaml").is_file():
            raise AppError(ExitCode.USAGE, f"{path.resolve()}: profile without a config.yaml")
        return str(path.resolve())
    if get_profile_dir(profile) is None:
        raise AppError(ExitCode.USAGE, f"profile {profile!r}: no such folder, nor a profile Snakemake knows")
    return profile


def _config(entries: list[str], bids_dir: Path, output_dir: Path, include: list[str], exclude: list[str]) -> dict:
    """The packaged defaults, ``--config`` entries, the dataset, the output folder and the selection, validated."""
    from snakemake.exceptions import WorkflowError
    from snakemake.utils import validate

    config = defaults()
    for entry in entries:
        key, sep, raw = entry.partition("=")
        if not sep or not key:
            raise AppError(ExitCode.USAGE, f"--config {entry!r}: expected KEY=VALUE")
        if key in ("bids_dir", "output_dir"):
            raise AppError(ExitCode.USAGE, f"--config {key}: give it as the {key.upper()} argument")
        *sections, leaf = key.split(".")
        node = config
        for section in sections:
            node = node.setdefault(section, {})
            if not isinstance(node, dict):
                raise AppError(ExitCode.USAGE, f"--config {key}: {section} is not a section of settings")
        node[leaf] = raw if isinstance(node.get(leaf), str) else _yaml_value(entry, raw)
    config.update(bids_dir=str(bids_dir), output_dir=str(output_dir))
    if include:
        config["participant_label"] = include
    if exclude:
        config["exclude_participant_label"] = exclude
    try:
        validate(config, str(SCHEMA))
    except WorkflowError as exc:
        # Snakemake wraps jsonschema's error, whose text repeats the whole schema and config: name the setting.
        cause = exc.__context__
        problem = f"{cause.json_path}: {cause.message}" if hasattr(cause, "json_path") else str(exc).splitlines()[0]
        raise AppError(ExitCode.USAGE, f"config: {problem}") from exc
    return config


def _yaml_value(entry: str, raw: str):
    """A ``--config`` value read as YAML (numbers, booleans, lists, mappings); a string setting keeps its text."""
    try:
        return yaml.safe_load(raw)
    except yaml.YAMLError as exc:
        raise AppError(ExitCode.USAGE, f"--config {entry!r}: not a YAML value ({' '.join(str(exc).split())})"
                       ) from exc


def _run_snakemake(argv: list[str]) -> int:
    from snakemake.cli import args_to_api, parse_args

    logger.debug("snakemake %s", " ".join(argv))
    # Snakemake prints its own messages; passed on to anomri's root handler too, each would show twice.
    snakemake_logger = logging.getLogger("snakemake.logging")
    propagate, snakemake_logger.propagate = snakemake_logger.propagate, False
    try:
        parser, snakemake_args = parse_args(argv)
        succeeded = args_to_api(snakemake_args, parser)
    except SystemExit as exc:
        # The workflow stops on a bad setting with sys.exit("anomri: error: config: ...") (workflow/rules/common.smk).
        if isinstance(exc.code, str):
            sys.stderr.write(exc.code + "\n")
            return ExitCode.USAGE if "error: config:" in exc.code else ExitCode.INVALID_DATASET
        return ExitCode.FAILURE if exc.code else ExitCode.SUCCESS
    finally:
        snakemake_logger.propagate = propagate
    return ExitCode.SUCCESS if succeeded else ExitCode.FAILURE


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register ``anomri bids``."""
    p = sub.add_parser(
        "bids", help="BIDS App: run the whole workflow on a BIDS dataset (participant or group level)",
        description=__doc__.split("\n\n")[0] + " Exit codes: 0 success, 1 the workflow failed, 16 invalid dataset, "
                    "17 unknown level, 18 the selection selects nothing, 64 bad usage, 66 BIDS_DIR missing.")
    p.add_argument("bids_dir", type=Path, metavar="BIDS_DIR", help="the BIDS dataset (read only)")
    p.add_argument("output_dir", type=Path, metavar="OUTPUT_DIR", help="the derivatives folder anomri writes")
    # Checked by the command, not argparse: an unknown level exits with 17, as BIDS Apps do.
    p.add_argument("analysis_level", metavar="{participant,group}",
                   help="participant: the whole pipeline for the selected participants; group: the cohort-level "
                        "evaluation, figures and OUTPUT_DIR/cohort.html, then OUTPUT_DIR/report.html")
    p.add_argument("--participant-label", "--participant_label", nargs="+", default=[], metavar="LABEL",
                   help="participants to analyse, with or without 'sub-' (default: all); the model trains on the "
                        "selected controls")
    p.add_argument("--exclude-participant-label", "--exclude_participant_label", nargs="+", default=[],
                   metavar="LABEL", help="participants to leave out")
    p.add_argument("--cores", metavar="N", help="CPU cores of the run (default: all, or the profile's)")
    p.add_argument("--profile", metavar="DIR", help="Snakemake profile (e.g. workflow/profiles/slurm)")
    p.add_argument("--config", nargs="+", default=[], metavar="KEY=VALUE",
                   help="settings of config.yaml; VALUE is read as YAML, a dotted KEY sets one setting of a section "
                        "(training.max_epochs=10, dwi_filters='{dir: [AP]}')")
