"""Stable Diffusion's denoising UNet: eps_theta(x_t, t, c).

The UNet predicts the noise eps (or v, for v-prediction models such as SD 2.x 768-v) in a
noisy latent x_t (B, 4, H/8, W/8), given the timestep t and the text embeddings c
(B, 77, cross_attention_dim). Ronneberger et al. 2015 (U-Net), Ho et al. 2020 (the
diffusion UNet), Rombach et al. 2022 (latent diffusion with cross-attention).

    emb = TimestepEmbedding(sinusoids(t))                      (B, 4 * C_0)
    h = conv_in(x_t)                                           (B, C_0, H, W)
    down path, level i = 0 .. n-1 (C_i = block_out_channels[i]):
        layers_per_block x [ResnetBlock2D(h, emb) -> Transformer2DModel(h, c) if a CrossAttn block]
        Downsample2D (all but the last level)                   H, W -> H/2, W/2
        every output is kept as a skip connection
    mid: ResnetBlock2D -> Transformer2DModel -> ResnetBlock2D  at H / 2^(n-1)
    up path, the levels in reverse: (layers_per_block + 1) x
        [concat(h, skip) -> ResnetBlock2D -> Transformer2DModel], Upsample2D (all but the last)
    out = conv_out(SiLU(GroupNorm(h)))                          (B, out_channels, H, W)

Shapes through SD 1.5 for a 512x512 image (latent 4x64x64), block_out_channels
(320, 640, 1280, 1280): 320x64x64 -> 640x32x32 -> 1280x16x16 -> 1280x8x8 (no attention at
the last level) -> mid 1280x8x8 -> back up to 320x64x64 -> 4x64x64.

A note on `attention_head_dim`. In diffusers' config.json (and therefore here) the field
`attention_head_dim` of SD 1.x holds 8: the *number of heads*, not their width. The
original CompVis config had `num_heads: 8` for SD 1.x; when the configs were converted, the
value landed in a field called attention_head_dim, and renaming it would have broken
tens of thousands of published configs, so diffusers reads attention_head_dim as the head
count (see the comment in diffusers' UNet2DConditionModel.__init__). The width of a head is
then C_i / heads: 320/8 = 40, 640/8 = 80, 1280/8 = 160. SD 2.x instead fixed the head
width at 64 (CompVis `num_head_channels: 64`), which the converted config expresses as
per-level head counts attention_head_dim = (5, 10, 20, 20): 320/5 = 640/10 = 1280/20 = 64.

SDXL (Podell et al. 2023) keeps this UNet and changes its configuration: three levels
(320, 640, 1280), no attention at the first, (1, 2, 10) transformer layers per level, 2048-wide
text embeddings from two encoders, and one more term added to the timestep embedding
(diffusers' addition_embed_type="text_time"):

    emb += add_embedding(concat(text_embeds, add_time_proj(time_ids).flatten))   (B, 4 * C_0)

text_embeds (B, 1280) is the second text encoder's pooled, projected prompt embedding and
time_ids (B, 6) the "micro-conditioning": original size (h, w), crop top-left (top, left) and
target size (h, w), each through 256-wide sinusoids. Pass them as diffusers does:
`unet(x, t, context, added_cond_kwargs={"text_embeds": ..., "time_ids": ...})`.

Config field names are diffusers' UNet2DConditionModel config.json keys and the defaults
are diffusers' defaults, so a config.json that omits a key means the same thing to both.
Keys that select features this UNet does not implement (concatenated class embeddings, added
embeddings other than SDXL's text_time, other block types, ...) are accepted only with their default value; anything
else raises a CheckpointError naming the key.
"""

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from sdlearn.models.attention import Transformer2DModel
from sdlearn.models.checkpoint import CheckpointError, ModelConfig, Pretrained
from sdlearn.models.layers import (Downsample2D, ResnetBlock2D, SinusoidalEmbedding, TimestepEmbedding, Upsample2D,
                                   batch_timesteps)

# diffusers config keys for features we do not implement -> the values that mean "off".
# A config.json may carry them (diffusers writes them all) as long as the feature is off.
_FEATURES_OFF = {
    "center_input_sample": (False,),
    "mid_block_type": ("UNetMidBlock2DCrossAttn",),
    "only_cross_attention": (False,),
    "dual_cross_attention": (False,),
    "num_attention_heads": (None,),
    "class_embeddings_concat": (False,),
    "encoder_hid_dim": (None,),
    "encoder_hid_dim_type": (None,),
    "resnet_time_scale_shift": ("default",),
    "resnet_skip_time_act": (False,),
    "resnet_out_scale_factor": (1.0,),
    "time_embedding_type": ("positional",),
    "time_embedding_dim": (None,),
    "time_embedding_act_fn": (None,),
    "timestep_post_act": (None,),
    "time_cond_proj_dim": (None,),
    "conv_in_kernel": (3,),
    "conv_out_kernel": (3,),
    "attention_type": ("default",),
    "cross_attention_norm": (None,),
    "reverse_transformer_layers_per_block": (None,),
}
# Keys that only matter for a feature that is off above, so any value is harmless.
_IRRELEVANT = {
    "addition_embed_type_num_heads",  # only with addition_embed_type="text"
    "mid_block_only_cross_attention",  # only with mid_block_type="UNetMidBlock2DSimpleCrossAttn"
}

