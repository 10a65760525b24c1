"""Exact Euclidean nearest-neighbour search: anomri's index against the libraries a user would pick.

A script, not a test. For each Euclidean nearest-neighbour score of the registry it times, on the same
queries, reference points and threads:

* ``anomri``: :class:`anomri.scores.indexes.EuclideanIndex` (KD-tree lower bound or float32 GEMM screen, then
  an exact float64 refine of the candidates);
* ``cKDTree``: ``scipy.spatial.cKDTree(points).query(queries, k=1, workers=threads)`` in float64 (exact);
* ``FAISS``: ``faiss.IndexFlatL2`` (exhaustive float32 search; ``faiss-cpu``), its k = 8 nearest recomputed in
  float64 and the minimum kept, so that float32 rounding can only matter for ties closer than 8 neighbours;
* ``cdist``: chunked ``torch.cdist`` + min in float32 (the brute force the project started from).

Bhattacharyya nearest neighbours and kernel densities have no exact library equivalent; a second table times
their indexes (:class:`~anomri.scores.indexes.BhattacharyyaIndex`, :class:`~anomri.scores.indexes.GaussianKernelIndex`)
against the brute force of ``bench_scores.py`` on ``--brute-queries`` queries, extrapolated linearly.

Every method's minimum squared distance is compared with a float64 brute force on ``--exact-check`` queries
(max relative difference). Build and query times are reported apart. Efficiency is the brute-force
equivalent work, 2 N M D multiply-adds, per second of query time, as a fraction of the float32
matrix-multiply rate measured on this machine with the same threads (``torch.mm`` of 2048 x 2048
matrices): a brute force can at best reach 1; a search that prunes can exceed it.

Usage::

    python benchmarks/bench_search.py                      # 70k queries, 200k references, 1 thread
    python benchmarks/bench_search.py --threads 2 --features 30
    python benchmarks/bench_search.py --device cuda        # anomri and cdist on the GPU (FAISS-cpu, cKDTree on CPU)
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import math
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from scipy.spatial import cKDTree

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_scores import brute_bhattacharyya, brute_log_density, brute_nn_cdist, problem  # noqa: E402

from anomri.scores.indexes import BhattacharyyaIndex, EuclideanIndex, GaussianKernelIndex  # noqa: E402

#: Neighbours FAISS returns in float32 before the float64 recomputation picks the nearest.
FAISS_K = 8


def gemm_rate(threads: int, device: torch.device, side: int = 2048, repeats: int = 5) -> float:
    """Float32 multiply-adds per second of ``torch.mm`` on square matrices: the machine's matrix-multiply limit."""
    a = torch.randn(side, side, device=device)
    b = torch.randn(side, side, device=device)
    torch.mm(a, b)  # warm-up: thread pool, kernels
    best = float("inf")
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        torch.mm(a, b)
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return side**3 / best


def brute_float64(queries: np.ndarray, points: np.ndarray, chunk: int = 64) -> np.ndarray:
    """min_y ||q - y||^2 in float64 by explicit differences (no expansion, so no cancellation)."""
    p = torch.from_numpy(points.astype(np.float64))
    out = [((torch.from_numpy(queries[s : s + chunk].astype(np.float64))[:, None] - p) ** 2).sum(-1).min(1).values
           for s in range(0, len(queries), chunk)]
    return torch.cat(out).numpy()


def search_anomri(points: np.ndarray, device: torch.device) -> Callable[[np.ndarray], np.ndarray]:
    index = EuclideanIndex(torch.from_numpy(points).to(device))
    _ = index.form  # the GEMM screen's packed reference rows: part of the build
    return lambda q: index.min_sqdist(torch.from_numpy(q).to(device)).cpu().numpy()


def search_ckdtree(points: np.ndarray, threads: int) -> Callable[[np.ndarray], np.ndarray]:
    tree = cKDTree(points.astype(np.float64))
    return lambda q: tree.query(q.astype(np.float64), k=1, workers=threads)[0] ** 2


