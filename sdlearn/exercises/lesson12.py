"""Lesson 12 exercises: the LoRA forward pass, the textual-inversion gradient, the prior-preservation loss.

    from sdlearn.exercises import lesson12 as ex
    ex.check_lora_forward(my_lora_forward)      # my_lora_forward(x, W, b, A, B, alpha, scale) -> y
    ex.check_keep_new_rows(my_keep_new_rows)    # my_keep_new_rows(grad (V, D), new_ids) -> grad, other rows zero
    ex.check_prior_loss(my_prior_loss)          # my_prior_loss(errors (B,), is_prior (B,), w) -> loss

LoRA (sdlearn.lora), with W (out, in), A (r, in), B (out, r), x (..., in):

    y = x W^T + b + (alpha / r) * s * (x A^T) B^T

Textual inversion (sdlearn.textual_inversion): the gradient of the embedding table E (V, D)
keeps only the rows of the new tokens; every other row gets a zero gradient, so it never moves.

DreamBooth's prior preservation (sdlearn.dreambooth), with c_i = 1 on instance rows and w on
class rows, and as many class rows as instance rows:

    L = mean(instance errors) + w * mean(class errors) = (1 / n_instance) * sum_i c_i L_i
"""

import torch

from sdlearn.dreambooth import prior_preservation_loss
from sdlearn.exercises.core import Case, Mistake, checker


# 1. The LoRA forward pass -----------------------------------------------------------------------


def reference_lora_forward(x, W, b, A, B, alpha, scale):
    r = A.shape[0]
    return x @ W.T + b + (alpha / r) * scale * ((x @ A.T) @ B.T)


LORA_MISTAKES = [
    Mistake(lambda x, W, b, A, B, alpha, scale: x @ W.T + b + scale * ((x @ A.T) @ B.T),
            "You left out alpha / r: the update is (alpha / r) * s * B A x, with r = A.shape[0] the rank."),
    Mistake(lambda x, W, b, A, B, alpha, scale: x @ W.T + b + alpha * scale * ((x @ A.T) @ B.T),
            "You multiplied by alpha but did not divide by the rank r = A.shape[0]: the factor is alpha / r."),
    Mistake(lambda x, W, b, A, B, alpha, scale: x @ W.T + b + (alpha / A.shape[0]) * ((x @ A.T) @ B.T),
            "You left out the runtime scale s (diffusers' cross_attention_kwargs={'scale': s}); s = 0 must give the base layer."),
    Mistake(lambda x, W, b, A, B, alpha, scale: x @ W.T + (alpha / A.shape[0]) * scale * ((x @ A.T) @ B.T),
            "You dropped the bias b of the frozen layer: y = W x + b + (alpha / r) s B A x."),
    Mistake(lambda x, W, b, A, B, alpha, scale: (alpha / A.shape[0]) * scale * ((x @ A.T) @ B.T),
            "You returned the update alone; LoRA adds it to the frozen layer's output W x + b."),
]


def _lora_cases() -> list:
    g = torch.Generator().manual_seed(12)
    cases = []
    for rank, alpha, scale in ((4, 4.0, 1.0), (2, 8.0, 0.25), (8, 1.0, 0.0)):
        n_in, n_out = 6, 5
        cases.append(Case(torch.randn(3, n_in, generator=g), torch.randn(n_out, n_in, generator=g), torch.randn(n_out, generator=g),
                          torch.randn(rank, n_in, generator=g), torch.randn(n_out, rank, generator=g), alpha, scale))
    return cases


@checker(reference_lora_forward, _lora_cases, name="lora_forward", mistakes=LORA_MISTAKES)
def check_lora_forward(fn) -> bool:
    """fn(x (N, in), W (out, in), b (out,), A (r, in), B (out, r), alpha float, scale float) -> y (N, out)."""


# 2. The textual-inversion gradient --------------------------------------------------------------


def reference_keep_new_rows(grad, new_ids):
    mask = torch.zeros(grad.shape[0], 1, dtype=grad.dtype)
    mask[list(new_ids)] = 1.0
    return grad * mask


KEEP_ROWS_MISTAKES = [
    Mistake(lambda grad, new_ids: grad, "You kept every row's gradient: the old words would move too. Zero every row but new_ids."),
    Mistake(lambda grad, new_ids: grad - reference_keep_new_rows(grad, new_ids),
            "You zeroed the new rows and kept the others: it is the other way round."),
    Mistake(lambda grad, new_ids: grad[list(new_ids)],
            "You returned only the new rows; the optimiser needs a gradient of the whole table's shape (V, D), zero elsewhere."),
    Mistake(lambda grad, new_ids: torch.zeros_like(grad), "You zeroed every row, so nothing would be learnt: keep the rows new_ids."),
]


def _keep_rows_cases() -> list:
    g = torch.Generator().manual_seed(13)
    return [Case(torch.randn(10, 4, generator=g), [9]), Case(torch.randn(12, 3, generator=g), [9, 10, 11]),
            Case(torch.randn(7, 5, generator=g), [0, 6])]


@checker(reference_keep_new_rows, _keep_rows_cases, name="keep_new_rows", mistakes=KEEP_ROWS_MISTAKES)
def check_keep_new_rows(fn) -> bool:
    """fn(grad (V, D), new_ids list of ints) -> a gradient (V, D) equal to grad on rows new_ids and zero elsewhere."""


# 3. The prior-preservation loss -----------------------------------------------------------------


def reference_prior_loss(errors, is_prior, w):
    return prior_preservation_loss(errors, is_prior, w)


PRIOR_MISTAKES = [
    Mistake(lambda e, p, w: (torch.where(p, w * e, e)).mean(),
            "You averaged over the whole batch; each half is averaged on its own: mean(instance) + w * mean(class), "
            "which is twice your number when the halves are equal."),
    Mistake(lambda e, p, w: e[~p].mean() + e[p].mean(), "You forgot the weight w on the class images' loss."),
    Mistake(lambda e, p, w: w * e[~p].mean() + e[p].mean(), "You put w on the instance loss; it weighs the class (prior) images."),
    Mistake(lambda e, p, w: e[~p].mean(), "You left out the class images: that is DreamBooth without prior preservation."),
    Mistake(lambda e, p, w: e[~p].mean() + w * e[~p].mean(), "Both means use the instance rows; the second is over the class rows (is_prior)."),
]


def _prior_cases() -> list:
    g = torch.Generator().manual_seed(14)
    flags = torch.arange(8) % 2 == 1
    return [Case(torch.rand(8, generator=g), flags, 1.0), Case(torch.rand(8, generator=g), flags, 0.5),
            Case(torch.rand(4, generator=g), torch.tensor([False, True, False, True]), 2.0)]


@checker(reference_prior_loss, _prior_cases, name="prior_loss", mistakes=PRIOR_MISTAKES)
def check_prior_loss(fn) -> bool:
    """fn(errors (B,) per-image losses, is_prior (B,) bool, w float) -> the scalar DreamBooth loss."""
