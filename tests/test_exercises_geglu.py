"""Lesson 07's GEGLU checker: the reference is SD's feed-forward, right answers pass, each known mistake is named."""

import pytest
import torch
import torch.nn.functional as F
from diffusers.models.attention import FeedForward as DiffusersFeedForward

from sdlearn.exercises import ExerciseError
from sdlearn.exercises import lesson07
from sdlearn.models.attention import FeedForward


def learner_geglu(x, proj_weight, proj_bias, out_weight, out_bias):
    """Written independently of the reference, as a learner would."""
    y = x @ proj_weight.T + proj_bias
    inner = y.shape[-1] // 2
    value, gate = y[..., :inner], y[..., inner:]
    return (value * 0.5 * gate * (1 + torch.erf(gate / 2**0.5))) @ out_weight.T + out_bias


def _module_weights(ff):
    return ff.net[0].proj.weight, ff.net[0].proj.bias, ff.net[2].weight, ff.net[2].bias


def test_reference_is_sdlearn_and_diffusers_feed_forward_at_sd_shapes():
    torch.manual_seed(0)
    ours = FeedForward(320).eval()
    assert tuple(ours.net[0].proj.weight.shape) == (2 * 1280, 320) and tuple(ours.net[2].weight.shape) == (320, 1280)
    theirs = DiffusersFeedForward(320, activation_fn="geglu").eval()
    theirs.load_state_dict(ours.state_dict(), strict=True)
    x = torch.randn(2, 7, 320)
    with torch.no_grad():
        got = lesson07.reference_geglu(x, *_module_weights(ours))
        assert torch.allclose(got, ours(x), atol=1e-6)
        assert torch.allclose(got, theirs(x), atol=1e-5)


@pytest.mark.parametrize("solution", [learner_geglu, lesson07.reference_geglu])
def test_correct_solutions_pass(solution, capsys):
    assert lesson07.check_geglu(solution) is True
    assert "Correct!" in capsys.readouterr().out


@pytest.mark.parametrize("mistake", lesson07.GEGLU_MISTAKES, ids=lambda m: m.fn.__name__)
def test_each_known_mistake_is_named(mistake):
    with pytest.raises(ExerciseError) as info:
        lesson07.check_geglu(mistake.fn)
    assert str(info.value).endswith(mistake.message), f"{mistake.fn.__name__} gave: {info.value}"


def test_mistakes_differ_from_the_reference_and_from_each_other():
    case = lesson07._geglu_cases()[1]  # SD's shapes
    outputs = [lesson07.reference_geglu(*case.args)] + [m.fn(*case.args) for m in lesson07.GEGLU_MISTAKES]
    for i in range(len(outputs)):
        for j in range(i + 1, len(outputs)):
            assert not torch.allclose(outputs[i], outputs[j], atol=1e-4), (i, j)


def test_generic_wrong_answers_raise():
    for wrong in (
        lambda *a: None,
        lambda x, *a: x,  # the input back (right shape, wrong numbers)
        lambda *a: lesson07.reference_geglu(*a) * 1.01,
        lambda x, w1, b1, w2, b2: F.linear(x, w1, b1),  # stopped after proj: (B, L, 2 x inner)
    ):
        with pytest.raises(ExerciseError):
            lesson07.check_geglu(wrong)
