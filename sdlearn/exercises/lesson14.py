"""Lesson 14 exercises: after SD 1.x.

Flow matching's training pair and its Euler step (SD3, Flux):

    from sdlearn.exercises import lesson14 as ex
    ex.check_flow_target(my_flow_target)    # my_flow_target(x0, noise, s) -> (x_s, target)
    ex.check_flow_step(my_flow_step)        # my_flow_step(x, v, s, s_next) -> x_next

Rectified flow (sdlearn.diffusion.flow_matching): s in [0, 1] is the noise level, s = 0 the
image and s = 1 pure noise; the sample moves on the straight line between them, and the
network learns the line's velocity:

    x_s    = (1 - s) x0 + s noise          (eq. 1)
    target = v = noise - x0                (eq. 2)

Sampling walks the line back from s = 1 to s = 0 with Euler's method (the flow_euler sampler):

    x_next = x + (s_next - s) v            (s_next < s, so the step goes against v, towards the image)


The diffusion transformer (DiT, sdlearn.models.dit):

    ex.check_patchify(my_patchify)        # my_patchify(x (B, C, H, W), p) -> tokens (B, N, p*p*C)
    ex.check_unpatchify(my_unpatchify)    # my_unpatchify(tokens (B, N, p*p*C), p, C) -> x (B, C, H, W), a square grid
    ex.check_modulate(my_modulate)        # my_modulate(x (B, N, D), shift (B, D), scale (B, D)) -> (B, N, D)
"""

import torch

from sdlearn.diffusion.flow_matching import flow_interpolate, flow_velocity
from sdlearn.exercises.core import Case, Mistake, checker
from sdlearn.models.dit import modulate, patchify, unpatchify

# 1. The training pair: where the sample is, and what the network must predict -------------------


def reference_flow_target(x0, noise, s):
    return flow_interpolate(x0, noise, s), flow_velocity(x0, noise)


TARGET_MISTAKES = [
    Mistake(lambda x0, noise, s: ((1 - s) * x0 + s * noise, x0 - noise),
            "Your x_s is right, but the target has the wrong sign: the velocity is dx_s/ds = noise - x0 (from the image "
            "towards the noise, the way s grows), not x0 - noise."),
    Mistake(lambda x0, noise, s: (s * x0 + (1 - s) * noise, noise - x0),
            "Your interpolation is swapped: s is the noise level, so x_s = (1 - s) x0 + s noise (s = 0 is the image, "
            "s = 1 pure noise). You wrote s x0 + (1 - s) noise."),
    Mistake(lambda x0, noise, s: (s * x0 + (1 - s) * noise, x0 - noise),
            "Both are reversed: you used s = 1 for the image. Here (as in SD3 and diffusers) s is the noise level: "
            "x_s = (1 - s) x0 + s noise, and the target is noise - x0."),
    Mistake(lambda x0, noise, s: ((1 - s) * x0 + s * noise, noise),
            "The target is the noise, DDPM's eps. Flow matching predicts the velocity of the straight path, noise - x0."),
    Mistake(lambda x0, noise, s: ((1 - s) * x0 + s * noise, x0),
            "The target is the clean image. Flow matching predicts the velocity of the straight path, noise - x0."),
    Mistake(lambda x0, noise, s: ((1 - s) ** 0.5 * x0 + s**0.5 * noise, noise - x0),
            "Your x_s has square roots: that is DDPM's variance-preserving path (alpha_bar = 1 - s). Flow matching's "
            "path is the straight line x_s = (1 - s) x0 + s noise."),
]


def _target_cases() -> list:
    g = torch.Generator().manual_seed(140)
    return [
        Case(torch.randn(2, 3, 4, 4, generator=g), torch.randn(2, 3, 4, 4, generator=g), 0.3),
        Case(torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 4, 8, 8, generator=g),
             torch.tensor([0.1, 0.75, 0.9]).reshape(3, 1, 1, 1)),  # one level per image, shaped to broadcast
    ]


@checker(reference_flow_target, _target_cases, name="flow_target", mistakes=TARGET_MISTAKES)
def check_flow_target(fn) -> bool:
    """fn(x0 (B, C, H, W), noise (B, C, H, W), s float or (B, 1, 1, 1)) -> (x_s, target), each (B, C, H, W)."""


