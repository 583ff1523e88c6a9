"""Stable Diffusion's autoencoder (AutoencoderKL): pixels <-> a latent 8x smaller per side.

Latent diffusion (Rombach et al. 2022) runs the diffusion model on z, not on the image x.
A variational autoencoder (Kingma & Welling 2014) with a KL-regularised latent makes z:

    encoder:  x (B, 3, H, W) -> (mean, logvar) (B, 2*4, H/f, W/f),   f = 2^(levels-1) = 8 for SD
    posterior q(z | x) = N(mean, diag(sigma^2)),  sigma = exp(logvar / 2)
    sample    z = mean + sigma * eps,  eps ~ N(0, I)             (the reparameterisation trick)
    decoder:  z (B, 4, H/f, W/f) -> x_hat (B, 3, H, W)
    KL(q(z | x) || N(0, I)) = 1/2 sum(mean^2 + sigma^2 - 1 - log sigma^2)   over C, h, w

SD trained its autoencoder with a tiny KL weight (plus perceptual and GAN losses), so the
latents are not unit-variance: the diffusion model sees `scaling_factor * z` (0.18215 for
SD 1.x/2.x, about 1 / std(z) measured on training images), and the pipeline decodes
`z / scaling_factor`.

Architecture (diffusers' Encoder/Decoder, from the VQGAN of Esser et al. 2021):

    encoder: conv_in -> per level: layers_per_block ResnetBlocks (+ stride-2 conv except the
             last level) -> mid block (ResnetBlock, single-head self-attention over all
             pixels, ResnetBlock) -> GroupNorm, SiLU -> conv_out (2 * latent channels)
    quant_conv (1x1) -> DiagonalGaussian | post_quant_conv (1x1)
    decoder: conv_in -> mid block -> per level, widest first: layers_per_block + 1
             ResnetBlocks (+ nearest 2x upsample and conv except the last) -> GroupNorm,
             SiLU -> conv_out (3 channels)

Parameter names are diffusers' (encoder.down_blocks.0.resnets.0.conv1,
encoder.mid_block.attentions.0.to_q, quant_conv, ...), so AutoencoderKL folders load with
strict=True both ways. References: diffusers models/autoencoders/autoencoder_kl.py and
vae.py (DiagonalGaussianDistribution); CompVis ldm/modules/diffusionmodules/model.py.
"""

import math
from dataclasses import dataclass

import torch
from torch import nn

from sdlearn.models.attention import Attention
from sdlearn.models.checkpoint import ModelConfig, Pretrained
from sdlearn.models.layers import Downsample2D, ResnetBlock2D, Upsample2D
from sdlearn.models.noise import randn

RESNET_EPS = 1e-6  # every GroupNorm of the autoencoder uses eps 1e-6 (diffusers and CompVis)


