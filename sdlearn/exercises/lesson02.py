"""Checkers for lesson 02 (variational autoencoders).

    from sdlearn.exercises import lesson02 as ex
    ex.check_reparameterise(reparameterise)      # z = mu + sigma * eps
    ex.check_kl_divergence(kl_divergence)        # KL(N(mu, sigma^2) || N(0, I))
    ex.check_elbo_loss(elbo_loss)                # reconstruction + beta * KL

The references are sdlearn.autoencoder.reparameterise, kl_divergence and elbo_loss; the
wrong variants below are the mistakes people make most often with these three formulas.
"""

import torch

from sdlearn import autoencoder
from sdlearn.exercises.core import Case, Mistake, checker


def _gaussians(seed: int, batch: int, dim: int) -> tuple:
    """Seeded mu, logvar (B, d); logvar spans negative and positive values so every mistake shows."""
    g = torch.Generator().manual_seed(seed)
    mu = torch.randn(batch, dim, generator=g)
    logvar = 1.5 * torch.randn(batch, dim, generator=g)
    return mu, logvar


# ------------------------------------------------------------------------------------------
# Reparameterisation: z = mu + exp(logvar / 2) * eps
# ------------------------------------------------------------------------------------------


def _reparameterise_cases() -> list:
    cases = []
    for seed, batch, dim in [(0, 4, 2), (1, 3, 5), (2, 6, 16)]:
        mu, logvar = _gaussians(seed, batch, dim)
        eps = torch.randn(batch, dim, generator=torch.Generator().manual_seed(100 + seed))
        cases.append(Case(mu, logvar, eps))
    return cases


REPARAMETERISE_MISTAKES = [
    Mistake(lambda mu, logvar, eps: mu + logvar * eps,
            "You used the log-variance as the standard deviation. sigma = exp(logvar / 2)."),
    Mistake(lambda mu, logvar, eps: mu + torch.exp(logvar) * eps,
            "You multiplied eps by exp(logvar), which is the variance sigma^2. The standard deviation is exp(0.5 * logvar)."),
    Mistake(lambda mu, logvar, eps: mu + torch.exp(-0.5 * logvar) * eps,
            "You used exp(-logvar / 2) = 1 / sigma. The standard deviation is exp(+0.5 * logvar)."),
    Mistake(lambda mu, logvar, eps: torch.exp(0.5 * logvar) * eps,
            "You forgot the mean: z = mu + sigma * eps."),
    Mistake(lambda mu, logvar, eps: mu + eps,
            "You ignored sigma: every dimension got unit noise. Scale eps by sigma = exp(logvar / 2)."),
]


@checker(autoencoder.reparameterise, _reparameterise_cases, name="reparameterise", mistakes=REPARAMETERISE_MISTAKES)
def check_reparameterise(fn) -> bool:
    """fn(mu, logvar, eps) -> z = mu + exp(logvar / 2) * eps, all (B, d)."""


# ------------------------------------------------------------------------------------------
# KL(N(mu, sigma^2) || N(0, I)) = 1/2 sum_j (mu_j^2 + sigma_j^2 - 1 - log sigma_j^2)
# ------------------------------------------------------------------------------------------


def _kl_terms(mu, logvar):
    return 0.5 * (mu**2 + torch.exp(logvar) - 1 - logvar)  # (B, d)


KL_CASES = [Case(*_gaussians(seed, batch, dim)) for seed, batch, dim in [(3, 4, 2), (4, 3, 8), (5, 5, 3)]]

