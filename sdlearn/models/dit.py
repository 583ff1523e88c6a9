"""The diffusion transformer (DiT): eps_theta(x_t, t, y) with a plain transformer instead of a UNet.

Peebles & Xie 2023, "Scalable Diffusion Models with Transformers" (DiT). A latent x_t
(B, C, H, W) is cut into p x p patches, each patch becomes a token, a stack of transformer
blocks processes the N tokens, and a last linear layer turns every token back into its
patch of the output. The timestep t and the class label y steer every block through
adaptive layer norm (adaLN-Zero) instead of cross-attention.

Notation: p patch size, h = H / p and w = W / p the grid of patches, N = h * w tokens,
D = num_attention_heads * attention_head_dim the width of a token, K the number of classes.

1. Patchify. Token n = i * w + j (row-major over the grid) holds the patch
   x[:, :, i p : (i + 1) p, j p : (j + 1) p]:

       patchify:   (B, C, H, W) -> (B, h, w, p, p, C) -> (B, N, p * p * C)    pixel (a, b), channel c at
                                                                              feature (a * p + b) * C + c
       unpatchify: (B, N, p * p * C_out) -> (B, C_out, H, W), its inverse

   The model embeds each patch linearly, tokens = patchify(x) W_patch + b (a Conv2d with kernel
   = stride = p, `pos_embed.proj`), and adds a fixed 2-D sin-cos position embedding. For the
   token at row i, column j, with omega_k = 10000^(-k / (D/4)), k = 0 .. D/4 - 1:

       pos(i, j) = [sin(j omega), cos(j omega), sin(i omega), cos(i omega)]       (D,)

   The column comes first (a quirk of the MAE code DiT copied, which diffusers keeps). For a
   grid of another size than the training one (sample_size / p) the positions are rescaled
   to span the same range [0, sample_size / p), as diffusers' PatchEmbed does.

2. Conditioning (diffusers' CombinedTimestepLabelEmbeddings, `norm1.emb`):

       c = MLP(sinusoids_256(t)) + E[y]                                            (B, D)

   E has K + 1 rows: row K is the "null" class, the unconditional input of classifier-free
   guidance (a training loop replaces a label by K with probability 0.1: `drop_class_labels`).
   In diffusers' config, K is called num_embeds_ada_norm (1000 ImageNet classes for DiT-XL/2).

3. A block with adaLN-Zero. One linear layer reads SiLU(c) and writes six D-vectors:

       shift_1, scale_1, gate_1, shift_2, scale_2, gate_2 = W_ada SiLU(c) + b_ada   (`norm1.linear`)
       modulate(x, shift, scale) = x * (1 + scale) + shift                         (per token)
       x = x + gate_1 * Attn(modulate(LN(x), shift_1, scale_1))
       x = x + gate_2 * MLP(modulate(LN(x), shift_2, scale_2))

   i.e. h = x + gate * f(norm(x) * (1 + scale) + shift) twice, with LayerNorms that have no
   parameters of their own: the condition chooses the scale and shift. "Zero": W_ada and b_ada
   start at zero, so every gate is 0 and every block computes x + 0 * f(...) = x, the identity.
   A deep stack of identities passes the signal and the gradient straight through at the
   start, and each block learns how much to add (the same idea as zero-initialising the last
   norm of a ResNet block, Goyal et al. 2017); the paper found it gives the best FID of the
   conditioning schemes it compared.

4. Final layer (`proj_out_1`, `proj_out_2`): shift, scale = proj_out_1(SiLU(c));
   out = unpatchify(proj_out_2(modulate(LN(x), shift, scale))). proj_out_2 also starts at
   zero, so a fresh model predicts 0.

5. Learned sigma (Nichol & Dhariwal 2021). DiT-XL/2 has out_channels = 2 C: the first C
   channels are eps, the last C a value v per pixel that interpolates the variance,
   Sigma = exp(v log beta_t + (1 - v) log beta_tilde_t). Sampling with DDIM or DPM-Solver uses
   only eps (`split_learned_sigma`), as diffusers' DiTPipeline does.

Parameter names are those of diffusers' DiTTransformer2DModel, so state dicts load with
strict=True both ways. One difference in layout from the original DiT code: diffusers gives
every block its own conditioning embedder (transformer_blocks.i.norm1.emb, the final layer
uses block 0's), where the original shares one. The conversion of the published checkpoint
copies it into each block, so DiT-XL/2 has 749.8M parameters here of which the paper's 675M
are distinct (`num_parameters(embedder_once=True)`).

Training mode: diffusers' LabelEmbedding drops labels to the null class by itself when the
module is in train() mode (each block's copy independently). sdlearn does not; a training
loop drops them once per sample with `drop_class_labels`, so eval() and train() give the same
conditioning and the drop is seeded by the loop's generator.

References: the DiT paper (figure 3, section 3.2); facebookresearch/DiT models.py; diffusers
models/transformers/dit_transformer_2d.py, models/attention.py (BasicTransformerBlock with
norm_type="ada_norm_zero"), models/normalization.py (AdaLayerNormZero), models/embeddings.py
(PatchEmbed, get_2d_sincos_pos_embed, CombinedTimestepLabelEmbeddings, LabelEmbedding).
"""

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from sdlearn.models.attention import FEED_FORWARD_ACTIVATIONS, Attention, FeedForward
from sdlearn.models.checkpoint import CheckpointError, ModelConfig, Pretrained, check_state_dict
from sdlearn.models.layers import SinusoidalEmbedding, TimestepEmbedding, batch_timesteps

