"""The exercise-checking framework.

A checker runs the learner's function and the package's reference on the same seeded
inputs and explains, in teaching terms, what went wrong: the function returned None, the
output has the wrong type or shape, or the numbers are off (with the largest error and
where it happened). Known mistakes (alpha instead of alpha_bar, a missing square root, ...)
are given as *wrong variants*: if the learner's output matches one of them, the checker
names the mistake instead of only printing a number.

A failed check raises `ExerciseError`, a subclass of AssertionError, so a wrong answer
also fails the notebook under nbval. A passed check prints a short confirmation.

    check_function(
        learner_fn, reference_fn,
        cases=[Case(x0, noise, t)],              # seeded inputs
        name="q_sample",
        mistakes=[Mistake(wrong_fn, "You used alpha_t; use alpha_bar_t (the product).")],
    )
"""

import copy
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch


class ExerciseError(AssertionError):
    """A learner's answer is not right yet. The message says why and what to try."""


@dataclass
class Case:
    """One set of inputs for a checked function: positional and keyword arguments."""

    args: tuple = ()
    kwargs: dict = field(default_factory=dict)

    def __init__(self, *args, **kwargs):
        self.args = args
        self.kwargs = kwargs


@dataclass
class Mistake:
    """A known wrong variant of the reference and the teaching message for it."""

    fn: Callable
    message: str


def _clone(value):
    """Give each function its own copy of the inputs, so in-place edits (or a sampler's step
    counter) cannot leak from one call into the next. Modules and functions are shared."""
    if isinstance(value, torch.Tensor):
        return value.clone()
    if isinstance(value, (list, tuple)):
        return type(value)(_clone(v) for v in value)
    if isinstance(value, dict):
        return {k: _clone(v) for k, v in value.items()}
    if value is None or isinstance(value, (bool, int, float, str, torch.nn.Module, torch.Generator)) or callable(value):
        return value
    return copy.deepcopy(value)


def _call(fn: Callable, case: Case):
    return fn(*_clone(case.args), **_clone(case.kwargs))


def _as_tuple(value) -> tuple:
    return tuple(value) if isinstance(value, (tuple, list)) else (value,)


def _close(a, b, atol: float, rtol: float) -> bool:
    try:
        a_t, b_t = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
    except (TypeError, ValueError, RuntimeError):
        return False
    return a_t.shape == b_t.shape and bool(torch.allclose(a_t, b_t, atol=atol, rtol=rtol))


def _outputs_close(got, want, atol: float, rtol: float) -> bool:
    got_t, want_t = _as_tuple(got), _as_tuple(want)
    return len(got_t) == len(want_t) and all(_close(g, w, atol, rtol) for g, w in zip(got_t, want_t))


def _describe_difference(name: str, got, want, atol: float, rtol: float) -> str | None:
    """Why one output differs from the reference, or None if it matches."""
    if got is None:
        return f"`{name}` returned None. Did you forget the `return` statement?"
    if isinstance(want, torch.Tensor):
        if not isinstance(got, torch.Tensor):
            return f"`{name}` should return a torch.Tensor, but it returned a {type(got).__name__}."
        if got.shape != want.shape:
            return (
                f"`{name}` returned a tensor of shape {tuple(got.shape)}; expected {tuple(want.shape)}. "
                "Check which dimension you reduced over, or a missing broadcast (e.g. `[:, None, None, None]`)."
            )
        if not torch.isfinite(got).all():
            return f"`{name}` returned NaN or infinite values. Look for a division by zero or the log of a negative number."
        diff = (got.double() - want.double()).abs()
        if not torch.allclose(got.double(), want.double(), atol=atol, rtol=rtol):
            worst = int(diff.argmax())
            index = tuple(int(i) for i in torch.unravel_index(torch.tensor(worst), diff.shape))
            return (
                f"`{name}` has the right shape but the wrong values: the largest error is "
                f"{diff.max().item():.3g} at index {index} (allowed {atol:g})."
            )
        return None
    if isinstance(want, (int, float)):
        if not isinstance(got, (int, float, torch.Tensor)):
            return f"`{name}` should return a number, but it returned a {type(got).__name__}."
        if not _close(got, want, atol, rtol):
            return f"`{name}` returned {float(got):.6g}; expected {float(want):.6g}."
        return None
    return None if got == want else f"`{name}` returned {got!r}; expected {want!r}."


def check_function(
    learner_fn: Callable,
    reference_fn: Callable,
    cases: Sequence[Case],
    *,
    name: str,
    mistakes: Sequence[Mistake] = (),
    atol: float = 1e-5,
    rtol: float = 1e-5,
    quiet: bool = False,
) -> bool:
    """Compare `learner_fn` with `reference_fn` on every case; raise ExerciseError on a mismatch.

    Returns True (and prints a confirmation unless quiet) when every case matches.
    """
    if not callable(learner_fn):
        raise ExerciseError(f"Expected a function for `{name}`, got a {type(learner_fn).__name__}.")
    for i, case in enumerate(cases):
        want = _call(reference_fn, case)
        try:
            got = _call(learner_fn, case)
        except NotImplementedError:
            raise ExerciseError(f"`{name}` is not written yet: replace `raise NotImplementedError` with your code.") from None
        except Exception as exc:  # the learner's code crashed: show why, in their terms
            raise ExerciseError(f"`{name}` raised {type(exc).__name__}: {exc}") from exc
        if _outputs_close(got, want, atol, rtol):
            continue
        for mistake in mistakes:
            if _outputs_close(got, _call(mistake.fn, case), atol, rtol):
                raise ExerciseError(f"`{name}`: {mistake.message}")
        got_t, want_t = _as_tuple(got), _as_tuple(want)
        if isinstance(want, tuple) and len(got_t) != len(want_t):
            raise ExerciseError(f"`{name}` should return {len(want_t)} values, but it returned {len(got_t)}.")
        for j, (g, w) in enumerate(zip(got_t, want_t)):
            label = name if len(want_t) == 1 else f"{name} (output {j})"
            problem = _describe_difference(label, g, w, atol, rtol)
            if problem:
                raise ExerciseError(f"{problem} (test case {i + 1} of {len(cases)})")
    if not quiet:
        print(f"Correct! `{name}` matches the reference on {len(cases)} test case(s).")
    return True
