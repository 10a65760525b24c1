"""Image models: conv VAE + registry adapter, projection, AnoGAN latent search, multiple-hypotheses WTA, training."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

from anomri.errors import InputError
from anomri.images.scoring import AUTO_SEARCH_CHUNK, anogan_search_chunk
from anomri.images.settings import SLOW_IMAGE_SCORES, ImageSettings
from anomri.images import training as image_training
from anomri.images.training import learning_rate_factor, load_image_model, save_image_model, train_image_model
from anomri.models.anogan import DCGAN, latent_search
from anomri.models.conv_vae import ConvVAE, FlatImageVAE
from anomri.models.mhp_vae import MultiHypothesisVAE, winner_takes_all
from anomri.models.projection import energy, project, projection_map
from anomri.scores import get_scores
from anomri.scores.context import ScoreContext
from anomri.scores.pixelwise import PIXELWISE_SCORES, PixelwiseContext
from anomri.scores.reference import ReferenceSet


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def test_registry_scores_apply_to_images_and_maps_sum_to_them() -> None:
    vae = ConvVAE((2, 16, 16), latent_size=4, channels=(4, 8)).eval()
    flat = FlatImageVAE(vae)
    raw = torch.rand(3, 2, 16, 16)
    reference = ReferenceSet.build(flat, torch.rand(5, 2 * 16 * 16))
    x = flat.standardize(raw.flatten(1))
    ctx = ScoreContext(flat, x, n_samples=4, generator=torch.Generator().manual_seed(1), reference=reference)
    with torch.no_grad():
        for score in get_scores("all"):
            if score.id in SLOW_IMAGE_SCORES:
                continue
            value = score.func(ctx)
            assert value.shape == (3,) and torch.isfinite(value).all(), score.id
            if score.id in PIXELWISE_SCORES:
                pixel_terms = score.func(PixelwiseContext(ctx))
                assert pixel_terms.shape == (3, 2 * 16 * 16), score.id
                torch.testing.assert_close(pixel_terms.sum(-1), value, rtol=1e-5, atol=1e-2, msg=score.id)
        # Brute force: the det-rec-err map is the squared error against the conv decoder's mean at mu.
        images = vae.standardize(raw)
        expected = (images - vae.decode(vae.encode(images)[0])[0]) ** 2
        got = get_scores(["det-rec-err"])[0].func(PixelwiseContext(ctx)).reshape(3, 2, 16, 16)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
        # Reference scores see the flattened images: input-nn-euclid is the nearest reference image.
        brute = torch.cdist(x, reference.x).min(1).values ** 2
        torch.testing.assert_close(get_scores(["input-nn-euclid"])[0].func(ctx), brute, rtol=1e-4, atol=1e-3)


def _tiny_mhp(n_heads: int = 3) -> MultiHypothesisVAE:
    return MultiHypothesisVAE((1, 8, 8), latent_size=2, channels=(4,), n_hypotheses=n_heads)


def test_wta_gradient_reaches_only_the_winning_head() -> None:
    model = _tiny_mhp()
    x = torch.randn(1, 1, 8, 8)
    hyps = model.hypotheses(torch.randn(1, 2))
    brute_errors = [float(((hyps[0, h] - x[0]) ** 2).sum().detach()) for h in range(3)]
    result = winner_takes_all(x, hyps, epsilon=0.0)
    assert int(result.winner) == int(np.argmin(brute_errors))
    assert result.best_error.item() == pytest.approx(min(brute_errors), rel=1e-5)
    result.loss.sum().backward()
    for h, head in enumerate(model.heads):
        grad_norm = sum(float(p.grad.abs().sum()) for p in head.parameters() if p.grad is not None)
        if h == int(result.winner):
            assert grad_norm > 0
        else:
            assert grad_norm == 0.0


def test_relaxed_wta_trains_every_head() -> None:
    model = _tiny_mhp()
    x = torch.randn(2, 1, 8, 8)
    result = winner_takes_all(x, model.hypotheses(torch.randn(2, 2)), epsilon=0.05)
    result.loss.sum().backward()
    for head in model.heads:
        assert sum(float(p.grad.abs().sum()) for p in head.parameters()) > 0


def test_mhp_losses_drive_both_players() -> None:
    model = _tiny_mhp()
    losses = model.losses(torch.randn(4, 1, 8, 8), generator=torch.Generator().manual_seed(0))
    d_params = list(model.discriminator.parameters())
    d_grads = torch.autograd.grad(losses["discriminator"], d_params, retain_graph=True)
    assert all(torch.isfinite(g).all() for g in d_grads) and any(g.abs().sum() > 0 for g in d_grads)
    # The generator loss subtracts the discriminator's loss on fakes: its gradient w.r.t. the heads
    # differs from that of WTA + KL alone.
    head_params = list(model.heads.parameters())
    with_adv = torch.autograd.grad(losses["generator"], head_params, retain_graph=True)
    without = torch.autograd.grad(losses["wta"] + losses["kl"], head_params, retain_graph=True, allow_unused=True)
    assert any(not torch.allclose(a, b) for a, b in zip(with_adv, without) if b is not None)


class LinearAutoencoder(nn.Module):
    """Plain autoencoder whose normal manifold is a known subspace: f(x) = P x."""

    def __init__(self, basis: torch.Tensor) -> None:
        super().__init__()
        q, _ = torch.linalg.qr(basis)
        self.register_buffer("projector", q @ q.T)

    def reconstruct_with_loss(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        reconstruction = (x.flatten(1) @ self.projector).reshape(x.shape)
        return reconstruction, ((x - reconstruction) ** 2).flatten(1).sum(-1)


def test_projection_lowers_energy_monotonically_and_localises_the_anomaly() -> None:
    d = 8 * 8
    model = LinearAutoencoder(torch.randn(d, 5))
    normal = model.reconstruct_with_loss(torch.randn(3, 1, 8, 8))[0]
    x0 = normal.clone()
    x0[:, 0, 2, 5] += 3.0  # one anomalous pixel per image
    result = project(model, x0, steps=200, step_size=0.02, l1_weight=0.05, tolerance=0.0)
    e = result.energies
    assert e.shape == (201, 3)
    assert torch.all(e[1:] <= e[:-1] + 1e-6)
    assert torch.all(e[-1] < 0.5 * e[0])
    # E at the end matches a fresh evaluation at x_T.
    torch.testing.assert_close(e[-1], energy(model, result.projected, x0, 0.05), rtol=1e-5, atol=1e-5)
    pixel_map = projection_map(model, x0, result.projected, "residual")
    assert pixel_map.shape == (3, 8, 8)
    flat_argmax = pixel_map.flatten(1).argmax(1)
    assert torch.all(flat_argmax == 2 * 8 + 5)


def test_standardized_projection_map_is_the_error_in_decoder_standard_deviations() -> None:
    vae = ConvVAE((2, 16, 16), latent_size=4, channels=(4, 8)).eval()
    x0 = vae.standardize(torch.rand(3, 2, 16, 16))
    projected = project(vae, x0, steps=5, step_size=1e-3).projected
    # Brute force, pixel by pixel: decoder Gaussian at z = mu(x_T), squared z-score of x_0, summed over channels.
    with torch.no_grad():
        mean, log_sigma = vae.decode(vae.encode(projected)[0])
    expected = torch.zeros(3, 16, 16)
    for n in range(3):
        for c in range(2):
            expected[n] += ((x0[n, c] - mean[n, c]) / log_sigma[n, c].exp()) ** 2
    torch.testing.assert_close(projection_map(vae, x0, projected, "standardized"), expected, rtol=1e-5, atol=1e-5)
    # A doubled error at one pixel quadruples that pixel's value and leaves the others.
    bumped = x0.clone()
    bumped[0, 1, 3, 4] = mean[0, 1, 3, 4] + 2 * (x0[0, 1, 3, 4] - mean[0, 1, 3, 4])
    diff = projection_map(vae, bumped, projected, "standardized") - expected
    channel_term = ((x0[0, 1, 3, 4] - mean[0, 1, 3, 4]) / log_sigma[0, 1, 3, 4].exp()) ** 2
    torch.testing.assert_close(diff[0, 3, 4], 3 * channel_term, rtol=1e-4, atol=1e-5)
    diff[0, 3, 4] = 0
    assert diff.abs().max() < 1e-5
    # A plain autoencoder has no predicted standard deviation: refused, with the alternatives named.
    with pytest.raises(ValueError, match="residual"):
        projection_map(LinearAutoencoder(torch.randn(64, 5)), torch.zeros(1, 1, 8, 8), torch.zeros(1, 1, 8, 8),
                       "standardized")


def test_projection_survives_a_step_size_that_would_diverge() -> None:
    model = LinearAutoencoder(torch.randn(64, 5))
    x0 = torch.randn(2, 1, 8, 8)
    # alpha = 1e3 multiplies gradients of order 10 by weights of order 1: the plain update explodes.
    plain = x0 - 1e3 * torch.autograd.functional.jacobian(
        lambda x: model.reconstruct_with_loss(x)[1].sum(), x0) * (x0 - model.reconstruct_with_loss(x0)[0]) ** 2
    assert energy(model, plain, x0, 0.05).min() > 1e3 * energy(model, x0, x0, 0.05).max()
    result = project(model, x0, steps=60, step_size=1e3, l1_weight=0.05, tolerance=0.0)
    assert torch.isfinite(result.energies).all()
    assert torch.all(result.energies[1:] <= result.energies[:-1])
    assert torch.all(result.energies[-1] < 0.5 * result.energies[0])


def test_projection_with_the_conv_vae_descends_and_stops_at_tolerance() -> None:
    vae = ConvVAE((1, 16, 16), latent_size=4, channels=(4, 8)).eval()
    x0 = vae.standardize(torch.rand(2, 1, 16, 16))
    result = project(vae, x0, steps=30, step_size=1e-3, l1_weight=0.1, tolerance=0.0)
    assert torch.all(result.energies[1:] <= result.energies[:-1] + 1e-4 * result.energies[0].abs())
    assert torch.all(result.energies[-1] < result.energies[0])
    early = project(vae, x0, steps=30, step_size=1e-3, l1_weight=0.1, tolerance=0.5)
    assert torch.all(early.steps_taken == 1)  # no step lowers E by half: each image stops after one
    assert not any(p.grad is not None for p in vae.parameters())  # weights untouched


def test_anogan_latent_search_lowers_its_loss_and_batches_exactly() -> None:
    gan = DCGAN((1, 16, 16), latent_size=6, channels=(4, 8)).eval()
    # Images the generator cannot reach exactly: no residual sits at the kink of the L1 loss,
    # where float rounding alone could flip a gradient sign between batched and single runs.
    x = 2.0 * torch.rand(3, 1, 16, 16) - 1.0
    z0 = torch.randn(3, 6)
    start = latent_search(gan, x, steps=0, z0=z0)
    end = latent_search(gan, x, steps=60, learning_rate=0.05, z0=z0)
    assert torch.all(end.score < start.score)
    torch.testing.assert_close(end.score, 0.9 * end.residual + 0.1 * end.discrimination)
    one_by_one = torch.cat([latent_search(gan, x[i:i + 1], steps=60, learning_rate=0.05, z0=z0[i:i + 1]).z
                            for i in range(3)])
    torch.testing.assert_close(end.z, one_by_one, rtol=1e-4, atol=1e-4)
    pixel_map = end.anomaly_map(x)
    torch.testing.assert_close(pixel_map, (x - end.generated).abs().sum(1))


def _settings(**kw) -> ImageSettings:
    base = {"vae_channels": [4, 8], "vae_latent_size": 4, "anogan_channels": [4, 8], "anogan_latent_size": 4,
            "mhp_channels": [4, 8], "mhp_latent_size": 4, "mhp_hypotheses": 2, "batch_size": 4,
            "draem_reconstruction_channels": [4, 8], "draem_segmentation_channels": [4, 8],
            "patch_memory_width": 4, "patch_memory_batch_size": 4, "patch_memory_positions": 4,
            "patch_memory_coreset_size": 20,
            "vae_epochs": 2, "anogan_epochs": 2, "mhp_epochs": 2, "draem_epochs": 2, "patch_memory_epochs": 2}
    return ImageSettings(**(base | kw))


@pytest.mark.parametrize("kind", ["conv-vae", "anogan", "mhp-vae", "draem", "patch-memory"])
def test_training_resumes_to_the_same_weights_and_checkpoints_round_trip(kind: str, tmp_path) -> None:
    images = np.random.default_rng(0).random((10, 1, 16, 16), dtype=np.float32)
    # A constant learning rate, so a finished shorter run can be resumed for more epochs.
    constant = {"vae_lr_schedule": "constant", "draem_lr_schedule": "constant"}
    straight, history = train_image_model(kind, images, _settings(**constant), progress=False)
    assert len(history) == 2
    resume = tmp_path / "resume.pt"
    train_image_model(kind, images, _settings(vae_epochs=1, anogan_epochs=1, mhp_epochs=1, draem_epochs=1,
                                              patch_memory_epochs=1, **constant), resume, progress=False)
    # Settings that do not change training (here the projection's) do not invalidate the checkpoint.
    resumed, resumed_history = train_image_model(kind, images, _settings(projection_steps=7, **constant),
                                                 resume, progress=False)
    assert resumed_history == history
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name  # bit for bit
    save_image_model(tmp_path / "m.pt", resumed, {"note": "test"})
    loaded, metadata = load_image_model(tmp_path / "m.pt")
    assert metadata["note"] == "test" and not loaded.training
    for a, b in zip(resumed.state_dict().values(), loaded.state_dict().values()):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("kind", ["conv-vae", "anogan", "mhp-vae", "draem", "patch-memory"])
def test_channels_last_models_compute_the_default_layouts_gradients(kind: str, tmp_path) -> None:
    """build_model and load_image_model give channels-last weights; a training step in that layout computes the
    gradients the same step computes in PyTorch's default layout (the layout changes speed, not arithmetic)."""
    s = _settings()
    images = torch.rand(4, 1, 16, 16, generator=torch.Generator().manual_seed(3))
    model = image_training.build_model(kind, (1, 16, 16), s)
    if hasattr(model, "standardizer"):
        model.standardizer.fit(images)

    def conv_weights(net: nn.Module) -> list[torch.Tensor]:
        return [m.weight for m in net.modules() if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d))]

    assert conv_weights(model) and all(w.is_contiguous(memory_format=torch.channels_last) for w in conv_weights(model))
    default = copy.deepcopy(model).to(memory_format=torch.contiguous_format)
    assert not all(w.is_contiguous(memory_format=torch.channels_last) for w in conv_weights(default))
    step = image_training.STEPS[kind][0]
    for net in (model, default):
        optimizers = image_training.build_optimizers(kind, net, s)
        for group in (g for optimizer in optimizers for g in optimizer.param_groups):
            group["lr"] = 0.0  # the step leaves its gradients and moves nothing
        step(net.train(), optimizers, images, torch.Generator().manual_seed(4), s)
    gradients = [(name, a.grad, b.grad) for (name, a), b in zip(model.named_parameters(), default.parameters())]
    assert all(a is not None for _, a, _ in gradients)
    # Biases ahead of batch norm have gradient 0 up to rounding, so the absolute tolerance follows the largest gradient.
    scale = max(float(b.abs().max()) for _, _, b in gradients)
    for name, a, b in gradients:
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-5 * scale, msg=lambda m: f"{name}: {m}")
    save_image_model(tmp_path / "m.pt", default, {})
    loaded = load_image_model(tmp_path / "m.pt")[0]
    assert all(w.is_contiguous(memory_format=torch.channels_last) for w in conv_weights(loaded))


