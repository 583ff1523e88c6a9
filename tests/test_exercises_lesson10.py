"""Lesson 10's checkers accept correct answers, name each known mistake, and agree with the pipeline."""

import pytest
import torch

from sdlearn.exercises import ExerciseError
from sdlearn.exercises import lesson10 as ex
from sdlearn.pipeline.stable_diffusion import _timesteps_for_strength
from sdlearn.samplers import get_sampler
from sdlearn.diffusion.schedules import NoiseSchedule


def learner_start(z0, noise, timesteps, strength, schedule):
    n = len(timesteps)
    k = int(n * strength)
    kept = timesteps[n - k:]
    if k == 0:
        return kept, z0
    a = schedule.alpha_bar[kept[0]]
    return kept, a.sqrt() * z0 + (1 - a).sqrt() * noise


def test_correct_answers_pass(capsys):
    assert ex.check_strength_start(learner_start)
    assert ex.check_inpaint_blend(lambda z, known, m: torch.where(m > 0.5, z, known))
    assert capsys.readouterr().out.count("Correct") == 2


@pytest.mark.parametrize("mistake", ex.STRENGTH_MISTAKES + ex.BLEND_MISTAKES, ids=lambda m: m.message[:30])
def test_each_mistake_is_named(mistake):
    check = ex.check_strength_start if mistake in ex.STRENGTH_MISTAKES else ex.check_inpaint_blend
    with pytest.raises(ExerciseError) as info:
        check(mistake.fn)
    assert mistake.message in str(info.value)


@pytest.mark.parametrize("strength", [0.0, 0.3, 0.75, 1.0])
def test_reference_matches_the_pipeline(strength):
    sampler = get_sampler("ddim", beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, steps_offset=1)
    sampler.set_timesteps(20)
    g = torch.Generator().manual_seed(0)
    z0, noise = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 4, 8, 8, generator=g)
    kept, start = ex.reference_strength_start(z0, noise, sampler.timesteps, strength, NoiseSchedule.sd())
    expected = _timesteps_for_strength(sampler, 20, strength)
    assert torch.equal(kept, expected)
    if len(kept):
        torch.testing.assert_close(start, sampler.add_noise(z0, noise, kept[:1]))