# 2. One Euler step of the flow ------------------------------------------------------------------


def reference_flow_step(x, v, s, s_next):
    return x + (s_next - s) * v


STEP_MISTAKES = [
    Mistake(lambda x, v, s, s_next: x + (s - s_next) * v,
            "Your step goes the wrong way: s falls from 1 to 0, so the step is (s_next - s) v, negative times v. "
            "You moved towards the noise."),
    Mistake(lambda x, v, s, s_next: x - s * v,
            "You jumped to x0_pred = x - s v, all the way to s = 0. One Euler step goes only to s_next: x + (s_next - s) v."),
    Mistake(lambda x, v, s, s_next: x + s_next * v,
            "You multiplied v by the level s_next; Euler's step multiplies it by the change of level, s_next - s."),
    Mistake(lambda x, v, s, s_next: (s_next - s) * v,
            "You returned the change alone; the next sample is x plus it: x + (s_next - s) v."),
]


def _step_cases() -> list:
    g = torch.Generator().manual_seed(141)
    return [Case(torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g), s, s_next)
            for s, s_next in ((1.0, 0.75), (0.6, 0.2), (0.3, 0.0))]


@checker(reference_flow_step, _step_cases, name="flow_step", mistakes=STEP_MISTAKES)
def check_flow_step(fn) -> bool:
    """fn(x (B, C, H, W), v (B, C, H, W), s float, s_next float < s) -> x_next (B, C, H, W)."""


# ================================================================================================
# DiT: patches and adaLN-Zero (sdlearn.models.dit)
#
# Token n = i * w + j (row-major over the h x w grid of patches) holds the p x p patch at row i,
# column j; inside a token the features run (row a in the patch, column b, channel c):
# feature (a * p + b) * C + c, the order in which DiT's final layer writes each output patch.
# adaLN-Zero modulates a normalised token with the condition's shift and scale:
# modulate(x, shift, scale) = x * (1 + scale) + shift, one shift and scale per sample.
# ================================================================================================


# 1. patchify -------------------------------------------------------------------------------------


