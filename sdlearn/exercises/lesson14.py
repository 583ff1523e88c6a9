"""Lesson 14 exercises: flow matching's training pair and its Euler step (SD3, Flux).

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
"""

import torch

from sdlearn.diffusion.flow_matching import flow_interpolate, flow_velocity
from sdlearn.exercises.core import Case, Mistake, checker

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
