"""Lesson 07 exercises: the UNet's timestep embedding, its shapes per level, its skip connections.

    from sdlearn.exercises import lesson07 as ex
    ex.check_timestep_embedding(my_embedding)   # my_embedding(t (B,), dim) -> (B, dim), SD's variant
    ex.check_level_shapes(my_level_shapes)      # (block_out_channels, height, width) -> [(C, H, W), ...]
    ex.check_skip_count(my_skip_count)          # (levels, layers_per_block) -> number of skip tensors
"""

import math

import torch

from sdlearn.exercises.core import Case, Mistake, checker
from sdlearn.models.layers import timestep_embedding

# 1. Sinusoidal timestep embedding ----------------------------------------------------------------


def reference_timestep_embedding(t, dim):
    """SD's sinusoids: [cos(t omega_i), sin(t omega_i)], omega_i = 10000^(-i / half), i < half = dim / 2."""
    return timestep_embedding(t, dim, flip_sin_to_cos=True, freq_shift=0)


def _sin_first(t, dim):
    return timestep_embedding(t, dim, flip_sin_to_cos=False, freq_shift=0)


def _shift_one(t, dim):
    return timestep_embedding(t, dim, flip_sin_to_cos=True, freq_shift=1)


def _interleaved(t, dim):
    emb = timestep_embedding(t, dim)  # (B, dim) = [cos..., sin...]
    half = dim // 2
    return torch.stack([emb[:, :half], emb[:, half:]], dim=-1).reshape(len(t), dim)  # cos0, sin0, cos1, ...


def _rising_frequencies(t, dim):
    half = dim // 2
    omega = torch.exp(math.log(10000.0) * torch.arange(half, dtype=torch.float32) / half)
    angles = t[:, None].float() * omega[None]
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)


def _linear_frequencies(t, dim):
    half = dim // 2
    omega = 1.0 - torch.arange(half, dtype=torch.float32) / half
    angles = t[:, None].float() * omega[None]
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)


EMBEDDING_MISTAKES = [
    Mistake(
        _sin_first,
        "You put the sines first. Stable Diffusion's checkpoints expect the cosines first (flip_sin_to_cos=True): "
        "torch.cat([cos, sin], dim=-1).",
    ),
    Mistake(
        _shift_one,
        "Your exponent divides by half - 1 (diffusers' freq_shift=1, the DDPM variant). SD divides by half: "
        "omega_i = exp(-ln(10000) * i / half).",
    ),
    Mistake(_interleaved, "You interleaved cos and sin (cos0, sin0, cos1, ...). SD concatenates: all cosines, then all sines."),
    Mistake(_rising_frequencies, "Your frequencies grow with i. Use a minus sign: omega_i = exp(-ln(10000) * i / half)."),
    Mistake(
        _linear_frequencies,
        "Your frequencies fall linearly. They fall geometrically, from 1 down to 1/10000: omega_i = 10000 ** (-i / half).",
    ),
]

EMBEDDING_CASES = [Case(torch.tensor([0, 1, 10, 500, 999]), 16), Case(torch.tensor([3, 261]), 320)]


@checker(reference_timestep_embedding, EMBEDDING_CASES, name="timestep_embedding", mistakes=EMBEDDING_MISTAKES, atol=1e-4, rtol=1e-4)
def check_timestep_embedding(fn) -> bool:
    """fn(t (B,) integer tensor, dim) -> (B, dim) float tensor."""


# 2. Shapes per level -------------------------------------------------------------------------------


def reference_level_shapes(block_out_channels, height, width):
    """The feature map of level i of the down path: (block_out_channels[i], H / 2^i, W / 2^i)."""
    return [(c, height // 2**i, width // 2**i) for i, c in enumerate(block_out_channels)]


def _halved_once_too_often(block_out_channels, height, width):
    return [(c, height // 2 ** (i + 1), width // 2 ** (i + 1)) for i, c in enumerate(block_out_channels)]


def _channels_doubling(block_out_channels, height, width):
    return [(block_out_channels[0] * 2**i, height // 2**i, width // 2**i) for i in range(len(block_out_channels))]


def _never_halved(block_out_channels, height, width):
    return [(c, height, width) for c in block_out_channels]


LEVEL_MISTAKES = [
    Mistake(_halved_once_too_often, "Level 0 runs at the full latent resolution; the first halving happens after it. Use H / 2**i."),
    Mistake(
        _channels_doubling,
        "You doubled the channels at every level. Read them from block_out_channels: SD's last two levels both have 1280.",
    ),
    Mistake(_never_halved, "Each level after the first runs at half the resolution of the one before: H / 2**i."),
]

LEVEL_CASES = [Case((320, 640, 1280, 1280), 64, 64), Case((32, 64), 16, 24), Case((128, 256, 256), 96, 64)]


@checker(reference_level_shapes, LEVEL_CASES, name="level_shapes", mistakes=LEVEL_MISTAKES)
def check_level_shapes(fn) -> bool:
    """fn(block_out_channels, height, width) -> list of (channels, height, width), one per level."""


# 3. Skip connections -------------------------------------------------------------------------------


def reference_skip_count(levels, layers_per_block):
    """conv_in's output, one per down layer, one per downsampler: 1 + levels * layers + (levels - 1).

    The up path consumes exactly as many: levels x (layers_per_block + 1) resnets.
    """
    return 1 + levels * layers_per_block + (levels - 1)


def _forgot_conv_in(levels, layers_per_block):
    return levels * layers_per_block + levels - 1


def _forgot_downsamplers(levels, layers_per_block):
    return 1 + levels * layers_per_block


def _layers_only(levels, layers_per_block):
    return levels * layers_per_block


def _downsampler_on_every_level(levels, layers_per_block):
    return 1 + levels * layers_per_block + levels


SKIP_MISTAKES = [
    Mistake(_forgot_conv_in, "You forgot conv_in's output: it is the first skip."),
    Mistake(_forgot_downsamplers, "You forgot the downsamplers' outputs: each one is kept as a skip too."),
    Mistake(_layers_only, "Count conv_in's output and every downsampler's output as well as the layers'."),
    Mistake(_downsampler_on_every_level, "The last level has no downsampler: there are levels - 1 of them."),
]

SKIP_CASES = [Case(4, 2), Case(2, 1), Case(3, 3)]


@checker(reference_skip_count, SKIP_CASES, name="skip_count", mistakes=SKIP_MISTAKES, atol=0, rtol=0)
def check_skip_count(fn) -> bool:
    """fn(levels, layers_per_block) -> int, the number of skip tensors the down path keeps."""
