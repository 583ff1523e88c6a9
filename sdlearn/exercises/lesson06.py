"""Lesson 06 exercises: scaled dot-product attention, and splitting channels into heads.

    from sdlearn.exercises import lesson06 as ex
    ex.check_attention(my_attention)        # my_attention(q, k, v) -> softmax(q k^T / sqrt(d)) v
    ex.check_split_heads(my_split_heads)    # my_split_heads(x (B, L, heads*d), heads) -> (B, heads, L, d)
"""

import torch

from sdlearn.models.attention import attention_written_out, split_heads
from sdlearn.exercises.core import Case, Mistake, checker


def _inputs(seed, *shapes):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(*shape, generator=g) for shape in shapes)


# 1. Scaled dot-product attention -----------------------------------------------------------------


def reference_attention(q, k, v):
    """softmax(Q K^T / sqrt(d)) V over the last axis (the keys)."""
    return attention_written_out(q, k, v)


def _no_scale(q, k, v):
    return torch.softmax(q @ k.transpose(-1, -2), dim=-1) @ v


def _scale_by_d(q, k, v):
    return torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1], dim=-1) @ v


def _scale_multiplied(q, k, v):
    return torch.softmax(q @ k.transpose(-1, -2) * q.shape[-1] ** 0.5, dim=-1) @ v


def _softmax_over_queries(q, k, v):
    return torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, dim=-2) @ v


def _v_transposed(q, k, v):
    return torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, dim=-1) @ v.transpose(-1, -2)


def _no_softmax(q, k, v):
    return (q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5) @ v


ATTENTION_MISTAKES = [
    Mistake(_no_scale, "You forgot the scale: divide the scores Q K^T by sqrt(d) before the softmax, d = q.shape[-1]."),
    Mistake(_scale_by_d, "You divided the scores by d; divide by sqrt(d) (d = q.shape[-1])."),
    Mistake(_scale_multiplied, "You multiplied the scores by sqrt(d); divide by it instead."),
    Mistake(
        _softmax_over_queries,
        "Your softmax runs over the queries (dim=-2). Each query's weights over the keys must sum to 1: use dim=-1.",
    ),
    Mistake(_v_transposed, "You multiplied the weights by V transposed. The weights (L_q, L_k) multiply V (L_k, d) as it is."),
    Mistake(_no_softmax, "You forgot the softmax: the scores must become weights that are positive and sum to 1 over the keys."),
]

# The first case has as many keys as channels (L_k = d = 8) so that multiplying by V
# transposed still runs and can be recognised; the second has different lengths, where that
# variant cannot run at all (check_function skips a wrong variant that raises on a case).
ATTENTION_CASES = [
    Case(*_inputs(0, (2, 2, 5, 8), (2, 2, 8, 8), (2, 2, 8, 8))),
    Case(*_inputs(1, (1, 3, 4, 16), (1, 3, 6, 16), (1, 3, 6, 16))),
]


@checker(reference_attention, ATTENTION_CASES, name="attention", mistakes=ATTENTION_MISTAKES)
def check_attention(fn) -> bool:
    """fn(q (B, heads, L_q, d), k (B, heads, L_k, d), v (B, heads, L_k, d)) -> (B, heads, L_q, d)."""


# 2. Splitting heads ------------------------------------------------------------------------------


def reference_split_heads(x, heads):
    """(B, L, heads * d) -> (B, heads, L, d): head h gets channels h*d .. (h+1)*d - 1."""
    return split_heads(x, heads)


def _view_without_transpose(x, heads):
    B, L, inner = x.shape
    return x.reshape(B, heads, L, inner // heads)


def _forgot_transpose(x, heads):
    B, L, inner = x.shape
    return x.reshape(B, L, heads, inner // heads)


def _interleaved_channels(x, heads):
    B, L, inner = x.shape
    return x.reshape(B, L, inner // heads, heads).permute(0, 3, 1, 2)


SPLIT_MISTAKES = [
    Mistake(
        _view_without_transpose,
        "You reshaped straight to (B, heads, L, d). That reinterprets the memory and mixes tokens between heads: "
        "reshape to (B, L, heads, d) first, then swap the L and heads axes with .transpose(1, 2).",
    ),
    Mistake(_forgot_transpose, "Almost: after reshaping to (B, L, heads, d), swap axes 1 and 2 so heads come before L."),
    Mistake(
        _interleaved_channels,
        "Your heads take every heads-th channel. Each head must own a contiguous block of d channels: "
        "reshape to (B, L, heads, d), not (B, L, d, heads).",
    ),
]

SPLIT_CASES = [Case(*_inputs(2, (2, 5, 12)), 3), Case(*_inputs(3, (1, 7, 16)), 4)]


@checker(reference_split_heads, SPLIT_CASES, name="split_heads", mistakes=SPLIT_MISTAKES, atol=0, rtol=0)
def check_split_heads(fn) -> bool:
    """fn(x (B, L, heads * d), heads) -> (B, heads, L, d)."""
