"""Every checker of every lesson accepts its reference and rejects generic wrong answers.

The checkers are discovered, not listed: every public `check_*` function defined in a
`sdlearn.exercises.lessonNN` module. Each exposes its spec (reference, cases, known
mistakes) as `check_xxx.exercise`, and the wrong answers below are derived from the
reference's own output: None, an empty list, the result with its last item dropped, the
result plus an extra output, every float 1% off, NaN instead of every float, every integer
off by one, a string, a crash, and a blank `raise NotImplementedError`. Each must fail with an
ExerciseError (an AssertionError) that explains itself; a wrong answer that does not apply
to a checker's result (nothing to truncate in a scalar) is skipped with the reason.
"""

import copy
import importlib
import pkgutil
import re

import pytest
import torch

import sdlearn.exercises
from sdlearn.exercises import Exercise, ExerciseError, NotWrittenYet


def _lesson_modules() -> list:
    names = sorted(m.name for m in pkgutil.iter_modules(sdlearn.exercises.__path__) if re.fullmatch(r"lesson\d+", m.name))
    return [importlib.import_module(f"sdlearn.exercises.{name}") for name in names]


def _discover() -> dict:
    """{'lesson03.check_q_sample': check_q_sample, ...}: the check_* functions each lesson module defines."""
    found = {}
    for module in _lesson_modules():
        for attr, obj in vars(module).items():
            if attr.startswith("check_") and callable(obj) and getattr(obj, "__module__", None) == module.__name__:
                found[f"{module.__name__.rsplit('.', 1)[1]}.{attr}"] = obj
    return found


CHECKERS = _discover()


def test_discovery_finds_every_lesson_and_every_checker_exposes_its_spec():
    lessons = {key.split(".")[0] for key in CHECKERS}
    assert lessons >= {f"lesson{n:02d}" for n in range(11)}, f"lessons without a checker: {sorted(lessons)}"
    missing = [key for key, check in CHECKERS.items() if not isinstance(getattr(check, "exercise", None), Exercise)]
    assert not missing, f"declare these with @checker(...) so their reference is reachable: {missing}"


def _exercise(key) -> Exercise:
    return CHECKERS[key].exercise


_REFERENCE_OUTPUTS: dict = {}


def _reference_outputs(key) -> list:
    """The reference's output on each case (cached: lesson 09's cases run a UNet)."""
    if key not in _REFERENCE_OUTPUTS:
        ex = _exercise(key)
        with torch.no_grad():
            _REFERENCE_OUTPUTS[key] = [ex.reference(*copy.deepcopy(c.args), **copy.deepcopy(c.kwargs)) for c in ex.make_cases()]
    return _REFERENCE_OUTPUTS[key]


# ------------------------------------------------------------------------------------------
# Generic wrong answers: a function of the reference's output. NA: does not apply to it.
# ------------------------------------------------------------------------------------------

NA = object()


def _map_leaves(out, fn):
    """Apply fn to every leaf (tensor or number) of a nested result; NA if fn changed nothing."""
    changed = False

    def walk(x):
        nonlocal changed
        if isinstance(x, (list, tuple)):
            return type(x)(walk(v) for v in x)
        if isinstance(x, dict):
            return {k: walk(v) for k, v in x.items()}
        y = fn(x)
        if y is NA:
            return x
        changed = True
        return y

    result = walk(out)
    return result if changed else NA


def _is_float(x) -> bool:
    return (isinstance(x, torch.Tensor) and x.is_floating_point() and x.numel() > 0) or isinstance(x, float)


def _is_int(x) -> bool:
    tensor_int = isinstance(x, torch.Tensor) and not x.is_floating_point() and x.dtype != torch.bool and x.numel() > 0
    return tensor_int or (isinstance(x, int) and not isinstance(x, bool))


def _truncated(out):
    if isinstance(out, (list, tuple)):
        return out[:-1] if len(out) else NA
    if isinstance(out, torch.Tensor):
        return out[:-1] if out.dim() >= 1 and len(out) else NA
    return NA


def _plus_extra(out):
    if isinstance(out, (list, tuple)):
        return type(out)([*out, copy.deepcopy(out[-1]) if len(out) else 0])
    return (out, copy.deepcopy(out))