DOWN_BLOCK_TYPES = ("CrossAttnDownBlock2D", "DownBlock2D")
CLASS_EMBED_TYPES = (None, "projection")  # None: ids through nn.Embedding (num_class_embeds); "projection": vectors
ADDITION_EMBED_TYPES = (None, "text_time")  # "text_time": SDXL's pooled text + micro-conditioning (see UNet.forward)
UP_BLOCK_TYPES = ("CrossAttnUpBlock2D", "UpBlock2D")


@dataclass
class UNetConfig(ModelConfig):
    """diffusers' UNet2DConditionModel config (the subset SD 1.x/2.x/XL use); defaults are diffusers'."""

    library_class: ClassVar[str] = "UNet2DConditionModel"
    ignored_keys: ClassVar[frozenset] = frozenset(_FEATURES_OFF) | frozenset(_IRRELEVANT)
    nullable_keys: ClassVar[frozenset] = frozenset({"upcast_attention"})  # SD 1.5 writes null for "off"

    sample_size: int | None = None  # latent height = width the model was trained at (64 -> 512 px)
    in_channels: int = 4
    out_channels: int = 4
    flip_sin_to_cos: bool = True  # cos first in the timestep sinusoids (see sdlearn.models.layers)
    freq_shift: int = 0
    down_block_types: tuple = ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D")
    up_block_types: tuple = ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D")
    block_out_channels: tuple = (320, 640, 1280, 1280)
    layers_per_block: int | tuple = 2
    downsample_padding: int = 1
    mid_block_scale_factor: float = 1.0
    dropout: float = 0.0
    act_fn: str = "silu"
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    cross_attention_dim: int = 1280  # width of the text embeddings
    transformer_layers_per_block: int | tuple = 1
    attention_head_dim: int | tuple = 8  # the NUMBER of heads per level (historical name, see above)
    use_linear_projection: bool = False  # proj_in/out: 1x1 conv (SD 1.x) or linear (SD 2.x)
    upcast_attention: bool = False  # attention scores in float32 (SD 2.1 768-v)
    num_class_embeds: int | None = None  # class-conditional models: a learned vector per class, added to emb
    # "projection": the condition is a vector (B, projection_class_embeddings_input_dim), e.g. a multi-hot of
    # attributes, mapped by a TimestepEmbedding-shaped MLP and added to emb (diffusers' class_embed_type).
    class_embed_type: str | None = None
    # SDXL's added conditioning (addition_embed_type="text_time"): the pooled text embedding (B, P) and six
    # "micro-conditioning" numbers per image, time_ids = (orig_h, orig_w, crop_top, crop_left, target_h, target_w),
    # each through sinusoids of width addition_time_embed_dim; their concatenation (B, P + 6 * addition_time_embed_dim)
    # is projection_class_embeddings_input_dim wide (SDXL base: 1280 + 6 * 256 = 2816).
    projection_class_embeddings_input_dim: int | None = None
    addition_embed_type: str | None = None
    addition_time_embed_dim: int | None = None

    def __post_init__(self):
        n = len(self.block_out_channels)
        if n < 1:
            raise ValueError("block_out_channels must list at least one level, e.g. (320, 640, 1280, 1280).")
        if len(self.down_block_types) != n or len(self.up_block_types) != n:
            raise ValueError(
                f"down_block_types ({len(self.down_block_types)}), up_block_types ({len(self.up_block_types)}) and "
                f"block_out_channels ({n}) must have one entry per level."
            )
        for kind, names, allowed in (("down", self.down_block_types, DOWN_BLOCK_TYPES), ("up", self.up_block_types, UP_BLOCK_TYPES)):
            unknown = [b for b in names if b not in allowed]
            if unknown:
                raise CheckpointError(f"{kind}_block_types contains {unknown}; sdlearn's UNet implements {list(allowed)}.")
        if self.act_fn not in ("silu", "swish"):
            raise CheckpointError(f"act_fn={self.act_fn!r} is not implemented; Stable Diffusion uses 'silu'.")
        if self.norm_num_groups is None:
            raise CheckpointError("norm_num_groups=None (no output norm) is not implemented; SD uses 32.")
        if not isinstance(self.cross_attention_dim, int):
            raise CheckpointError(
                f"cross_attention_dim={self.cross_attention_dim!r}: only one text width for all levels is implemented."
            )
        if self.num_class_embeds is not None and self.num_class_embeds < 1:
            raise ValueError(f"num_class_embeds must be a positive number of classes or None, got {self.num_class_embeds}.")
        if self.class_embed_type not in CLASS_EMBED_TYPES:
            raise CheckpointError(
                f"class_embed_type={self.class_embed_type!r} is not implemented; sdlearn's UNet implements {list(CLASS_EMBED_TYPES)}."
            )
        if self.class_embed_type == "projection":
            dim = self.projection_class_embeddings_input_dim
            if not isinstance(dim, int) or dim < 1:
                raise ValueError(
                    f"class_embed_type='projection' needs projection_class_embeddings_input_dim, the length of the "
                    f"condition vector (a positive int), got {dim!r}."
                )
            if self.num_class_embeds is not None:
                raise ValueError("Give either num_class_embeds (class ids) or class_embed_type='projection' (vectors), not both.")
        if self.addition_embed_type not in ADDITION_EMBED_TYPES:
            raise CheckpointError(
                f"addition_embed_type={self.addition_embed_type!r} is not implemented; sdlearn's UNet implements "
                f"{list(ADDITION_EMBED_TYPES)} (None for SD 1.x/2.x, 'text_time' for SDXL)."
            )
        if self.addition_embed_type == "text_time":
            for name in ("addition_time_embed_dim", "projection_class_embeddings_input_dim"):
                value = getattr(self, name)
                if not isinstance(value, int) or value < 1:
                    raise ValueError(
                        f"addition_embed_type='text_time' needs {name} (a positive int; SDXL base: "
                        f"addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816), got {value!r}."
                    )
            if self.projection_class_embeddings_input_dim <= 6 * self.addition_time_embed_dim:
                raise ValueError(
                    f"projection_class_embeddings_input_dim={self.projection_class_embeddings_input_dim} must be the pooled "
                    f"text width plus 6 * addition_time_embed_dim = {6 * self.addition_time_embed_dim} (SDXL: 1280 + 1536 = 2816)."
                )
        if self.upcast_attention is None:  # SD 1.5's config.json writes null for "off"
            self.upcast_attention = False
        for name in ("layers_per_block", "transformer_layers_per_block", "attention_head_dim"):
            value = getattr(self, name)
            if not isinstance(value, int) and len(value) != n:
                raise ValueError(f"{name}={value!r} must be one int or one value per level ({n} levels).")
            if not isinstance(value, int) and not all(isinstance(v, int) for v in value):
                raise CheckpointError(f"{name}={value!r}: nested per-layer values are not implemented; use ints.")
        for channels, heads in zip(self.block_out_channels, self.per_level("attention_head_dim")):
            if channels % heads != 0:
                raise ValueError(f"{channels} channels cannot be split into {heads} heads (attention_head_dim).")

    @classmethod
    def from_dict(cls, config: dict) -> "UNetConfig":
        for key, off in _FEATURES_OFF.items():
            if key in config and config[key] not in off:
                raise CheckpointError(
                    f"This UNet config sets {key}={config[key]!r}, a feature sdlearn's UNet does not implement "
                    f"(supported: {off[0]!r}). It is not a Stable Diffusion 1.x/2.x/XL UNet; use diffusers' "
                    "UNet2DConditionModel for it."
                )
        return super().from_dict(config)

    def per_level(self, name: str) -> tuple:
        """A field that may be one int or one value per level, as a tuple per level."""
        value = getattr(self, name)
        return (value,) * len(self.block_out_channels) if isinstance(value, int) else tuple(value)

    @property
    def num_levels(self) -> int:
        return len(self.block_out_channels)

    @property
    def downscale(self) -> int:
        """How much the last level is smaller than the input: 2^(levels-1)."""
        return 2 ** (self.num_levels - 1)

    # presets ------------------------------------------------------------------------------

    @classmethod
    def tiny(cls, **overrides) -> "UNetConfig":
        """SD 1.x layout at toy size (0.79M parameters): fast on a CPU, for tests and lessons."""
        values = dict(
            sample_size=16,
            block_out_channels=(32, 64),
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            layers_per_block=1,
            attention_head_dim=2,
            cross_attention_dim=32,
            norm_num_groups=8,
        )
        return cls(**{**values, **overrides})

    @classmethod
    def tiny_sd2(cls, **overrides) -> "UNetConfig":
        """SD 2.x layout at toy size (1.48M parameters): per-level head counts, linear projections, upcast attention."""
        values = dict(
            sample_size=16,
            block_out_channels=(32, 64, 64),
            down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
            layers_per_block=1,
            attention_head_dim=(2, 4, 4),  # head width 16 everywhere, like SD 2's 64
            cross_attention_dim=48,
            norm_num_groups=8,
            use_linear_projection=True,
            upcast_attention=True,
        )
        return cls(**{**values, **overrides})

    @classmethod
    def sd15(cls, **overrides) -> "UNetConfig":
        """Stable Diffusion 1.x (runwayml/stable-diffusion-v1-5 unet/config.json): 860M parameters."""
        values = dict(sample_size=64, cross_attention_dim=768, attention_head_dim=8)
        return cls(**{**values, **overrides})

    @classmethod
    def sd2(cls, **overrides) -> "UNetConfig":
        """Stable Diffusion 2.x 768-v (stabilityai/stable-diffusion-2-1 unet/config.json): 865M parameters.

        For the 512 px base model pass sample_size=64 (and upcast_attention=False).
        """
        values = dict(
            sample_size=96,
            cross_attention_dim=1024,
            attention_head_dim=(5, 10, 20, 20),
            use_linear_projection=True,
            upcast_attention=True,
        )
        return cls(**{**values, **overrides})

    @classmethod
    def tiny_sdxl(cls, **overrides) -> "UNetConfig":
        """SDXL layout at toy size (2.05M parameters): no attention at the first level, more transformer layers deeper, text_time.

        cross_attention_dim 64 = two tiny text encoders of width 32 concatenated; the pooled text
        embedding is 32 wide, so projection_class_embeddings_input_dim = 32 + 6 * 8 = 80 (the
        numbers of diffusers' own tiny SDXL test UNet).
        """
        values = dict(
            sample_size=16,
            block_out_channels=(32, 64, 64),
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            layers_per_block=1,
            transformer_layers_per_block=(1, 1, 2),
            attention_head_dim=(2, 4, 4),  # head width 16 everywhere, like SDXL's 64
            cross_attention_dim=64,
            norm_num_groups=8,
            use_linear_projection=True,
            addition_embed_type="text_time",
            addition_time_embed_dim=8,
            projection_class_embeddings_input_dim=80,
        )
        return cls(**{**values, **overrides})

    @classmethod
    def sdxl(cls, **overrides) -> "UNetConfig":
        """Stable Diffusion XL base 1.0 (stabilityai/stable-diffusion-xl-base-1.0 unet/config.json): 2.57B parameters.

        Where the numbers come from (Podell et al. 2023, "SDXL", section 2.1 and table 1; the published
        config.json; the fields not set here are diffusers' UNet2DConditionModel defaults, which that
        config.json also holds: in/out_channels 4, layers_per_block 2, norm_num_groups 32, silu, ...):
        - sample_size 128: 1024x1024 images through the f=8 VAE.
        - block_out_channels (320, 640, 1280): three levels instead of SD 1.x's four; the lowest
          (8x8 for SD 1.x) is dropped.
        - down_block_types: no attention at the highest resolution (level 0, 128x128, where
          attention is most expensive); up_block_types mirror them.
        - transformer_layers_per_block (1, 2, 10): the transformer compute moves to the lower
          levels (level 0's 1 is unused, it has no attention); the mid block uses the last, 10.
        - attention_head_dim (5, 10, 20): head counts (see the module docstring), i.e. heads 64
          wide at every level, as SD 2.x; use_linear_projection True, as SD 2.x.
        - cross_attention_dim 2048: the two text encoders' penultimate hidden states side by
          side, CLIP ViT-L (768) + OpenCLIP ViT-bigG (1280).
        - addition_embed_type "text_time", addition_time_embed_dim 256,
          projection_class_embeddings_input_dim 2816 = 1280 (ViT-bigG's pooled, projected
          text embedding) + 6 * 256 (sinusoids of the six size/crop numbers).
        """
        values = dict(
            sample_size=128,
            block_out_channels=(320, 640, 1280),
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            transformer_layers_per_block=(1, 2, 10),
            attention_head_dim=(5, 10, 20),
            use_linear_projection=True,
            cross_attention_dim=2048,
            addition_embed_type="text_time",
            addition_time_embed_dim=256,
            projection_class_embeddings_input_dim=2816,
        )
        return cls(**{**values, **overrides})


