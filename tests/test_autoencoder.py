"""The teaching autoencoder and VAE (sdlearn.autoencoder): formulas, conventions, models, helpers."""

import math

import pytest
import torch
from torch.distributions import Normal, kl_divergence as torch_kl

from sdlearn import autoencoder as ae
from sdlearn.datasets import HELD_OUT, COLOUR_NAMES, SHAPES
from sdlearn.train import train


def gaussians(seed=0, batch=3, dim=4):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, dim, generator=g), torch.randn(batch, dim, generator=g)


# ------------------------------------------------------------------------------------------
# reparameterise
# ------------------------------------------------------------------------------------------


def test_reparameterise_samples_have_the_posterior_mean_and_std():
    mu, logvar = torch.tensor([[1.5, -2.0]]), torch.tensor([[0.0, math.log(0.25)]])  # sigma = 1, 0.5
    eps = torch.randn(200_000, 2, generator=torch.Generator().manual_seed(0))
    z = ae.reparameterise(mu, logvar, eps)  # broadcasts (1, 2) against (N, 2)
    assert torch.allclose(z.mean(0), mu[0], atol=0.01)
    assert torch.allclose(z.std(0), torch.tensor([1.0, 0.5]), atol=0.01)


def test_reparameterise_gradient_flows_to_mu_and_logvar():
    mu, logvar = gaussians(1)
    mu.requires_grad_(True)
    logvar.requires_grad_(True)
    eps = torch.randn(mu.shape, generator=torch.Generator().manual_seed(2))
    ae.reparameterise(mu, logvar, eps).sum().backward()
    # dz/dmu = 1, dz/dlogvar = 0.5 * sigma * eps
    assert torch.equal(mu.grad, torch.ones_like(mu))
    assert torch.allclose(logvar.grad, 0.5 * torch.exp(0.5 * logvar.detach()) * eps)


def test_reparameterise_does_not_modify_inputs():
    mu, logvar = gaussians(3)
    before = (mu.clone(), logvar.clone())
    ae.reparameterise(mu, logvar, torch.ones_like(mu))
    assert torch.equal(mu, before[0]) and torch.equal(logvar, before[1])


# ------------------------------------------------------------------------------------------
# kl_divergence
# ------------------------------------------------------------------------------------------


def test_kl_is_zero_for_the_prior_and_positive_otherwise():
    zeros = torch.zeros(4, 3)
    assert ae.kl_divergence(zeros, zeros).item() == 0.0
    mu, logvar = gaussians(4)
    assert ae.kl_divergence(mu, logvar).item() > 0


def test_kl_matches_torch_distributions():
    mu, logvar = gaussians(5, batch=5, dim=6)
    q, p = Normal(mu, torch.exp(0.5 * logvar)), Normal(torch.zeros_like(mu), torch.ones_like(mu))
    want = torch_kl(q, p).sum(dim=1).mean()  # sum over dims, mean over the batch
    assert torch.allclose(ae.kl_divergence(mu, logvar), want, atol=1e-5)


def test_kl_matches_a_monte_carlo_estimate():
    mu, logvar = torch.tensor([[0.8, -0.3, 1.2]]), torch.tensor([[-0.5, 0.4, -1.0]])
    sigma = torch.exp(0.5 * logvar)
    z = mu + sigma * torch.randn(400_000, 3, generator=torch.Generator().manual_seed(6))
    # KL = E_q[log q(z) - log p(z)]
    log_q = Normal(mu, sigma).log_prob(z).sum(dim=1)
    log_p = Normal(0.0, 1.0).log_prob(z).sum(dim=1)
    estimate = (log_q - log_p).mean().item()
    exact = ae.kl_divergence(mu, logvar).item()
    assert abs(estimate - exact) < 0.01 * exact + 0.005, (estimate, exact)


