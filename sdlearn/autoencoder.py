"""Lessons 01-02's autoencoder toolkit: the shapes they train on, their losses for `train()`, and
the tools for looking at a latent space.

The models and their equations (Autoencoder, VAE, the KL term, the ELBO, PSNR) live in
`sdlearn.models.autoencoder` and are re-exported here, so a lesson needs one import:
`from sdlearn import autoencoder as ae`.
"""

import numpy as np
import torch

from sdlearn.datasets import COLOUR_NAMES, SHAPES, render, split_pairs, to_model_range
from sdlearn.models.autoencoder import (  # noqa: F401 (re-exported for the lessons)
    Autoencoder,
    AutoencoderConfig,
    Decoder,
    Encoder,
    VAE,
    elbo_loss,
    kl_divergence,
    latent_scaling_factor,
    psnr,
    reconstruction_error,
    reparameterise,
)


# ------------------------------------------------------------------------------------------
# Training with sdlearn.train.train: batches and losses
# ------------------------------------------------------------------------------------------


def centred_shapes(n: int, seed: int = 0, size: int = 32, split: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
    """n large shapes at the centre of the frame: images (n, 3, size, size) in [-1, 1] and labels (n, 2).

    Only colour and shape vary (plus a pixel or two of jitter), so a 2-D code has a fair
    chance to hold what matters, and a map of the codes can be read. Each image is the
    centre cell of a shapes-dataset render twice as large, so the shape fills the frame.
    labels[:, 0] indexes COLOUR_NAMES and labels[:, 1] indexes SHAPES. Item i depends only
    on (seed, i), as in datasets.Shapes.
    """
    pairs = split_pairs(split)
    pixels, labels = [], []
    for i in range(n):
        rng = np.random.default_rng([seed, 7, i])
        colour, shape = pairs[int(rng.integers(len(pairs)))]
        # The centre cell of a (2 size)^2 render spans [2/3 size, 4/3 size]: inside the middle crop.
        image = render(colour, shape, "large", "center", size_px=2 * size, jitter_rng=rng)
        pixels.append(np.asarray(image)[size // 2 : size // 2 + size, size // 2 : size // 2 + size])
        labels.append((COLOUR_NAMES.index(colour), SHAPES.index(shape)))
    return to_model_range(np.stack(pixels)), torch.tensor(labels)


class ImageBatches:
    """data(step) -> a batch of `batch_size` images drawn from `images` (N, C, H, W).

    The batch depends only on (seed, step), so a resumed run sees the same batches as an
    uninterrupted one.
    """

    def __init__(self, images: torch.Tensor, batch_size: int = 64, seed: int = 0):
        if images.dim() != 4 or len(images) == 0:
            raise ValueError(f"Expected a non-empty image tensor (N, C, H, W), got shape {tuple(images.shape)}.")
        self.images, self.batch_size, self.seed = images, batch_size, seed

    def __call__(self, step: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
        index = torch.randint(len(self.images), (self.batch_size,), generator=generator)
        return self.images[index]  # (batch_size, C, H, W)


def autoencoder_loss(model: Autoencoder, x: torch.Tensor) -> torch.Tensor:
    """loss_fn for train(): the reconstruction error of a plain autoencoder."""
    return reconstruction_error(x, model(x))


class VAELoss:
    """loss_fn for train(): elbo_loss with a fixed beta. (A class, so the loss has a name and a repr.)"""

    def __init__(self, beta: float = 1.0):
        self.beta = beta

    def __call__(self, model: VAE, x: torch.Tensor) -> torch.Tensor:
        x_recon, mu, logvar = model(x)
        return elbo_loss(x, x_recon, mu, logvar, self.beta)

    def __repr__(self) -> str:
        return f"VAELoss(beta={self.beta})"


# ------------------------------------------------------------------------------------------
# Looking at a latent space
# ------------------------------------------------------------------------------------------


@torch.no_grad()
def encode_all(model: Autoencoder | VAE, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """Codes (N, d) of many images: z for an Autoencoder, the mean mu for a VAE."""
    codes = []
    for start in range(0, len(images), batch_size):
        out = model.encode(images[start : start + batch_size])
        codes.append(out[0] if isinstance(out, tuple) else out)
    return torch.cat(codes)


@torch.no_grad()
def decode_grid(model: Autoencoder | VAE, low: tuple, high: tuple, n: int = 10) -> torch.Tensor:
    """Decode an n x n grid of 2-D codes spanning [low, high] (row 0 at the top = highest z_2).

    Returns (n * n, C, S, S), row by row, ready for show_images(..., ncols=n).
    """
    if model.config.latent_dim != 2:
        raise ValueError(f"decode_grid needs a 2-D latent space, this model has latent_dim={model.config.latent_dim}.")
    z1 = torch.linspace(low[0], high[0], n)
    z2 = torch.linspace(high[1], low[1], n)
    Z2, Z1 = torch.meshgrid(z2, z1, indexing="ij")  # (n, n) each: row r has z_2 = z2[r], column c has z_1 = z1[c]
    grid = torch.stack([Z1, Z2], dim=-1).reshape(-1, 2)  # (n * n, 2)
    return model.decode(grid)


@torch.no_grad()
def interpolate(model: Autoencoder | VAE, x_a: torch.Tensor, x_b: torch.Tensor, n: int = 8) -> torch.Tensor:
    """Decode n codes evenly spaced on the straight line from the code of x_a to that of x_b (C, S, S)."""
    codes = encode_all(model, torch.stack([x_a, x_b]))  # (2, d)
    w = torch.linspace(0, 1, n)[:, None]  # (n, 1)
    return model.decode((1 - w) * codes[0] + w * codes[1])  # (n, C, S, S)


def nearest_distance(images: torch.Tensor, references: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """For each image, the mean squared error to the closest of `references` (N, C, H, W): (B,).

    A small value means "this looks like some real image"; decodes of random codes that are
    far from every real image are the autoencoder's garbage.
    """
    refs = references.reshape(len(references), -1).double()  # (N, D)
    ref_sq = (refs**2).sum(dim=1)  # (N,)
    out = []
    for start in range(0, len(images), batch_size):
        q = images[start : start + batch_size].reshape(-1, refs.shape[1]).double()  # (b, D)
        # ||q - r||^2 = ||q||^2 - 2 q.r + ||r||^2, for all pairs at once: (b, N)
        d2 = (q**2).sum(dim=1, keepdim=True) - 2 * q @ refs.T + ref_sq
        out.append(d2.min(dim=1).values.clamp(min=0) / refs.shape[1])
    return torch.cat(out).float()


def knn_accuracy(codes: torch.Tensor, labels: torch.Tensor, query_codes: torch.Tensor, query_labels: torch.Tensor, k: int = 10) -> float:
    """How well a label can be read off a code: the accuracy of a k-nearest-neighbour vote.

    codes (N, d) with labels (N,) are the reference points; query_codes (M, d) with
    query_labels (M,) are scored. Chance level is about 1 / number of classes.
    """
    d2 = torch.cdist(query_codes.double(), codes.double())  # (M, N)
    nearest = d2.topk(k, dim=1, largest=False).indices  # (M, k)
    votes = labels[nearest]  # (M, k)
    predicted = torch.mode(votes, dim=1).values  # (M,)
    return (predicted == query_labels).float().mean().item()