# Blocks ----------------------------------------------------------------------------------------


class DownBlock(nn.Module):
    """One level of the down path: resnets (each followed by a transformer if `attention`), then a downsampler.

    diffusers' CrossAttnDownBlock2D (attention=True) and DownBlock2D (attention=False).
    forward returns the new h and the skip tensors: one per layer, plus the downsampled h.
    """

    def __init__(self, in_channels, out_channels, temb_channels, num_layers, attention, add_downsample, config, level):
        super().__init__()
        c = config
        heads = c.per_level("attention_head_dim")[level]
        self.resnets = nn.ModuleList(
            [
                ResnetBlock2D(in_channels if i == 0 else out_channels, out_channels, temb_channels, c.norm_num_groups, eps=c.norm_eps, dropout=c.dropout)
                for i in range(num_layers)
            ]
        )
        if attention:
            self.attentions = nn.ModuleList(
                [
                    Transformer2DModel(
                        heads, out_channels // heads, out_channels, c.per_level("transformer_layers_per_block")[level],
                        c.cross_attention_dim, c.norm_num_groups, c.use_linear_projection, c.dropout, c.upcast_attention,
                    )
                    for _ in range(num_layers)
                ]
            )
        else:
            self.attentions = None
        if add_downsample:
            self.downsamplers = nn.ModuleList([Downsample2D(out_channels, out_channels, padding=c.downsample_padding)])
        else:
            self.downsamplers = None

    def forward(self, h, emb, context):
        skips = []
        for i, resnet in enumerate(self.resnets):
            h = resnet(h, emb)
            if self.attentions is not None:
                h = self.attentions[i](h, context)
            skips.append(h)
        if self.downsamplers is not None:
            h = self.downsamplers[0](h)  # (B, C, H/2, W/2)
            skips.append(h)
        return h, skips


