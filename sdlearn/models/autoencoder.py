"""Autoencoders and variational autoencoders: where Stable Diffusion's latent space comes from.

Notation (used in lessons 01-02 and in the code below):

    x        an image (B, 3, S, S) with values in [-1, 1]
    z        its latent code (B, d); d = latent_dim, 2 when we want to plot it
    x_hat    the reconstruction D(z)
    mu, logvar, sigma    the encoder's Gaussian q(z | x) = N(mu, diag(sigma^2)),
             logvar = log sigma^2 (a log keeps sigma positive whatever the network outputs)
    eps      standard normal noise, eps ~ N(0, I)
    beta     the weight of the KL term

1. Autoencoder. An encoder E squeezes x into a few numbers, a decoder D brings it back, and
   both are trained to make the round trip faithful:

       z = E(x),   x_hat = D(z),   loss = ||x - x_hat||^2        (per image, then batch mean)

   Nothing asks the codes of real images to fill any particular region of latent space,
   so a z chosen at random usually decodes to something that is not an image of the data.

2. Variational autoencoder (Kingma & Welling 2014). The encoder outputs a distribution
   q(z | x), the decoder a likelihood p(x | z) = N(x; D(z), s^2 I), and the prior is
   p(z) = N(0, I). For any q, since KL(q(z|x) || p(z|x)) >= 0,

       log p(x) = E_q[log p(x | z)] - KL(q(z | x) || p(z)) + KL(q(z | x) || p(z | x))
               >= E_q[log p(x | z)] - KL(q(z | x) || p(z))                        (the ELBO)

   Training maximises the ELBO. The KL term pulls every q(z | x) towards N(0, I), so the
   codes of real images cover the region the prior samples from: sampling z ~ N(0, I) and
   decoding it now gives images, and the path between two codes stays among images.

   Reparameterisation trick. The expectation is estimated with one sample of z; written as

       z = mu + sigma * eps,    sigma = exp(logvar / 2),    eps ~ N(0, I)

   the randomness sits in eps, so gradients flow through mu and sigma to the encoder.

   KL of a diagonal Gaussian against N(0, I), in closed form, summed over the d dimensions:

       KL = 1/2 * sum_j (mu_j^2 + sigma_j^2 - 1 - log sigma_j^2)
          = 1/2 * sum_j (mu_j^2 + exp(logvar_j) - 1 - logvar_j)

   It is 0 exactly when mu = 0 and sigma = 1.

   Reconstruction term. With s^2 = 1/2, -log p(x | z) = ||x - D(z)||^2 + const: the sum of
   squared errors over the pixels (and channels) of one image. The loss is

       L(x) = ||x - x_hat||^2 + beta * KL(q(z | x) || N(0, I))

   beta = 1 is the negative ELBO (up to a constant); other values give the beta-VAE of
   Higgins et al. (2017). Choosing another s is the same as choosing another beta
   (beta = 2 s^2), so beta is *the* knob between sharp reconstructions and a tidy latent.

   Batch convention (kl_divergence, reconstruction_error, elbo_loss): each term is summed
   over the dimensions of one example, then averaged over the batch. A sum over an image
   is what the likelihood says; the batch mean keeps the loss independent of batch size.

3. Stable Diffusion's autoencoder (sdlearn.vae.AutoencoderKL) is a convolutional VAE with a
   spatial latent (4 channels, 8 times smaller per side) and a *tiny* KL weight (1e-6), so
   its latents are far from unit variance. The diffusion model is trained on
   scaling_factor * z, with scaling_factor = 1 / std(z) estimated once from a batch of training
   latents (the `scale_factor` of CompVis' LatentDiffusion): 0.18215 = 1 / 5.49 for SD.

4. PSNR, the usual reconstruction score, for images in [-1, 1] (a range R = 2):

       PSNR = 10 log10(R^2 / MSE) dB,    MSE = mean squared error over one image's pixels

   computed per image and averaged over the batch. +6 dB halves the RMS error; 30 dB is an
   RMS error of 2 / 10^1.5 = 0.063, i.e. 8 levels out of 255.

References: Kingma & Welling, "Auto-Encoding Variational Bayes" (2014); Higgins et al.,
"beta-VAE" (2017); Rombach et al., "High-Resolution Image Synthesis with Latent Diffusion
Models" (2022); Doersch, "Tutorial on Variational Autoencoders" (2016).
"""

import math
from dataclasses import dataclass

import torch
from torch import nn

from sdlearn.models.checkpoint import ModelConfig, Pretrained


