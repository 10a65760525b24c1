"""Benchmark of the novelty scores: speed, memory and exactness against the reference approaches.

A script, not a test. It builds a synthetic multi-shell diffusion problem
(stick + zeppelin + free water, Gaussian noise, a few "lesion" voxels with more
free water and less anisotropy), trains a GaussianVAE on it briefly, builds the
healthy reference set and times every registered score through
``NoveltyModel.score_samples``, one score at a time, printing one table row
per score: samples/s, peak memory above the baseline, and the ratio against
the reference approach where there is one:

* Euclidean nearest-neighbour scores: chunked brute-force ``torch.cdist`` + min
  (the original implementation), float32;
* Bhattacharyya scores: the chunked brute-force closed form over all pairs;
* densities: chunked brute-force log-sum-exp over all kernels, float64;
* ``closest-generated`` / ``max-generated-lik``: ``scipy.optimize.minimize``
  (L-BFGS-B, autograd gradient) per voxel from mu(x), on the same decoder.

Reference approaches run on a subsample of the test voxels (their cost is
exactly linear in the number of voxels) and are extrapolated to all voxels; the
maximum absolute difference to the fast result on that subsample is printed.

Usage::

    python benchmarks/bench_scores.py                       # 70k test voxels, 200k reference
    python benchmarks/bench_scores.py --n-test 5000 --n-ref 20000 --scores latent-nn-euclid
    python benchmarks/bench_scores.py --scaling             # cost when test / reference grow 4x
    python benchmarks/bench_scores.py --scale               # peak memory, 1M test x 500k reference
    python benchmarks/bench_scores.py --demo results/anomri # every score on one demo subject, as the workflow runs them
    python benchmarks/bench_scores.py --libraries           # Euclidean NN scores: ours vs FAISS, cKDTree, cdist

``--libraries`` runs ``bench_search.py`` (same synthetic problem and thread count): the exact Euclidean
nearest-neighbour search against ``faiss.IndexFlatL2`` (faiss-cpu), ``scipy.spatial.cKDTree`` and ``torch.cdist``,
with each one's efficiency against the machine's matrix-multiply rate.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import resource
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from scipy.optimize import minimize

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from anomri.maps.novelty import NoveltyModel  # noqa: E402
from anomri.models.gaussian import gaussian_nll  # noqa: E402
from anomri.models.vae import GaussianVAE  # noqa: E402
from anomri.scores import get_scores  # noqa: E402
from anomri.scores.generative import NegativeLogLikelihood, SquaredError  # noqa: E402
from anomri.scores.indexes import bhattacharyya_diagonal  # noqa: E402
from anomri.scores.reference import ReferenceSet  # noqa: E402

BATCH_SIZE = 4096
#: Test voxels of the float64 brute-force exactness check of the Euclidean scores.
EXACT_CHECK = 500
#: Voxels generated at once by synthetic_voxels.
SYNTHETIC_BLOCK = 50_000
SCALING_SCORES = ["latent-nn-euclid", "latent-nn-bhatt", "output-nn-euclid", "input-nn-euclid",
                  "latent-logdensity", "output-logdensity", "input-logdensity", "closest-generated"]


# ---------------------------------------------------------------- problem
def synthetic_voxels(n: int, n_features: int, seed: int, lesion_fraction: float = 0.0) -> np.ndarray:
    """Multi-shell signals (b = 1, 2, 3 ms/um^2) of stick + zeppelin + free water, SNR 25.

    Generated in blocks so that a million voxels need no more than the float32 result.
    """
    bvals = np.repeat([1.0, 2.0, 3.0], math.ceil(n_features / 3))[:n_features]
    directions = np.random.default_rng(1234).normal(size=(n_features, 3))
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    out = np.empty((n, n_features), np.float32)
    for block, start in enumerate(range(0, n, SYNTHETIC_BLOCK)):
        rng = np.random.default_rng([seed, block])
        m = min(SYNTHETIC_BLOCK, n - start)
        fibre = rng.normal(size=(m, 3))
        fibre /= np.linalg.norm(fibre, axis=1, keepdims=True)
        f_water = rng.beta(1.5, 8.0, m)
        f_stick = rng.uniform(0.2, 0.7, m)
        d_par, d_perp = rng.uniform(1.5, 2.5, m), rng.uniform(0.2, 0.8, m)
        lesion = rng.random(m) < lesion_fraction
        f_water[lesion] = rng.uniform(0.4, 0.9, lesion.sum())  # oedema-like: free water up, anisotropy down
        f_stick[lesion] *= 0.3
        cos2 = (fibre @ directions.T) ** 2
        stick = np.exp(-bvals * d_par[:, None] * cos2)
        zeppelin = np.exp(-bvals * (d_perp[:, None] + (d_par - d_perp)[:, None] * cos2))
        tissue = f_stick[:, None] * stick + (1 - f_stick)[:, None] * zeppelin
        signal = f_water[:, None] * np.exp(-bvals * 3.0) + (1 - f_water)[:, None] * tissue
        out[start : start + m] = signal + rng.normal(scale=1 / 25, size=signal.shape)
    return out


def train_vae(raw: np.ndarray, latent: int, steps: int, seed: int, device: torch.device) -> GaussianVAE:
    """A GaussianVAE trained for ``steps`` Adam steps: good enough for a realistic latent distribution."""
    torch.manual_seed(seed)
    model = GaussianVAE(raw.shape[1], latent_size=latent).to(device)
    data = torch.from_numpy(raw).to(device)
    model.set_standardization(data.mean(0), data.std(0))
    x = model.standardize(data)
    optimiser = torch.optim.Adam(model.parameters(), lr=2e-3)
    generator = torch.Generator(device=device).manual_seed(seed)
    for _ in range(steps):
        batch = x[torch.randint(len(x), (512,), generator=generator, device=device)]
        loss, _, _ = model.loss(batch, generator=generator)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    model.zero_grad(set_to_none=True)
    return model.eval()


# ---------------------------------------------------------------- measuring
class PeakMemory:
    """Peak resident memory (or CUDA memory) above the level at entry, sampled every 5 ms."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.peak_mb = 0.0

    @staticmethod
    def _rss_mb() -> float:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20

    def _watch(self) -> None:
        while not self._stop.wait(0.005):
            self._peak = max(self._peak, self._rss_mb())

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self._start = torch.cuda.memory_allocated()
            return self
        self._start = self._peak = self._rss_mb()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.peak_mb = (torch.cuda.max_memory_allocated() - self._start) / 2**20
            return
        self._stop.set()
        self._thread.join()
        self.peak_mb = max(self._peak, self._rss_mb()) - self._start