WRONG_ANSWERS = {
    "returns_none": (lambda out: None, "every result can be None"),
    "returns_empty_list": (lambda out: [], "every result can be []"),
    "returns_a_string": (lambda out: "hello", "every result can be a string"),
    "drops_the_last_item": (_truncated, "the result is a scalar: there is no last item to drop"),
    "adds_an_extra_output": (_plus_extra, "every result can get an extra output"),
    "floats_off_by_1_percent": (
        lambda out: _map_leaves(out, lambda x: x * 1.01 if _is_float(x) else NA),
        "the result holds no floating-point numbers",
    ),
    "floats_become_nan": (
        lambda out: _map_leaves(out, lambda x: torch.full_like(x, float("nan")) if isinstance(x, torch.Tensor) and _is_float(x)
                                else float("nan") if _is_float(x) else NA),
        "the result holds no floating-point numbers",
    ),
    "integers_off_by_one": (
        lambda out: _map_leaves(out, lambda x: x + 1 if _is_int(x) else NA),
        "the result holds no integers",
    ),
}


def _wrong_answer_params():
    return [pytest.param(key, kind, id=f"{key}-{kind}") for key in CHECKERS for kind in WRONG_ANSWERS]


@pytest.mark.parametrize("key", [pytest.param(k, id=k) for k in CHECKERS])
def test_the_reference_passes(key, capsys):
    assert CHECKERS[key](_exercise(key).reference) is True
    assert "Correct!" in capsys.readouterr().out


@pytest.mark.parametrize("key, kind", _wrong_answer_params())
def test_a_generic_wrong_answer_fails_with_a_message(key, kind):
    transform, reason = WRONG_ANSWERS[kind]
    ex = _exercise(key)
    if all(transform(out) is NA for out in _reference_outputs(key)):
        pytest.skip(f"{kind} does not apply to {key}: {reason}")

    def wrong(*args, **kwargs):
        out = ex.reference(*args, **kwargs)
        changed = transform(out)
        return out if changed is NA else changed

    with pytest.raises(ExerciseError) as info:
        CHECKERS[key](wrong)
    message = str(info.value)
    assert not isinstance(info.value, NotWrittenYet), message
    assert f"`{ex.name}" in message, message
    assert "could not compare" not in message, f"the checker fell back to its last-resort message: {message}"


@pytest.mark.parametrize("key", [pytest.param(k, id=k) for k in CHECKERS])
def test_a_blank_exercise_is_not_written_yet(key, capsys):
    """A blank is reported, not raised, so a learner's notebook runs on (Run All); the message names the reference
    the next cells use and how to see it. check_function itself still raises NotWrittenYet."""

    def blank(*args, **kwargs):
        raise NotImplementedError

    ex = _exercise(key)
    assert CHECKERS[key](blank) is False
    out = capsys.readouterr().out
    assert f"`{ex.name}` is not written yet" in out, out
    assert f"`{ex.reference.__module__}.{ex.reference.__qualname__}`" in out, out
    assert ".solution()` shows the reference" in out, out
    with pytest.raises(NotWrittenYet, match="not written yet"):
        ex.check(blank)


@pytest.mark.parametrize("key", [pytest.param(k, id=k) for k in CHECKERS])
def test_the_solution_shows_the_references_source(key, capsys):
    ex = _exercise(key)
    CHECKERS[key].solution()
    out = capsys.readouterr().out
    assert f"def {ex.reference.__name__}(" in out, out
    assert "return" in out, out


@pytest.mark.parametrize("key", [pytest.param(k, id=k) for k in CHECKERS])
def test_a_crash_is_reported_with_its_cause(key):
    def crashes(*args, **kwargs):
        raise ValueError("something broke")

    with pytest.raises(ExerciseError, match="raised ValueError: something broke") as info:
        CHECKERS[key](crashes)
    assert not isinstance(info.value, NotWrittenYet)
    assert isinstance(info.value.__cause__, ValueError)


def _mistake_params():
    params = []
    for key, check in CHECKERS.items():
        mistakes = getattr(getattr(check, "exercise", None), "mistakes", ())
        for i, mistake in enumerate(mistakes):
            params.append(pytest.param(key, i, id=f"{key}-{getattr(mistake.fn, '__name__', 'mistake')}-{i}"))
    return params