def test_cosine_learning_rate_anneals_over_the_run_and_only_for_the_models_set_to_it() -> None:
    cosine = ImageSettings(vae_lr_schedule="cosine")
    factors = [learning_rate_factor("conv-vae", cosine, epoch, 10) for epoch in range(10)]
    assert factors[0] > 0.95 and 0.0 < factors[-1] < 0.05
    assert all(a > b for a, b in zip(factors, factors[1:]))
    assert learning_rate_factor("conv-vae", ImageSettings(vae_lr_schedule="constant"), 9, 10) == 1.0
    assert learning_rate_factor("mhp-vae", cosine, 9, 10) == 1.0
    assert learning_rate_factor("draem", ImageSettings(draem_lr_schedule="cosine"), 9, 10) == factors[-1]
    assert learning_rate_factor("draem", ImageSettings(draem_lr_schedule="constant"), 9, 10) == 1.0
    with pytest.raises(InputError, match="vae_lr_schedule"):
        ImageSettings(vae_lr_schedule="step")


def test_vertical_flips_change_training_and_are_part_of_the_checkpoint_fingerprint(tmp_path) -> None:
    images = np.random.default_rng(2).random((8, 1, 16, 16), dtype=np.float32)
    images[:, :, :8] *= 0.2  # dark top half: a vertical flip makes a different image
    plain, _ = train_image_model("conv-vae", images, _settings(vae_epochs=1), tmp_path / "r.pt", progress=False)
    flipped, history = train_image_model("conv-vae", images, _settings(vae_epochs=1, vertical_flip=True),
                                         tmp_path / "r.pt", progress=False)
    assert any(not torch.equal(a, b) for a, b in zip(plain.state_dict().values(), flipped.state_dict().values()))
    # Without flips, the same settings give the same weights again (the checkpoint of the flipped run is not reused).
    again, _ = train_image_model("conv-vae", images, _settings(vae_epochs=1), tmp_path / "r.pt", progress=False)
    for a, b in zip(plain.state_dict().values(), again.state_dict().values()):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("kind", ["conv-vae", "draem"])