@dataclass
class Timing:
    wall: float
    cpu: float
    peak_mb: float


def timed(device: torch.device, work: Callable[[], object]) -> tuple[object, Timing]:
    with PeakMemory(device) as memory:
        wall, cpu = time.perf_counter(), time.process_time()
        result = work()
        if device.type == "cuda":
            torch.cuda.synchronize()
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    return result, Timing(wall, cpu, memory.peak_mb)


# ---------------------------------------------------------------- reference approaches
def brute_nn_cdist(queries: torch.Tensor, points: torch.Tensor, chunk: int = 1024) -> torch.Tensor:
    """The original approach: chunked torch.cdist + min, squared."""
    return torch.cat([torch.cdist(queries[s : s + chunk], points).min(1).values ** 2
                      for s in range(0, len(queries), chunk)])


def brute_bhattacharyya(m1: torch.Tensor, lv1: torch.Tensor, m2: torch.Tensor, lv2: torch.Tensor) -> torch.Tensor:
    """Closed form against every reference Gaussian, a few queries at a time."""
    rows = max(1, 2**24 // (len(m2) * m2.shape[1]))
    return torch.cat([bhattacharyya_diagonal(m1[s : s + rows, None], lv1[s : s + rows, None], m2[None], lv2[None])
                      .min(1).values for s in range(0, len(m1), rows)])


def brute_log_density(queries: torch.Tensor, means: torch.Tensor, log_sigma: torch.Tensor) -> torch.Tensor:
    """log (1/M) sum_y N(q; m_y, s_y^2) by direct float64 evaluation of every kernel, a few queries at a time."""
    rows = max(1, 2**24 // (len(means) * means.shape[1]))
    means, log_sigma = means.double(), log_sigma.double()
    out = [torch.logsumexp(-gaussian_nll(queries[s : s + rows, None].double(), means[None], log_sigma[None]), dim=1)
           for s in range(0, len(queries), rows)]
    return torch.cat(out) - math.log(len(means))


def scipy_per_voxel(vae: GaussianVAE, x: torch.Tensor, objective) -> np.ndarray:
    """min_z objective by scipy L-BFGS-B from mu(x), one voxel at a time (autograd gradients)."""
    with torch.no_grad():
        mu, _ = vae.encode(x)
    best = []
    for xi, zi in zip(x, mu.cpu(), strict=True):

        def fun(z: np.ndarray, xi: torch.Tensor = xi) -> tuple[float, np.ndarray]:
            code = torch.tensor(z, dtype=torch.float32, device=xi.device, requires_grad=True)
            value = objective.value(xi[None], *vae.decode(code[None]))[0]
            (gradient,) = torch.autograd.grad(value, code)
            return float(value.detach()), gradient.double().cpu().numpy()

        best.append(minimize(fun, zi.double().numpy(), jac=True, method="L-BFGS-B").fun)
    return np.array(best)


@dataclass
class Baseline:
    name: str
    subsample: int
    run: Callable[[torch.Tensor], np.ndarray]  # standardised test subsample -> values
    compare: str = "max |diff|"
    exact: Callable[[torch.Tensor], np.ndarray] | None = None  # float64 brute force, untimed
    key: str | None = None  # baselines with one key run once; each score transforms the result
    transform: Callable[[np.ndarray], np.ndarray] = np.asarray


def baselines(vae: GaussianVAE, ref: ReferenceSet, n_queries: int, n_scipy: int) -> dict[str, Baseline]:
    """The reference approach of each score that has one, on standardised inputs."""

    def encoded(x: torch.Tensor):
        with torch.no_grad():
            mu, logvar = vae.encode(x)
            mean, log_sigma = vae.decode(mu)
        return mu, logvar, mean, log_sigma

    def nn(pick_query: Callable, points: torch.Tensor) -> Baseline:
        def run(x: torch.Tensor, dtype: torch.dtype = torch.float32) -> np.ndarray:
            return brute_nn_cdist(pick_query(x, *encoded(x)).to(dtype), points.to(dtype)).cpu().numpy()

        return Baseline("cdist+min", n_queries, run, exact=lambda x: run(x, torch.float64))

    out = {
        "latent-nn-euclid": nn(lambda x, mu, lv, m, ls: mu, ref.mu),
        "output-nn-euclid": nn(lambda x, mu, lv, m, ls: m, ref.recon_mean),
        "input-to-recon-nn": nn(lambda x, mu, lv, m, ls: x, ref.recon_mean),
        "recon-to-data-nn": nn(lambda x, mu, lv, m, ls: m, ref.x),
        "input-nn-euclid": nn(lambda x, mu, lv, m, ls: x, ref.x),
    }
    slow = max(1, n_queries // 16)

    def bhatt_latent(x):
        mu, lv, _, _ = encoded(x)
        return brute_bhattacharyya(mu, lv, ref.mu, ref.logvar).cpu().numpy()

    def bhatt_output(x):
        _, _, m, ls = encoded(x)
        return brute_bhattacharyya(m, 2 * ls, ref.recon_mean, 2 * ref.recon_log_sigma).cpu().numpy()

    out["latent-nn-bhatt"] = Baseline("brute closed form", slow, bhatt_latent)
    out["output-nn-bhatt"] = Baseline("brute closed form", slow, bhatt_output)
    densities = {
        "latent": lambda x: brute_log_density(encoded(x)[0], ref.mu, 0.5 * ref.logvar),
        "output": lambda x: brute_log_density(encoded(x)[2], ref.recon_mean, ref.recon_log_sigma),
        "input": lambda x: brute_log_density(x, ref.recon_mean, ref.recon_log_sigma),
    }
    for space, log_density in densities.items():
        def run(x: torch.Tensor, f: Callable = log_density) -> np.ndarray:
            return f(x).cpu().numpy()

        out[f"{space}-logdensity"] = Baseline("brute log-sum-exp", slow, run, key=space, transform=np.negative)
        out[f"{space}-density"] = Baseline("brute log-sum-exp", slow, run, key=space,
                                           transform=lambda v: -np.exp(v).astype(np.float32))
    out["closest-generated"] = Baseline("scipy per voxel", n_scipy, lambda x: scipy_per_voxel(vae, x, SquaredError),
                                        "mean objective ours / scipy")
    out["max-generated-lik"] = Baseline("scipy per voxel", n_scipy,
                                        lambda x: scipy_per_voxel(vae, x, NegativeLogLikelihood),
                                        "mean objective ours / scipy")
    return out


# ---------------------------------------------------------------- runs
def score_rows(vae, ref, raw_test, ids, device, n_samples, references, seed=0):
    """Time every score and its reference approach; return table rows."""
    rows = []
    x_all = vae.standardize(torch.from_numpy(raw_test).to(device))
    measured: dict[str, tuple[np.ndarray, Timing]] = {}
    for score_id in ids:
        model = NoveltyModel(vae, [score_id], n_samples=n_samples, seed=seed, reference=ref, batch_size=BATCH_SIZE,
                             device=device)
        values, t = timed(device, lambda model=model: model.score_samples(raw_test, progress=False)[score_id])
        row = {"score": score_id, "n": len(raw_test), "wall": t.wall, "cpu": t.cpu, "peak": t.peak_mb}
        base = references.get(score_id)
        if base is not None:
            # An evenly spread subsample, so normal and lesion voxels are represented.
            pick = np.linspace(0, len(raw_test) - 1, min(base.subsample, len(raw_test))).astype(int)
            key = base.key or score_id
            if key not in measured:
                measured[key] = timed(device, lambda base=base, pick=pick: base.run(x_all[pick]))
            raw_values, tb = measured[key]
            slow_values = base.transform(raw_values)
            scale = len(raw_test) / len(pick)
            row.update(base=base.name, base_wall=tb.wall * scale, base_cpu=tb.cpu * scale,
                       ratio=tb.wall * scale / t.wall, ratio_cpu=tb.cpu * scale / max(t.cpu, 1e-9))
            if base.compare == "max |diff|":
                fast = values[pick].astype(np.float64)
                largest = np.max(np.abs(fast))
                row["check"] = f"max |diff| {np.max(np.abs(fast - slow_values)):.1e} (max |value| {largest:.1e})"
                if base.exact is not None:
                    few = pick[:EXACT_CHECK]
                    exact = base.exact(x_all[few])
                    relative = np.max(np.abs(values[few] - exact) / np.abs(exact))
                    row["check"] += f"; vs float64 brute force: max rel. diff {relative:.1e}"
            else:
                row["check"] = f"mean objective {values[pick].mean():.4f} vs scipy {slow_values.mean():.4f}"
        rows.append(row)
        print(format_row(row), flush=True)
    return rows


HEADER = ("| score | voxels | time (s) | CPU (s) | voxels/s | peak MB | reference approach | ref. time (s) | "
          "speed-up (wall / CPU) | check |")


def format_row(row: dict) -> str:
    rate = row["n"] / row["wall"]
    if "base" in row:
        ref = f"{row['base']} | {row['base_wall']:.0f} | {row['ratio']:.0f}x / {row['ratio_cpu']:.0f}x | {row['check']}"
    else:
        ref = "— | — | — | —"
    return (f"| {row['score']} | {row['n']} | {row['wall']:.1f} | {row['cpu']:.1f} | {rate:,.0f} | "
            f"{row['peak']:.0f} | {ref} |")


def problem(args, n_test, n_ref, device, vae=None):
    raw_ref = synthetic_voxels(n_ref, args.features, seed=1)
    raw_test = synthetic_voxels(n_test, args.features, seed=2, lesion_fraction=0.05)
    if vae is None:
        t = time.perf_counter()
        vae = train_vae(synthetic_voxels(50_000, args.features, seed=0), args.latent, args.train_steps, 0, device)
        print(f"trained the VAE in {time.perf_counter() - t:.0f} s", flush=True)
    t = time.perf_counter()
    ref = ReferenceSet.build(vae, raw_ref, device=device)
    print(f"built the reference set ({n_ref}) in {time.perf_counter() - t:.1f} s", flush=True)
    return vae, ref, raw_test


def describe_latents(ref: ReferenceSet) -> str:
    active = int((ref.logvar.exp().median(0).values < 0.5).sum())
    return f"latent size {ref.latent_size} ({active} active dimensions: median posterior variance < 0.5)"


def main_table(args, device):
    vae, ref, raw_test = problem(args, args.n_test, args.n_ref, device)
    print(describe_latents(ref))
    ids = args.scores or [s.id for s in get_scores("all")]
    print(HEADER)
    print("|" + "---|" * 10)
    return score_rows(vae, ref, raw_test, ids, device, args.n_samples,
                      baselines(vae, ref, args.baseline_queries, args.scipy_voxels))


def scaling_table(args, device):
    """Cost of each score at (N, M), (4N, M) and (N, 4M), the reference indexes built beforehand."""
    n, m = args.n_test // 4, args.n_ref // 4
    ids = args.scores or SCALING_SCORES
    vae, ref_small, raw_small = problem(args, n, m, device)
    _, ref_large, _ = problem(args, n, 4 * m, device, vae)
    raw_large = synthetic_voxels(4 * n, args.features, seed=2, lesion_fraction=0.05)
    print(f"CPU seconds (wall seconds in brackets), N = {n} test, M = {m} reference")
    print("| score | N, M | 4N, M | ratio 4N | N, 4M | ratio 4M |")
    print("|---|---|---|---|---|---|")
    for score_id in ids:
        times = []
        for ref, raw in ((ref_small, raw_small), (ref_small, raw_large), (ref_large, raw_small)):
            model = NoveltyModel(vae, [score_id], n_samples=args.n_samples, reference=ref, batch_size=BATCH_SIZE,
                                 device=device)
            model.score_samples(raw[:16], progress=False)  # builds the reference indexes outside the timing
            times.append(timed(device, lambda model=model, raw=raw: model.score_samples(raw, progress=False))[1])
        small, large_n, large_m = times
        print(f"| {score_id} | {small.cpu:.1f} ({small.wall:.1f}) | {large_n.cpu:.1f} ({large_n.wall:.1f}) | "
              f"{large_n.cpu / small.cpu:.1f} | {large_m.cpu:.1f} ({large_m.wall:.1f}) | "
              f"{large_m.cpu / small.cpu:.1f} |", flush=True)


def scale_run(args, device):
    """Peak memory with 1M test voxels and a 500k reference set (every index built and kept)."""
    n_test, n_ref = args.scale_test, args.scale_ref
    vae, ref, raw_test = problem(args, n_test, n_ref, device)
    ids = args.scores or [s.id for s in get_scores("all")]
    voxels = min(n_test, args.scale_batches * BATCH_SIZE)
    print(f"{n_test} test voxels x {args.features} features held in memory, reference set {n_ref}; "
          f"each score runs on the first {voxels} voxels ({args.scale_batches} batches: memory is per batch)")
    print("| score | voxels | time (s) | peak MB above start |")
    print("|---|---|---|---|")
    for score_id in ids:
        model = NoveltyModel(vae, [score_id], n_samples=args.n_samples, reference=ref, batch_size=BATCH_SIZE,
                             device=device)
        _, t = timed(device, lambda model=model: model.score_samples(raw_test[:voxels], progress=False))
        print(f"| {score_id} | {voxels} | {t.wall:.1f} | {t.peak_mb:.0f} |", flush=True)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # kB -> GB
    print(f"\npeak resident memory of the whole run (ru_maxrss): {peak:.2f} GB")
    if device.type == "cuda":
        print(f"peak CUDA memory: {torch.cuda.max_memory_allocated() / 2**30:.2f} GB")


def demo_run(args, device):
    """Seconds per score for one subject of a finished demo run, all scores in one ``NoveltyModel`` as the workflow
    runs them (shared model outputs are paid by the first score that needs them), on a subsample of its voxels."""
    from anomri.io.derivatives import ScanDerivatives
    from anomri.io.voxels import load_masked
    from anomri.models.checkpoint import load_vae

    root = Path(args.demo)
    vae, _ = load_vae(root / "models" / "fold-1" / "vae.pt", device)
    ref = ReferenceSet.load(root / "models" / "fold-1" / "reference_set.pt", device)
    scan = ScanDerivatives(root, args.subject)
    voxels, _, _ = load_masked(scan.features, scan.mask)
    pick = np.linspace(0, len(voxels) - 1, min(args.demo_voxels, len(voxels))).astype(int)
    scale = len(voxels) / len(pick)
    print(f"{args.subject}: {len(voxels)} voxels x {voxels.shape[1]} features, latent {vae.latent_size}, reference "
          f"{len(ref)}, n_samples {args.n_samples}, batch {BATCH_SIZE}; timed on {len(pick)} evenly spread voxels, "
          f"extrapolated x{scale:.2f}")
    model = NoveltyModel(vae, "all", n_samples=args.n_samples, reference=ref, batch_size=BATCH_SIZE, device=device)
    _, build = timed(device, lambda: model.score_samples(voxels[pick[:16]], progress=False))
    seconds = {s.id: np.zeros(2) for s in model.scores}  # wall, CPU

    def clocked(score):
        def func(ctx):
            start = np.array([time.perf_counter(), time.process_time()])
            out = score.func(ctx)
            seconds[score.id] += np.array([time.perf_counter(), time.process_time()]) - start
            return out

        return dataclasses.replace(score, func=func)

    model.scores = [clocked(s) for s in model.scores]
    _, t = timed(device, lambda: model.score_samples(voxels[pick], progress=False))
    print(f"reference indexes built (and 16 voxels scored) in {build.wall:.1f} s, once per reference set")
    print("| score | wall s per subject | CPU s per subject |")
    print("|---|---|---|")
    for score_id, (wall, cpu) in seconds.items():
        print(f"| {score_id} | {wall * scale:.1f} | {cpu * scale:.1f} |")
    print(f"| **total** | **{t.wall * scale:.0f}** | **{t.cpu * scale:.0f}** |")
    print(f"peak memory {t.peak_mb:.0f} MB above the start")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--threads", type=int, default=1, help="torch / KD-tree threads (default 1)")
    parser.add_argument("--n-test", type=int, default=70_000)
    parser.add_argument("--n-ref", type=int, default=200_000)
    parser.add_argument("--features", type=int, default=90)
    parser.add_argument("--latent", type=int, default=16)
    parser.add_argument("--n-samples", type=int, default=45, help="Monte Carlo samples (the paper's 45)")
    parser.add_argument("--train-steps", type=int, default=1500)
    parser.add_argument("--scores", nargs="*", help="score ids (default: all)")
    parser.add_argument("--baseline-queries", type=int, default=4000,
                        help="test voxels the reference approaches run on (a quarter for the slow ones)")
    parser.add_argument("--scipy-voxels", type=int, default=200)
    parser.add_argument("--scaling", action="store_true", help="cost when the test / reference set grow 4x")
    parser.add_argument("--scale", action="store_true", help="peak memory for 1M test voxels x 500k reference")
    parser.add_argument("--scale-test", type=int, default=1_000_000)
    parser.add_argument("--scale-ref", type=int, default=500_000)
    parser.add_argument("--scale-batches", type=int, default=4)
    parser.add_argument("--libraries", action="store_true",
                        help="Euclidean NN scores against FAISS, cKDTree and cdist (bench_search.py)")
    parser.add_argument("--demo", help="derivatives directory of a finished demo run (models/, sub-*/)")
    parser.add_argument("--subject", default="sub-P01", help="with --demo: the subject to score")
    parser.add_argument("--demo-voxels", type=int, default=16384, help="with --demo: voxels timed")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device here")
    if args.libraries:
        from bench_search import main as search_main

        search_main(["--device", args.device, "--threads", str(args.threads), "--n-test", str(args.n_test),
                     "--n-ref", str(args.n_ref), "--train-steps", str(args.train_steps)])
        return
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, device {device}, {args.threads} thread(s), {os.cpu_count()} CPU(s), "
          f"load average {os.getloadavg()[0]:.1f}")
    if args.demo:
        demo_run(args, device)
        return
    print(f"features {args.features}, latent {args.latent}, Monte Carlo samples {args.n_samples}")
    if args.scale:
        scale_run(args, device)
    elif args.scaling:
        scaling_table(args, device)
    else:
        main_table(args, device)


if __name__ == "__main__":
    main()