@pytest.mark.parametrize("key, index", _mistake_params())
def test_each_named_mistake_is_recognised(key, index):
    mistake = _exercise(key).mistakes[index]
    with pytest.raises(ExerciseError) as info:
        CHECKERS[key](mistake.fn)
    assert mistake.message in str(info.value), f"expected the mistake's own message, got: {info.value}"


# ------------------------------------------------------------------------------------------
# Regressions and the comparison itself
# ------------------------------------------------------------------------------------------


def test_a_known_mistake_that_cannot_run_on_a_case_does_not_crash_the_checker():
    """lesson06's `_v_transposed` only runs where L_k == d (case 1); on case 2 it raised a RuntimeError."""
    from sdlearn.exercises import lesson06

    def wrong_on_case_2(q, k, v):
        out = lesson06.reference_attention(q, k, v)
        return out if q.shape[-2] == 5 else out * 2

    with pytest.raises(ExerciseError, match=r"wrong values.*test case 2 of 2"):
        lesson06.check_attention(wrong_on_case_2)
    with pytest.raises(ExerciseError, match="should return a torch.Tensor"):
        lesson06.check_attention(lambda *args: [])


def _check(got, want, **kwargs):
    from sdlearn.exercises import Case, check_function

    return check_function(lambda: got, lambda: want, [Case()], name="f", quiet=True, **kwargs)


@pytest.mark.parametrize(
    "got, want, message",
    [
        ([(1, 2), (3, 4)], [(1, 2)], "should return 1 value, but it returned 2"),
        ([(1, 2)], [(1, 2), (3, 4)], "should return 2 values, but it returned 1"),
        ([(1, 2), (3, 5)], [(1, 2), (3, 4)], r"`f\[1\]\[1\]` is 5; expected 4"),
        ([(1, 2), (3,)], [(1, 2), (3, 4)], r"`f\[1\]` should hold 2 values, but it is 1"),
        ((torch.ones(2), None), (torch.ones(2), torch.ones(3)), r"`f \(output 1\)` is None"),
        ((torch.ones(2), torch.full((3,), float("nan"))), (torch.ones(2), torch.ones(3)), "NaN"),
        ({"a": 1.0}, {"a": 1.0, "b": 2.0}, r"missing the keys \['b'\]"),
        ({"a": 1.0, "b": 2.0, "c": 0}, {"a": 1.0, "b": 2.0}, r"unexpected keys \['c'\]"),
        ({"a": 1.0, "b": 2.5}, {"a": 1.0, "b": 2.0}, r"`f\['b'\]` is 2.5; expected 2"),
        (float("nan"), 1.0, "returned nan"),
        ("cat", "dog", "returned the string 'cat'; expected the string 'dog'"),
        (torch.ones(4, 3), torch.ones(4), r"wrong shape \(4, 3\) instead of \(4,\)"),
        (torch.ones(1), torch.tensor(1.0), r"wrong shape \(1,\) instead of \(\)"),
    ],
)
def test_the_comparison_explains_nested_results(got, want, message):
    with pytest.raises(ExerciseError, match=message):
        _check(got, want)


@pytest.mark.parametrize(
    "got, want",
    [
        ([[1, 2], [3, 4]], [(1, 2), (3, 4)]),  # a list where a tuple is expected is fine
        (3.0, torch.tensor(3.0)),  # a Python number for a 0-d tensor
        (torch.tensor(11), 11),  # a 0-d tensor for a number
        ({"a": torch.ones(2)}, {"a": torch.ones(2)}),
        (torch.empty(0), torch.empty(0)),
    ],
)
def test_the_comparison_accepts_equivalent_results(got, want):
    assert _check(got, want)


def test_a_blank_helper_is_named_and_a_library_not_implemented_is_not_blamed_on_the_learner():
    from sdlearn.exercises import lesson00

    def scale(x):
        raise NotImplementedError

    def to_model_range(x):
        return scale(x) - 1

    with pytest.raises(NotWrittenYet, match="`scale`, which it calls, still raises NotImplementedError"):
        lesson00.check_to_model_range.exercise.check(to_model_range)

    def calls_an_abstract_module(x):
        return torch.nn.Module()(x)  # torch raises NotImplementedError: no forward

    with pytest.raises(ExerciseError, match="raised NotImplementedError inside") as info:
        lesson00.check_to_model_range(calls_an_abstract_module)
    assert not isinstance(info.value, NotWrittenYet)