def _patches(x, p, order):
    """x (B, C, H, W) as (B, C, h, p, w, p), permuted by `order` and flattened to (B, N, p*p*C)."""
    B, C, H, W = x.shape
    return x.reshape(B, C, H // p, p, W // p, p).permute(*order).reshape(B, (H // p) * (W // p), p * p * C)


PATCHIFY_MISTAKES = [
    Mistake(lambda x, p: _patches(x, p, (0, 2, 4, 1, 3, 5)),
            "Each token's features are ordered (channel, row, column), as F.unfold gives them; DiT's final layer writes "
            "(row, column, channel): permute to (B, h, w, p, p, C), channels last."),
    Mistake(lambda x, p: x.reshape(x.shape[0], (x.shape[2] // p) * (x.shape[3] // p), -1),
            "You reshaped without moving any axis, so a token is not a p x p patch but a run of consecutive numbers. "
            "Split H and W into (grid, within-patch) with reshape(B, C, h, p, w, p), then permute."),
    Mistake(lambda x, p: _patches(x, p, (0, 4, 2, 3, 5, 1)),
            "Your tokens go down the columns of the grid first; DiT numbers them row by row: token n = i * w + j."),
    Mistake(lambda x, p: _patches(x, p, (0, 2, 4, 5, 3, 1)),
            "Inside each patch you went column by column; the features run row by row: feature (a * p + b) * C + c "
            "for the pixel at row a, column b of the patch."),
]


def _patchify_cases() -> list:
    g = torch.Generator().manual_seed(141)
    return [Case(torch.randn(2, 4, 8, 8, generator=g), 2), Case(torch.randn(1, 3, 6, 4, generator=g), 2),
            Case(torch.randn(1, 2, 8, 8, generator=g), 4)]


@checker(patchify, _patchify_cases, name="patchify", mistakes=PATCHIFY_MISTAKES)
def check_patchify(fn) -> bool:
    """fn(x (B, C, H, W), p) -> tokens (B, N, p*p*C), N = (H/p) (W/p), row-major, features (a, b, c)."""


# 2. unpatchify -----------------------------------------------------------------------------------


def _unpatches(tokens, p, C, shape, order):
    """tokens (B, N, p*p*C) viewed as `shape` (with h = w = sqrt(N)), permuted by `order`, as (B, C, h*p, w*p)."""
    B, N, _ = tokens.shape
    h = int(round(N**0.5))
    sizes = {"h": h, "w": h, "p": p, "q": p, "C": C}
    return tokens.reshape(B, *(sizes[s] for s in shape)).permute(*order).reshape(B, C, h * p, h * p)


UNPATCHIFY_MISTAKES = [
    Mistake(lambda tokens, p, C: _unpatches(tokens, p, C, "hwCpq", (0, 3, 1, 4, 2, 5)),
            "You read each token's features as (channel, row, column); DiT's final layer writes them (row, column, "
            "channel): reshape to (B, h, w, p, p, C)."),
    Mistake(lambda tokens, p, C: tokens.reshape(tokens.shape[0], C, *(2 * [int(round(tokens.shape[1] ** 0.5)) * p])),
            "You reshaped the tokens straight into an image without moving any axis. Reshape to (B, h, w, p, p, C), "
            "permute to (B, C, h, p, w, p), then reshape to (B, C, h*p, w*p)."),
    Mistake(lambda tokens, p, C: _unpatches(tokens, p, C, "hwpqC", (0, 5, 1, 2, 3, 4)),
            "You permuted to (B, C, h, w, p, p): the grid axes must interleave with the pixel axes, (B, C, h, p, w, p), "
            "so that image row = i * p + a and column = j * p + b."),
    Mistake(lambda tokens, p, C: _unpatches(tokens, p, C, "hwpqC", (0, 5, 2, 4, 1, 3)),
            "Your image is transposed: the grid axes are swapped. Token n = i * w + j is at row i, column j."),
]


def _unpatchify_cases() -> list:
    g = torch.Generator().manual_seed(142)
    return [Case(torch.randn(2, 16, 16, generator=g), 2, 4), Case(torch.randn(1, 9, 12, generator=g), 2, 3),
            Case(torch.randn(1, 4, 32, generator=g), 4, 2)]


@checker(unpatchify, _unpatchify_cases, name="unpatchify", mistakes=UNPATCHIFY_MISTAKES)
def check_unpatchify(fn) -> bool:
    """fn(tokens (B, N, p*p*C), p, C) -> x (B, C, H, W) with H = W = p sqrt(N): the inverse of patchify."""


# 3. modulate -------------------------------------------------------------------------------------


MODULATE_MISTAKES = [
    Mistake(lambda x, shift, scale: x * scale[:, None] + shift[:, None],
            "You multiplied by scale; adaLN multiplies by (1 + scale), so that scale = 0 (the zero initialisation) "
            "leaves the normalised x unchanged."),
    Mistake(lambda x, shift, scale: x * (1 + shift[:, None]) + scale[:, None],
            "You swapped shift and scale: x * (1 + scale) + shift."),
    Mistake(lambda x, shift, scale: (x + shift[:, None]) * (1 + scale[:, None]),
            "You shifted before scaling; adaLN scales first, then shifts: x * (1 + scale) + shift."),
    Mistake(lambda x, shift, scale: x * (1 + scale) + shift,
            "shift and scale hold one vector per sample, (B, D), and x is (B, N, D): add a token axis, "
            "scale[:, None] and shift[:, None], so the same vector modulates every token of that sample."),
    Mistake(lambda x, shift, scale: x * (1 + scale[:, None]),
            "You left out the shift: x * (1 + scale) + shift."),
]


def _modulate_cases() -> list:
    g = torch.Generator().manual_seed(143)
    cases = []
    for B, N, D in ((4, 4, 6), (2, 5, 3), (1, 7, 8)):  # B = N first: a missing token axis broadcasts silently there
        cases.append(Case(torch.randn(B, N, D, generator=g), torch.randn(B, D, generator=g), torch.randn(B, D, generator=g)))
    return cases


@checker(modulate, _modulate_cases, name="modulate", mistakes=MODULATE_MISTAKES)
def check_modulate(fn) -> bool:
    """fn(x (B, N, D), shift (B, D), scale (B, D)) -> x * (1 + scale) + shift, per sample over all its tokens."""
