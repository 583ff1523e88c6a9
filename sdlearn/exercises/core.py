"""The exercise-checking framework.

A checker runs the learner's function and the package's reference on the same seeded
inputs and explains, in teaching terms, what went wrong: the function is not written yet,
returned None, returned the wrong number of values, the wrong type or shape, NaN, or the
numbers are off (with the largest error and where it happened). Known mistakes (alpha
instead of alpha_bar, a missing square root, ...) are given as *wrong variants*: if the
learner's output matches one of them, the checker names the mistake instead of only
printing a number.

A failed check raises `ExerciseError`, a subclass of AssertionError, so a wrong answer
also fails the notebook under nbval; a blank exercise (still `raise NotImplementedError`)
makes `check_function` raise its subclass `NotWrittenYet`, which a lesson's checker turns
into a printed "not written yet" and a False result, so the rest of the lesson still runs.
A passed check prints a short confirmation.

    check_function(
        learner_fn, reference_fn,
        cases=[Case(x0, noise, t)],              # seeded inputs
        name="q_sample",
        mistakes=[Mistake(wrong_fn, "You used alpha_t; use alpha_bar_t (the product).")],
    )

The lessons declare their checkers with `@checker(...)`, which also records the reference,
cases and mistakes on the checker (`check_q_sample.exercise`), so tests can reach them.
"""

import contextlib
import copy
import functools
import math
import numbers
import os
import sysconfig
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch


class ExerciseError(AssertionError):
    """A learner's answer is not right yet. The message says why and what to try."""


class NotWrittenYet(ExerciseError):
    """The exercise is still blank: the learner's function raises NotImplementedError."""


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


# ------------------------------------------------------------------------------------------
# Comparing an output with the reference's
# ------------------------------------------------------------------------------------------