def test_kl_sums_over_dimensions_and_averages_over_the_batch():
    mu, logvar = gaussians(7, batch=4, dim=5)
    per_example = torch.stack([ae.kl_divergence(mu[i : i + 1], logvar[i : i + 1]) for i in range(4)])
    assert torch.allclose(ae.kl_divergence(mu, logvar), per_example.mean())
    split = ae.kl_divergence(mu[:, :2], logvar[:, :2]) + ae.kl_divergence(mu[:, 2:], logvar[:, 2:])
    assert torch.allclose(ae.kl_divergence(mu, logvar), split)
    # spatial latents (B, C, h, w), as AutoencoderKL has: summed over C, h, w
    mu4, logvar4 = mu.reshape(4, 5, 1, 1), logvar.reshape(4, 5, 1, 1)
    assert torch.allclose(ae.kl_divergence(mu4, logvar4), ae.kl_divergence(mu, logvar))


def test_kl_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="same shape"):
        ae.kl_divergence(torch.zeros(2, 3), torch.zeros(2, 4))


# ------------------------------------------------------------------------------------------
# reconstruction_error and elbo_loss
# ------------------------------------------------------------------------------------------


def images(seed, shape=(3, 3, 8, 8)):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(shape, generator=g) * 2 - 1
    return x, x + 0.1 * torch.randn(shape, generator=g)


def test_reconstruction_error_is_a_gaussian_nll_with_variance_one_half():
    x, x_recon = images(8)
    D = x[0].numel()
    nll = -Normal(x_recon, math.sqrt(0.5)).log_prob(x).flatten(1).sum(dim=1).mean()
    # -log N(x; x_hat, 1/2 I) = ||x - x_hat||^2 + (D / 2) log(pi)
    assert torch.allclose(ae.reconstruction_error(x, x_recon), nll - D / 2 * math.log(math.pi), atol=1e-4)


def test_reconstruction_error_sums_per_image_and_averages_over_the_batch():
    x, x_recon = images(9)
    per_image = ((x - x_recon) ** 2).flatten(1).sum(dim=1)
    assert torch.allclose(ae.reconstruction_error(x, x_recon), per_image.mean())
    doubled = ae.reconstruction_error(torch.cat([x, x]), torch.cat([x_recon, x_recon]))
    assert torch.allclose(doubled, ae.reconstruction_error(x, x_recon))  # independent of batch size
    with pytest.raises(ValueError, match="same shape"):
        ae.reconstruction_error(x, x_recon[:, :2])


def test_elbo_loss_is_reconstruction_plus_beta_kl():
    x, x_recon = images(10)
    mu, logvar = gaussians(11, batch=3, dim=2)
    rec, kl = ae.reconstruction_error(x, x_recon), ae.kl_divergence(mu, logvar)
    assert torch.allclose(ae.elbo_loss(x, x_recon, mu, logvar, beta=0.0), rec)
    assert torch.allclose(ae.elbo_loss(x, x_recon, mu, logvar), rec + kl)  # beta defaults to 1
    assert torch.allclose(ae.elbo_loss(x, x_recon, mu, logvar, beta=4.0), rec + 4 * kl)


# ------------------------------------------------------------------------------------------
# psnr and the scaling factor
# ------------------------------------------------------------------------------------------


def test_psnr_known_values():
    a = torch.zeros(3, 4, 4)
    assert math.isclose(ae.psnr(a, a + 0.2).item(), 20.0, abs_tol=1e-6)  # 10 log10(4 / 0.04)
    assert math.isclose(ae.psnr(a, a + 2.0).item(), 0.0, abs_tol=1e-6)  # the full range: 0 dB
    assert ae.psnr(a, a).item() == math.inf


def test_psnr_of_a_batch_is_the_mean_of_per_image_psnr():
    a = torch.zeros(2, 3, 4, 4)
    b = torch.stack([torch.full((3, 4, 4), 0.2), torch.full((3, 4, 4), 0.02)])  # 20 dB and 40 dB
    assert math.isclose(ae.psnr(a, b).item(), 30.0, abs_tol=1e-6)
    with pytest.raises(ValueError, match="same shape"):
        ae.psnr(a, b[:, :1])


