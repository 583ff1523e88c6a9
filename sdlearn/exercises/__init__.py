"""Exercise checkers for the lessons.

`core` holds the framework (ExerciseError, Case, Mistake, check_function); each lesson's
checkers live in their own module (`lesson00`, `lesson02`, ...), so a notebook does

    from sdlearn.exercises import lesson03 as ex
    ex.check_q_sample(q_sample)

A wrong answer raises ExerciseError (an AssertionError). A blank exercise (still
`raise NotImplementedError`) is reported as "not written yet" and the checker returns
False, so the rest of the lesson runs on the package's reference; `ex.check_q_sample.solution()`
prints that reference. (`check_function` itself raises NotWrittenYet for a blank.)
"""

from sdlearn.exercises.core import Case, Exercise, ExerciseError, Mistake, NotWrittenYet, check_function, checker

__all__ = ["Case", "Exercise", "ExerciseError", "Mistake", "NotWrittenYet", "check_function", "checker"]
