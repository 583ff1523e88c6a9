"""Attention, cross-attention and the transformer blocks inside Stable Diffusion's UNet.

Scaled dot-product attention (Vaswani et al. 2017, eq. 1). For queries Q (L_q, d), keys
K (L_k, d) and values V (L_k, d_v):

    Attention(Q, K, V) = softmax(Q K^T / sqrt(d)) V

The softmax runs over the keys (the last axis), so each query's weights sum to one; the
1/sqrt(d) keeps the dot products' variance near 1 so the softmax does not saturate.

Multi-head attention projects the inputs, splits the channels into `heads` groups of
width d = dim_head, attends in each group independently and projects back:

    Q = x W_q,  K = c W_k,  V = c W_v                 (B, L, heads * d)
    head_h = Attention(Q_h, K_h, V_h)                  (B, L_q, d) for h = 1..heads
    out = concat(head_1 .. head_heads) W_out + b_out

Self-attention: c = x (image tokens attend to image tokens). Cross-attention: Q comes from
the image tokens x (B, H*W, C) and K, V from the text tokens c (B, 77, D_text); this is how
the prompt steers the image (Rombach et al. 2022, section 3.3).

BasicTransformerBlock (pre-LayerNorm, residual):
    x = x + attn1(norm1(x))           self-attention over the H*W image tokens
    x = x + attn2(norm2(x), context)  cross-attention to the text
    x = x + ff(norm3(x))              GEGLU feed-forward: (h * GELU(g)) W_2, [h, g] = x W_1 + b_1
                                      (DiT's blocks use a plain GELU MLP instead: GELU(x W_1 + b_1) W_2)

Transformer2DModel (CompVis' SpatialTransformer) wraps blocks for a feature map:
    GroupNorm -> proj_in -> flatten (B, C, H, W) -> (B, H*W, C) -> blocks -> unflatten -> proj_out -> + x
proj_in/proj_out are 1x1 convolutions in SD 1.x and linear layers in SD 2.x
(`use_linear_projection`); both are the same map per pixel, in a different weight shape.

Two computations of attention give the same numbers: `attention_written_out` (the formula
above, step by step) and `F.scaled_dot_product_attention` (a fused kernel that never
stores the (L_q, L_k) matrix: faster, less memory). Modules use the fused one unless
`use_fused_attention(model, False)` is set or attention maps are being recorded with
`record_attention(model)`, which keeps the softmax probabilities of the chosen layers,
shape (B, heads, H*W, tokens), keyed by layer name.

Parameter names (to_q, to_k, to_v, to_out.0, norm1..3, attn1, attn2, ff.net.0.proj,
ff.net.2, norm, proj_in, proj_out, transformer_blocks) are diffusers', so state dicts load
with strict=True. References: diffusers models/attention_processor.py (Attention,
AttnProcessor2_0), models/attention.py (BasicTransformerBlock, FeedForward),
models/transformers/transformer_2d.py; CompVis ldm/modules/attention.py; GEGLU:
Shazeer 2020, "GLU Variants Improve Transformer".
"""

import contextlib
import threading
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn


# 1. The attention formula ------------------------------------------------------------------


def attention_probabilities(q: torch.Tensor, k: torch.Tensor, scale: float | None = None, upcast: bool = False) -> torch.Tensor:
    """softmax(Q K^T * scale) over the keys: (..., L_q, d), (..., L_k, d) -> (..., L_q, L_k).

    scale defaults to 1/sqrt(d). upcast computes in float32 (SD 2.1 sets upcast_attention
    because its fp16 scores overflow), returning the input dtype.
    """
    dtype = q.dtype
    if upcast:
        q, k = q.float(), k.float()
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    scores = (q @ k.transpose(-1, -2)) * scale  # (..., L_q, L_k)
    return scores.softmax(dim=-1).to(dtype)


def attention_written_out(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None, upcast: bool = False
) -> torch.Tensor:
    """softmax(Q K^T / sqrt(d)) V, step by step: (..., L_q, d) -> (..., L_q, d_v)."""
    return attention_probabilities(q, k, scale, upcast) @ v


