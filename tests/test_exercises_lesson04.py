"""The lesson 04 checkers pass correct answers, name each known mistake, and their references
agree with sdlearn's DDPM code (the loss the recipe trains with, the DDPM sampler's step)."""

import pytest
import torch

from sdlearn.ddpm import ddpm_loss, null_context
from sdlearn.exercises import ExerciseError
from sdlearn.exercises import lesson04
from sdlearn.samplers import get_sampler, randn
from sdlearn.diffusion.schedules import NoiseSchedule
from sdlearn.unet import UNet, UNetConfig


def learner_loss(eps_model, x0, t, eps, schedule):
    a = schedule.alpha_bar[t].view(-1, 1, 1, 1)
    x_t = torch.sqrt(a) * x0 + torch.sqrt(1 - a) * eps
    return ((eps_model(x_t, t) - eps) ** 2).mean()


def learner_step(x_t, eps_pred, t, schedule, z):
    beta, alpha, alpha_bar = schedule.beta[t].item(), schedule.alpha[t].item(), schedule.alpha_bar[t].item()
    alpha_bar_prev = schedule.alpha_bar[t - 1].item() if t > 0 else 1.0
    sigma = ((1 - alpha_bar_prev) / (1 - alpha_bar) * beta) ** 0.5
    return (x_t - beta / (1 - alpha_bar) ** 0.5 * eps_pred) / alpha**0.5 + sigma * z


def test_checkers_pass_correct_answers(capsys):
    assert lesson04.check_training_loss(lesson04.reference_training_loss)
    assert lesson04.check_training_loss(learner_loss)
    assert lesson04.check_reverse_step(lesson04.reference_reverse_step)
    assert lesson04.check_reverse_step(learner_step)
    assert capsys.readouterr().out.count("Correct!") == 4


@pytest.mark.parametrize("mistake", lesson04.LOSS_MISTAKES, ids=lambda m: m.fn.__name__)
def test_loss_checker_names_each_mistake(mistake):
    with pytest.raises(ExerciseError) as info:
        lesson04.check_training_loss(mistake.fn)
    assert mistake.message in str(info.value)


@pytest.mark.parametrize("mistake", lesson04.STEP_MISTAKES, ids=lambda m: m.fn.__name__)
def test_step_checker_names_each_mistake(mistake):
    with pytest.raises(ExerciseError) as info:
        lesson04.check_reverse_step(mistake.fn)
    assert mistake.message in str(info.value)


def test_checkers_explain_other_failures():
    with pytest.raises(ExerciseError, match="returned None"):
        lesson04.check_training_loss(lambda eps_model, x0, t, eps, schedule: None)
    with pytest.raises(ExerciseError, match="shape"):  # returned the per-pixel errors, not their mean
        lesson04.check_training_loss(lambda eps_model, x0, t, eps, schedule: (eps_model(x0, t) - eps) ** 2)
    def unwritten(x_t, eps_pred, t, schedule, z):
        raise NotImplementedError

    assert lesson04.check_reverse_step(unwritten) is False  # a blank is reported, not raised


def test_reference_loss_is_the_loss_the_recipe_trains_with():
    torch.manual_seed(0)
    config = UNetConfig(sample_size=8, in_channels=3, out_channels=3, block_out_channels=(8, 16),
                        down_block_types=("DownBlock2D",) * 2, up_block_types=("UpBlock2D",) * 2,
                        layers_per_block=1, attention_head_dim=2, cross_attention_dim=8, norm_num_groups=4)
    unet = UNet(config)
    schedule = NoiseSchedule.ddpm()
    x0, eps = torch.rand(3, 3, 8, 8) * 2 - 1, torch.randn(3, 3, 8, 8)
    t = torch.tensor([3, 400, 999])

    def eps_model(x, t):
        return unet(x, t, null_context(unet, x.shape[0]))

    x_t = schedule.q_sample(x0, t, eps)
    torch.testing.assert_close(lesson04.reference_training_loss(eps_model, x0, t, eps, schedule), ddpm_loss(unet, x_t, t, eps))


def test_reference_step_is_the_ddpm_samplers_step():
    """Eq. 11 with beta_tilde equals DDPMSampler (fixed_small, 1000 steps) step by step, noise included."""
    schedule = NoiseSchedule.ddpm()
    sampler = get_sampler("ddpm", beta_schedule="linear", beta_start=1e-4, beta_end=0.02, steps_offset=0)
    sampler.set_timesteps(1000)
    model = lesson04.ToyEpsModel(3, seed=2)
    x = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    g_sampler, g_ours = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    for t in (999, 998, 500, 1, 0):
        eps = model(x, t)
        x_sampler = sampler.step(eps, t, x, generator=g_sampler).prev_sample
        z = randn(x.shape, generator=g_ours) if t > 0 else torch.zeros_like(x)  # the sampler draws none at t = 0
        torch.testing.assert_close(lesson04.reference_reverse_step(x, eps, t, schedule, z), x_sampler, atol=2e-5, rtol=1e-4)