@dataclass
class AutoencoderConfig(ModelConfig):
    """A small convolutional autoencoder: `channels` stride-2 levels, then a linear bottleneck."""

    image_size: int = 32
    in_channels: int = 3
    channels: tuple = (32, 64, 128)  # one stride-2 level each: 32 -> 16 -> 8 -> 4
    latent_dim: int = 2

    @classmethod
    def tiny(cls, **overrides) -> "AutoencoderConfig":
        """2-D latent for 32x32 images: every code is a point we can plot (lessons 01-02)."""
        return cls(**{**dict(image_size=32, channels=(32, 64, 128), latent_dim=2), **overrides})

    @classmethod
    def small(cls, **overrides) -> "AutoencoderConfig":
        """A 16-D latent for 32x32 images: sharper reconstructions, no longer plottable."""
        return cls(**{**dict(image_size=32, channels=(32, 64, 128), latent_dim=16), **overrides})

    def __post_init__(self):
        levels = len(self.channels)
        if levels < 1 or self.image_size % 2**levels:
            raise ValueError(
                f"image_size {self.image_size} must be divisible by 2**{levels} (one halving per entry of "
                f"channels={tuple(self.channels)}). Use e.g. image_size=32 with 3 levels."
            )
        if self.latent_dim < 1:
            raise ValueError(f"latent_dim must be at least 1, got {self.latent_dim}.")

    @property
    def bottom_size(self) -> int:
        """Side of the smallest feature map, before the linear bottleneck."""
        return self.image_size // 2 ** len(self.channels)


# ------------------------------------------------------------------------------------------
# The VAE's three formulas, and the scores
# ------------------------------------------------------------------------------------------


def reparameterise(mu: torch.Tensor, logvar: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """z = mu + sigma * eps with sigma = exp(logvar / 2): a sample of N(mu, sigma^2), differentiable in mu and logvar."""
    sigma = torch.exp(0.5 * logvar)  # the standard deviation, not the variance exp(logvar)
    return mu + sigma * eps


def _sum_per_example(values: torch.Tensor) -> torch.Tensor:
    """(B, ...) -> (B,): sum over every dimension but the batch."""
    return values.reshape(values.shape[0], -1).sum(dim=1)


def kl_divergence(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, diag(exp(logvar))) || N(0, I)): summed over the latent dimensions of each example,
    averaged over the batch (dim 0). A scalar; 0 exactly when mu = 0 and logvar = 0."""
    if mu.shape != logvar.shape:
        raise ValueError(f"mu {tuple(mu.shape)} and logvar {tuple(logvar.shape)} must have the same shape (B, ...).")
    per_dim = 0.5 * (mu**2 + torch.exp(logvar) - 1.0 - logvar)  # (B, d) or (B, C, h, w)
    return _sum_per_example(per_dim).mean()


def reconstruction_error(x: torch.Tensor, x_recon: torch.Tensor) -> torch.Tensor:
    """Sum of squared errors over each image's pixels and channels, averaged over the batch (a scalar)."""
    if x.shape != x_recon.shape:
        raise ValueError(f"x {tuple(x.shape)} and x_recon {tuple(x_recon.shape)} must have the same shape (B, C, H, W).")
    return _sum_per_example((x - x_recon) ** 2).mean()


def elbo_loss(x: torch.Tensor, x_recon: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor, beta: float = 1.0) -> torch.Tensor:
    """The (beta-weighted) negative ELBO per image, averaged over the batch:
    reconstruction_error(x, x_recon) + beta * kl_divergence(mu, logvar). Lower is better."""
    return reconstruction_error(x, x_recon) + beta * kl_divergence(mu, logvar)


def latent_scaling_factor(latents: torch.Tensor) -> float:
    """1 / std of all latent values: what makes the diffusion model see unit-variance latents (SD: 0.18215)."""
    std = latents.detach().double().std().item()
    if not math.isfinite(std) or std == 0.0:
        raise ValueError(f"The latents have standard deviation {std}; pass the encodings of many real images.")
    return 1.0 / std