class MidBlock(nn.Module):
    """ResnetBlock2D -> Transformer2DModel -> ResnetBlock2D at the lowest resolution (UNetMidBlock2DCrossAttn)."""

    def __init__(self, channels, temb_channels, config):
        super().__init__()
        c = config
        heads = c.per_level("attention_head_dim")[-1]
        layers = c.per_level("transformer_layers_per_block")[-1]

        def resnet():
            return ResnetBlock2D(
                channels, channels, temb_channels, c.norm_num_groups, eps=c.norm_eps, dropout=c.dropout,
                output_scale_factor=c.mid_block_scale_factor,
            )

        self.attentions = nn.ModuleList(
            [
                Transformer2DModel(
                    heads, channels // heads, channels, layers, c.cross_attention_dim, c.norm_num_groups,
                    c.use_linear_projection, c.dropout, c.upcast_attention,
                )
            ]
        )
        self.resnets = nn.ModuleList([resnet(), resnet()])

    def forward(self, h, emb, context):
        h = self.resnets[0](h, emb)
        h = self.attentions[0](h, context)
        return self.resnets[1](h, emb)


class UpBlock(nn.Module):
    """One level of the up path: each resnet first concatenates a skip tensor; then an upsampler.

    diffusers' CrossAttnUpBlock2D (attention=True) and UpBlock2D (attention=False). The
    skips are consumed last-in first-out, which pairs each up layer with the down layer
    at the same resolution.
    """

    def __init__(self, in_channels, prev_channels, out_channels, temb_channels, num_layers, attention, add_upsample, config, level):
        super().__init__()
        c = config
        heads = c.per_level("attention_head_dim")[::-1][level]
        resnets = []
        for i in range(num_layers):
            # The last layer of the level takes the skip from the level below (in_channels wide).
            skip_channels = in_channels if i == num_layers - 1 else out_channels
            h_channels = prev_channels if i == 0 else out_channels
            resnets.append(ResnetBlock2D(h_channels + skip_channels, out_channels, temb_channels, c.norm_num_groups, eps=c.norm_eps, dropout=c.dropout))
        self.resnets = nn.ModuleList(resnets)
        if attention:
            self.attentions = nn.ModuleList(
                [
                    Transformer2DModel(
                        heads, out_channels // heads, out_channels, c.per_level("transformer_layers_per_block")[::-1][level],
                        c.cross_attention_dim, c.norm_num_groups, c.use_linear_projection, c.dropout, c.upcast_attention,
                    )
                    for _ in range(num_layers)
                ]
            )
        else:
            self.attentions = None
        self.upsamplers = nn.ModuleList([Upsample2D(out_channels, out_channels)]) if add_upsample else None

    def forward(self, h, skips, emb, context):
        for i, resnet in enumerate(self.resnets):
            h = torch.cat([h, skips[-1 - i]], dim=1)  # (B, C_h + C_skip, H, W)
            h = resnet(h, emb)
            if self.attentions is not None:
                h = self.attentions[i](h, context)
        if self.upsamplers is not None:
            h = self.upsamplers[0](h)  # (B, C, 2H, 2W)
        return h