NORM_TYPES = ("ada_norm_zero",)  # diffusers' norm_type values this DiT implements
TIMESTEP_CHANNELS = 256  # width of the timestep sinusoids (DiT's frequency_embedding_size)

# diffusers' older config.json of a DiT names the class Transformer2DModel (the hub's facebook/DiT-XL-2-256
# does); diffusers maps it to DiTTransformer2DModel when norm_type is "ada_norm_zero". Its extra keys
# are accepted with the value that means "off" ...
_LEGACY_FEATURES_OFF = {
    "cross_attention_dim": (None,),
    "num_vector_embeds": (None,),
    "only_cross_attention": (False,),
    "double_self_attention": (False,),
    "attention_type": ("default",),
    "caption_channels": (None,),
    "use_additional_conditions": (None, False),
}
# ... and these with any value, because DiTTransformer2DModel does not read them either.
_LEGACY_IRRELEVANT = {"use_linear_projection", "interpolation_scale"}

# Other model folders a learner may point at by mistake: _class_name -> what it is.
_OTHER_CLASSES = {
    "UNet2DConditionModel": "Stable Diffusion's UNet (UNet2DConditionModel)",
    "UNet2DModel": "an unconditional DDPM UNet (UNet2DModel)",
    "AutoencoderKL": "the VAE (AutoencoderKL)",
    "ControlNetModel": "a ControlNet (ControlNetModel)",
    "PixArtTransformer2DModel": "PixArt-alpha's transformer (PixArtTransformer2DModel)",
    "SD3Transformer2DModel": "Stable Diffusion 3's MMDiT (SD3Transformer2DModel)",
    "FluxTransformer2DModel": "Flux's transformer (FluxTransformer2DModel)",
}
# State dicts of other models, told apart by the start of their keys (checked in this order).
_OTHER_STATE_DICTS = (
    ("controlnet_cond_embedding.", "a ControlNet (ControlNetModel)"),
    ("down_blocks.", "a UNet (UNet2DConditionModel / UNet2DModel: conv_in, down_blocks, mid_block, up_blocks)"),
    ("encoder.", "an autoencoder (AutoencoderKL: encoder, decoder)"),
    ("text_model.", "a CLIP text encoder (CLIPTextModel)"),
    ("model.diffusion_model.", "a whole Stable Diffusion checkpoint in the original CompVis single-file layout"),
    ("adaln_single.", "PixArt-alpha's transformer (PixArtTransformer2DModel)"),
    ("x_embedder.", "a DiT in the original facebookresearch/DiT layout (x_embedder, t_embedder, y_embedder, blocks, "
                    "final_layer); convert it to diffusers' names first (diffusers' scripts/convert_dit_to_diffusers.py)"),
)