KL_MISTAKES = [
    Mistake(lambda mu, logvar: (2 * _kl_terms(mu, logvar)).sum(dim=1).mean(),
            "You forgot the factor 1/2 in front of the sum."),
    Mistake(lambda mu, logvar: _kl_terms(mu, logvar).mean(),
            "You averaged over the latent dimensions. Sum over the dimensions of each example, then average over the batch."),
    Mistake(lambda mu, logvar: _kl_terms(mu, logvar).sum(),
            "You summed over the batch too. Sum over each example's dimensions, then take the mean over the batch."),
    Mistake(lambda mu, logvar: _kl_terms(mu, logvar).sum(dim=1),
            "You returned one KL per example. Average over the batch to get one number."),
    Mistake(lambda mu, logvar: (0.5 * (mu**2 + logvar**2 - 1 - torch.log(logvar**2))).sum(dim=1).mean(),
            "You used logvar as if it were sigma. sigma^2 = exp(logvar), and log sigma^2 is logvar itself."),
    Mistake(lambda mu, logvar: (0.5 * (mu**2 + torch.exp(0.5 * logvar) - 1 - logvar)).sum(dim=1).mean(),
            "You used exp(0.5 * logvar) (the standard deviation) where the formula has sigma^2 = exp(logvar)."),
    Mistake(lambda mu, logvar: (0.5 * (mu**2 + torch.exp(logvar) - 1 + logvar)).sum(dim=1).mean(),
            "The sign of the log term is wrong: it is - log sigma^2 = - logvar."),
    Mistake(lambda mu, logvar: (0.5 * (mu**2 + torch.exp(logvar) - logvar)).sum(dim=1).mean(),
            "You left out the -1. Without it the KL of N(0, I) against itself is not 0."),
]


@checker(autoencoder.kl_divergence, KL_CASES, name="kl_divergence", mistakes=KL_MISTAKES)
def check_kl_divergence(fn) -> bool:
    """fn(mu, logvar) -> scalar: KL summed over the latent dimensions, averaged over the batch."""


# ------------------------------------------------------------------------------------------
# The loss: reconstruction + beta * KL (the negative ELBO when beta = 1)
# ------------------------------------------------------------------------------------------


def _elbo_cases() -> list:
    cases = []
    for seed, batch, shape, dim, beta in [(6, 4, (3, 8, 8), 2, 0.5), (7, 3, (3, 4, 4), 6, 4.0), (8, 5, (1, 6, 6), 3, 2.0)]:
        g = torch.Generator().manual_seed(seed)
        x = torch.rand(batch, *shape, generator=g) * 2 - 1
        x_recon = x + 0.2 * torch.randn(batch, *shape, generator=g)
        mu, logvar = _gaussians(seed + 50, batch, dim)
        cases.append(Case(x, x_recon, mu, logvar, beta))
    return cases


def _sse(x, x_recon):
    return ((x - x_recon) ** 2).reshape(x.shape[0], -1).sum(dim=1)  # (B,)


def _kl(mu, logvar):
    return _kl_terms(mu, logvar).sum(dim=1)  # (B,)


ELBO_MISTAKES = [
    Mistake(lambda x, xr, mu, lv, beta: ((x - xr) ** 2).mean() + beta * _kl(mu, lv).mean(),
            "Your reconstruction term is the mean squared error. Sum the squared errors over each image (the Gaussian "
            "log-likelihood sums over pixels), then average over the batch."),
    Mistake(lambda x, xr, mu, lv, beta: beta * _sse(x, xr).mean() + _kl(mu, lv).mean(),
            "You put beta on the reconstruction term. beta weights the KL term: rec + beta * KL."),
    Mistake(lambda x, xr, mu, lv, beta: _sse(x, xr).mean() + _kl(mu, lv).mean(),
            "You ignored beta. Multiply the KL term by beta."),
    Mistake(lambda x, xr, mu, lv, beta: _sse(x, xr).mean() - beta * _kl(mu, lv).mean(),
            "You subtracted the KL term. The ELBO subtracts it, so the loss (the negative ELBO) adds it."),
    Mistake(lambda x, xr, mu, lv, beta: -(_sse(x, xr).mean() + beta * _kl(mu, lv).mean()),
            "You returned the ELBO itself. We minimise the loss = -ELBO = reconstruction + beta * KL."),
    Mistake(lambda x, xr, mu, lv, beta: _sse(x, xr).sum() + beta * _kl(mu, lv).sum(),
            "You summed over the batch. Average the per-image loss over the batch."),
]


@checker(autoencoder.elbo_loss, _elbo_cases, name="elbo_loss", mistakes=ELBO_MISTAKES, atol=1e-4)
def check_elbo_loss(fn) -> bool:
    """fn(x, x_recon, mu, logvar, beta) -> scalar: per-image sum of squared errors + beta * KL, averaged over the batch."""
