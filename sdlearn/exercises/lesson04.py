"""Lesson 04 exercises: the DDPM training loss, and one reverse step.

    from sdlearn.exercises import lesson04 as ex
    ex.check_training_loss(my_loss)     # my_loss(eps_model, x0, t, eps, schedule) -> scalar
    ex.check_reverse_step(my_step)      # my_step(x_t, eps_pred, t, schedule, z) -> x_{t-1}

1. The training loss (Ho et al. 2020, eq. 14, Algorithm 1):

       x_t  = sqrt(alpha_bar_t) x0 + sqrt(1 - alpha_bar_t) eps          (eq. 4)
       loss = mean of (eps - eps_model(x_t, t))^2                        (eq. 14)

   x0 and eps are (B, C, H, W), t a LongTensor (B,) of 0-based timesteps, eps_model(x, t)
   returns the predicted noise (B, C, H, W), `schedule` a sdlearn.diffusion.schedules.NoiseSchedule.

2. One reverse step (eq. 11, Algorithm 2 line 4), t an int for the whole batch:

       x_{t-1} = 1 / sqrt(alpha_t) * (x_t - beta_t / sqrt(1 - alpha_bar_t) * eps_pred) + sigma_t z
       sigma_t^2 = beta_tilde_t = (1 - alpha_bar_{t-1}) / (1 - alpha_bar_t) * beta_t     (eq. 7)

   with alpha_bar_{-1} = 1, so sigma_0 = 0: the last step adds no noise. This is exactly
   sdlearn.samplers.DDPMSampler's step (variance_type="fixed_small", all 1000 steps, no
   clipping), written in the paper's eq. 11 form instead of the posterior-mean form.
"""

import torch
import torch.nn.functional as F
from torch import nn

from sdlearn.exercises.core import Case, Mistake, checker
from sdlearn.diffusion.schedules import NoiseSchedule


class ToyEpsModel(nn.Module):
    """A fixed stand-in for the UNet in the checks: eps_model(x, t) = W x + (t / T) b, per pixel.

    Deterministic and cheap, and it depends on both x and t, so a loss that feeds the
    model the wrong input or timestep gives a different number.
    """

    def __init__(self, channels: int = 3, seed: int = 0, T: int = 1000):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.weight = nn.Parameter(torch.randn(channels, channels, generator=g) / channels**0.5, requires_grad=False)
        self.bias = nn.Parameter(torch.randn(channels, generator=g), requires_grad=False)
        self.T = T

    def forward(self, x: torch.Tensor, t) -> torch.Tensor:
        t = torch.as_tensor(t, dtype=x.dtype).reshape(-1)  # (B,) or (1,)
        mixed = torch.einsum("oc,bchw->bohw", self.weight, x)  # (B, C, H, W)
        return mixed + (t / self.T)[:, None, None, None] * self.bias[None, :, None, None]