# Config --------------------------------------------------------------------------------------


@dataclass
class DiTConfig(ModelConfig):
    """diffusers' DiTTransformer2DModel config; field names and defaults are diffusers' (DiT-XL/2's shape)."""

    library_class: ClassVar[str] = "DiTTransformer2DModel"

    num_attention_heads: int = 16
    attention_head_dim: int = 72  # the width of one head (unlike the UNet's historical field of that name)
    in_channels: int = 4
    out_channels: int | None = None  # None: in_channels; 2 * in_channels for a learned sigma (DiT-XL/2: 8)
    num_layers: int = 28
    dropout: float = 0.0
    norm_num_groups: int = 32  # in diffusers' signature, not used by a DiT
    attention_bias: bool = True  # biases in to_q, to_k, to_v
    sample_size: int = 32  # latent height = width the model was trained at (32 -> 256 px with SD's VAE)
    patch_size: int = 2
    activation_fn: str = "gelu-approximate"  # the MLP: GELU with the tanh approximation
    num_embeds_ada_norm: int | None = 1000  # K, the number of classes (the label table has K + 1 rows)
    upcast_attention: bool = False
    norm_type: str = "ada_norm_zero"
    norm_elementwise_affine: bool = False  # a learned weight and bias in norm3 (DiT has none)
    norm_eps: float = 1e-5  # eps of norm3; norm1 and the final norm use 1e-6, as diffusers hard-codes

    def __post_init__(self):
        if self.norm_type not in NORM_TYPES:
            raise CheckpointError(
                f"norm_type={self.norm_type!r} is not supported: sdlearn's DiT implements norm_type='ada_norm_zero' "
                "(adaLN-Zero, the DiT paper's blocks). 'ada_norm_single' is PixArt-alpha's transformer; use diffusers for it."
            )
        if not isinstance(self.num_embeds_ada_norm, int) or self.num_embeds_ada_norm < 1:
            raise CheckpointError(
                f"num_embeds_ada_norm={self.num_embeds_ada_norm!r}: a DiT needs the number of classes K there (a positive "
                "integer, 1000 for ImageNet); its label table has K + 1 rows, the last one the null class."
            )
        if self.activation_fn not in FEED_FORWARD_ACTIVATIONS:
            raise CheckpointError(f"activation_fn={self.activation_fn!r} is not implemented; choose one of {list(FEED_FORWARD_ACTIVATIONS)}.")
        for name in ("num_attention_heads", "attention_head_dim", "in_channels", "num_layers", "sample_size", "patch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)}.")
        if self.out_channels is not None and self.out_channels < 1:
            raise ValueError(f"out_channels must be a positive integer or None (= in_channels), got {self.out_channels}.")
        if self.sample_size % self.patch_size:
            raise ValueError(f"sample_size={self.sample_size} is not a multiple of patch_size={self.patch_size}: the patches must tile the latent.")
        if self.inner_dim % 4:
            raise ValueError(
                f"The token width num_attention_heads * attention_head_dim = {self.inner_dim} must be a multiple of 4: "
                "the 2-D sin-cos position embedding gives a quarter of it to each of sin/cos of the row and the column."
            )

    @classmethod
    def from_dict(cls, config: dict) -> "DiTConfig":
        if isinstance(config, dict):
            refuse_other_config(config)
            if config.get("_class_name") == "Transformer2DModel":
                config = _from_legacy(config)
        return super().from_dict(config)

    @property
    def inner_dim(self) -> int:
        """D, the width of a token."""
        return self.num_attention_heads * self.attention_head_dim

    @property
    def output_channels(self) -> int:
        return self.in_channels if self.out_channels is None else self.out_channels

    @property
    def learns_sigma(self) -> bool:
        """Whether the output holds a variance prediction after eps (out_channels = 2 * in_channels)."""
        return self.output_channels == 2 * self.in_channels

    @property
    def null_class(self) -> int:
        """The label of the unconditional ("null") class: K, the row after the K real classes."""
        return self.num_embeds_ada_norm

    # presets ------------------------------------------------------------------------------

    @classmethod
    def tiny(cls, **overrides) -> "DiTConfig":
        """DiT at toy size (0.40M parameters): 16x16 (or 8x8) latents of 4 channels, patch 2, 32 classes."""
        values = dict(
            num_attention_heads=4,
            attention_head_dim=16,  # D = 64
            in_channels=4,
            out_channels=8,  # learned sigma, as DiT-XL/2
            num_layers=4,
            sample_size=16,  # 8x8 = 64 tokens; an 8x8 latent gives 16 tokens
            patch_size=2,
            num_embeds_ada_norm=32,  # e.g. 8 colours x 4 shapes
        )
        return cls(**{**values, **overrides})

    @classmethod
    def dit_xl_2(cls, **overrides) -> "DiTConfig":
        """DiT-XL/2 at 256 px (facebook/DiT-XL-2-256 transformer/config.json): 28 blocks of width 1152, 16 heads.

        675M distinct parameters (749.8M in diffusers' layout, see the module docstring).
        For the 512 px model pass sample_size=64.
        """
        values = dict(num_attention_heads=16, attention_head_dim=72, in_channels=4, out_channels=8, num_layers=28,
                      sample_size=32, patch_size=2, num_embeds_ada_norm=1000)
        return cls(**{**values, **overrides})


