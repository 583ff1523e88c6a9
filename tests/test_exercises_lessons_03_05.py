"""The lesson 03 and 05 checkers pass correct answers and name each known mistake."""

import pytest
import torch

from sdlearn.exercises import ExerciseError
from sdlearn.exercises import lesson03, lesson05
from sdlearn.samplers import get_sampler


# Lesson 03: q_sample ------------------------------------------------------------------


def learner_q_sample(x0, t, eps, schedule):
    """A correct answer written as a learner would, without sdlearn's helper."""
    alpha_bar_t = schedule.alpha_bar[t].view(-1, 1, 1, 1)
    return torch.sqrt(alpha_bar_t) * x0 + torch.sqrt(1 - alpha_bar_t) * eps


def test_q_sample_checker_passes_correct_answers(capsys):
    assert lesson03.check_q_sample(lesson03.reference_q_sample)
    assert lesson03.check_q_sample(learner_q_sample)
    assert "Correct!" in capsys.readouterr().out


@pytest.mark.parametrize("mistake", lesson03.Q_SAMPLE_MISTAKES, ids=lambda m: m.fn.__name__)
def test_q_sample_checker_names_each_mistake(mistake):
    with pytest.raises(ExerciseError) as info:
        lesson03.check_q_sample(mistake.fn)
    assert mistake.message in str(info.value)


def test_q_sample_checker_explains_other_failures():
    with pytest.raises(ExerciseError, match="returned None"):
        lesson03.check_q_sample(lambda x0, t, eps, schedule: None)
    with pytest.raises(ExerciseError, match="shape"):  # forgot to broadcast alpha_bar[t] over (C, H, W)
        lesson03.check_q_sample(lambda x0, t, eps, schedule: schedule.alpha_bar[t].sqrt())
    def unwritten(x0, t, eps, schedule):
        raise NotImplementedError

    assert lesson03.check_q_sample(unwritten) is False  # a blank is reported, not raised


# Lesson 05: one DDIM step -------------------------------------------------------------


def learner_ddim_step(x_t, eps, t, t_prev, schedule):
    a_t, a_prev = schedule.alpha_bar[t].item(), schedule.alpha_bar[t_prev].item()  # as Python floats
    x0_pred = (x_t - (1 - a_t) ** 0.5 * eps) / a_t**0.5
    return a_prev**0.5 * x0_pred + (1 - a_prev) ** 0.5 * eps


def test_ddim_checker_passes_correct_answers():
    assert lesson05.check_ddim_step(lesson05.reference_ddim_step)
    assert lesson05.check_ddim_step(learner_ddim_step)


@pytest.mark.parametrize("mistake", lesson05.DDIM_MISTAKES, ids=lambda m: m.fn.__name__)
def test_ddim_checker_names_each_mistake(mistake):
    with pytest.raises(ExerciseError) as info:
        lesson05.check_ddim_step(mistake.fn)
    assert mistake.message in str(info.value)


def test_ddim_reference_is_the_samplers_step():
    sampler = get_sampler("ddim")  # SD 1.5 schedule, eta = 0
    sampler.set_timesteps(50)
    g = torch.Generator().manual_seed(0)
    x, eps = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    for t in sampler.timesteps[:-1]:
        t = int(t)
        want = sampler.step(eps, t, x).prev_sample
        got = lesson05.reference_ddim_step(x, eps, t, t - 1000 // 50, sampler.schedule)
        assert torch.allclose(got, want, atol=1e-5)