def search_faiss(points: np.ndarray, threads: int) -> Callable[[np.ndarray], np.ndarray]:
    import faiss

    faiss.omp_set_num_threads(threads)
    index = faiss.IndexFlatL2(points.shape[1])
    index.add(np.ascontiguousarray(points, dtype=np.float32))
    reference = points.astype(np.float64)

    def query(q: np.ndarray) -> np.ndarray:
        _, nearest = index.search(np.ascontiguousarray(q, dtype=np.float32), FAISS_K)
        exact = ((q.astype(np.float64)[:, None, :] - reference[nearest]) ** 2).sum(-1)
        return exact.min(1)

    return query


def search_cdist(points: np.ndarray, device: torch.device) -> Callable[[np.ndarray], np.ndarray]:
    p = torch.from_numpy(points).to(device)
    return lambda q: brute_nn_cdist(torch.from_numpy(q).to(device), p).cpu().numpy()


def timed(work: Callable[[], object], device: torch.device) -> tuple[object, float]:
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = work()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return out, time.perf_counter() - start


def score_spaces(vae, ref, raw_test: np.ndarray, device: torch.device) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """(queries, reference points) of every Euclidean nearest-neighbour score, as the registry defines them."""
    with torch.no_grad():
        x = vae.standardize(torch.from_numpy(raw_test).to(device))
        mu, _ = vae.encode(x)
        mean, _ = vae.decode(mu)
    as_np = {"x": x, "mu": mu, "mean": mean, "ref.x": ref.x, "ref.mu": ref.mu, "ref.mean": ref.recon_mean}
    a = {k: v.detach().float().cpu().numpy() for k, v in as_np.items()}
    return {
        "latent-nn-euclid": (a["mu"], a["ref.mu"]),
        "output-nn-euclid": (a["mean"], a["ref.mean"]),
        "input-to-recon-nn": (a["x"], a["ref.mean"]),
        "recon-to-data-nn": (a["mean"], a["ref.x"]),
        "input-nn-euclid": (a["x"], a["ref.x"]),
    }


def own_searches(vae, ref, raw_test: np.ndarray, device: torch.device) -> dict[str, tuple[Callable, Callable, int]]:
    """score id -> (build the index and return its query, brute force, dimension D) of the non-Euclidean searches."""
    with torch.no_grad():
        x = vae.standardize(torch.from_numpy(raw_test).to(device))
        mu, logvar = vae.encode(x)
        mean, log_sigma = vae.decode(mu)

    def bhatt(m, lv, rm, rlv):
        def build():
            index = BhattacharyyaIndex(rm, rlv)
            return lambda rows: index.min_distance(m[rows], lv[rows]).cpu().numpy()

        return build, lambda rows: brute_bhattacharyya(m[rows], lv[rows], rm, rlv).double().cpu().numpy(), m.shape[1]

    def density(q, means, ls):
        def build():
            index = GaussianKernelIndex(means, ls)
            return lambda rows: index.log_sum(q[rows]).cpu().numpy() - math.log(len(means))

        return build, lambda rows: brute_log_density(q[rows], means, ls).cpu().numpy(), q.shape[1]

    return {
        "latent-nn-bhatt": bhatt(mu, logvar, ref.mu, ref.logvar),
        "output-nn-bhatt": bhatt(mean, 2 * log_sigma, ref.recon_mean, 2 * ref.recon_log_sigma),
        "latent-logdensity": density(mu, ref.mu, 0.5 * ref.logvar),
        "output-logdensity": density(mean, ref.recon_mean, ref.recon_log_sigma),
        "input-logdensity": density(x, ref.recon_mean, ref.recon_log_sigma),
    }


