"""Stable Diffusion's autoencoder as the lessons use it: the model under its public name
`sdlearn.vae` (the code is in `sdlearn/models/vae.py`), and the course's trained tiny one.
"""

from sdlearn.datasets import data_path
from sdlearn.models.vae import (  # noqa: F401 (re-exported)
    RESNET_EPS,
    AttentionBlock,
    AutoencoderKL,
    Decoder,
    DiagonalGaussian,
    DownEncoderBlock2D,
    Encoder,
    MidBlock,
    UpDecoderBlock2D,
    VAEConfig,
)

TINY_FOLDER = "tiny-vae"  # under data/, made by `make train-tiny-vae`


def load_tiny_vae(folder=None, device=None) -> AutoencoderKL:
    """The shipped tiny AutoencoderKL (data/tiny-vae: f = 8, 4 latent channels, 64x64 images), in eval mode."""
    folder = data_path(TINY_FOLDER, "train-tiny-vae") if folder is None else folder
    return AutoencoderKL.from_pretrained(folder, device=device).eval()