def _from_legacy(config: dict) -> dict:
    """A Transformer2DModel config.json of a DiT, as the DiTTransformer2DModel config diffusers maps it to."""
    if config.get("norm_type") != "ada_norm_zero":
        raise CheckpointError(
            f"This config.json names the class Transformer2DModel with norm_type={config.get('norm_type')!r}; diffusers "
            "reads it as a DiT only with norm_type='ada_norm_zero' (sdlearn's DiT implements only that)."
        )
    for key, off in _LEGACY_FEATURES_OFF.items():
        if key in config and config[key] not in off:
            raise CheckpointError(
                f"This Transformer2DModel config sets {key}={config[key]!r}, a feature a DiT does not have "
                f"(supported: {off[0]!r}). It is not a DiT config."
            )
    skip = set(_LEGACY_FEATURES_OFF) | _LEGACY_IRRELEVANT
    return {**{k: v for k, v in config.items() if k not in skip}, "_class_name": DiTConfig.library_class}


def refuse_other_config(config: dict) -> None:
    """CheckpointError naming the kind of model a config.json is for, when it is not a DiT's."""
    named = config.get("_class_name")
    if named in (DiTConfig.library_class, "Transformer2DModel"):
        return
    if named is not None:
        what = _OTHER_CLASSES.get(named, named)
        found = f"{what}"
    elif "down_block_types" in config or "block_out_channels" in config:
        found = "a UNet or an autoencoder (it has block_out_channels / down_block_types)"
    elif "model_type" in config or "architectures" in config:
        found = f"a transformers model ({config.get('model_type') or config.get('architectures')})"
    else:
        return  # no name and no other model's keys: the field checks speak
    raise CheckpointError(
        f"This config.json is for {found}, not a DiT (DiTTransformer2DModel). Point at a DiT folder, e.g. the "
        "transformer/ folder of a DiTPipeline."
    )


def refuse_other_state_dict(state_dict: dict, source: str = "the state dict") -> None:
    """CheckpointError naming the kind of model a state dict belongs to, when it is plainly not a DiT's."""
    if "pos_embed.proj.weight" in state_dict:
        return
    for prefix, what in _OTHER_STATE_DICTS:
        if any(key.startswith(prefix) for key in state_dict):
            raise CheckpointError(
                f"{source} holds the weights of {what}, not a DiT (DiTTransformer2DModel: pos_embed.proj, "
                "transformer_blocks.N.norm1 / attn1 / ff, proj_out_1, proj_out_2)."
            )


# The pure functions of the exercises -----------------------------------------------------------