def own_table(vae, ref, raw_test: np.ndarray, device: torch.device, brute_queries: int, limit: float) -> None:
    """The searches only anomri does exactly, against their brute force (extrapolated from a subsample)."""
    print("\nsearches without an exact library equivalent (brute force timed on "
          f"{brute_queries} queries, extrapolated)")
    print("| score | D | anomri build (s) | anomri query (s) | queries/s | brute force (s) | speed-up | "
          "brute-force-equivalent efficiency | max abs. diff |")
    print("|---|---|---|---|---|---|---|---|---|")
    n, m = len(raw_test), len(ref.mu)
    every = torch.arange(n, device=device)
    pick = torch.linspace(0, n - 1, min(brute_queries, n), device=device).long()
    for score_id, (build, brute, dims) in own_searches(vae, ref, raw_test, device).items():
        search, build_s = timed(build, device)
        values, seconds = timed(lambda search=search: search(every), device)
        slow, slow_s = timed(lambda brute=brute: brute(pick), device)
        brute_s = slow_s * n / len(pick)
        diff = np.max(np.abs(values[pick.cpu().numpy()] - slow))
        print(f"| {score_id} | {dims} | {build_s:.2f} | {seconds:.2f} | {n / seconds:,.0f} | {brute_s:.0f} | "
              f"{brute_s / seconds:.0f}x | {n * m * dims / seconds / limit:.2f} | {diff:.1e} |", flush=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", help="cpu or cuda (anomri and cdist; the libraries stay on CPU)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--n-test", type=int, default=70_000)
    parser.add_argument("--n-ref", type=int, default=200_000)
    parser.add_argument("--features", type=int, default=30, help="q-space features per voxel")
    parser.add_argument("--latent", type=int, default=8)
    parser.add_argument("--train-steps", type=int, default=1500)
    parser.add_argument("--exact-check", type=int, default=300, help="queries checked against float64 brute force")
    parser.add_argument("--methods", nargs="*", default=["anomri", "cKDTree", "FAISS", "cdist"])
    parser.add_argument("--scores", nargs="*", help="Euclidean score ids (default: all five)")
    parser.add_argument("--brute-queries", type=int, default=500,
                        help="queries the brute force of the Bhattacharyya and density searches runs on (0: no table)")
    args = parser.parse_args(argv)
    if "FAISS" in args.methods and importlib.util.find_spec("faiss") is None:
        logging.warning("faiss is not installed (pip install -e '.[bench]' or faiss-cpu): FAISS rows left out")
        args.methods = [m for m in args.methods if m != "FAISS"]
    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    limit = gemm_rate(args.threads, device)
    print(f"torch {torch.__version__}, device {device}, {args.threads} thread(s), {os.cpu_count()} CPU(s), load "
          f"average {os.getloadavg()[0]:.1f}; float32 matrix-multiply limit {limit / 1e9:.1f} G multiply-adds/s")
    vae, ref, raw_test = problem(args, args.n_test, args.n_ref, device)
    spaces = score_spaces(vae, ref, raw_test, device)
    builders = {
        "anomri": lambda p: search_anomri(p, device),
        "cKDTree": lambda p: search_ckdtree(p, args.threads),
        "FAISS": lambda p: search_faiss(p, args.threads),
        "cdist": lambda p: search_cdist(p, device),
    }
    print(f"{args.n_test} queries, {args.n_ref} reference points")
    print("| score | D | method | build (s) | query (s) | queries/s | brute-force-equivalent efficiency | "
          "max rel. diff vs float64 brute force |")
    print("|---|---|---|---|---|---|---|---|")
    for score_id in args.scores or list(spaces):
        queries, points = spaces[score_id]
        check = np.linspace(0, len(queries) - 1, args.exact_check).astype(int)
        exact = brute_float64(queries[check], points)
        for method in args.methods:
            search, build = timed(lambda method=method: builders[method](points), device)
            values, seconds = timed(lambda search=search: search(queries), device)
            relative = np.max(np.abs(values[check] - exact) / np.maximum(exact, 1e-300))
            work = len(queries) * len(points) * points.shape[1]
            print(f"| {score_id} | {points.shape[1]} | {method} | {build:.2f} | {seconds:.2f} | "
                  f"{len(queries) / seconds:,.0f} | {work / seconds / limit:.2f} | {relative:.1e} |", flush=True)
    if args.brute_queries:
        own_table(vae, ref, raw_test, device, args.brute_queries, limit)


if __name__ == "__main__":
    main()