def test_cosine_training_interrupted_mid_run_resumes_to_the_same_weights(kind: str, tmp_path, monkeypatch) -> None:
    images = np.random.default_rng(1).random((10, 1, 16, 16), dtype=np.float32)
    settings = _settings(vae_epochs=3, draem_epochs=3, vae_lr_schedule="cosine", draem_lr_schedule="cosine")
    straight, history = train_image_model(kind, images, settings, progress=False)
    seen_rates = []
    epochs_field = image_training.STEPS[kind][1]
    real_step = image_training.STEPS[kind][0]

    def recording_step(model, optimizers, *args):
        seen_rates.append(optimizers[0].param_groups[0]["lr"])
        return real_step(model, optimizers, *args)

    def interrupt_at_third_epoch(kind, s, epoch, n_epochs):
        if epoch == 2:
            raise KeyboardInterrupt
        return learning_rate_factor(kind, s, epoch, n_epochs)

    resume = tmp_path / "resume.pt"
    with monkeypatch.context() as patch:
        patch.setitem(image_training.STEPS, kind, (recording_step, epochs_field))
        patch.setattr(image_training, "learning_rate_factor", interrupt_at_third_epoch)
        with pytest.raises(KeyboardInterrupt):
            train_image_model(kind, images, settings, resume, progress=False)
    # The rate fell from epoch to epoch (3 batches of 4, 4 and 2 images per epoch).
    assert seen_rates[0] > seen_rates[-1] > 0 and len(set(seen_rates)) == 2
    resumed, resumed_history = train_image_model(kind, images, settings, resume, progress=False)
    assert resumed_history == history
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name  # bit for bit
    # A checkpoint of a cosine run for other epochs is not resumed (its rates differ): trained afresh instead.
    longer_settings = _settings(vae_epochs=4, draem_epochs=4, vae_lr_schedule="cosine", draem_lr_schedule="cosine")
    _, longer = train_image_model(kind, images, longer_settings, resume, progress=False)
    assert len(longer) == 4 and longer[:3] != history


def test_anogan_search_chunk_follows_the_device_unless_set() -> None:
    assert anogan_search_chunk("auto", torch.device("cpu")) == AUTO_SEARCH_CHUNK["cpu"]
    assert anogan_search_chunk("auto", torch.device("cuda")) == AUTO_SEARCH_CHUNK["cuda"]
    assert anogan_search_chunk(7, torch.device("cpu")) == 7
    for bad in (0, "large"):
        with pytest.raises(InputError):
            ImageSettings(anogan_search_batch_size=bad)
