"""Lesson 05 exercise: one deterministic DDIM step (eta = 0) from a noise prediction.

    from sdlearn.exercises import lesson05 as ex
    ex.check_ddim_step(my_ddim_step)   # my_ddim_step(x_t, eps, t, t_prev, schedule) -> x_prev

    x0_pred = (x_t - sqrt(1 - alpha_bar_t) eps) / sqrt(alpha_bar_t)            (DDIM eq. 12, "predicted x0")
    x_prev  = sqrt(alpha_bar_prev) x0_pred + sqrt(1 - alpha_bar_prev) eps       (eq. 12 with sigma = 0)

x_t and eps are (B, C, H, W); t > t_prev >= 0 are integer timesteps (the same for the whole
batch); `schedule` is a `sdlearn.diffusion.schedules.NoiseSchedule` (.beta, .alpha, .alpha_bar).
This is exactly what `sdlearn.samplers.DDIMSampler.step` computes with eta = 0.
"""

import torch

from sdlearn.exercises.core import Case, Mistake, checker
from sdlearn.diffusion.schedules import NoiseSchedule


def reference_ddim_step(x_t, eps, t, t_prev, schedule):
    alpha_bar_t, alpha_bar_prev = schedule.alpha_bar[t], schedule.alpha_bar[t_prev]
    x0_pred = (x_t - (1 - alpha_bar_t).sqrt() * eps) / alpha_bar_t.sqrt()
    return alpha_bar_prev.sqrt() * x0_pred + (1 - alpha_bar_prev).sqrt() * eps


def _step(x_t, eps, a_t, a_prev, sign=-1.0, sqrt=True, direction=None):
    """A DDIM step with one thing changed, to build the wrong variants below."""

    def root(v):
        return v.sqrt() if sqrt else v

    x0_pred = (x_t + sign * root(1 - a_t) * eps) / root(a_t)
    direction = a_prev if direction is None else direction
    return root(a_prev) * x0_pred + root(1 - direction) * eps


def _alpha_not_alpha_bar(x_t, eps, t, t_prev, schedule):
    return _step(x_t, eps, schedule.alpha[t], schedule.alpha[t_prev])


def _no_sqrt(x_t, eps, t, t_prev, schedule):
    return _step(x_t, eps, schedule.alpha_bar[t], schedule.alpha_bar[t_prev], sqrt=False)


def _wrong_sign(x_t, eps, t, t_prev, schedule):
    return _step(x_t, eps, schedule.alpha_bar[t], schedule.alpha_bar[t_prev], sign=+1.0)


def _old_noise_level(x_t, eps, t, t_prev, schedule):
    a_t, a_prev = schedule.alpha_bar[t], schedule.alpha_bar[t_prev]
    return _step(x_t, eps, a_t, a_prev, direction=a_t)


def _swapped_timesteps(x_t, eps, t, t_prev, schedule):
    return _step(x_t, eps, schedule.alpha_bar[t_prev], schedule.alpha_bar[t])


def _returned_x0(x_t, eps, t, t_prev, schedule):
    a_t = schedule.alpha_bar[t]
    return (x_t - (1 - a_t).sqrt() * eps) / a_t.sqrt()


DDIM_MISTAKES = [
    Mistake(
        _alpha_not_alpha_bar,
        "You used alpha (one step's signal). DDIM, like q(x_t | x0), works with alpha_bar = schedule.alpha_bar: "
        "the DDIM paper calls it alpha_t, which is the DDPM paper's alpha_bar_t.",
    ),
    Mistake(_no_sqrt, "alpha_bar and 1 - alpha_bar are variances: the coefficients are their square roots."),
    Mistake(_wrong_sign, "Predicting x0 removes the noise: x0_pred = (x_t - sqrt(1 - alpha_bar_t) eps) / sqrt(alpha_bar_t)."),
    Mistake(
        _old_noise_level,
        "The noise you put back must have the new, smaller level: sqrt(1 - alpha_bar_prev) * eps, not sqrt(1 - alpha_bar_t).",
    ),
    Mistake(_swapped_timesteps, "alpha_bar_t and alpha_bar_prev are swapped: divide by sqrt(alpha_bar_t), re-noise with alpha_bar_prev."),
    Mistake(_returned_x0, "You returned x0_pred. Finish the step: x_prev = sqrt(alpha_bar_prev) x0_pred + sqrt(1 - alpha_bar_prev) eps."),
]


def _cases() -> list:
    schedule = NoiseSchedule.sd()
    g = torch.Generator().manual_seed(5)
    cases = []
    for t, t_prev in ((981, 961), (501, 481), (41, 1)):
        shape = (2, 4, 8, 8)
        cases.append(Case(torch.randn(shape, generator=g), torch.randn(shape, generator=g), t, t_prev, schedule))
    return cases


@checker(reference_ddim_step, _cases, name="ddim_step", mistakes=DDIM_MISTAKES, atol=1e-4, rtol=1e-4)
def check_ddim_step(fn) -> bool:
    """fn(x_t (B, C, H, W), eps (B, C, H, W), t int, t_prev int, schedule) -> x_prev (B, C, H, W)."""