# The model -------------------------------------------------------------------------------------


class UNet(Pretrained, nn.Module):
    """eps_theta(x_t, t, context): UNet(x (B, C_in, H, W), t, context (B, L, D)) -> (B, C_out, H, W).

    t may be an int, a float, a 0-d tensor or a (B,) tensor. H and W must be multiples of
    2^(levels-1) (8 for SD). Build with `UNet(UNetConfig.sd15())`, `UNet.from_config(dict)`
    or `UNet.from_pretrained(folder)`.
    """

    config_class = UNetConfig
    weights_name = "diffusion_pytorch_model.safetensors"

    def __init__(self, config: UNetConfig):
        super().__init__()
        if not isinstance(config, UNetConfig):
            raise TypeError(f"UNet expects a UNetConfig, got {type(config).__name__}. For a config.json dict use UNet.from_config(d).")
        self.config = c = config
        channels = c.block_out_channels
        time_embed_dim = channels[0] * 4
        n = c.num_levels
        layers = c.per_level("layers_per_block")

        self.conv_in = nn.Conv2d(c.in_channels, channels[0], kernel_size=3, padding=1)
        self.time_proj = SinusoidalEmbedding(channels[0], c.flip_sin_to_cos, c.freq_shift)
        self.time_embedding = TimestepEmbedding(channels[0], time_embed_dim)
        # Class conditioning, added to the timestep embedding so that every ResNet block sees it:
        # class ids (diffusers' num_class_embeds):                emb += E[label]
        # condition vectors (class_embed_type="projection"):    emb += linear_2(SiLU(linear_1(y)))
        if c.class_embed_type == "projection":
            self.class_embedding = TimestepEmbedding(c.projection_class_embeddings_input_dim, time_embed_dim)
        elif c.num_class_embeds:
            self.class_embedding = nn.Embedding(c.num_class_embeds, time_embed_dim)
        else:
            self.class_embedding = None
        # SDXL's added conditioning (addition_embed_type="text_time"), also added to emb:
        #   emb += linear_2(SiLU(linear_1(concat(pooled_text, sinusoids(time_ids).flatten))))
        if c.addition_embed_type == "text_time":
            self.add_time_proj = SinusoidalEmbedding(c.addition_time_embed_dim, c.flip_sin_to_cos, c.freq_shift)
            self.add_embedding = TimestepEmbedding(c.projection_class_embeddings_input_dim, time_embed_dim)

        self.down_blocks = nn.ModuleList()
        for i, block_type in enumerate(c.down_block_types):
            self.down_blocks.append(
                DownBlock(
                    channels[max(i - 1, 0)], channels[i], time_embed_dim, layers[i],
                    attention=block_type == "CrossAttnDownBlock2D", add_downsample=i < n - 1, config=c, level=i,
                )
            )
        self.mid_block = MidBlock(channels[-1], time_embed_dim, c)

        self.up_blocks = nn.ModuleList()
        reversed_channels = channels[::-1]
        reversed_layers = layers[::-1]
        for i, block_type in enumerate(c.up_block_types):
            self.up_blocks.append(
                UpBlock(
                    in_channels=reversed_channels[min(i + 1, n - 1)],  # width of the skips from the level below
                    prev_channels=reversed_channels[max(i - 1, 0)],
                    out_channels=reversed_channels[i],
                    temb_channels=time_embed_dim,
                    num_layers=reversed_layers[i] + 1,  # one more than down: it also takes the downsampler's output
                    attention=block_type == "CrossAttnUpBlock2D",
                    add_upsample=i < n - 1,
                    config=c,
                    level=i,
                )
            )

        self.conv_norm_out = nn.GroupNorm(c.norm_num_groups, channels[0], eps=c.norm_eps)
        self.conv_act = nn.SiLU()
        self.conv_out = nn.Conv2d(channels[0], c.out_channels, kernel_size=3, padding=1)

    # input checks ------------------------------------------------------------------------

    def _check_inputs(self, x: torch.Tensor, context: torch.Tensor) -> None:
        c = self.config
        if x.ndim != 4:
            raise ValueError(f"UNet expects a latent batch (B, {c.in_channels}, H, W), got shape {tuple(x.shape)}.")
        if x.shape[1] != c.in_channels:
            raise ValueError(
                f"UNet expects {c.in_channels} input channels, got {x.shape[1]} (shape {tuple(x.shape)}). "
                "Pass the VAE latent (4 channels for SD), not the image."
            )
        H, W = x.shape[-2:]
        if H % c.downscale or W % c.downscale:
            raise ValueError(
                f"The latent is {H}x{W}, but this UNet's {c.num_levels} levels shrink it by a factor of {c.downscale}, "
                f"so height and width must be multiples of {c.downscale}. With SD's VAE (factor 8) that means image "
                f"sizes that are multiples of {8 * c.downscale} pixels."
            )
        if context is None or context.ndim != 3:
            got = "None" if context is None else f"shape {tuple(context.shape)}"
            raise ValueError(f"context must be text embeddings (B, tokens, {c.cross_attention_dim}), got {got}.")
        if context.shape[-1] != c.cross_attention_dim:
            raise ValueError(
                f"context has width {context.shape[-1]}, but this UNet expects cross_attention_dim={c.cross_attention_dim}. "
                "SD 1.x uses CLIP ViT-L/14 (768), SD 2.x OpenCLIP ViT-H/14 (1024)."
            )
        if context.shape[0] != x.shape[0]:
            raise ValueError(
                f"x has batch size {x.shape[0]} but context has {context.shape[0]}; give one text embedding per latent "
                "(for classifier-free guidance, concatenate the unconditional and conditional halves of both)."
            )

    # forward -----------------------------------------------------------------------------

    def _class_embedding(self, class_labels, x: torch.Tensor) -> torch.Tensor:
        """The condition's embedding (B, 4 * C_0) for a class-conditional model, after checking the labels."""
        c = self.config
        if self.class_embedding is None:
            raise ValueError("class_labels were given, but this UNet has no class embedding (num_class_embeds=None).")
        if c.class_embed_type == "projection":
            dim = c.projection_class_embeddings_input_dim
            if class_labels is None:
                raise ValueError(f"This UNet is conditional (class_embed_type='projection'): pass class_labels, a ({x.shape[0]}, {dim}) float tensor.")
            y = torch.as_tensor(class_labels, device=x.device)
            if y.shape != (x.shape[0], dim) or not y.is_floating_point():
                raise ValueError(f"class_labels must be a float tensor of shape ({x.shape[0]}, {dim}), got {y.dtype} {tuple(y.shape)}.")
            return self.class_embedding(y.to(x.dtype)).to(x.dtype)
        n = c.num_class_embeds
        if class_labels is None:
            raise ValueError(f"This UNet is class-conditional (num_class_embeds={n}): pass class_labels, a (B,) LongTensor.")
        labels = torch.as_tensor(class_labels, device=x.device)
        if labels.ndim != 1 or labels.shape[0] != x.shape[0] or labels.is_floating_point():
            raise ValueError(f"class_labels must be integers of shape ({x.shape[0]},), got {labels.dtype} {tuple(labels.shape)}.")
        if labels.min() < 0 or labels.max() >= n:
            raise ValueError(f"class_labels must lie in 0..{n - 1}, got values from {int(labels.min())} to {int(labels.max())}.")
        return self.class_embedding(labels).to(x.dtype)

    def _added_embedding(self, added_cond_kwargs, x: torch.Tensor) -> torch.Tensor:
        """SDXL's text_time embedding (B, 4 * C_0) of the pooled text embedding and the six size/crop numbers.

        text_embeds (B, P): encoder 2's pooled, projected prompt embedding (P = 1280 for SDXL).
        time_ids (B, 6): (original_h, original_w, crop_top, crop_left, target_h, target_w) in pixels; SDXL
        was trained on them so that at sampling time one can ask for an uncropped, full-resolution image.
        """
        c = self.config
        d = c.addition_time_embed_dim
        P = c.projection_class_embeddings_input_dim - 6 * d
        B = x.shape[0]
        if added_cond_kwargs is None:
            added_cond_kwargs = {}
        if not isinstance(added_cond_kwargs, dict):
            raise TypeError(f"added_cond_kwargs must be a dict with 'text_embeds' and 'time_ids', got {type(added_cond_kwargs).__name__}.")
        missing = [k for k in ("text_embeds", "time_ids") if added_cond_kwargs.get(k) is None]
        if missing:
            raise ValueError(
                f"This UNet has addition_embed_type='text_time' (SDXL): pass added_cond_kwargs={{'text_embeds': ({B}, {P}) "
                f"pooled text embedding, 'time_ids': ({B}, 6) original size, crop top-left, target size}}; missing {missing}."
            )
        text_embeds = added_cond_kwargs["text_embeds"]
        time_ids = torch.as_tensor(added_cond_kwargs["time_ids"], device=x.device)
        if text_embeds.shape != (B, P):
            raise ValueError(f"text_embeds must have shape ({B}, {P}) (the pooled text embedding), got {tuple(text_embeds.shape)}.")
        if time_ids.shape != (B, 6):
            raise ValueError(
                f"time_ids must have shape ({B}, 6): (original_h, original_w, crop_top, crop_left, target_h, target_w) "
                f"per image, got {tuple(time_ids.shape)}."
            )
        time_embeds = self.add_time_proj(time_ids.flatten()).reshape(B, 6 * d)  # (B*6, d) -> (B, 6 d), float32
        add_embeds = torch.cat([text_embeds.to(time_embeds.dtype), time_embeds], dim=-1)  # (B, P + 6 d)
        return self.add_embedding(add_embeds.to(x.dtype))

    def forward(self, x: torch.Tensor, t, context: torch.Tensor, class_labels=None, added_cond_kwargs: dict | None = None) -> torch.Tensor:
        """The model output (B, C_out, H, W). class_labels for class-conditional models; added_cond_kwargs
        {"text_embeds": (B, P), "time_ids": (B, 6)} for SDXL (addition_embed_type="text_time"), as diffusers takes them."""
        self._check_inputs(x, context)
        # The sinusoids are computed in float32, then cast (as diffusers does for fp16 models).
        emb = self.time_embedding(self.time_proj(batch_timesteps(t, x)).to(x.dtype))  # (B, 4 * C_0)
        if self.class_embedding is not None or class_labels is not None:
            emb = emb + self._class_embedding(class_labels, x)  # the class joins the timestep in every ResNet block
        if self.config.addition_embed_type == "text_time":
            emb = emb + self._added_embedding(added_cond_kwargs, x)  # so do SDXL's pooled text and size/crop numbers
        elif added_cond_kwargs:
            raise ValueError("added_cond_kwargs were given, but this UNet has no added embedding (addition_embed_type=None).")

        h = self.conv_in(x)  # (B, C_0, H, W)
        skips = [h]
        for block in self.down_blocks:
            h, block_skips = block(h, emb, context)
            skips.extend(block_skips)

        h = self.mid_block(h, emb, context)  # (B, C_last, H / 2^(n-1), W / 2^(n-1))

        for block in self.up_blocks:
            n = len(block.resnets)
            h = block(h, skips[-n:], emb, context)
            del skips[-n:]

        return self.conv_out(self.conv_act(self.conv_norm_out(h)))  # (B, C_out, H, W)

    # inspection --------------------------------------------------------------------------

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