def test_latent_scaling_factor_is_one_over_std():
    latents = 5.49 * torch.randn(64, 4, 8, 8, generator=torch.Generator().manual_seed(12))
    assert math.isclose(ae.latent_scaling_factor(latents), 0.18215, rel_tol=0.02)
    with pytest.raises(ValueError, match="standard deviation"):
        ae.latent_scaling_factor(torch.ones(4, 4))


# ------------------------------------------------------------------------------------------
# The models
# ------------------------------------------------------------------------------------------


def test_autoencoder_shapes_and_bad_input():
    model = ae.Autoencoder.from_config(ae.AutoencoderConfig.tiny())
    x = torch.rand(5, 3, 32, 32) * 2 - 1
    z = model.encode(x)
    assert z.shape == (5, 2)
    assert model.decode(z).shape == x.shape and model(x).shape == x.shape
    with pytest.raises(ValueError, match=r"Expected images \(B, 3, 32, 32\)"):
        model.encode(torch.zeros(2, 3, 64, 64))
    with pytest.raises(ValueError, match=r"Expected codes z of shape \(B, 2\)"):
        model.decode(torch.zeros(2, 3))


def test_vae_shapes_and_seeded_sampling():
    model = ae.VAE.from_config(ae.AutoencoderConfig.small())
    x = torch.rand(4, 3, 32, 32) * 2 - 1
    mu, logvar = model.encode(x)
    assert mu.shape == logvar.shape == (4, 16)
    x_hat, mu2, _ = model(x, generator=torch.Generator().manual_seed(0))
    again, _, _ = model(x, generator=torch.Generator().manual_seed(0))
    assert x_hat.shape == x.shape and torch.equal(x_hat, again) and torch.equal(mu, mu2)
    other, _, _ = model(x, generator=torch.Generator().manual_seed(1))
    assert not torch.equal(x_hat, other)  # the sample really is random


def test_config_checks():
    with pytest.raises(ValueError, match="divisible by 2\\*\\*3"):
        ae.AutoencoderConfig(image_size=36)
    with pytest.raises(ValueError, match="latent_dim"):
        ae.AutoencoderConfig(latent_dim=0)


def test_save_and_load_round_trip(tmp_path):
    model = ae.VAE.from_config(ae.AutoencoderConfig.tiny())
    model.save_pretrained(tmp_path / "vae")
    loaded = ae.VAE.from_pretrained(tmp_path / "vae")
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    assert loaded.config == model.config
    assert torch.equal(loaded.encode(x)[0], model.encode(x)[0])


def test_training_reduces_the_loss_of_both_models():
    x, _ = ae.centred_shapes(32, seed=0)
    for model, loss_fn in [(ae.Autoencoder.from_config(ae.AutoencoderConfig.tiny()), ae.autoencoder_loss),
                           (ae.VAE.from_config(ae.AutoencoderConfig.tiny()), ae.VAELoss(beta=1.0))]:
        history = train(model, loss_fn, ae.ImageBatches(x, 8), steps=30, lr=2e-3, grad_clip=None, progress=False)
        first, last = sum(history.losses[:5]) / 5, sum(history.losses[-5:]) / 5
        assert last < 0.7 * first, (type(model).__name__, first, last)


# ------------------------------------------------------------------------------------------
# Data and latent-space helpers
# ------------------------------------------------------------------------------------------


def test_centred_shapes_are_deterministic_and_honour_the_split():
    x, labels = ae.centred_shapes(40, seed=3)
    again, _ = ae.centred_shapes(20, seed=3)
    assert x.shape == (40, 3, 32, 32) and labels.shape == (40, 2)
    assert torch.equal(x[:20], again)  # item i depends on (seed, i) only
    assert x.min() >= -1 and x.max() <= 1
    pairs = {(COLOUR_NAMES[c], SHAPES[s]) for c, s in labels.tolist()}
    assert not pairs & set(HELD_OUT)
    _, test_labels = ae.centred_shapes(40, seed=3, split="test")
    assert {(COLOUR_NAMES[c], SHAPES[s]) for c, s in test_labels.tolist()} <= set(HELD_OUT)
    # the corners of the frame are background (white), the centre is the shape (not white)
    assert (x[:, :, 0, 0] == 1).all() and (x[:, :, 16, 16] < 0.9).any(dim=1).all()