def attention_fused(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """The same result from PyTorch's fused kernel (FlashAttention / memory-efficient / math)."""
    return F.scaled_dot_product_attention(q, k, v, scale=scale)


def split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """(B, L, heads * d) -> (B, heads, L, d): each head gets its own slice of the channels."""
    B, L, inner = x.shape
    return x.view(B, L, heads, inner // heads).transpose(1, 2)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    """(B, heads, L, d) -> (B, L, heads * d), the inverse of split_heads."""
    B, heads, L, d = x.shape
    return x.transpose(1, 2).reshape(B, L, heads * d)


# 2. Recording attention maps ---------------------------------------------------------------


@dataclass
class AttentionMaps:
    """Attention probabilities recorded by `record_attention`.

    maps[name] is the latest call's softmax(Q K^T / sqrt(d)) of the layer `name`, shape
    (B, heads, L_q, L_k): for cross-attention L_q = H*W image tokens, L_k = text tokens.
    If `accumulate` is set, maps hold the sum over calls and `calls[name]` the count, so
    maps[name] / calls[name] is the average over e.g. all sampling steps.
    """

    accumulate: bool = False
    maps: dict = field(default_factory=dict)
    calls: dict = field(default_factory=dict)

    def store(self, name: str, probs: torch.Tensor) -> None:
        probs = probs.detach().float().cpu()
        if self.accumulate and name in self.maps:
            self.maps[name] = self.maps[name] + probs
        else:
            self.maps[name] = probs
        self.calls[name] = self.calls.get(name, 0) + 1

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.maps[name]

    def __len__(self) -> int:
        return len(self.maps)

    def __iter__(self):
        return iter(self.maps)

    def keys(self):
        return self.maps.keys()

    def items(self):
        return self.maps.items()

    def mean(self, name: str) -> torch.Tensor:
        """The map of `name` averaged over the recorded calls."""
        return self.maps[name] / (self.calls[name] if self.accumulate else 1)

    def token_maps(self, name: str, height: int | None = None) -> torch.Tensor:
        """Head-averaged maps of one layer as images: (B, L_k, h, w).

        The image tokens are the pixels of the layer's feature map in row-major order;
        `height` is needed only for non-square maps.
        """
        probs = self.mean(name).mean(dim=1)  # (B, L_q, L_k), averaged over heads
        B, L_q, L_k = probs.shape
        h = height if height is not None else int(round(L_q**0.5))
        if L_q % h != 0:
            raise ValueError(f"Layer {name} has {L_q} image tokens, which is not height x width for height={h}. Pass the right `height`.")
        return probs.transpose(1, 2).reshape(B, L_k, h, L_q // h)

    def average_token_maps(self, size: int | tuple[int, int], names=None) -> torch.Tensor:
        """Token maps of several layers resized to one size and averaged: (B, L_k, *size).

        Prompt-to-prompt (Hertz et al. 2022) averages the 16x16 layers of SD this way.
        """
        names = list(self.maps) if names is None else list(names)
        if not names:
            raise ValueError("No attention maps recorded: run the model inside `record_attention(model)` first.")
        size = (size, size) if isinstance(size, int) else tuple(size)
        total = 0
        for name in names:
            total = total + F.interpolate(self.token_maps(name), size=size, mode="bilinear", align_corners=False)
        return total / len(names)


@contextlib.contextmanager
def record_attention(model: nn.Module, kind: str = "cross", accumulate: bool = False):
    """Record attention probabilities of the Attention layers in `model` while inside.

        with record_attention(unet) as maps:
            unet(x, t, context)
        maps["mid_block.attentions.0.transformer_blocks.0.attn2"].shape  # (B, heads, H*W, 77)

    kind: "cross" (attn2, image -> text), "self" (attn1) or "all". Recording layers compute
    the probabilities explicitly (slower, more memory); outside the block every layer is
    back on the fused path and pays nothing.
    """
    if kind not in ("cross", "self", "all"):
        raise ValueError(f"kind must be 'cross', 'self' or 'all', got {kind!r}.")
    maps = AttentionMaps(accumulate=accumulate)
    chosen = [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, Attention) and (kind == "all" or module.is_cross_attention == (kind == "cross"))
    ]
    if not chosen:
        raise ValueError(f"{type(model).__name__} has no {kind}-attention layers to record.")
    # The recording belongs to this thread: a generation that another thread runs on the same
    # model at the same time (a second widget, a server) is neither recorded here nor disturbed.
    thread = threading.get_ident()
    previous = [module.recorders.get(thread) for _, module in chosen]  # a recording this one is nested in
    for name, module in chosen:
        module.recorders[thread] = (maps, name)
    try:
        yield maps
    finally:
        for (_, module), before in zip(chosen, previous):
            if before is None:
                module.recorders.pop(thread, None)
            else:
                module.recorders[thread] = before


def use_fused_attention(model: nn.Module, fused: bool = True) -> nn.Module:
    """Switch every Attention layer in `model` to the fused kernel or the written-out formula."""
    for module in model.modules():
        if isinstance(module, Attention):
            module.fused = fused
    return model


# 3. Multi-head attention -------------------------------------------------------------------


class Attention(nn.Module):
    """Multi-head attention; cross-attention when `cross_attention_dim` is given.

    forward(x (B, L_q, query_dim), context (B, L_k, cross_attention_dim) or None) -> (B, L_q, query_dim)
    """

    def __init__(
        self,
        query_dim: int,
        cross_attention_dim: int | None = None,
        heads: int = 8,
        dim_head: int = 64,
        dropout: float = 0.0,
        bias: bool = False,
        out_bias: bool = True,
        upcast_attention: bool = False,
    ):
        super().__init__()
        inner_dim = heads * dim_head
        self.heads = heads
        self.dim_head = dim_head
        self.scale = dim_head**-0.5
        self.is_cross_attention = cross_attention_dim is not None
        self.cross_attention_dim = cross_attention_dim if cross_attention_dim is not None else query_dim
        self.upcast_attention = upcast_attention
        self.fused = True  # use F.scaled_dot_product_attention; same numbers, faster
        # thread id -> (AttentionMaps, this layer's name) while that thread is inside record_attention()
        self.recorders = {}

        self.to_q = nn.Linear(query_dim, inner_dim, bias=bias)
        self.to_k = nn.Linear(self.cross_attention_dim, inner_dim, bias=bias)
        self.to_v = nn.Linear(self.cross_attention_dim, inner_dim, bias=bias)
        self.to_out = nn.ModuleList([nn.Linear(inner_dim, query_dim, bias=out_bias), nn.Dropout(dropout)])

    @property
    def recorder(self):
        """The AttentionMaps recording this layer for the calling thread (inside record_attention), else None."""
        recording = self.recorders.get(threading.get_ident())
        return None if recording is None else recording[0]

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        if context is None:
            context = x
        elif context.shape[-1] != self.cross_attention_dim:
            raise ValueError(
                f"The context has width {context.shape[-1]}, but this attention layer expects "
                f"{self.cross_attention_dim} (its cross_attention_dim). Use a text encoder of that width, "
                "e.g. 768 for SD 1.x (CLIP ViT-L/14) or 1024 for SD 2.x (OpenCLIP ViT-H/14)."
            )
        q = split_heads(self.to_q(x), self.heads)  # (B, heads, L_q, d)
        k = split_heads(self.to_k(context), self.heads)  # (B, heads, L_k, d)
        v = split_heads(self.to_v(context), self.heads)  # (B, heads, L_k, d)

        recording = self.recorders.get(threading.get_ident()) if self.recorders else None
        if recording is not None:
            probs = attention_probabilities(q, k, self.scale, self.upcast_attention)  # (B, heads, L_q, L_k)
            recording[0].store(recording[1], probs)
            out = probs @ v
        elif self.fused:
            # upcast_attention is not needed here: the fused kernels accumulate the softmax in
            # float32 themselves (diffusers' default processor, AttnProcessor2_0, relies on the same).
            out = F.scaled_dot_product_attention(q, k, v, scale=self.scale)
        else:
            out = attention_written_out(q, k, v, self.scale, self.upcast_attention)
        out = merge_heads(out)  # (B, L_q, heads * d)
        return self.to_out[1](self.to_out[0](out))


# 4. Feed-forward -----------------------------------------------------------------------------


class GEGLU(nn.Module):
    """One linear layer makes a value h and a gate g; out = h * GELU(g)."""

    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, gate = self.proj(x).chunk(2, dim=-1)  # two (B, L, dim_out) halves
        return h * F.gelu(gate)


class GELU(nn.Module):
    """A linear layer then GELU: out = GELU(x W + b), the plain MLP of ViT and DiT (no gate).

    approximate="tanh" is GELU's tanh approximation (diffusers' activation_fn "gelu-approximate",
    DiT's choice); "none" the exact erf form ("gelu").
    """

    def __init__(self, dim_in: int, dim_out: int, approximate: str = "none"):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out)
        self.approximate = approximate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.proj(x), approximate=self.approximate)