def trace_shapes(unet: UNet, x: torch.Tensor, t, context: torch.Tensor, added_cond_kwargs: dict | None = None) -> list:
    """Run `unet` once and list (module name, output shape) for its top-level stages.

    added_cond_kwargs: SDXL's {"text_embeds", "time_ids"} (see UNet.forward), for a text_time UNet.

    Works on the meta device too, which gives the shapes of a full-size model without
    allocating its weights: `with torch.device("meta"): unet = UNet(UNetConfig.sd15())`.
    """
    trace = []
    stages = [("conv_in", unet.conv_in), ("time_embedding", unet.time_embedding)]
    for i, block in enumerate(unet.down_blocks):
        stages += [(f"down_blocks.{i}.resnets.{j}", m) for j, m in enumerate(block.resnets)]
        stages += [(f"down_blocks.{i}.attentions.{j}", m) for j, m in enumerate(block.attentions or [])]
        stages += [(f"down_blocks.{i}.downsamplers.0", m) for m in block.downsamplers or []]
    stages += [("mid_block", unet.mid_block)]
    for i, block in enumerate(unet.up_blocks):
        stages += [(f"up_blocks.{i}.resnets.{j}", m) for j, m in enumerate(block.resnets)]
        stages += [(f"up_blocks.{i}.attentions.{j}", m) for j, m in enumerate(block.attentions or [])]
        stages += [(f"up_blocks.{i}.upsamplers.0", m) for m in block.upsamplers or []]
    stages += [("conv_out", unet.conv_out)]

    def recorder(name):
        def hook(module, inputs, output):
            trace.append((name, tuple(inputs[0].shape), tuple(output.shape)))

        return hook

    handles = [module.register_forward_hook(recorder(name)) for name, module in stages]
    try:
        with torch.no_grad():
            unet(x, t, context, added_cond_kwargs=added_cond_kwargs)
    finally:
        for handle in handles:
            handle.remove()
    return trace