@dataclass
class VAEConfig(ModelConfig):
    """Fields named as in diffusers' AutoencoderKL config.json (the vae/ folder of an SD model)."""

    library_class = "AutoencoderKL"

    in_channels: int = 3
    out_channels: int = 3
    down_block_types: tuple = ("DownEncoderBlock2D",) * 4
    up_block_types: tuple = ("UpDecoderBlock2D",) * 4
    block_out_channels: tuple = (128, 256, 512, 512)
    layers_per_block: int = 2
    act_fn: str = "silu"
    latent_channels: int = 4
    norm_num_groups: int = 32
    sample_size: int | tuple = 512
    scaling_factor: float = 0.18215  # the diffusion model sees scaling_factor * z
    shift_factor: float | None = None  # later models (SD3, Flux) use (z - shift) * scale; SD 1/2: None
    latents_mean: tuple | None = None  # per-channel statistics some later models publish;
    latents_std: tuple | None = None  # kept for the pipeline, not used by the autoencoder itself
    force_upcast: bool = True  # a hint to pipelines: decode in float32 (SD's VAE overflows in fp16)
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True

    @classmethod
    def tiny(cls, **overrides) -> "VAEConfig":
        """Four levels (f = 8) but narrow: 64x64 images -> 4x8x8 latents, quick on a CPU.

        scaling_factor is 1.0 until a trained tiny autoencoder's latents are measured.
        """
        values = {**dict(block_out_channels=(32, 64, 64, 64), layers_per_block=1, norm_num_groups=16,
                         sample_size=64, scaling_factor=1.0), **overrides}
        levels = len(values["block_out_channels"])  # one block type per level unless given
        values.setdefault("down_block_types", ("DownEncoderBlock2D",) * levels)
        values.setdefault("up_block_types", ("UpDecoderBlock2D",) * levels)
        return cls(**values)

    @classmethod
    def sd(cls) -> "VAEConfig":
        """The autoencoder of SD 1.x and 2.x (83.7 M parameters)."""
        return cls()

    def __post_init__(self):
        levels = len(self.block_out_channels)
        if len(self.down_block_types) != levels or len(self.up_block_types) != levels:
            raise ValueError(
                f"down_block_types ({len(self.down_block_types)}), up_block_types ({len(self.up_block_types)}) "
                f"and block_out_channels ({levels}) need one entry per level."
            )
        unsupported = {t for t in self.down_block_types if t != "DownEncoderBlock2D"}
        unsupported |= {t for t in self.up_block_types if t != "UpDecoderBlock2D"}
        if unsupported:
            raise ValueError(
                f"Block types {sorted(unsupported)} are not implemented; AutoencoderKL for Stable Diffusion "
                "uses DownEncoderBlock2D and UpDecoderBlock2D only."
            )
        if self.act_fn not in ("silu", "swish"):
            raise ValueError(f"act_fn {self.act_fn!r} is not implemented; Stable Diffusion's autoencoder uses 'silu'.")
        bad = [c for c in self.block_out_channels if c % self.norm_num_groups]
        if bad:
            raise ValueError(f"block_out_channels {bad} are not divisible by norm_num_groups={self.norm_num_groups}.")

    @property
    def downscale_factor(self) -> int:
        """f: image side / latent side (8 for SD)."""
        return 2 ** (len(self.block_out_channels) - 1)


# ------------------------------------------------------------------------------------------
# The posterior q(z | x)
# ------------------------------------------------------------------------------------------


class DiagonalGaussian:
    """q(z | x) = N(mean, diag(var)), from the encoder's (B, 2C, h, w) output [mean | logvar]."""

    def __init__(self, parameters: torch.Tensor):
        self.parameters = parameters
        self.mean, logvar = torch.chunk(parameters, 2, dim=1)  # (B, C, h, w) each
        # Clamped as diffusers and CompVis do, so exp() neither overflows nor collapses to 0.
        self.logvar = torch.clamp(logvar, -30.0, 20.0)
        self.std = torch.exp(0.5 * self.logvar)
        self.var = torch.exp(self.logvar)

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """z = mean + std * eps (reparameterised: gradients flow into mean and std)."""
        eps = randn(self.mean.shape, generator=generator, device=self.mean.device, dtype=self.mean.dtype)
        return self.mean + self.std * eps

    def mode(self) -> torch.Tensor:
        """The most likely z, the mean (what SD's img2img uses with sample_posterior=False)."""
        return self.mean

    def kl(self, other: "DiagonalGaussian | None" = None) -> torch.Tensor:
        """KL(self || other) per sample (B,), summed over C, h, w; `other` defaults to N(0, I)."""
        if other is None:
            return 0.5 * torch.sum(self.mean**2 + self.var - 1.0 - self.logvar, dim=(1, 2, 3))
        return 0.5 * torch.sum(
            (self.mean - other.mean) ** 2 / other.var + self.var / other.var - 1.0 - self.logvar + other.logvar,
            dim=(1, 2, 3),
        )

    def nll(self, z: torch.Tensor) -> torch.Tensor:
        """-log q(z | x) per sample (B,)."""
        return 0.5 * torch.sum(math.log(2.0 * math.pi) + self.logvar + (z - self.mean) ** 2 / self.var, dim=(1, 2, 3))


# ------------------------------------------------------------------------------------------
# Blocks
# ------------------------------------------------------------------------------------------


