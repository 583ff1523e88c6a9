"""Lesson 09's checkers accept correct answers and name each known mistake."""

import pytest
import torch

from sdlearn.exercises import ExerciseError
from sdlearn.exercises import lesson09 as ex


def learner_guidance(eps_uncond, eps_cond, scale):
    return (1 - scale) * eps_uncond + scale * eps_cond  # the same formula, written differently


def learner_loop_step(unet, sampler, latents, t, cond, uncond, scale):
    x = sampler.scale_model_input(torch.cat([latents] * 2), t)
    out = unet(x, t, torch.cat([uncond, cond]))
    eps = out[: len(latents)] + scale * (out[len(latents):] - out[: len(latents)])
    return sampler.step(eps, t, latents)[0]


def test_correct_answers_pass(capsys):
    assert ex.check_guidance(learner_guidance)
    assert ex.check_loop_step(learner_loop_step)
    assert capsys.readouterr().out.count("Correct") == 2


@pytest.mark.parametrize("mistake", ex.GUIDANCE_MISTAKES, ids=lambda m: m.message[:30])
def test_each_guidance_mistake_is_named(mistake):
    with pytest.raises(ExerciseError) as info:
        ex.check_guidance(mistake.fn)
    assert mistake.message in str(info.value)


@pytest.mark.parametrize("mistake", ex.LOOP_MISTAKES, ids=lambda m: m.fn.__name__)
def test_each_loop_mistake_is_named(mistake):
    with pytest.raises(ExerciseError) as info:
        ex.check_loop_step(mistake.fn)
    assert mistake.message in str(info.value)


def test_unwritten_and_none_answers_get_a_message():
    def unwritten(*args):
        raise NotImplementedError

    assert ex.check_guidance(unwritten) is False  # a blank is reported, not raised
    with pytest.raises(ExerciseError, match="returned None"):
        ex.check_loop_step(lambda *args: None)