def test_image_batches_depend_only_on_seed_and_step():
    x = torch.arange(50.0).reshape(50, 1, 1, 1)
    a, b = ae.ImageBatches(x, 8, seed=1), ae.ImageBatches(x, 8, seed=1)
    assert torch.equal(a(7), b(7)) and not torch.equal(a(7), a(8))
    with pytest.raises(ValueError, match="non-empty"):
        ae.ImageBatches(torch.zeros(0, 3, 4, 4))


def test_nearest_distance_matches_brute_force():
    g = torch.Generator().manual_seed(13)
    refs, queries = torch.randn(30, 3, 4, 4, generator=g), torch.randn(7, 3, 4, 4, generator=g)
    brute = torch.stack([((q - refs) ** 2).flatten(1).mean(dim=1).min() for q in queries])
    assert torch.allclose(ae.nearest_distance(queries, refs, batch_size=3), brute, atol=1e-5)
    assert ae.nearest_distance(refs[:4], refs).max() < 1e-6


def test_knn_accuracy_on_separable_and_random_labels():
    g = torch.Generator().manual_seed(14)
    labels = torch.arange(4).repeat_interleave(25)
    centres = 10 * torch.randn(4, 2, generator=g)
    codes = centres[labels] + 0.1 * torch.randn(100, 2, generator=g)
    query = centres[labels] + 0.1 * torch.randn(100, 2, generator=g)
    assert ae.knn_accuracy(codes, labels, query, labels, k=5) == 1.0
    shuffled = labels[torch.randperm(100, generator=g)]
    assert ae.knn_accuracy(codes, shuffled, query, labels, k=5) < 0.6


def test_decode_grid_and_interpolate():
    model = ae.Autoencoder.from_config(ae.AutoencoderConfig.tiny()).eval()
    grid = ae.decode_grid(model, (-1.0, -2.0), (1.0, 2.0), n=3)
    assert grid.shape == (9, 3, 32, 32)
    with torch.no_grad():
        top_left = model.decode(torch.tensor([[-1.0, 2.0]]))  # row 0 = highest z_2, column 0 = lowest z_1
        bottom_right = model.decode(torch.tensor([[1.0, -2.0]]))
    assert torch.allclose(grid[0], top_left[0], atol=1e-6) and torch.allclose(grid[8], bottom_right[0], atol=1e-6)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    path = ae.interpolate(model, x[0], x[1], n=5)
    assert path.shape == (5, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(path[0], model(x[:1])[0], atol=1e-5) and torch.allclose(path[-1], model(x[1:])[0], atol=1e-5)
    with pytest.raises(ValueError, match="2-D latent"):
        ae.decode_grid(ae.Autoencoder.from_config(ae.AutoencoderConfig.small()), (0, 0), (1, 1))


def test_the_teaching_models_keep_their_convolutions_channels_last_with_the_same_outputs():
    """A layout for speed only: the same model with ordinary (NCHW) weights gives the same outputs."""
    import copy

    from sdlearn.autoencoder import Autoencoder, AutoencoderConfig, VAE

    x = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    for cls in (Autoencoder, VAE):
        torch.manual_seed(0)
        model = cls.from_config(AutoencoderConfig.tiny())
        convs = [p for p in model.parameters() if p.dim() == 4]
        assert convs and all(p.is_contiguous(memory_format=torch.channels_last) for p in convs)
        plain = copy.deepcopy(model).to(memory_format=torch.contiguous_format)
        assert all(p.is_contiguous() for p in plain.parameters())
        encode = lambda m: m.encode(x)[0] if cls is VAE else m.encode(x)  # noqa: E731
        assert torch.allclose(encode(model), encode(plain), atol=1e-5)
        z = torch.randn(4, model.config.latent_dim, generator=torch.Generator().manual_seed(1))
        assert torch.allclose(model.decode(z), plain.decode(z), atol=1e-5)
