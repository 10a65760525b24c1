"""``anomri demo-cohort``: the synthetic diffusion cohort, every simulation setting an option."""

from __future__ import annotations

import argparse

from anomri.cli.registry import command
from anomri.errors import InputError
from anomri.settings import default


@command("demo-cohort")
def run_demo_cohort(args: argparse.Namespace) -> None:
    from anomri.demo.cohort import CohortSettings, make_demo_cohort

    overrides = {k: v for k, v in vars(args).items() if k in COHORT_OPTIONS and v is not None}
    if "lesion_masks" in overrides:
        overrides["lesion_masks"] = tuple(overrides["lesion_masks"])
    for key in ("snr", "severity"):
        if key in overrides:
            overrides[key] = tuple(overrides[key])
    try:
        settings = CohortSettings.legacy() if args.preset == "legacy" else CohortSettings()
        make_demo_cohort(args.out, n_controls=args.n_controls, n_patients=args.n_patients, seed=args.seed,
                         settings=settings, workers=_workers(args.threads), **overrides)
    except ValueError as exc:
        raise InputError(args.out, str(exc)) from exc


def _workers(threads: int | None) -> int:
    """Subjects simulated at once: the global ``--threads`` (default 2), each worker's BLAS kept to one thread."""
    if threads is None:
        return 2
    from threadpoolctl import threadpool_limits

    threadpool_limits(limits=1)  # the workers are the parallelism: N workers x 1 BLAS thread = N threads
    return threads


#: ``demo-cohort`` options that set a field of :class:`anomri.demo.cohort.CohortSettings`.
COHORT_OPTIONS = (
    "voxel_size", "scheme", "bvals", "bvecs", "n_b0", "max_dirs_per_shell", "snr", "pose_rotation_deg",
    "pose_translation_mm", "head_scaling", "warp_mm", "ventricle_mm", "cortex_thinning", "diffusivity_jitter",
    "axon_fraction_jitter", "bias_field", "volume_motion_deg", "volume_motion_mm", "gibbs", "lesions",
    "lesion_masks", "severity", "t2_shine_through", "signal_model", "lesion_model",
)


def add_parser(sub: argparse._SubParsersAction) -> None:
    """``demo-cohort``: every simulation setting, unset ones taken from the preset."""
    p = sub.add_parser("demo-cohort", help="write a synthetic BIDS cohort (realistic MS patients by default)",
                       description="Options left out take the preset's value (anomri.demo.cohort.CohortSettings).")
    p.add_argument("out", help="new BIDS directory")
    p.add_argument("--preset", choices=["realistic", "legacy"], default="realistic",
                   help="realistic: per-subject anatomy, real MS lesion masks, motion and bias; legacy: the "
                        "earlier cohort (one anatomy, blob lesions), reproduced byte for byte")
    p.add_argument("--n-controls", type=int, default=default("demo.n_controls"))
    p.add_argument("--n-patients", type=int, default=default("demo.n_patients"))
    p.add_argument("--seed", type=int, default=default("demo.seed"))
    g = p.add_argument_group("acquisition")
    g.add_argument("--voxel-size", type=float, help="isotropic voxel size, mm")
    g.add_argument("--scheme", help="dipy gradient table (3shell, isbi2013-2shell) or shells 'b:n,b:n'")
    g.add_argument("--bvals", help="FSL .bval of your own scheme (with --bvecs; replaces --scheme)")
    g.add_argument("--bvecs", help="FSL .bvec of your own scheme, world (RAS) axes")
    g.add_argument("--n-b0", type=int, help="interleaved b0 volumes")
    g.add_argument("--max-dirs-per-shell", type=int, help="subsample each shell of a dipy table")
    g.add_argument("--snr", type=float, nargs=2, metavar=("LOW", "HIGH"), help="SNR range (mean WM b0 / sigma)")
    g.add_argument("--bias-field", type=float, help="receive bias strength (0.2: +-20-40 %%)")
    g.add_argument("--volume-motion-deg", type=float, help="head rotation between volumes, per axis, degrees")
    g.add_argument("--volume-motion-mm", type=float, help="head translation between volumes, mm")
    g.add_argument("--gibbs", action=argparse.BooleanOptionalAction, default=None, help="Gibbs ringing")
    g = p.add_argument_group("anatomy")
    g.add_argument("--pose-rotation-deg", type=float, help="head pose rotation per axis, degrees")
    g.add_argument("--pose-translation-mm", type=float, help="head pose translation, mm")
    g.add_argument("--head-scaling", type=float, help="head size per axis in [1 - h, 1 + h]")
    g.add_argument("--warp-mm", type=float, help="amplitude of the smooth nonlinear warp, mm")
    g.add_argument("--ventricle-mm", type=float, help="patients' largest ventricle enlargement, mm")
    g.add_argument("--cortex-thinning", type=float, help="patients' largest share of outer cortex lost")
    g.add_argument("--diffusivity-jitter", type=float, help="subject diffusivity scaling in [1 - j, 1 + j]")
    g.add_argument("--axon-fraction-jitter", type=float, help="subject axon-fraction scaling in [1 - j, 1 + j]")
    g.add_argument("--signal-model", choices=["stick-zeppelin", "tensor"],
                   help="tissue signal family: WM stick + zeppelin + free water (default), or Gaussian diffusion "
                        "tensors (axial 1.7, radial 0.4 um^2/ms) + free water, axial and radial diffusivities "
                        "jittered independently")
    g = p.add_argument_group("lesions")
    g.add_argument("--lesions", choices=["ms", "blobs"], help="real MS lesion masks or deep-WM ellipsoids")
    g.add_argument("--lesion-masks", nargs="+", metavar="NIFTI",
                   help="MNI-space lesion masks that patients take in turn (default: the five shipped with anomri)")
    g.add_argument("--severity", type=float, nargs=2, metavar=("LOW", "HIGH"),
                   help="range of per-lesion severity, 0 barely visible to 1 a black hole")
    g.add_argument("--t2-shine-through", action=argparse.BooleanOptionalAction, default=None,
                   help="lesions hyperintense on b0")
    g.add_argument("--lesion-model", choices=["axon-loss", "demyelination"],
                   help="what a lesion of severity s does: axonal loss + free water (default), or demyelination: "
                        "radial diffusivity x (1 + 2 s), axial x (1 - 0.15 s), free water + 0.25 s, T2 x (1 + 0.5 s)")

