"""Checkers for lesson 01 (autoencoders and latent space).

    from sdlearn.exercises import lesson01 as ex
    ex.check_compression_factor(compression_factor)
    ex.check_reconstruction_error(reconstruction_error)
    ex.check_psnr(psnr)

Each checker compares the learner's function with the reference in sdlearn.autoencoder
on seeded inputs, and names the usual mistakes when the learner's numbers match one.
"""

import math

import torch

from sdlearn import autoencoder
from sdlearn.exercises.core import Case, Mistake, checker

# ------------------------------------------------------------------------------------------
# How much smaller is the latent? numbers in the image / numbers in the latent
# ------------------------------------------------------------------------------------------


def compression_factor(image_shape: tuple, latent_shape: tuple) -> float:
    """How many times fewer numbers the latent holds than the image, e.g. (3, 512, 512) -> (4, 64, 64): 48."""
    return math.prod(image_shape) / math.prod(latent_shape)


def _ratio_of_sides(image_shape, latent_shape):
    return image_shape[-1] / latent_shape[-1]


def _pixels_only(image_shape, latent_shape):
    return math.prod(image_shape[-2:]) / math.prod(latent_shape[-2:])


def _inverted(image_shape, latent_shape):
    return math.prod(latent_shape) / math.prod(image_shape)


COMPRESSION_CASES = [
    Case((3, 512, 512), (4, 64, 64)),  # Stable Diffusion 1.x at 512x512
    Case((3, 64, 64), (4, 8, 8)),  # the tiny autoencoder of lesson 02
    Case((3, 32, 32), (2,)),  # lesson 01's 2-D code
    Case((3, 768, 768), (4, 96, 96)),  # SD 2.x at 768x768
]

COMPRESSION_MISTAKES = [
    Mistake(_ratio_of_sides, "You divided one side by the other (the downscale factor f). Count every number: channels x height x width."),
    Mistake(_pixels_only, "You compared height x width only. The channels count too: 3 colours in, 4 latent channels out."),
    Mistake(_inverted, "Your ratio is upside down: divide the numbers in the image by the numbers in the latent."),
]


@checker(compression_factor, COMPRESSION_CASES, name="compression_factor", mistakes=COMPRESSION_MISTAKES)
def check_compression_factor(fn) -> bool:
    """fn(image_shape, latent_shape) -> how many times fewer numbers the latent holds."""


# ------------------------------------------------------------------------------------------
# The reconstruction error: squared errors summed over an image, averaged over the batch
# ------------------------------------------------------------------------------------------


def _mse_everything(x, x_recon):
    return ((x - x_recon) ** 2).mean()


def _sum_everything(x, x_recon):
    return ((x - x_recon) ** 2).sum()


def _absolute(x, x_recon):
    return (x - x_recon).abs().reshape(x.shape[0], -1).sum(dim=1).mean()


def _not_squared(x, x_recon):
    return (x - x_recon).reshape(x.shape[0], -1).sum(dim=1).mean()


def _per_image(x, x_recon):
    return ((x - x_recon) ** 2).reshape(x.shape[0], -1).sum(dim=1)


def _images(seed: int, shape: tuple) -> tuple:
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(shape, generator=g) * 2 - 1
    x_recon = (x + 0.3 * torch.randn(shape, generator=g)).clamp(-1.2, 1.2)
    return x, x_recon


RECONSTRUCTION_CASES = [Case(*_images(0, (4, 3, 8, 8))), Case(*_images(1, (3, 3, 16, 16))), Case(*_images(2, (5, 1, 4, 4)))]

RECONSTRUCTION_MISTAKES = [
    Mistake(_mse_everything, "You took the mean over every number (the MSE). Sum over each image's pixels and channels, then average over the batch."),
    Mistake(_sum_everything, "You summed over the batch as well. Sum within each image, then take the mean over images, so the loss does not grow with the batch size."),
    Mistake(_per_image, "You returned one error per image. Average them over the batch to get one number."),
    Mistake(_absolute, "You summed absolute errors |x - x_hat|. Square the errors: (x - x_hat) ** 2."),
    Mistake(_not_squared, "You summed the raw differences, so positive and negative errors cancel. Square them first."),
]


@checker(autoencoder.reconstruction_error, RECONSTRUCTION_CASES, name="reconstruction_error", mistakes=RECONSTRUCTION_MISTAKES)
def check_reconstruction_error(fn) -> bool:
    """fn(x, x_recon) -> scalar: squared errors summed over each image, averaged over the batch."""


# ------------------------------------------------------------------------------------------
# PSNR for images in [-1, 1]
# ------------------------------------------------------------------------------------------


def _peak_one(a, b):
    mse = ((a - b) ** 2).reshape(a.shape[0], -1).mean(dim=1)
    return (10 * torch.log10(1.0 / mse)).mean()


def _twenty_log(a, b):
    mse = ((a - b) ** 2).reshape(a.shape[0], -1).mean(dim=1)
    return (20 * torch.log10(4.0 / mse)).mean()


def _pooled_mse(a, b):
    return 10 * torch.log10(4.0 / ((a - b) ** 2).mean())


def _per_image_psnr(a, b):
    mse = ((a - b) ** 2).reshape(a.shape[0], -1).mean(dim=1)
    return 10 * torch.log10(4.0 / mse)


def _natural_log(a, b):
    mse = ((a - b) ** 2).reshape(a.shape[0], -1).mean(dim=1)
    return (10 * torch.log(4.0 / mse)).mean()


def _psnr_cases() -> list:
    cases = []
    for seed, shape, noise in [(3, (4, 3, 8, 8), (0.02, 0.1, 0.3, 0.05)), (4, (3, 3, 16, 16), (0.2, 0.01, 0.08))]:
        g = torch.Generator().manual_seed(seed)
        a = torch.rand(shape, generator=g) * 2 - 1
        scale = torch.tensor(noise)[:, None, None, None]  # a different error per image, so pooling matters
        b = a + scale * torch.randn(shape, generator=g)
        cases.append(Case(a, b))
    return cases


PSNR_CASES = _psnr_cases()

PSNR_MISTAKES = [
    Mistake(_peak_one, "You used a peak of 1. Our images span [-1, 1], so the peak-to-peak range is 2 and the numerator is 2 ** 2 = 4."),
    Mistake(_twenty_log, "You used 20 log10 with the MSE. Either 10 log10(4 / MSE), or 20 log10(2 / RMSE), not a mix."),
    Mistake(_pooled_mse, "You pooled the MSE over the whole batch. Compute each image's PSNR, then average the PSNRs."),
    Mistake(_per_image_psnr, "You returned one PSNR per image. Average them over the batch."),
    Mistake(_natural_log, "You used the natural log. Decibels use log10."),
]


@checker(autoencoder.psnr, PSNR_CASES, name="psnr", mistakes=PSNR_MISTAKES, atol=1e-4, rtol=1e-5)
def check_psnr(fn) -> bool:
    """fn(a, b) -> mean over the batch of each image's PSNR in dB, images in [-1, 1]."""
