"""The convolutional building blocks of Stable Diffusion's UNet (and its autoencoder).

Notation: x is a feature map (B, C, H, W); t the diffusion timestep (an integer in
0..999 for SD); emb the timestep embedding that every residual block receives.

1. Sinusoidal timestep embedding (Vaswani et al. 2017, section 3.5, used for timesteps by
   Ho et al. 2020). With half = dim / 2 and i = 0 .. half-1:

       omega_i = exp(-ln(max_period) * i / (half - shift))       frequencies, max_period = 10000
       emb(t)  = [cos(t * omega_0), ..., cos(t * omega_{half-1}),
                  sin(t * omega_0), ..., sin(t * omega_{half-1})]

   Stable Diffusion uses exactly this variant: cosines first (`flip_sin_to_cos=True`) and
   shift = 0 (`freq_shift=0`). The original CompVis code (`timestep_embedding` in
   ldm/modules/diffusionmodules/util.py) writes `cat([cos, sin])` and divides by `half`;
   diffusers' generic function defaults to `[sin, cos]` and `half - 1` (the DDPM/TensorFlow
   variant), which is why SD configs set flip_sin_to_cos=True and freq_shift=0. The order
   matters: the learned `linear_1` after it was trained on one order, and swapping sin and
   cos feeds it a permuted vector, which a trained model cannot undo.

2. TimestepEmbedding: an MLP on top of the sinusoids, emb = linear_2(SiLU(linear_1(sinusoids))),
   width 4 * block_out_channels[0] (1280 for SD).

3. ResnetBlock2D (the "ResBlock" of Ho et al. / Dhariwal & Nichol, with GroupNorm):

       h = conv1(SiLU(GroupNorm(x)))
       h = h + time_emb_proj(SiLU(emb))[:, :, None, None]     the timestep enters here, per channel
       h = conv2(dropout(SiLU(GroupNorm(h))))
       out = (shortcut(x) + h) / output_scale_factor           shortcut = 1x1 conv when C changes

4. Downsample2D: a 3x3 convolution with stride 2 (H, W -> H/2, W/2).
   Upsample2D: nearest-neighbour 2x upsampling, then a 3x3 convolution.

Parameter names (norm1, conv1, time_emb_proj, norm2, conv2, conv_shortcut, linear_1,
linear_2, conv) are those of diffusers, so state dicts load with strict=True.
References: diffusers models/embeddings.py, resnet.py, downsampling.py, upsampling.py;
CompVis latent-diffusion ldm/modules/diffusionmodules/openaimodel.py.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn


# 1. Timestep embedding -----------------------------------------------------------------


def timestep_embedding(
    t: torch.Tensor,
    dim: int,
    flip_sin_to_cos: bool = True,
    freq_shift: float = 0.0,
    max_period: float = 10000.0,
) -> torch.Tensor:
    """Sinusoidal embedding of timesteps t (B,) -> (B, dim), float32.

    Defaults are Stable Diffusion's: cosines first, frequency shift 0.
    """
    if t.ndim != 1:
        raise ValueError(f"timestep_embedding expects a 1-D tensor of timesteps (B,), got shape {tuple(t.shape)}.")
    half = dim // 2
    i = torch.arange(half, dtype=torch.float32, device=t.device)
    omega = torch.exp(-math.log(max_period) * i / (half - freq_shift))  # (half,)
    angles = t[:, None].float() * omega[None, :]  # (B, half)
    if flip_sin_to_cos:
        emb = torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)  # (B, 2*half)
    else:
        emb = torch.cat([torch.sin(angles), torch.cos(angles)], dim=-1)
    if dim % 2 == 1:  # odd widths get one zero column, as diffusers does
        emb = F.pad(emb, (0, 1))
    return emb


def batch_timesteps(t, x: torch.Tensor) -> torch.Tensor:
    """t (an int, a float, a 0-d tensor or a (B,) or (1,) tensor) as a (B,) tensor on x's device, B = x.shape[0]."""
    if not torch.is_tensor(t):
        t = torch.tensor([t], dtype=torch.float64 if isinstance(t, float) else torch.int64)
    if t.ndim == 0:
        t = t[None]
    if t.ndim != 1 or t.shape[0] not in (1, x.shape[0]):
        raise ValueError(f"t must be a number, a 0-d tensor or a tensor of shape ({x.shape[0]},), got shape {tuple(t.shape)}.")
    return t.to(x.device).expand(x.shape[0])


class SinusoidalEmbedding(nn.Module):
    """`timestep_embedding` as a module (no parameters; diffusers calls it `time_proj`)."""

    def __init__(self, dim: int, flip_sin_to_cos: bool = True, freq_shift: float = 0.0):
        super().__init__()
        self.dim = dim
        self.flip_sin_to_cos = flip_sin_to_cos
        self.freq_shift = freq_shift

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return timestep_embedding(t, self.dim, self.flip_sin_to_cos, self.freq_shift)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, flip_sin_to_cos={self.flip_sin_to_cos}, freq_shift={self.freq_shift}"


