"""Lesson 08's checker accepts a correct contrastive loss and names each known mistake."""

import pytest
import torch
import torch.nn.functional as F

from sdlearn.exercises import ExerciseError
from sdlearn.exercises import lesson08 as ex


def learner_solution(image_emb, text_emb, logit_scale):
    u = F.normalize(image_emb, dim=-1)
    v = F.normalize(text_emb, dim=-1)
    logits = logit_scale.exp() * u @ v.T
    labels = torch.arange(len(u))
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


def test_correct_solution_passes(capsys):
    assert ex.check_contrastive_loss(learner_solution)
    assert "Correct" in capsys.readouterr().out


def test_reference_passes():
    assert ex.check_contrastive_loss(ex.reference_contrastive_loss)


@pytest.mark.parametrize("mistake", ex.MISTAKES, ids=lambda m: m.fn.__name__)
def test_each_mistake_is_named(mistake):
    with pytest.raises(ExerciseError) as info:
        ex.check_contrastive_loss(mistake.fn)
    assert mistake.message in str(info.value)


def test_mistakes_are_distinguishable_on_the_cases():
    """Each wrong variant differs from the reference and from the others on the first case."""
    case = ex.CASES[0]
    values = [ex.reference_contrastive_loss(*case.args).item()] + [m.fn(*case.args).item() for m in ex.MISTAKES]
    assert len({round(v, 5) for v in values}) == len(values), values


def test_other_failures_explain_themselves():
    with pytest.raises(ExerciseError, match="returned None"):
        ex.check_contrastive_loss(lambda u, v, t: None)
    def todo(u, v, t):
        raise NotImplementedError

    assert ex.check_contrastive_loss(todo) is False  # a blank is reported, not raised
    with pytest.raises(ExerciseError, match="shape"):
        ex.check_contrastive_loss(lambda u, v, t: learner_solution(u, v, t).expand(3))
