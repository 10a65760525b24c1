"""The ND-VAE score family: reference-set scores against brute force, generative scores against
a grid search, the reference set's file round trip, and seeded determinism."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from anomri.errors import InputError
from anomri.maps.novelty import NoveltyModel
from anomri.models.vae import GaussianVAE
from anomri.scores import get_scores, score_ids, search
from anomri.scores.generative import LatentSearch, NegativeLogLikelihood, SquaredError, minimise_over_latents
from anomri.scores.indexes import BhattacharyyaIndex, EuclideanIndex, GaussianKernelIndex
from anomri.scores.context import ScoreContext
from anomri.scores.reference import ReferenceSet

N_FEATURES, LATENT = 10, 3

PAPER_SCORES = {
    "vae-reg", "det-rec-err", "det-rec-lik", "enc-stoch-rec-err", "enc-stoch-rec-err-min", "neg-elbo",
    "latent-nn-euclid", "latent-nn-bhatt", "latent-density", "latent-logdensity",
    "enc-stoch-rec-lik", "enc-stoch-rec-lik-min", "dec-stoch-rec-err", "dec-stoch-rec-err-min",
    "full-stoch-rec-err", "full-stoch-rec-err-min",
    "output-nn-euclid", "output-nn-bhatt", "output-density", "output-logdensity", "input-to-recon-nn",
    "input-density", "input-logdensity", "recon-to-data-nn", "input-nn-euclid",
    "closest-generated", "max-generated-lik", "sampled-elbo",
}
REFERENCE_SCORES = {
    "latent-nn-euclid", "latent-nn-bhatt", "latent-density", "latent-logdensity", "output-nn-euclid",
    "output-nn-bhatt", "output-density", "output-logdensity", "input-to-recon-nn", "input-density",
    "input-logdensity", "recon-to-data-nn", "input-nn-euclid",
}


def manifold_samples(n: int, seed: int) -> np.ndarray:
    """Raw features on a curved 2-D manifold plus a little noise."""
    rng = np.random.default_rng(seed)
    t = rng.uniform(-2, 2, size=(n, 2))
    freq = np.arange(1, N_FEATURES + 1)
    x = np.sin(np.outer(t[:, 0], freq) / 3) + np.cos(np.outer(t[:, 1], freq) / 4)
    x += 0.05 * rng.normal(size=(n, N_FEATURES))
    return (x + 3.0).astype(np.float32)


def trained_vae(latent_size: int) -> GaussianVAE:
    """A small VAE trained briefly on manifold samples, so its latents are structured like a real one's."""
    torch.manual_seed(0)
    model = GaussianVAE(N_FEATURES, latent_size=latent_size, hidden_channels=(32, 16))
    raw = torch.from_numpy(manifold_samples(2000, seed=0))
    model.set_standardization(raw.mean(0), raw.std(0))
    x = model.standardize(raw)
    optimiser = torch.optim.Adam(model.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(0)
    for _ in range(150):
        loss, _, _ = model.loss(x[torch.randint(len(x), (256,), generator=generator)], generator=generator)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    model.zero_grad(set_to_none=True)
    return model.eval()


@pytest.fixture(scope="module")
def vae() -> GaussianVAE:
    return trained_vae(LATENT)


@pytest.fixture(scope="module")
def reference(vae: GaussianVAE) -> ReferenceSet:
    return ReferenceSet.build(vae, manifold_samples(3000, seed=1), batch_size=1024)


@pytest.fixture(scope="module")
def test_raw() -> np.ndarray:
    raw = manifold_samples(600, seed=2)
    raw[::7] += np.random.default_rng(3).normal(scale=1.5, size=raw[::7].shape).astype(np.float32)  # novel voxels
    return raw


@pytest.fixture(params=["tree", "dense"])
def strategy(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run a test once with the tree refine only, once with every ball screened densely (GEMM or all pairs)."""
    fraction = 1 if request.param == "tree" else 10**9
    monkeypatch.setattr(search, "_DENSE_FRACTION", fraction)
    monkeypatch.setattr(search, "_BRUTE_FRACTION", fraction)
    return request.param


def _brute(reference: ReferenceSet, vae: GaussianVAE, raw: np.ndarray) -> dict[str, np.ndarray]:
    """Every reference score by full float64 matrices."""
    with torch.no_grad():
        x = vae.standardize(torch.from_numpy(raw))
        mu, logvar = vae.encode(x)
        mean, log_sigma = vae.decode(mu)
    x, mu, logvar, mean, log_sigma = (t.double() for t in (x, mu, logvar, mean, log_sigma))
    ry, rmu, rlv = reference.x.double(), reference.mu.double(), reference.logvar.double()
    rmean, rls = reference.recon_mean.double(), reference.recon_log_sigma.double()

    def sqdist(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return ((a[:, None, :] - b[None, :, :]) ** 2).sum(-1)

    def bhattacharyya(m1, v1, m2, v2):  # full formula with determinants, diagonal covariances
        m1, v1, m2, v2 = m1[:, None], v1[:, None], m2[None], v2[None]
        avg = (v1 + v2) / 2
        log_det_ratio = avg.log().sum(-1) - 0.5 * (v1.log().sum(-1) + v2.log().sum(-1))
        return ((m1 - m2) ** 2 / avg).sum(-1) / 8 + 0.5 * log_det_ratio

    def log_mixture(q, means, log_sd):  # log (1/M) sum_y prod_k N(q_k; m_yk, s_yk)
        z = (q[:, None, :] - means[None]) / log_sd.exp()[None]
        log_kernel = (-0.5 * z**2 - log_sd[None] - 0.5 * math.log(2 * math.pi)).sum(-1)
        return torch.logsumexp(log_kernel, dim=1) - math.log(len(means))

    out = {
        "latent-nn-euclid": sqdist(mu, rmu).min(1).values,
        "latent-nn-bhatt": bhattacharyya(mu, logvar.exp(), rmu, rlv.exp()).min(1).values,
        "output-nn-euclid": sqdist(mean, rmean).min(1).values,
        "output-nn-bhatt": bhattacharyya(mean, (2 * log_sigma).exp(), rmean, (2 * rls).exp()).min(1).values,
        "input-to-recon-nn": sqdist(x, rmean).min(1).values,
        "recon-to-data-nn": sqdist(mean, ry).min(1).values,
        "input-nn-euclid": sqdist(x, ry).min(1).values,
        "latent-logdensity": -log_mixture(mu, rmu, 0.5 * rlv),
        "output-logdensity": -log_mixture(mean, rmean, rls),
        "input-logdensity": -log_mixture(x, rmean, rls),
    }
    for space in ("latent", "output", "input"):
        out[f"{space}-density"] = -torch.exp(-out[f"{space}-logdensity"])
    return {k: v.numpy() for k, v in out.items()}


def test_registry_holds_the_whole_family() -> None:
    ids = set(score_ids())
    assert PAPER_SCORES <= ids
    for score in get_scores("all"):
        assert score.formula and score.description, score.id
        assert score.needs_reference == (score.id in REFERENCE_SCORES), score.id
    assert {s.id for s in get_scores("all")} == ids


def test_reference_scores_equal_brute_force(vae, reference, test_raw, strategy) -> None:
    ids = sorted(REFERENCE_SCORES)
    model = NoveltyModel(vae, ids, n_samples=4, seed=0, reference=reference, batch_size=256)
    fast = model.score_samples(test_raw, progress=False)
    brute = _brute(reference, vae, test_raw)
    for score_id in ids:
        np.testing.assert_allclose(fast[score_id], brute[score_id], rtol=2e-6, atol=1e-30, err_msg=score_id)


def test_indexes_exact_in_float64(vae, reference, test_raw, strategy) -> None:
    """The searches themselves agree with brute force to float64 rounding, not just float32."""
    with torch.no_grad():
        x = vae.standardize(torch.from_numpy(test_raw))
        mu, logvar = vae.encode(x)
    brute = _brute(reference, vae, test_raw)
    euclid = EuclideanIndex(reference.x).min_sqdist(x)
    np.testing.assert_allclose(euclid.numpy(), brute["input-nn-euclid"], rtol=1e-11)
    bhatt = BhattacharyyaIndex(reference.mu, reference.logvar).min_distance(mu, logvar)
    # The expanded distance cancels O(1) terms: float64 rounding is ~1e-16 absolute, relative only for large values.
    np.testing.assert_allclose(bhatt.numpy(), brute["latent-nn-bhatt"], rtol=1e-11, atol=1e-14)
    log_sum = GaussianKernelIndex(reference.mu, 0.5 * reference.logvar).log_sum(mu)
    neg_log_density = -(log_sum.numpy() - math.log(len(reference)))
    np.testing.assert_allclose(neg_log_density, brute["latent-logdensity"], rtol=1e-9, atol=1e-9)


def test_reference_set_round_trip(vae, reference, tmp_path) -> None:
    path = tmp_path / "ref" / "reference.pt"
    reference.save(path)
    loaded = ReferenceSet.load(path)
    for name in ("x", "mu", "logvar", "recon_mean", "recon_log_sigma"):
        assert torch.equal(getattr(loaded, name), getattr(reference, name))
    assert not list(path.parent.glob(".tmp*"))
    loaded.check_model(vae)
    other = GaussianVAE(N_FEATURES, latent_size=LATENT, hidden_channels=(32, 16))
    other.load_state_dict(vae.state_dict())
    with torch.no_grad():
        other.net.mu.bias.add_(0.5)
    with pytest.raises(ValueError, match="different model"):
        loaded.check_model(other)
    (tmp_path / "bad.pt").write_bytes(b"not a reference set")
    with pytest.raises(InputError):
        ReferenceSet.load(tmp_path / "bad.pt")
    torch.save({"x": reference.x}, tmp_path / "partial.pt")
    with pytest.raises(InputError):
        ReferenceSet.load(tmp_path / "partial.pt")


def test_reference_scores_refuse_a_mismatched_model(vae, reference, test_raw) -> None:
    other = GaussianVAE(N_FEATURES, latent_size=LATENT, hidden_channels=(32, 16))
    with pytest.raises(ValueError, match="different model"):
        NoveltyModel(other, ["latent-nn-euclid"], reference=reference).score_samples(test_raw[:8], progress=False)


def _grid_minimum(vae: GaussianVAE, x: torch.Tensor, objective, half_width: float = 6.0, n: int = 601):
    """Objective on a dense grid of the 2-D latent space.

    Returns its minimum, the largest step from there to a neighbour, whether the
    minimum is interior, and how many local minima (points below their 8
    neighbours) the grid holds, per sample.
    """
    axis = torch.linspace(-half_width, half_width, n)
    grid = torch.cartesian_prod(axis, axis)
    with torch.no_grad():
        mean, log_sigma = vae.decode(grid)
        values = torch.stack([objective.value(xi.expand_as(mean), mean, log_sigma) for xi in x]).view(len(x), n, n)
    flat = values.view(len(x), -1).argmin(1)
    i, j = flat // n, flat % n
    best = values.view(len(x), -1).min(1).values
    # How much the objective moves between the grid minimum and its neighbours bounds what the grid can miss.
    neighbours = torch.stack([values[torch.arange(len(x)), (i + di).clamp(0, n - 1), (j + dj).clamp(0, n - 1)]
                              for di, dj in ((1, 0), (-1, 0), (0, 1), (0, -1))])
    centre = values[:, 1:-1, 1:-1]
    lower = torch.ones_like(centre, dtype=torch.bool)
    for di in (-1, 0, 1):
        for dj in (-1, 0, 1):
            if di or dj:
                lower &= centre < values[:, 1 + di : n - 1 + di, 1 + dj : n - 1 + dj]
    interior = (i > 0) & (i < n - 1) & (j > 0) & (j < n - 1)
    return best, (neighbours - best).max(0).values, interior, lower.flatten(1).sum(1)


class WavyDecoderVAE(GaussianVAE):
    """A 2-D latent VAE whose decoder is a known multimodal function with an interior minimum.

    m(z) = [sin(W z + c), z / 2] and log s(z) = -1 + ||z||^2 / 20: the sines make
    several local minima per sample, the linear part and the growing s make
    both objectives grow far from the origin, so a finite grid holds the minimum.
    """

    def __init__(self) -> None:
        super().__init__(8, latent_size=2, hidden_channels=(8,))
        generator = torch.Generator().manual_seed(3)
        self.weight = 0.7 * torch.randn(6, 2, generator=generator)
        self.offset = torch.rand(6, generator=generator) * 6.0

    def decode(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mean = torch.cat([torch.sin(z @ self.weight.T + self.offset), 0.5 * z], dim=-1)
        log_sigma = -1.0 + 0.05 * (z * z).sum(-1, keepdim=True)
        return mean, log_sigma.expand_as(mean)


@pytest.mark.parametrize("objective", [SquaredError, NegativeLogLikelihood])
def test_generative_scores_reach_the_grid_minimum(objective) -> None:
    vae = WavyDecoderVAE().eval()
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        mean, log_sigma = vae.decode(torch.randn(32, 2, generator=generator))
        x = mean + 0.5 * torch.exp(log_sigma) * torch.randn(mean.shape, generator=generator)
        ctx = ScoreContext(vae, x, n_samples=1, generator=torch.Generator().manual_seed(0))
        score = get_scores(["closest-generated" if objective is SquaredError else "max-generated-lik"])[0]
        found = score.func(ctx).double()
    grid_min, grid_step, interior, local_minima = _grid_minimum(vae, x, objective)
    assert interior.all()  # the minima lie inside the grid, so the grid minimum bounds the true one
    assert (local_minima > 1).all()  # multimodal: a local descent alone can end in the wrong basin
    assert (found <= grid_min + 1e-4).all()
    assert (found >= grid_min - grid_step - 1e-4).all()
    assert all(p.grad is None for p in vae.parameters())


def test_generative_search_never_worse_than_its_start(vae, test_raw) -> None:
    with torch.no_grad():
        x = vae.standardize(torch.from_numpy(test_raw[:200]))
        mu, _ = vae.encode(x)
        start_values = SquaredError.value(x, *vae.decode(mu))
        found = minimise_over_latents(vae, x, mu[None], SquaredError, LatentSearch(max_iterations=3))
    assert (found <= start_values).all()
    assert (found < start_values).float().mean() > 0.5


def test_seeded_maps_are_deterministic_and_selection_independent(vae, reference) -> None:
    raw = manifold_samples(5 * 4 * 3, seed=5).reshape(5, 4, 3, N_FEATURES)
    mask = np.ones((5, 4, 3), bool)
    mask[0] = False

    def maps(scores, seed):
        model = NoveltyModel(vae, scores, n_samples=6, seed=seed, reference=reference, batch_size=16)
        return model.fit(raw, mask).maps

    first, again, other_seed = maps("all", 0), maps("all", 0), maps("all", 1)
    stochastic = {"enc-stoch-rec-err", "dec-stoch-rec-err-min", "full-stoch-rec-err", "enc-stoch-rec-lik", "neg-elbo"}
    for score_id, volume in first.items():
        np.testing.assert_array_equal(volume, again[score_id], err_msg=score_id)
        assert np.all(volume[~mask] == 0)
        if score_id in stochastic:
            assert not np.array_equal(volume, other_seed[score_id]), score_id
    for score_id in ("dec-stoch-rec-err", "full-stoch-rec-err-min", "closest-generated", "latent-nn-bhatt"):
        np.testing.assert_array_equal(maps([score_id], 0)[score_id], first[score_id], err_msg=score_id)