# 2. The MLP on top of the sinusoids ------------------------------------------------------


class TimestepEmbedding(nn.Module):
    """emb = linear_2(SiLU(linear_1(sinusoids))): (B, in_channels) -> (B, time_embed_dim)."""

    def __init__(self, in_channels: int, time_embed_dim: int):
        super().__init__()
        self.linear_1 = nn.Linear(in_channels, time_embed_dim)
        self.act = nn.SiLU()
        self.linear_2 = nn.Linear(time_embed_dim, time_embed_dim)

    def forward(self, sinusoids: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act(self.linear_1(sinusoids)))


# 3. Residual block with the timestep injected ---------------------------------------------


class ResnetBlock2D(nn.Module):
    """GroupNorm-SiLU-conv twice, the timestep added in between, plus a skip connection.

    `temb_channels=None` gives the block without a timestep (the autoencoder's).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int | None = None,
        temb_channels: int | None = 512,
        groups: int = 32,
        groups_out: int | None = None,
        eps: float = 1e-6,
        dropout: float = 0.0,
        output_scale_factor: float = 1.0,
    ):
        super().__init__()
        out_channels = in_channels if out_channels is None else out_channels
        groups_out = groups if groups_out is None else groups_out
        for channels, g in ((in_channels, groups), (out_channels, groups_out)):
            if channels % g != 0:
                raise ValueError(
                    f"GroupNorm needs the channel count to be a multiple of the number of groups: "
                    f"{channels} channels, {g} groups. Choose channel widths divisible by norm_num_groups."
                )
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.output_scale_factor = output_scale_factor

        self.norm1 = nn.GroupNorm(groups, in_channels, eps=eps)
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1)
        # One bias per output channel from the timestep embedding.
        self.time_emb_proj = nn.Linear(temb_channels, out_channels) if temb_channels is not None else None
        self.norm2 = nn.GroupNorm(groups_out, out_channels, eps=eps)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1)
        self.nonlinearity = nn.SiLU()
        # The skip path needs a 1x1 convolution only when the channel count changes.
        self.conv_shortcut = nn.Conv2d(in_channels, out_channels, kernel_size=1) if in_channels != out_channels else None

    def forward(self, x: torch.Tensor, emb: torch.Tensor | None = None) -> torch.Tensor:
        h = self.conv1(self.nonlinearity(self.norm1(x)))  # (B, C_out, H, W)
        if self.time_emb_proj is not None:
            if emb is None:
                raise ValueError("This ResnetBlock2D was built with temb_channels, so it needs the timestep embedding `emb`.")
            h = h + self.time_emb_proj(self.nonlinearity(emb))[:, :, None, None]  # (B, C_out, 1, 1) broadcast
        h = self.conv2(self.dropout(self.nonlinearity(self.norm2(h))))
        shortcut = self.conv_shortcut(x) if self.conv_shortcut is not None else x
        out = shortcut + h
        if self.output_scale_factor != 1.0:
            out = out / self.output_scale_factor
        return out


# 4. Changing resolution -------------------------------------------------------------------


class Downsample2D(nn.Module):
    """3x3 convolution with stride 2: (B, C, H, W) -> (B, C_out, H/2, W/2).

    padding=1 is the UNet's; padding=0 pads only right and bottom by one pixel first
    (the autoencoder's encoder, inherited from the original VQGAN code).
    """

    def __init__(self, channels: int, out_channels: int | None = None, padding: int = 1):
        super().__init__()
        self.channels = channels
        self.padding = padding
        self.conv = nn.Conv2d(channels, out_channels or channels, kernel_size=3, stride=2, padding=padding)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.padding == 0:
            x = F.pad(x, (0, 1, 0, 1))  # (left, right, top, bottom)
        return self.conv(x)


class Upsample2D(nn.Module):
    """Nearest-neighbour 2x upsampling then a 3x3 convolution: (B, C, H, W) -> (B, C_out, 2H, 2W).

    Upsampling then convolving (rather than a transposed convolution) avoids checkerboard
    artefacts (Odena et al. 2016).
    """

    def __init__(self, channels: int, out_channels: int | None = None):
        super().__init__()
        self.channels = channels
        self.conv = nn.Conv2d(channels, out_channels or channels, kernel_size=3, padding=1)

    def forward(self, x: torch.Tensor, output_size: tuple[int, int] | None = None) -> torch.Tensor:
        if output_size is None:
            x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        else:
            x = F.interpolate(x, size=output_size, mode="nearest")
        return self.conv(x)
