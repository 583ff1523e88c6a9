"""Lesson 03 exercise: noising an image to timestep t in one jump.

    from sdlearn.exercises import lesson03 as ex
    ex.check_q_sample(my_q_sample)   # my_q_sample(x0, t, eps, schedule) -> x_t

    x_t = sqrt(alpha_bar_t) x0 + sqrt(1 - alpha_bar_t) eps        (DDPM eq. 4)

x0 and eps are (B, C, H, W), t is a LongTensor (B,) of 0-based timesteps (one per image),
and `schedule` is a `sdlearn.diffusion.schedules.NoiseSchedule` with `.beta`, `.alpha`, `.alpha_bar`,
each a (T,) tensor.
"""

import torch

from sdlearn.exercises.core import Case, Mistake, checker
from sdlearn.diffusion.schedules import NoiseSchedule


def _per_image(values: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return values[t][:, None, None, None]  # (B,) -> (B, 1, 1, 1), to broadcast over C, H, W


def reference_q_sample(x0, t, eps, schedule):
    """x_t = sqrt(alpha_bar_t) x0 + sqrt(1 - alpha_bar_t) eps."""
    return schedule.q_sample(x0, t, eps)


def _alpha_not_alpha_bar(x0, t, eps, schedule):
    a = _per_image(schedule.alpha, t)
    return a.sqrt() * x0 + (1 - a).sqrt() * eps


def _no_sqrt(x0, t, eps, schedule):
    a_bar = _per_image(schedule.alpha_bar, t)
    return a_bar * x0 + (1 - a_bar) * eps


def _no_sqrt_on_noise(x0, t, eps, schedule):
    a_bar = _per_image(schedule.alpha_bar, t)
    return a_bar.sqrt() * x0 + (1 - a_bar) * eps


def _no_sqrt_on_signal(x0, t, eps, schedule):
    a_bar = _per_image(schedule.alpha_bar, t)
    return a_bar * x0 + (1 - a_bar).sqrt() * eps


def _swapped(x0, t, eps, schedule):
    a_bar = _per_image(schedule.alpha_bar, t)
    return (1 - a_bar).sqrt() * x0 + a_bar.sqrt() * eps


def _beta_as_noise(x0, t, eps, schedule):
    a_bar, beta = _per_image(schedule.alpha_bar, t), _per_image(schedule.beta, t)
    return a_bar.sqrt() * x0 + beta.sqrt() * eps


def _one_based(x0, t, eps, schedule):
    a_bar = _per_image(schedule.alpha_bar, t - 1)
    return a_bar.sqrt() * x0 + (1 - a_bar).sqrt() * eps


Q_SAMPLE_MISTAKES = [
    Mistake(
        _alpha_not_alpha_bar,
        "You used alpha_t, the signal kept by ONE step. Jumping from x0 straight to x_t needs "
        "alpha_bar_t = alpha_1 * ... * alpha_t (schedule.alpha_bar).",
    ),
    Mistake(_no_sqrt, "alpha_bar_t and 1 - alpha_bar_t are variances: multiply x0 and eps by their square roots."),
    Mistake(_no_sqrt_on_noise, "The noise term needs a square root too: sqrt(1 - alpha_bar_t) * eps."),
    Mistake(_no_sqrt_on_signal, "The signal term needs a square root too: sqrt(alpha_bar_t) * x0."),
    Mistake(_swapped, "The coefficients are swapped: x0 gets sqrt(alpha_bar_t), the noise gets sqrt(1 - alpha_bar_t)."),
    Mistake(
        _beta_as_noise,
        "You scaled the noise by sqrt(beta_t), the noise of one step. After t steps the noise has "
        "variance 1 - alpha_bar_t.",
    ),
    Mistake(
        _one_based,
        "You looked up alpha_bar[t - 1]. Timesteps here are 0-based (as in diffusers): use alpha_bar[t] "
        "(the paper's t = 1 is index 0).",
    ),
]


def _cases() -> list:
    schedule = NoiseSchedule.ddpm()
    g = torch.Generator().manual_seed(3)
    cases = []
    for t in ([10, 250, 600, 999], [400]):
        t = torch.tensor(t)
        shape = (len(t), 3, 8, 8)
        cases.append(Case(torch.rand(shape, generator=g) * 2 - 1, t, torch.randn(shape, generator=g), schedule))
    return cases


@checker(reference_q_sample, _cases, name="q_sample", mistakes=Q_SAMPLE_MISTAKES)
def check_q_sample(fn) -> bool:
    """fn(x0 (B, C, H, W), t (B,) long, eps (B, C, H, W), schedule) -> x_t (B, C, H, W)."""