# diffusers' activation_fn names that FeedForward implements: SD's UNet uses "geglu", DiT "gelu-approximate".
FEED_FORWARD_ACTIVATIONS = ("geglu", "gelu", "gelu-approximate")


class FeedForward(nn.Module):
    """GEGLU (or GELU) to mult * dim, dropout, linear back to dim (diffusers' `ff.net.0/1/2`).

    activation_fn: "geglu" (SD's UNet, the default), "gelu" or "gelu-approximate" (DiT).
    """

    def __init__(self, dim: int, mult: int = 4, dropout: float = 0.0, activation_fn: str = "geglu"):
        super().__init__()
        if activation_fn not in FEED_FORWARD_ACTIVATIONS:
            raise ValueError(f"activation_fn={activation_fn!r} is not implemented; choose one of {list(FEED_FORWARD_ACTIVATIONS)}.")
        inner_dim = dim * mult
        if activation_fn == "geglu":
            first = GEGLU(dim, inner_dim)
        else:
            first = GELU(dim, inner_dim, approximate="tanh" if activation_fn == "gelu-approximate" else "none")
        self.net = nn.ModuleList([first, nn.Dropout(dropout), nn.Linear(inner_dim, dim)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.net:
            x = layer(x)
        return x


# 5. Transformer block and the spatial transformer ------------------------------------------


class BasicTransformerBlock(nn.Module):
    """Self-attention, cross-attention, feed-forward; each pre-LayerNorm with a residual.

    forward(x (B, L, dim), context (B, L_k, cross_attention_dim)) -> (B, L, dim)
    Without `cross_attention_dim` the block has no attn2/norm2 (self-attention only).
    """

    def __init__(
        self,
        dim: int,
        num_attention_heads: int,
        attention_head_dim: int,
        cross_attention_dim: int | None = None,
        dropout: float = 0.0,
        upcast_attention: bool = False,
        norm_eps: float = 1e-5,
    ):
        super().__init__()
        heads, d = num_attention_heads, attention_head_dim
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.attn1 = Attention(dim, None, heads, d, dropout, upcast_attention=upcast_attention)
        if cross_attention_dim is not None:
            self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
            self.attn2 = Attention(dim, cross_attention_dim, heads, d, dropout, upcast_attention=upcast_attention)
        else:
            self.norm2 = None
            self.attn2 = None
        self.norm3 = nn.LayerNorm(dim, eps=norm_eps)
        self.ff = FeedForward(dim, dropout=dropout)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.attn1(self.norm1(x))
        if self.attn2 is not None:
            if context is None:
                raise ValueError("This block has cross-attention: pass the text embeddings as `context` (B, tokens, width).")
            x = x + self.attn2(self.norm2(x), context)
        return x + self.ff(self.norm3(x))


class Transformer2DModel(nn.Module):
    """The SpatialTransformer: transformer blocks over the pixels of a feature map.

    forward(x (B, C, H, W), context (B, L_k, cross_attention_dim)) -> (B, C, H, W)
    """

    def __init__(
        self,
        num_attention_heads: int,
        attention_head_dim: int,
        in_channels: int,
        num_layers: int = 1,
        cross_attention_dim: int | None = None,
        norm_num_groups: int = 32,
        use_linear_projection: bool = False,
        dropout: float = 0.0,
        upcast_attention: bool = False,
    ):
        super().__init__()
        inner_dim = num_attention_heads * attention_head_dim
        self.in_channels = in_channels
        self.use_linear_projection = use_linear_projection
        self.norm = nn.GroupNorm(norm_num_groups, in_channels, eps=1e-6)
        if use_linear_projection:  # SD 2.x
            self.proj_in = nn.Linear(in_channels, inner_dim)
            self.proj_out = nn.Linear(inner_dim, in_channels)
        else:  # SD 1.x: the same per-pixel map as a 1x1 convolution
            self.proj_in = nn.Conv2d(in_channels, inner_dim, kernel_size=1)
            self.proj_out = nn.Conv2d(inner_dim, in_channels, kernel_size=1)
        self.transformer_blocks = nn.ModuleList(
            [
                BasicTransformerBlock(
                    inner_dim, num_attention_heads, attention_head_dim, cross_attention_dim, dropout, upcast_attention
                )
                for _ in range(num_layers)
            ]
        )

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        B, C, H, W = x.shape
        h = self.norm(x)
        if self.use_linear_projection:
            h = self.proj_in(h.permute(0, 2, 3, 1).reshape(B, H * W, C))  # (B, H*W, inner)
        else:
            h = self.proj_in(h)  # (B, inner, H, W)
            h = h.permute(0, 2, 3, 1).reshape(B, H * W, h.shape[1])  # (B, H*W, inner): one token per pixel
        for block in self.transformer_blocks:
            h = block(h, context)
        # .contiguous(): back to the (B, C, H, W) memory layout. A permuted view would make the
        # residual sum channels-last, and that layout then spreads through the following
        # convolutions and GroupNorms, which are slower in it on the CPU.
        if self.use_linear_projection:
            h = self.proj_out(h).reshape(B, H, W, C).permute(0, 3, 1, 2).contiguous()  # (B, C, H, W)
        else:
            h = self.proj_out(h.reshape(B, H, W, -1).permute(0, 3, 1, 2).contiguous())  # (B, C, H, W)
        return h + x


SpatialTransformer = Transformer2DModel  # the name in the original CompVis code