def skip_connections(unet: UNet, trace: list) -> list:
    """Pair every skip tensor with the up-path resnet that concatenates it.

    `trace` is the output of `trace_shapes`. Returns (source, shape, consumer) triples in
    the order the down path stores them; the up path takes them last-in first-out.
    """
    shapes = {name: out for name, _, out in trace}
    sources = ["conv_in"]
    for i, block in enumerate(unet.down_blocks):
        kind = "attentions" if block.attentions is not None else "resnets"
        sources += [f"down_blocks.{i}.{kind}.{j}" for j in range(len(block.resnets))]
        if block.downsamplers is not None:
            sources.append(f"down_blocks.{i}.downsamplers.0")
    consumers = [f"up_blocks.{i}.resnets.{j}" for i, block in enumerate(unet.up_blocks) for j in range(len(block.resnets))]
    if len(consumers) != len(sources):
        raise RuntimeError(f"{len(sources)} skips are stored but {len(consumers)} up-path resnets consume them.")
    return [(source, shapes[source], consumer) for source, consumer in zip(sources, reversed(consumers))]


def config_dict_for_diffusers(config: UNetConfig) -> dict:
    """The config as the keyword arguments of diffusers' UNet2DConditionModel (no bookkeeping keys)."""
    return {k: v for k, v in config.to_dict().items() if not k.startswith("_")}


__all__ = ["UNet", "UNetConfig", "trace_shapes", "skip_connections", "config_dict_for_diffusers"]