def patchify(x: torch.Tensor, p: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, N, p * p * C): one token per p x p patch, row-major over the grid of patches.

    Within a token the features are ordered (row in the patch, column in the patch, channel),
    the order in which the final layer writes its patches (see `unpatchify`).
    """
    B, C, H, W = x.shape
    if H % p or W % p:
        raise ValueError(f"A {H}x{W} input cannot be cut into {p}x{p} patches: height and width must be multiples of {p}.")
    h, w = H // p, W // p
    x = x.reshape(B, C, h, p, w, p)  # (B, C, i, a, j, b): pixel (i p + a, j p + b)
    x = x.permute(0, 2, 4, 3, 5, 1)  # (B, h, w, p, p, C): patch (i, j), pixel (a, b), channel c
    return x.reshape(B, h * w, p * p * C)  # (B, N, p*p*C)


def unpatchify(tokens: torch.Tensor, p: int, C: int, h: int | None = None) -> torch.Tensor:
    """(B, N, p * p * C) -> (B, C, h * p, w * p), the inverse of `patchify`.

    h is the number of patch rows; None means a square grid (N = h * h), as diffusers assumes.
    """
    B, N, features = tokens.shape
    if features != p * p * C:
        raise ValueError(f"Tokens of width {features} are not {p}x{p} patches of {C} channels ({p * p * C} features).")
    if h is None:
        h = math.isqrt(N)
        if h * h != N:
            raise ValueError(f"{N} tokens are not a square number, so they do not form a square grid: pass h, the number of patch rows.")
    if h < 1 or N % h:
        raise ValueError(f"{N} tokens do not form a grid of {h} rows of patches.")
    w = N // h
    x = tokens.reshape(B, h, w, p, p, C)  # (B, i, j, a, b, c)
    x = x.permute(0, 5, 1, 3, 2, 4)  # (B, C, h, p, w, p): diffusers' einsum "nhwpqc->nchpwq"
    return x.reshape(B, C, h * p, w * p)  # (B, C, H, W)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x * (1 + scale) + shift for tokens x (B, N, D) and one shift and scale (B, D) per sample.

    "1 + scale": scale = 0 leaves x as it is, so a zero-initialised adaLN starts as a plain LayerNorm.
    """
    return x * (1 + scale[:, None]) + shift[:, None]  # (B, 1, D) broadcast over the N tokens


def sincos_position_embedding(dim: int, h: int, w: int, base_size: int | None = None) -> torch.Tensor:
    """The fixed 2-D sin-cos position embedding (h * w, dim), float32, as diffusers' PatchEmbed computes it.

    pos(i, j) = [sin(j omega), cos(j omega), sin(i omega), cos(i omega)], omega_k = 10000^(-k / (dim/4)),
    with the row and column positions scaled to span [0, base_size) (base_size: the training grid, default h).
    """
    if dim % 4:
        raise ValueError(f"The 2-D sin-cos embedding needs a width that is a multiple of 4, got {dim}.")
    base_size = h if base_size is None else base_size
    rows = torch.arange(h, dtype=torch.float32) / (h / base_size)  # (h,) positions i, rescaled to the training grid
    cols = torch.arange(w, dtype=torch.float32) / (w / base_size)  # (w,)
    i = rows[:, None].expand(h, w).reshape(-1)  # (h*w,) the row of token n = i * w + j
    j = cols[None, :].expand(h, w).reshape(-1)  # (h*w,) its column

    quarter = dim // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)  # (dim/4,) in float64, as diffusers

    def sincos(pos):  # (h*w,) -> (h*w, dim/2)
        angles = torch.outer(pos.double(), omega)
        return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)

    return torch.cat([sincos(j), sincos(i)], dim=1).float()  # (h*w, dim): the column first


def drop_class_labels(labels: torch.Tensor, null_class: int, p: float = 0.1, generator: torch.Generator | None = None) -> torch.Tensor:
    """Replace each label by the null class with probability p (training for classifier-free guidance)."""
    drop = torch.rand(labels.shape, generator=generator, device=labels.device) < p
    return torch.where(drop, torch.full_like(labels, null_class), labels)