def _per_image(values: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return values[t][:, None, None, None]  # (B,) -> (B, 1, 1, 1)


# 1. The training loss --------------------------------------------------------------------


def reference_training_loss(eps_model, x0, t, eps, schedule):
    alpha_bar_t = _per_image(schedule.alpha_bar, t)
    x_t = alpha_bar_t.sqrt() * x0 + (1 - alpha_bar_t).sqrt() * eps  # eq. 4
    return F.mse_loss(eps_model(x_t, t), eps)  # eq. 14


def _loss_with(eps_model, x0, t, eps, schedule, coefficients="alpha_bar", sqrt=True, target="eps", model_input="x_t", reduce="mean"):
    """The loss with one thing changed, to build the wrong variants below."""
    a = _per_image(schedule.alpha if coefficients == "alpha" else schedule.alpha_bar, t)
    x_t = (a.sqrt() * x0 + (1 - a).sqrt() * eps) if sqrt else (a * x0 + (1 - a) * eps)
    prediction = eps_model(x0 if model_input == "x0" else x_t, t)
    error = (prediction - (x0 if target == "x0" else eps)) ** 2
    return error.sum() if reduce == "sum" else error.mean()


def _predicts_x0(eps_model, x0, t, eps, schedule):
    return _loss_with(eps_model, x0, t, eps, schedule, target="x0")


def _alpha_not_alpha_bar(eps_model, x0, t, eps, schedule):
    return _loss_with(eps_model, x0, t, eps, schedule, coefficients="alpha")


def _no_sqrt(eps_model, x0, t, eps, schedule):
    return _loss_with(eps_model, x0, t, eps, schedule, sqrt=False)


def _model_sees_x0(eps_model, x0, t, eps, schedule):
    return _loss_with(eps_model, x0, t, eps, schedule, model_input="x0")


def _sum_not_mean(eps_model, x0, t, eps, schedule):
    return _loss_with(eps_model, x0, t, eps, schedule, reduce="sum")


LOSS_MISTAKES = [
    Mistake(
        _predicts_x0,
        "You compared the prediction with x0. In DDPM's eq. 14 the network predicts the NOISE: "
        "the target is eps, the noise you mixed in.",
    ),
    Mistake(
        _alpha_not_alpha_bar,
        "You noised x0 with alpha_t, one step's signal. Jumping to timestep t needs alpha_bar_t (schedule.alpha_bar).",
    ),
    Mistake(_no_sqrt, "alpha_bar_t and 1 - alpha_bar_t are variances: x0 and eps are scaled by their square roots."),
    Mistake(_model_sees_x0, "The network must see the noisy image x_t, not the clean x0 (it cannot find noise that is not there)."),
    Mistake(_sum_not_mean, "Use the mean of the squared errors, not the sum (the loss should not grow with the batch or image size)."),
]


def _loss_cases() -> list:
    schedule = NoiseSchedule.ddpm()
    g = torch.Generator().manual_seed(4)
    model = ToyEpsModel(3, seed=1)
    cases = []
    for t in ([5, 250, 600, 999], [400, 30]):
        t = torch.tensor(t)
        shape = (len(t), 3, 8, 8)
        cases.append(Case(model, torch.rand(shape, generator=g) * 2 - 1, t, torch.randn(shape, generator=g), schedule))
    return cases


@checker(reference_training_loss, _loss_cases, name="training_loss", mistakes=LOSS_MISTAKES)
def check_training_loss(fn) -> bool:
    """fn(eps_model, x0 (B, C, H, W), t (B,) long, eps (B, C, H, W), schedule) -> scalar tensor."""


# 2. One reverse step ---------------------------------------------------------------------


def reference_reverse_step(x_t, eps_pred, t, schedule, z):
    beta_t, alpha_t, alpha_bar_t = schedule.beta[t], schedule.alpha[t], schedule.alpha_bar[t]
    mean = (x_t - beta_t / (1 - alpha_bar_t).sqrt() * eps_pred) / alpha_t.sqrt()  # eq. 11
    alpha_bar_prev = schedule.alpha_bar[t - 1] if t > 0 else torch.tensor(1.0)
    variance = (1 - alpha_bar_prev) / (1 - alpha_bar_t) * beta_t  # beta_tilde_t, eq. 7
    return mean + variance.sqrt() * z


def _step_with(x_t, eps_pred, t, schedule, z, signal="alpha", sqrt_noise=True, variance="beta_tilde", std=True, sign=-1.0):
    beta_t, alpha_bar_t = schedule.beta[t], schedule.alpha_bar[t]
    a = schedule.alpha[t] if signal == "alpha" else alpha_bar_t
    noise_scale = (1 - alpha_bar_t).sqrt() if sqrt_noise else (1 - alpha_bar_t)
    mean = (x_t + sign * beta_t / noise_scale * eps_pred) / a.sqrt()
    alpha_bar_prev = schedule.alpha_bar[t - 1] if t > 0 else torch.tensor(1.0)
    var = beta_t if variance == "beta" else (1 - alpha_bar_prev) / (1 - alpha_bar_t) * beta_t
    return mean + (var.sqrt() if std else var) * z


def _alpha_bar_in_front(x_t, eps_pred, t, schedule, z):
    return _step_with(x_t, eps_pred, t, schedule, z, signal="alpha_bar")


def _no_sqrt_on_noise_level(x_t, eps_pred, t, schedule, z):
    return _step_with(x_t, eps_pred, t, schedule, z, sqrt_noise=False)


def _beta_variance(x_t, eps_pred, t, schedule, z):
    return _step_with(x_t, eps_pred, t, schedule, z, variance="beta")


def _variance_as_std(x_t, eps_pred, t, schedule, z):
    return _step_with(x_t, eps_pred, t, schedule, z, std=False)


def _adds_the_noise(x_t, eps_pred, t, schedule, z):
    return _step_with(x_t, eps_pred, t, schedule, z, sign=+1.0)


STEP_MISTAKES = [
    Mistake(
        _alpha_bar_in_front,
        "The factor in front is 1 / sqrt(alpha_t) with alpha_t = 1 - beta_t (one step back), not alpha_bar_t.",
    ),
    Mistake(_no_sqrt_on_noise_level, "The noise prediction is scaled by beta_t / sqrt(1 - alpha_bar_t): you forgot the square root."),
    Mistake(
        _beta_variance,
        "You used sigma_t^2 = beta_t (the paper's other choice, diffusers' 'fixed_large'). This exercise asks for "
        "the posterior variance beta_tilde_t = (1 - alpha_bar_{t-1}) / (1 - alpha_bar_t) * beta_t, with alpha_bar_{-1} = 1.",
    ),
    Mistake(_variance_as_std, "sigma_t is a standard deviation: multiply z by the square root of the variance beta_tilde_t."),
    Mistake(_adds_the_noise, "A reverse step removes the predicted noise: x_t MINUS beta_t / sqrt(1 - alpha_bar_t) * eps_pred."),
]


def _step_cases() -> list:
    schedule = NoiseSchedule.ddpm()
    g = torch.Generator().manual_seed(5)
    cases = []
    for t in (999, 500, 20, 1, 0):
        shape = (2, 3, 8, 8)
        cases.append(Case(torch.randn(shape, generator=g), torch.randn(shape, generator=g), t, schedule, torch.randn(shape, generator=g)))
    return cases


@checker(reference_reverse_step, _step_cases, name="reverse_step", mistakes=STEP_MISTAKES, atol=1e-4, rtol=1e-4)
def check_reverse_step(fn) -> bool:
    """fn(x_t (B, C, H, W), eps_pred (B, C, H, W), t int, schedule, z (B, C, H, W)) -> x_{t-1}."""