def psnr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Peak signal-to-noise ratio in dB for images in [-1, 1]: 10 log10(2^2 / MSE).

    (C, H, W) -> a 0-d tensor; (B, C, H, W) -> the mean over images of each image's PSNR.
    Identical images give inf. Clamp model outputs to [-1, 1] first, as shown images are.
    """
    if a.shape != b.shape or a.dim() not in (3, 4):
        raise ValueError(f"psnr expects two images (C, H, W) or batches (B, C, H, W) of the same shape, got {tuple(a.shape)} and {tuple(b.shape)}.")
    if a.dim() == 3:
        a, b = a[None], b[None]
    mse = ((a.double() - b.double()) ** 2).reshape(a.shape[0], -1).mean(dim=1)  # (B,)
    return (10.0 * torch.log10(4.0 / mse)).mean()


# ------------------------------------------------------------------------------------------
# Encoder and decoder
# ------------------------------------------------------------------------------------------


class Encoder(nn.Module):
    """x (B, C, S, S) -> (B, out_dim): stride-2 convolutions, then one linear layer."""

    def __init__(self, config: AutoencoderConfig, out_dim: int):
        super().__init__()
        layers, c_in = [], config.in_channels
        for c in config.channels:
            layers += [nn.Conv2d(c_in, c, kernel_size=3, stride=2, padding=1), nn.SiLU()]
            c_in = c
        self.convs = nn.Sequential(*layers)
        self.linear = nn.Linear(c_in * config.bottom_size**2, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.convs(x)  # (B, channels[-1], S / 2^levels, S / 2^levels)
        return self.linear(h.flatten(1))  # (B, out_dim)


class Decoder(nn.Module):
    """z (B, d) -> x_hat (B, C, S, S): one linear layer, then (nearest 2x upsample, conv) per level."""

    def __init__(self, config: AutoencoderConfig):
        super().__init__()
        widths = list(reversed(config.channels))  # widest first, as the encoder ended
        self.bottom = (widths[0], config.bottom_size, config.bottom_size)
        self.linear = nn.Linear(config.latent_dim, math.prod(self.bottom))
        layers = []
        for c_in, c_out in zip(widths, widths[1:] + [widths[-1]]):
            layers += [nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(c_in, c_out, kernel_size=3, padding=1), nn.SiLU()]
        self.convs = nn.Sequential(*layers)
        # No squashing at the end: the output is the mean of a Gaussian; clamp to [-1, 1] to show it.
        self.conv_out = nn.Conv2d(widths[-1], config.in_channels, kernel_size=3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = torch.nn.functional.silu(self.linear(z)).view(z.shape[0], *self.bottom)  # (B, C_last, s, s)
        return self.conv_out(self.convs(h))  # (B, C, S, S)


# ------------------------------------------------------------------------------------------
# The models
# ------------------------------------------------------------------------------------------


class _Codec(Pretrained, nn.Module):
    """What the two models share: the config, input checks, decode() and the weights' memory layout.

    The convolution weights are kept channels-last (NHWC strides; the values and shapes are
    unchanged): the CPU's convolutions run faster in that layout, so lessons 01-02 train
    their models in less time (tests/test_autoencoder.py checks the outputs are the same).
    """

    config_class = AutoencoderConfig

    def _channels_last(self) -> None:
        self.to(memory_format=torch.channels_last)  # 4-D weights only; linear layers are untouched

    def _check_images(self, x: torch.Tensor) -> None:
        c = self.config
        want = (c.in_channels, c.image_size, c.image_size)
        if not isinstance(x, torch.Tensor) or x.dim() != 4 or tuple(x.shape[1:]) != want:
            got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(
                f"Expected images (B, {c.in_channels}, {c.image_size}, {c.image_size}) in [-1, 1], got {got}. "
                f"Make the dataset with size={c.image_size}, or build the model with image_size={x.shape[-1] if isinstance(x, torch.Tensor) else '...'}."
            )

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Images (B, C, S, S) from codes z (B, latent_dim)."""
        if not isinstance(z, torch.Tensor) or z.dim() != 2 or z.shape[1] != self.config.latent_dim:
            got = tuple(z.shape) if isinstance(z, torch.Tensor) else type(z).__name__
            raise ValueError(f"Expected codes z of shape (B, {self.config.latent_dim}), got {got}.")
        return self.decoder(z)


class Autoencoder(_Codec):
    """A plain autoencoder: encode(x) -> z (B, d), decode(z) -> x_hat, forward(x) -> x_hat."""

    def __init__(self, config: AutoencoderConfig):
        super().__init__()
        self.config = config
        self.encoder = Encoder(config, config.latent_dim)
        self.decoder = Decoder(config)
        self._channels_last()

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        self._check_images(x)
        return self.encoder(x)  # (B, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x))


class VAE(_Codec):
    """A variational autoencoder: encode(x) -> (mu, logvar), each (B, d); decode(z) -> x_hat;
    forward(x) -> (x_hat, mu, logvar) with z = mu + sigma * eps sampled by reparameterise."""

    def __init__(self, config: AutoencoderConfig):
        super().__init__()
        self.config = config
        self.encoder = Encoder(config, 2 * config.latent_dim)  # [mu | logvar]
        self.decoder = Decoder(config)
        self._channels_last()

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self._check_images(x)
        mu, logvar = self.encoder(x).chunk(2, dim=1)  # (B, d) each
        return mu, logvar

    def forward(self, x: torch.Tensor, generator: torch.Generator | None = None):
        mu, logvar = self.encode(x)
        eps = torch.randn(mu.shape, generator=generator, device=mu.device, dtype=mu.dtype)
        z = reparameterise(mu, logvar, eps)  # (B, d)
        return self.decode(z), mu, logvar
