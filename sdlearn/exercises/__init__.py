"""Exercise checkers for the lessons.

`core` holds the framework (ExerciseError, Case, Mistake, check_function); each lesson's
checkers live in their own module (`lesson00`, `lesson02`, ...), so a notebook does

    from sdlearn.exercises import lesson03 as ex
    ex.check_q_sample(q_sample)

A wrong answer raises ExerciseError (an AssertionError); a blank exercise (still
`raise NotImplementedError`) raises its subclass NotWrittenYet.
"""

from sdlearn.exercises.core import Case, Exercise, ExerciseError, Mistake, NotWrittenYet, check_function, checker

__all__ = ["Case", "Exercise", "ExerciseError", "Mistake", "NotWrittenYet", "check_function", "checker"]
