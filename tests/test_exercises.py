"""The checker framework tells right from wrong, and says what is wrong in teaching terms."""

import re

import pytest
import torch

from sdlearn.exercises import Case, ExerciseError, Mistake, check_function, lesson00


def reference(x, scale=1.0):
    return x.sum(dim=-1) * scale


CASES = [Case(torch.arange(12.0).reshape(3, 4)), Case(torch.ones(2, 5), scale=2.0)]


def check(fn, **kwargs):
    return check_function(fn, reference, CASES, name="total", quiet=True, **kwargs)


def test_passes_on_the_reference(capsys):
    assert check_function(reference, reference, CASES, name="total")
    assert "Correct" in capsys.readouterr().out


@pytest.mark.parametrize(
    "wrong, message",
    [
        (lambda x, scale=1.0: None, "returned None"),
        (lambda x, scale=1.0: x.sum(dim=-1).tolist(), "should return a torch.Tensor"),
        (lambda x, scale=1.0: x.sum(dim=0) * scale, "shape"),
        (lambda x, scale=1.0: x.sum(dim=-1) * scale + 0.1, "largest error is 0.1"),
        (lambda x, scale=1.0: x.sum(dim=-1) / 0.0, "NaN or infinite"),
        (lambda x, scale=1.0: (_ for _ in ()).throw(NotImplementedError()), "not written yet"),
        (lambda x, scale=1.0: x[10], "raised IndexError"),
    ],
)
def test_fails_with_a_teaching_message(wrong, message):
    with pytest.raises(ExerciseError, match=message):
        check(wrong)


def test_known_mistakes_are_named():
    forgot_scale = Mistake(lambda x, scale=1.0: x.sum(dim=-1), "you forgot to multiply by scale.")
    with pytest.raises(ExerciseError, match="forgot to multiply by scale"):
        check(lambda x, scale=1.0: x.sum(dim=-1), mistakes=[forgot_scale])


def test_a_failure_is_an_assertion_error_so_nbval_fails_too():
    assert issubclass(ExerciseError, AssertionError)


def test_inputs_cannot_leak_between_learner_and_reference():
    def mutating(x, scale=1.0):
        out = x.sum(dim=-1) * scale
        x.mul_(0)  # an in-place edit of the input must not change what the reference sees
        return out

    assert check(mutating)


def test_not_a_function():
    with pytest.raises(ExerciseError, match="Expected a function"):
        check_function(42, reference, CASES, name="total")


def test_tuple_outputs_are_checked_one_by_one():
    def ref(x):
        return x + 1, x * 2

    with pytest.raises(ExerciseError, match=r"output 1"):
        check_function(lambda x: (x + 1, x * 3), ref, [Case(torch.ones(3))], name="pair", quiet=True)
    with pytest.raises(ExerciseError, match="should return 2 values"):
        check_function(lambda x: (x + 1,), ref, [Case(torch.ones(3))], name="pair", quiet=True)


def test_lesson00_checker():
    assert lesson00.check_to_model_range(lambda x: 2 * x - 1)
    for mistake in lesson00.MISTAKES:
        with pytest.raises(ExerciseError, match=re.escape(mistake.message)):
            lesson00.check_to_model_range(mistake.fn)