class AttentionBlock(Attention):
    """Single-head self-attention over all h*w pixels, with its own GroupNorm and a residual.

    (B, C, h, w) -> GroupNorm -> (B, h*w, C) tokens -> attention -> (B, C, h, w) + input
    """

    def __init__(self, channels: int, groups: int):
        super().__init__(channels, heads=1, dim_head=channels, bias=True)
        self.group_norm = nn.GroupNorm(groups, channels, eps=RESNET_EPS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        tokens = self.group_norm(x).view(B, C, H * W).transpose(1, 2)  # (B, HW, C)
        out = super().forward(tokens)  # (B, HW, C)
        return x + out.transpose(1, 2).reshape(B, C, H, W)


class MidBlock(nn.Module):
    """ResnetBlock -> AttentionBlock -> ResnetBlock at the lowest resolution (diffusers' UNetMidBlock2D)."""

    def __init__(self, channels: int, groups: int, add_attention: bool = True):
        super().__init__()
        self.attentions = nn.ModuleList([AttentionBlock(channels, groups) if add_attention else nn.Identity()])
        self.resnets = nn.ModuleList(
            [ResnetBlock2D(channels, channels, temb_channels=None, groups=groups, eps=RESNET_EPS) for _ in range(2)]
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.resnets[0](x)
        x = self.attentions[0](x)
        return self.resnets[1](x)


class DownEncoderBlock2D(nn.Module):
    """`num_layers` ResnetBlocks, then (except at the last level) a stride-2 convolution."""

    def __init__(self, in_channels: int, out_channels: int, num_layers: int, groups: int, add_downsample: bool):
        super().__init__()
        self.resnets = nn.ModuleList(
            ResnetBlock2D(in_channels if i == 0 else out_channels, out_channels, temb_channels=None, groups=groups, eps=RESNET_EPS)
            for i in range(num_layers)
        )
        # padding=0: pad right/bottom only, then a 3x3 stride-2 conv (the VQGAN encoder's choice)
        self.downsamplers = nn.ModuleList([Downsample2D(out_channels, out_channels, padding=0)]) if add_downsample else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for resnet in self.resnets:
            x = resnet(x)
        if self.downsamplers is not None:
            x = self.downsamplers[0](x)  # (B, C, H, W) -> (B, C, H/2, W/2)
        return x


class UpDecoderBlock2D(nn.Module):
    """`num_layers` ResnetBlocks, then (except at the last level) upsample 2x and convolve."""

    def __init__(self, in_channels: int, out_channels: int, num_layers: int, groups: int, add_upsample: bool):
        super().__init__()
        self.resnets = nn.ModuleList(
            ResnetBlock2D(in_channels if i == 0 else out_channels, out_channels, temb_channels=None, groups=groups, eps=RESNET_EPS)
            for i in range(num_layers)
        )
        self.upsamplers = nn.ModuleList([Upsample2D(out_channels, out_channels)]) if add_upsample else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for resnet in self.resnets:
            x = resnet(x)
        if self.upsamplers is not None:
            x = self.upsamplers[0](x)  # (B, C, h, w) -> (B, C, 2h, 2w)
        return x


class Encoder(nn.Module):
    """x (B, in_channels, H, W) -> (B, 2 * latent_channels, H/f, W/f): [mean | logvar]."""

    def __init__(self, config: VAEConfig):
        super().__init__()
        channels, groups = config.block_out_channels, config.norm_num_groups
        self.conv_in = nn.Conv2d(config.in_channels, channels[0], kernel_size=3, padding=1)
        self.down_blocks = nn.ModuleList(
            DownEncoderBlock2D(channels[max(i - 1, 0)], channels[i], config.layers_per_block, groups, add_downsample=i < len(channels) - 1)
            for i in range(len(channels))
        )
        self.mid_block = MidBlock(channels[-1], groups, config.mid_block_add_attention)
        self.conv_norm_out = nn.GroupNorm(groups, channels[-1], eps=RESNET_EPS)
        self.conv_act = nn.SiLU()
        self.conv_out = nn.Conv2d(channels[-1], 2 * config.latent_channels, kernel_size=3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)  # (B, C_0, H, W)
        for block in self.down_blocks:
            h = block(h)  # ... -> (B, C_last, H/f, W/f)
        h = self.mid_block(h)
        return self.conv_out(self.conv_act(self.conv_norm_out(h)))  # (B, 2 * latent, H/f, W/f)


class Decoder(nn.Module):
    """z (B, latent_channels, h, w) -> image (B, out_channels, h*f, w*f)."""

    def __init__(self, config: VAEConfig):
        super().__init__()
        channels, groups = config.block_out_channels, config.norm_num_groups
        reversed_channels = list(reversed(channels))
        self.conv_in = nn.Conv2d(config.latent_channels, channels[-1], kernel_size=3, padding=1)
        self.mid_block = MidBlock(channels[-1], groups, config.mid_block_add_attention)
        self.up_blocks = nn.ModuleList(
            UpDecoderBlock2D(reversed_channels[max(i - 1, 0)], reversed_channels[i], config.layers_per_block + 1, groups,
                             add_upsample=i < len(channels) - 1)
            for i in range(len(channels))
        )
        self.conv_norm_out = nn.GroupNorm(groups, channels[0], eps=RESNET_EPS)
        self.conv_act = nn.SiLU()
        self.conv_out = nn.Conv2d(channels[0], config.out_channels, kernel_size=3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid_block(self.conv_in(z))  # (B, C_last, h, w)
        for block in self.up_blocks:
            h = block(h)  # ... -> (B, C_0, h*f, w*f)
        return self.conv_out(self.conv_act(self.conv_norm_out(h)))  # (B, out_channels, H, W)


# ------------------------------------------------------------------------------------------
# The model
# ------------------------------------------------------------------------------------------


class AutoencoderKL(Pretrained, nn.Module):
    """`encode(x) -> DiagonalGaussian`, `decode(z) -> x_hat`; images in [-1, 1], (B, 3, H, W)."""

    config_class = VAEConfig
    weights_name = "diffusion_pytorch_model.safetensors"

    def __init__(self, config: VAEConfig):
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        L = config.latent_channels
        # 1x1 convolutions around the latent (named after VQGAN's quantiser, which KL-VAEs do not have)
        self.quant_conv = nn.Conv2d(2 * L, 2 * L, kernel_size=1) if config.use_quant_conv else None
        self.post_quant_conv = nn.Conv2d(L, L, kernel_size=1) if config.use_post_quant_conv else None

    def _check(self, t: torch.Tensor, channels: int, what: str, multiple: int) -> None:
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"Expected {what} as a tensor (B, {channels}, H, W), got {got}.")
        if t.shape[1] != channels:
            raise ValueError(
                f"Expected {what} with {channels} channels, got {t.shape[1]} (shape {tuple(t.shape)}). "
                "Images are (B, C, H, W), channels first; latents have config.latent_channels channels."
            )
        H, W = t.shape[-2:]
        if H % multiple or W % multiple:
            raise ValueError(
                f"The image size {H}x{W} must be divisible by {multiple} (the autoencoder halves it "
                f"{len(self.config.block_out_channels) - 1} times). Resize or crop it, e.g. to "
                f"{H // multiple * multiple}x{W // multiple * multiple}."
            )

    def encode(self, x: torch.Tensor) -> DiagonalGaussian:
        """The posterior q(z | x) for images x (B, 3, H, W) in [-1, 1]."""
        self._check(x, self.config.in_channels, "images", self.config.downscale_factor)
        moments = self.encoder(x)  # (B, 2 * latent, H/f, W/f)
        if self.quant_conv is not None:
            moments = self.quant_conv(moments)
        return DiagonalGaussian(moments)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, h*f, w*f) from latents z (B, latent, h, w) (unscaled: divide by scaling_factor first)."""
        self._check(z, self.config.latent_channels, "latents", 1)
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return self.decoder(z)

    def forward(self, x: torch.Tensor, sample_posterior: bool = False, generator: torch.Generator | None = None) -> torch.Tensor:
        """Reconstruction: decode(z) with z the posterior mean, or a sample when sample_posterior."""
        posterior = self.encode(x)
        z = posterior.sample(generator) if sample_posterior else posterior.mode()
        return self.decode(z)