def split_learned_sigma(output: torch.Tensor, in_channels: int) -> tuple:
    """(B, 2C, H, W) -> eps (B, C, H, W), v (B, C, H, W), the variance interpolation of a learned-sigma model."""
    if output.shape[1] != 2 * in_channels:
        raise ValueError(f"Expected 2 x {in_channels} channels (eps and the variance), got {output.shape[1]}.")
    return output[:, :in_channels], output[:, in_channels:]


# Blocks ------------------------------------------------------------------------------------------


class PatchEmbed(nn.Module):
    """Patches to tokens plus the fixed position embedding: (B, C, H, W) -> (B, N, D).

    proj is a Conv2d with kernel = stride = p, the same map as patchify(x) @ W^T + b with the
    kernel's weights reordered to (a, b, c). The position embedding is a buffer that is not
    saved (diffusers' PatchEmbed does not save it either): it is computed, not learned.
    """

    def __init__(self, sample_size: int, patch_size: int, in_channels: int, dim: int):
        super().__init__()
        self.patch_size = patch_size
        self.base_size = sample_size // patch_size  # the training grid
        self.proj = nn.Conv2d(in_channels, dim, kernel_size=patch_size, stride=patch_size)
        pos = sincos_position_embedding(dim, self.base_size, self.base_size)
        self.register_buffer("pos_embed", pos[None], persistent=False)  # (1, N, D)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2] // self.patch_size, x.shape[-1] // self.patch_size
        tokens = self.proj(x).flatten(2).transpose(1, 2)  # (B, D, h, w) -> (B, N, D), n = i * w + j
        if (h, w) == (self.base_size, self.base_size):
            pos = self.pos_embed
        else:  # another size than the training one: the same positions, rescaled (diffusers does the same)
            pos = sincos_position_embedding(tokens.shape[-1], h, w, self.base_size)[None].to(x.device)
        return (tokens + pos).to(tokens.dtype)


class LabelEmbedding(nn.Module):
    """E[y]: a learned vector per class, plus one for the null class K (diffusers' `class_embedder`)."""

    def __init__(self, num_classes: int, dim: int):
        super().__init__()
        self.num_classes = num_classes
        self.embedding_table = nn.Embedding(num_classes + 1, dim)  # row K: the null class

    def forward(self, labels: torch.Tensor) -> torch.Tensor:
        return self.embedding_table(labels)


class TimestepLabelEmbedding(nn.Module):
    """c = MLP(sinusoids_256(t)) + E[y]: (B,), (B,) -> (B, D) (diffusers' CombinedTimestepLabelEmbeddings).

    DiT's sinusoids put cosines first and shift the frequencies by one (flip_sin_to_cos=True,
    freq_shift=1), unlike SD's UNet (freq_shift=0).
    """

    def __init__(self, num_classes: int, dim: int):
        super().__init__()
        self.time_proj = SinusoidalEmbedding(TIMESTEP_CHANNELS, flip_sin_to_cos=True, freq_shift=1)
        self.timestep_embedder = TimestepEmbedding(TIMESTEP_CHANNELS, dim)
        self.class_embedder = LabelEmbedding(num_classes, dim)

    def forward(self, t: torch.Tensor, labels: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        t_emb = self.timestep_embedder(self.time_proj(t).to(dtype))  # sinusoids in float32, then cast
        return t_emb + self.class_embedder(labels)  # (B, D)


class AdaLayerNormZero(nn.Module):
    """adaLN-Zero's parts (diffusers' `norm1`): the conditioning `emb`, the modulation `linear`, a bare LayerNorm.

    modulation(t, y) returns the six (B, D) vectors shift_1, scale_1, gate_1, shift_2, scale_2, gate_2.
    """

    def __init__(self, dim: int, num_classes: int):
        super().__init__()
        self.emb = TimestepLabelEmbedding(num_classes, dim)
        self.silu = nn.SiLU()
        self.linear = nn.Linear(dim, 6 * dim)  # zero at initialisation: every block starts as the identity
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)

    def modulation(self, t: torch.Tensor, labels: torch.Tensor, dtype: torch.dtype = torch.float32) -> tuple:
        c = self.emb(t, labels, dtype)  # (B, D)
        return self.linear(self.silu(c)).chunk(6, dim=1)  # six (B, D)


