"""Lesson 07 exercises: the UNet's timestep embedding, its shapes per level, its skip connections.

    from sdlearn.exercises import lesson07 as ex
    ex.check_timestep_embedding(my_embedding)   # my_embedding(t (B,), dim) -> (B, dim), SD's variant
    ex.check_level_shapes(my_level_shapes)      # (block_out_channels, height, width) -> [(C, H, W), ...]
    ex.check_skip_count(my_skip_count)          # (levels, layers_per_block) -> number of skip tensors
    ex.check_geglu(my_geglu)                    # (x, proj_weight, proj_bias, out_weight, out_bias) -> (B, L, C)
"""

import math

import torch
import torch.nn.functional as F

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


# 4. GEGLU, the feed-forward layer of every transformer block -----------------------------------


def reference_geglu(x, proj_weight, proj_bias, out_weight, out_bias):
    """SD's feed-forward (diffusers' ff.net.0 = GEGLU, ff.net.2 = Linear), on x (B, L, C):

        [h | g] = x W1^T + b1        W1: (2 * inner, C), inner = 4C (SD 1.5 level 0: 320 -> 2 x 1280)
        out = (h * GELU(g)) W2^T + b2   W2: (C, inner)                  (1280 -> 320)

    h is the first half of the channels (the value), g the second (the gate); GELU is exact (erf).
    """
    h, gate = F.linear(x, proj_weight, proj_bias).chunk(2, dim=-1)  # two (B, L, inner) halves
    return F.linear(h * F.gelu(gate), out_weight, out_bias)  # (B, L, C)


def _gate_and_value_swapped(x, w1, b1, w2, b2):
    h, gate = F.linear(x, w1, b1).chunk(2, dim=-1)
    return F.linear(gate * F.gelu(h), w2, b2)


def _sigmoid_gate(x, w1, b1, w2, b2):
    h, gate = F.linear(x, w1, b1).chunk(2, dim=-1)
    return F.linear(h * torch.sigmoid(gate), w2, b2)


def _silu_gate(x, w1, b1, w2, b2):
    h, gate = F.linear(x, w1, b1).chunk(2, dim=-1)
    return F.linear(h * F.silu(gate), w2, b2)


def _tanh_gelu(x, w1, b1, w2, b2):
    h, gate = F.linear(x, w1, b1).chunk(2, dim=-1)
    return F.linear(h * F.gelu(gate, approximate="tanh"), w2, b2)


def _no_activation(x, w1, b1, w2, b2):
    h, gate = F.linear(x, w1, b1).chunk(2, dim=-1)
    return F.linear(h * gate, w2, b2)


def _no_gate(x, w1, b1, w2, b2):
    h, _ = F.linear(x, w1, b1).chunk(2, dim=-1)
    return F.linear(F.gelu(h), w2, b2)


def _interleaved_halves(x, w1, b1, w2, b2):
    y = F.linear(x, w1, b1)
    return F.linear(y[..., 0::2] * F.gelu(y[..., 1::2]), w2, b2)


GEGLU_MISTAKES = [
    Mistake(
        _gate_and_value_swapped,
        "You put GELU on the first half. The first half of proj's output is the value h, the second the gate g: "
        "h, gate = proj.chunk(2, dim=-1); h * GELU(gate).",
    ),
    Mistake(_sigmoid_gate, "You gated with a sigmoid (that is GLU). GEGLU gates with GELU: h * F.gelu(gate)."),
    Mistake(_silu_gate, "You gated with SiLU (that is SwiGLU, used by later models). SD's GEGLU uses GELU: h * F.gelu(gate)."),
    Mistake(
        _tanh_gelu,
        "You used GELU's tanh approximation. SD's GEGLU uses the exact GELU (F.gelu with the default approximate='none').",
    ),
    Mistake(_no_activation, "You multiplied value and gate without the GELU: h * F.gelu(gate)."),
    Mistake(
        _no_gate,
        "You applied GELU to the value and dropped the gate. proj makes 2 x inner channels: the value h (first half) "
        "is multiplied by GELU of the gate g (second half).",
    ),
    Mistake(
        _interleaved_halves,
        "You took every other channel as the gate. The two halves are contiguous: h = first inner channels, "
        "gate = the last inner ones (.chunk(2, dim=-1)).",
    ),
]


def _geglu_case(seed, batch, tokens, channels):
    """x (batch, tokens, C) and the weights of a feed-forward with inner = 4C, seeded."""
    g = torch.Generator().manual_seed(seed)
    inner = 4 * channels
    x = torch.randn(batch, tokens, channels, generator=g)
    w1 = torch.randn(2 * inner, channels, generator=g) / channels**0.5  # (2 x inner, C)
    b1 = torch.randn(2 * inner, generator=g) * 0.1
    w2 = torch.randn(channels, inner, generator=g) / inner**0.5  # (C, inner)
    b2 = torch.randn(channels, generator=g) * 0.1
    return Case(x, w1, b1, w2, b2)


def _geglu_cases() -> list:
    return [_geglu_case(0, 2, 5, 8), _geglu_case(1, 1, 4, 320)]  # the second: SD 1.5's level 0, 320 -> 2 x 1280 -> 320


@checker(reference_geglu, _geglu_cases, name="geglu", mistakes=GEGLU_MISTAKES, atol=1e-5, rtol=1e-5)
def check_geglu(fn) -> bool:
    """fn(x (B, L, C), proj_weight (2 * inner, C), proj_bias (2 * inner,), out_weight (C, inner), out_bias (C,)) -> (B, L, C)."""