def _is_number(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _plural(n: int, word: str = "value") -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def _kind(value) -> str:
    """A short description of a value for a message: 'a tensor of shape (4, 3)', 'a list of 2 values'."""
    if value is None:
        return "None"
    if isinstance(value, torch.Tensor):
        return f"a tensor of shape {tuple(value.shape)}"
    if isinstance(value, bool):
        return f"the bool {value}"
    if _is_number(value):
        text = str(value) if isinstance(value, numbers.Integral) else f"{float(value):.6g}"
        return f"the number {text}" if len(text) <= 20 else f"an integer with {len(text)} digits"
    if isinstance(value, (list, tuple)):
        return f"a {type(value).__name__} of {_plural(len(value))}" if len(value) else f"an empty {type(value).__name__}"
    if isinstance(value, Mapping):
        return f"a {type(value).__name__} with keys {list(value)[:6]}"
    if isinstance(value, str):
        return f"the string {value[:40]!r}"
    if type(value).__name__ == "ndarray":
        return f"a NumPy array of shape {getattr(value, 'shape', '?')}"
    return f"a value of type {type(value).__name__}"


def _number_text(x: float) -> str:
    return str(int(x)) if math.isfinite(x) and x.is_integer() and abs(x) < 1e15 else f"{x:.6g}"


def _compare_numbers(label: str, verb: str, got, want, atol: float, rtol: float) -> str | None:
    w = float(want)
    try:
        g = float(got)
    except OverflowError:  # an integer too large for a float
        return f"`{label}` {verb} {_kind(got)}; expected {_number_text(w)}."
    if not math.isfinite(g) and math.isfinite(w):
        return f"`{label}` {verb} {g}. Look for a division by zero or the log of a negative number."
    if g == w or abs(g - w) <= atol + rtol * abs(w):
        return None
    return f"`{label}` {verb} {_number_text(g)}; expected {_number_text(w)}."


def _compare_tensors(label: str, verb: str, got: torch.Tensor, want: torch.Tensor, atol: float, rtol: float) -> str | None:
    if tuple(got.shape) != tuple(want.shape):
        hint = (
            "Check which dimension you reduced over, or a missing broadcast (e.g. `[:, None, None, None]`)."
            if got.dim() != want.dim()
            else "Check the size along each dimension (an off-by-one slice, a swapped axis?)."
        )
        return f"`{label}` has the wrong shape {tuple(got.shape)} instead of {tuple(want.shape)}. {hint}"
    if got.is_complex() and not want.is_complex():
        return f"`{label}` holds complex numbers; expected real ones."
    g = got.detach().to(device="cpu", dtype=torch.float64)
    w = want.detach().to(device="cpu", dtype=torch.float64)
    bad = ~torch.isfinite(g) & torch.isfinite(w)
    if bool(bad.any()):
        return (
            f"`{label}` holds {_plural(int(bad.sum()), 'NaN or infinite value')}. "
            "Look for a division by zero or the log of a negative number."
        )
    close = torch.isclose(g, w, atol=atol, rtol=rtol, equal_nan=True)
    if bool(close.all()):
        return None
    diff = torch.where(close, torch.zeros_like(g), (g - w).abs().nan_to_num(nan=math.inf))
    worst = int(diff.argmax())
    if g.dim() == 0:
        where, g_at, w_at = "", g.item(), w.item()
    else:
        index = tuple(int(i) for i in torch.unravel_index(torch.tensor(worst), tuple(diff.shape)))
        where, g_at, w_at = f" at index {index}", g.reshape(-1)[worst].item(), w.reshape(-1)[worst].item()
    return (
        f"`{label}` has the right shape but the wrong values: the largest error is "
        f"{diff.reshape(-1)[worst].item():.3g}{where} (you have {g_at:.6g}, expected {w_at:.6g}; "
        f"allowed {atol + rtol * abs(w_at):.3g})."
    )


def _difference(label: str, got, want, atol: float, rtol: float, top: bool = True) -> str | None:
    """Why `got` differs from the reference's `want`, or None if it matches. Recurses into
    sequences and dicts. Never raises: whatever the learner returned gets a message."""
    try:
        return _compare(label, got, want, atol, rtol, top)
    except Exception as exc:  # an odd object the rules below did not foresee: still explain, never crash
        return (
            f"`{label}` {'returned' if top else 'is'} {_kind(got)}, which the checker could not compare with the "
            f"reference's result, {_kind(want)} ({type(exc).__name__}: {exc})."
        )


def _compare(label: str, got, want, atol: float, rtol: float, top: bool) -> str | None:
    verb, should = ("returned", "should return") if top else ("is", "should be")
    if want is None:
        return None if got is None else f"`{label}` {should} None, but it {verb} {_kind(got)}."
    if got is None:
        hint = " Did you forget the `return` statement?" if top else f" Expected {_kind(want)}."
        return f"`{label}` returned None.{hint}" if top else f"`{label}` is None.{hint}"

    if isinstance(want, torch.Tensor):
        if isinstance(got, torch.Tensor):
            return _compare_tensors(label, verb, got, want, atol, rtol)
        if want.dim() == 0 and _is_number(got):
            return _compare_numbers(label, verb, got, want.item(), atol, rtol)
        hint = ""
        if isinstance(got, (list, tuple)) and any(isinstance(g, torch.Tensor) for g in got):
            hint = f" Return one tensor, not a {type(got).__name__} of several values."
        elif isinstance(got, (list, tuple)) or _is_number(got):
            hint = " Keep the result a tensor: use torch operations (no .tolist(), .item() or Python lists)."
        return f"`{label}` {should} a torch.Tensor of shape {tuple(want.shape)}, but it {verb} {_kind(got)}.{hint}"

    if _is_number(want):
        if isinstance(got, torch.Tensor) and got.dim() == 0:
            if got.is_complex():
                return f"`{label}` {verb} a complex number; expected a real one."
            return _compare_numbers(label, verb, got.item(), want, atol, rtol)
        if _is_number(got):
            return _compare_numbers(label, verb, got, want, atol, rtol)
        hint = " Use .item() or index it to get one number." if isinstance(got, torch.Tensor) and got.numel() == 1 else ""
        return f"`{label}` {should} a number, but it {verb} {_kind(got)}.{hint}"

    if isinstance(want, (list, tuple)):
        if not isinstance(got, (list, tuple)):
            return f"`{label}` {should} a {type(want).__name__} of {_plural(len(want))}, but it {verb} {_kind(got)}."
        if len(got) != len(want):
            return f"`{label}` should {'return' if top else 'hold'} {_plural(len(want))}, but it {verb} {len(got)}."
        for j, (g, w) in enumerate(zip(got, want)):
            child = f"{label} (output {j})" if top and isinstance(want, tuple) else f"{label}[{j}]"
            problem = _difference(child, g, w, atol, rtol, top=False)
            if problem:
                return problem
        return None

    if isinstance(want, Mapping):
        if not isinstance(got, Mapping):
            return f"`{label}` {should} a dict with keys {list(want)}, but it {verb} {_kind(got)}."
        missing, extra = [k for k in want if k not in got], [k for k in got if k not in want]
        if missing or extra:
            parts = ([f"is missing the keys {missing}"] if missing else []) + ([f"has unexpected keys {extra}"] if extra else [])
            return f"`{label}` {' and '.join(parts)}; expected the keys {list(want)}."
        for key in want:
            problem = _difference(f"{label}[{key!r}]", got[key], want[key], atol, rtol, top=False)
            if problem:
                return problem
        return None

    # strings, bools, anything else: the same type and equal
    if type(got) is not type(want):
        return f"`{label}` {should} {_kind(want)}, but it {verb} {_kind(got)}."
    equal = got == want
    if equal is True or (isinstance(equal, bool) and equal):
        return None
    return f"`{label}` {verb} {_kind(got)}; expected {_kind(want)}."


def _matches(got, want, atol: float, rtol: float) -> bool:
    return _difference("output", got, want, atol, rtol) is None


# ------------------------------------------------------------------------------------------
# Explaining an exception raised by the learner's function
# ------------------------------------------------------------------------------------------

_LIBRARY_DIRS = tuple(
    os.path.realpath(path) + os.sep
    for path in {
        os.path.dirname(os.path.dirname(os.path.abspath(__file__))),  # sdlearn itself
        os.path.dirname(os.path.abspath(torch.__file__)),
        *(sysconfig.get_paths().get(key, "") for key in ("stdlib", "platstdlib", "purelib", "platlib")),
    }
    if path
)


def _is_library(filename: str) -> bool:
    return os.path.realpath(filename).startswith(_LIBRARY_DIRS)


def _frames(exc: BaseException) -> list:
    """The traceback frames of exc, outermost first: (code object, line number)."""
    frames, tb = [], exc.__traceback__
    while tb is not None:
        frames.append((tb.tb_frame.f_code, tb.tb_lineno))
        tb = tb.tb_next
    return frames


def _source_line(code, lineno: int) -> str:
    import linecache

    return linecache.getline(code.co_filename, lineno).strip()


def _where(exc: BaseException) -> str:
    """' (in `fn`, line 3: `return x[10]`)' for the learner's innermost frame, or ''."""
    learner = [(code, line) for code, line in _frames(exc) if not _is_library(code.co_filename)]
    if not learner:
        return ""
    code, line = learner[-1]
    text = _source_line(code, line)
    return f" (in `{code.co_name}`, line {line}" + (f": `{text}`)" if text else ")")


def _not_implemented(name: str, fn: Callable, exc: NotImplementedError, case_text: str) -> ExerciseError:
    """A blank exercise (NotWrittenYet), or a NotImplementedError from library code it called."""
    frames = _frames(exc)
    code = frames[-1][0] if frames else None
    if code is not None and _is_library(code.co_filename):
        detail = f": {exc}" if str(exc) else ""
        return ExerciseError(
            f"`{name}` raised NotImplementedError inside `{code.co_name}` ({os.path.basename(code.co_filename)}){detail}. "
            f"Your function is written, but something it calls is not implemented{case_text}."
        )
    if code is None or code is getattr(fn, "__code__", None) or code.co_name.startswith("<") or code.co_name in (
        getattr(fn, "__name__", None), "__call__"
    ):
        return NotWrittenYet(f"`{name}` is not written yet: replace `raise NotImplementedError` with your code.")
    return NotWrittenYet(
        f"`{name}` is not written yet: `{code.co_name}`, which it calls, still raises NotImplementedError. "
        "Replace it with your code."
    )


def _case_text(i: int, cases: Sequence[Case], name: str) -> str:
    """' (test case 2 of 3)', with the inputs when they are short plain values: ' ...: f((32, 64), 16, 24))'."""
    text = f" (test case {i + 1} of {len(cases)}"
    case = cases[i]

    def plain(v):
        return v is None or isinstance(v, (bool, int, float, str)) or (isinstance(v, (tuple, list)) and all(plain(x) for x in v))

    if all(plain(v) for v in (*case.args, *case.kwargs.values())):
        call = ", ".join([repr(a) for a in case.args] + [f"{k}={v!r}" for k, v in case.kwargs.items()])
        if len(call) <= 80:
            text += f": {name}({call})"
    return text + ")"


# ------------------------------------------------------------------------------------------
# The check
# ------------------------------------------------------------------------------------------


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

    Returns True (and prints a confirmation unless quiet) when every case matches. The
    number of outputs, their types, shapes and values must all match, in nested lists,
    tuples and dicts too. A function that still raises NotImplementedError raises
    NotWrittenYet (an ExerciseError); any other exception it raises becomes an
    ExerciseError that names it (the original is chained as the cause).
    """
    if not callable(learner_fn):
        hint = f" Pass the function itself, `check_{name}({name})`, not its result." if learner_fn is not None else ""
        raise ExerciseError(f"Expected a function for `{name}`, got {_kind(learner_fn)}.{hint}")
    cases = list(cases)
    for i, case in enumerate(cases):
        want = _call(reference_fn, case)  # a crash here is a bug in the package, not the learner's: let it show
        try:
            got = _call(learner_fn, case)
        except NotImplementedError as exc:
            raise _not_implemented(name, learner_fn, exc, _case_text(i, cases, name)) from exc
        except Exception as exc:  # the learner's code crashed: show why, in their terms
            raise ExerciseError(
                f"`{name}` raised {type(exc).__name__}: {exc}{_where(exc)}{_case_text(i, cases, name)}"
            ) from exc
        if got is NotImplemented:
            raise NotWrittenYet(f"`{name}` is not written yet: it returns NotImplemented. Replace that with your code.")
        problem = _difference(name, got, want, atol, rtol)
        if problem is None:
            continue
        for mistake in mistakes:
            try:
                wrong = _call(mistake.fn, case)
            except Exception:  # a wrong variant that cannot run on these inputs cannot be what the learner did
                continue
            if _matches(got, wrong, atol, rtol):
                raise ExerciseError(f"`{name}`: {mistake.message}")
        raise ExerciseError(f"{problem}{_case_text(i, cases, name)}")
    if not quiet:
        print(f"Correct! `{name}` matches the reference on {len(cases)} test case(s).")
    return True


# ------------------------------------------------------------------------------------------
# Declaring a lesson's checker
# ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Exercise:
    """Everything one checker compares with: the reference, its inputs, the known mistakes."""

    name: str
    reference: Callable
    cases: Sequence[Case] | Callable[[], Sequence[Case]]
    mistakes: Sequence[Mistake] = ()
    atol: float = 1e-5
    rtol: float = 1e-5
    no_grad: bool = False  # run every function under torch.no_grad() (a UNet in the inputs)

    def make_cases(self) -> list:
        return list(self.cases() if callable(self.cases) else self.cases)

    def check(self, fn, *, quiet: bool = False) -> bool:
        with torch.no_grad() if self.no_grad else contextlib.nullcontext():
            return check_function(
                fn, self.reference, self.make_cases(), name=self.name, mistakes=self.mistakes, atol=self.atol, rtol=self.rtol, quiet=quiet
            )


def _reference_name(exercise: Exercise) -> str:
    return f"{exercise.reference.__module__}.{exercise.reference.__qualname__}"


def _runs_on(exercise: Exercise, check_name: str) -> str:
    return (
        f"The cells below use the package's reference, `{_reference_name(exercise)}`, so the lesson runs on without "
        f"your answer. Stuck? `ex.{check_name}.solution()` shows the reference."
    )


def solution_source(exercise: Exercise) -> str:
    """The reference's source code, as a learner who is stuck would like to read it."""
    import inspect
    import textwrap

    try:
        source = inspect.getsource(exercise.reference)
    except (OSError, TypeError):  # a built-in or a lambda defined where its source cannot be read
        return f"{_reference_name(exercise)} (no source available)"
    return f"# {_reference_name(exercise)}\n{textwrap.dedent(source).rstrip()}"


def checker(reference: Callable, cases, *, name: str, mistakes: Sequence[Mistake] = (), atol: float = 1e-5,
            rtol: float = 1e-5, no_grad: bool = False):
    """Declare a lesson's checker. The decorated function only gives the name and the docstring:

        @checker(reference_q_sample, _cases, name="q_sample", mistakes=Q_SAMPLE_MISTAKES)
        def check_q_sample(fn) -> bool:
            \"\"\"fn(x0, t, eps, schedule) -> x_t.\"\"\"

    becomes `check_q_sample(fn)`, which runs `check_function` with these arguments. `cases` is
    a list of Case or a function that builds one (called at each check). The checker keeps
    the spec in `check_q_sample.exercise` (an Exercise), so tests reach every reference, and
    `check_q_sample.solution()` prints the reference's source.

    Unlike `check_function`, the checker does not raise for a blank exercise: it prints
    that the exercise is not written yet and which reference the next cells use, and
    returns False, so a learner's notebook still runs from top to bottom (Run All). A wrong
    answer raises ExerciseError.
    """
    exercise = Exercise(name, reference, cases, tuple(mistakes), atol, rtol, no_grad)

    def decorate(stub: Callable) -> Callable:
        @functools.wraps(stub)
        def check(fn) -> bool:
            try:
                return exercise.check(fn)
            except NotWrittenYet as blank:
                # A blank exercise is not a wrong answer: say so and let the lesson run on (Run All).
                print(f"{blank}\n{_runs_on(exercise, stub.__name__)}")
                return False

        check.exercise = exercise
        check.solution = lambda: print(solution_source(exercise))
        return check

    return decorate