class DiTBlock(nn.Module):
    """A transformer block with adaLN-Zero: tokens (B, N, D), t (B,), labels (B,) -> (B, N, D).

    diffusers' BasicTransformerBlock with norm_type="ada_norm_zero" and no cross-attention.
    """

    def __init__(self, config: DiTConfig):
        super().__init__()
        c = config
        dim = c.inner_dim
        self.norm1 = AdaLayerNormZero(dim, c.num_embeds_ada_norm)
        self.attn1 = Attention(dim, None, c.num_attention_heads, c.attention_head_dim, c.dropout,
                               bias=c.attention_bias, upcast_attention=c.upcast_attention)
        self.norm3 = nn.LayerNorm(dim, eps=c.norm_eps, elementwise_affine=c.norm_elementwise_affine)
        self.ff = FeedForward(dim, dropout=c.dropout, activation_fn=c.activation_fn)

    def forward(self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        shift_1, scale_1, gate_1, shift_2, scale_2, gate_2 = self.norm1.modulation(t, labels, x.dtype)
        # x = x + gate_1 * Attn(LN(x) * (1 + scale_1) + shift_1)
        x = x + gate_1[:, None] * self.attn1(modulate(self.norm1.norm(x), shift_1, scale_1))
        # x = x + gate_2 * MLP(LN(x) * (1 + scale_2) + shift_2)
        return x + gate_2[:, None] * self.ff(modulate(self.norm3(x), shift_2, scale_2))


# The model ---------------------------------------------------------------------------------------


class DiT(Pretrained, nn.Module):
    """eps_theta(x_t, t, y): DiT(x (B, C, H, W), t, class_labels (B,)) -> (B, C_out, H, W).

    t may be an int, a float, a 0-d tensor or a (B,) tensor; class_labels are integers in
    0 .. K, K (`config.null_class`) being the null class of classifier-free guidance. H and W
    must be multiples of the patch size. Build with `DiT(DiTConfig.tiny())`,
    `DiT.from_config(dict)` or `DiT.from_pretrained(folder)` (a DiTPipeline's transformer/).
    """

    config_class = DiTConfig
    weights_name = "diffusion_pytorch_model.safetensors"

    def __init__(self, config: DiTConfig):
        super().__init__()
        if not isinstance(config, DiTConfig):
            raise TypeError(f"DiT expects a DiTConfig, got {type(config).__name__}. For a config.json dict use DiT.from_config(d).")
        self.config = c = config
        dim = c.inner_dim
        self.pos_embed = PatchEmbed(c.sample_size, c.patch_size, c.in_channels, dim)
        self.transformer_blocks = nn.ModuleList([DiTBlock(c) for _ in range(c.num_layers)])
        self.norm_out = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.proj_out_1 = nn.Linear(dim, 2 * dim)  # shift, scale of the final layer
        self.proj_out_2 = nn.Linear(dim, c.patch_size * c.patch_size * c.output_channels)  # token -> its output patch
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """The DiT paper's initialisation; the adaLN linears and the final layer start at zero.

        Linear layers: Xavier-uniform weights, zero biases; the patch embedding likewise (as
        a linear map of the flattened patch); the label table and the timestep MLP: N(0, 0.02^2).
        Every block's conditioning embedder starts as a copy of block 0's, as the one shared
        embedder of the original code would be.
        """
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        weight = self.pos_embed.proj.weight
        nn.init.xavier_uniform_(weight.view(weight.shape[0], -1))
        nn.init.zeros_(self.pos_embed.proj.bias)
        first = self.transformer_blocks[0].norm1.emb
        nn.init.normal_(first.class_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(first.timestep_embedder.linear_1.weight, std=0.02)
        nn.init.normal_(first.timestep_embedder.linear_2.weight, std=0.02)
        for block in self.transformer_blocks:
            if block.norm1.emb is not first:
                block.norm1.emb.load_state_dict(first.state_dict())
            nn.init.zeros_(block.norm1.linear.weight)  # adaLN-Zero: gates 0, the block is the identity
            nn.init.zeros_(block.norm1.linear.bias)
        for layer in (self.proj_out_1, self.proj_out_2):  # the final layer predicts 0 at first
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    # input checks ------------------------------------------------------------------------

    def _check_inputs(self, x: torch.Tensor) -> None:
        c = self.config
        if x.ndim != 4 or x.shape[1] != c.in_channels:
            raise ValueError(f"DiT expects a latent batch (B, {c.in_channels}, H, W), got shape {tuple(x.shape)}.")
        H, W = x.shape[-2:]
        if H % c.patch_size or W % c.patch_size:
            raise ValueError(f"The latent is {H}x{W}; height and width must be multiples of the patch size {c.patch_size}.")

    def _labels(self, class_labels, x: torch.Tensor) -> torch.Tensor:
        """class_labels as a (B,) LongTensor in 0 .. K, after checking them."""
        K = self.config.null_class
        if class_labels is None:
            raise ValueError(f"DiT is class-conditional: pass class_labels, a ({x.shape[0]},) LongTensor in 0..{K} "
                             f"({K} = the null class, for the unconditional half of classifier-free guidance).")
        labels = torch.as_tensor(class_labels, device=x.device)
        if labels.ndim == 0:
            labels = labels[None].expand(x.shape[0])
        if labels.ndim != 1 or labels.shape[0] != x.shape[0] or labels.is_floating_point() or labels.dtype == torch.bool:
            raise ValueError(f"class_labels must be integers of shape ({x.shape[0]},), got {labels.dtype} {tuple(labels.shape)}.")
        if labels.min() < 0 or labels.max() > K:
            raise ValueError(f"class_labels must lie in 0..{K} ({K} = the null class), got values from "
                             f"{int(labels.min())} to {int(labels.max())}.")
        return labels

    # forward -----------------------------------------------------------------------------

    def forward(self, x: torch.Tensor, t, class_labels) -> torch.Tensor:
        self._check_inputs(x)
        c = self.config
        p = c.patch_size
        t = batch_timesteps(t, x)  # (B,)
        labels = self._labels(class_labels, x)

        h = self.pos_embed(x)  # (B, N, D), N = (H/p) * (W/p)
        for block in self.transformer_blocks:
            h = block(h, t, labels)  # (B, N, D)

        # Final layer: adaLN (without a gate) from block 0's conditioning, as diffusers does.
        cond = self.transformer_blocks[0].norm1.emb(t, labels, h.dtype)  # (B, D)
        shift, scale = self.proj_out_1(F.silu(cond)).chunk(2, dim=1)  # two (B, D)
        h = self.proj_out_2(modulate(self.norm_out(h), shift, scale))  # (B, N, p*p*C_out)
        return unpatchify(h, p, c.output_channels, x.shape[-2] // p)  # (B, C_out, H, W)

    # loading -----------------------------------------------------------------------------

    def load_checked_state_dict(self, state_dict: dict, source: str = "the state dict") -> None:
        refuse_other_state_dict(state_dict, source)
        check_state_dict(self, state_dict, source)
        self.load_state_dict(state_dict, strict=True)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        if strict:
            refuse_other_state_dict(state_dict)
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    # inspection --------------------------------------------------------------------------

    def num_parameters(self, embedder_once: bool = False) -> int:
        """The number of parameters; embedder_once counts the per-block conditioning embedders once (the paper's count)."""
        total = sum(p.numel() for p in self.parameters())
        if embedder_once:
            per_copy = sum(p.numel() for p in self.transformer_blocks[0].norm1.emb.parameters())
            total -= (len(self.transformer_blocks) - 1) * per_copy
        return total


__all__ = [
    "DiT", "DiTConfig", "DiTBlock", "AdaLayerNormZero", "TimestepLabelEmbedding", "LabelEmbedding", "PatchEmbed",
    "patchify", "unpatchify", "modulate", "sincos_position_embedding", "drop_class_labels", "split_learned_sigma",
    "refuse_other_config", "refuse_other_state_dict", "NORM_TYPES",
]
