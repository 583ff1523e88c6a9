"""Exercise checkers for the lessons.

`core` holds the framework (ExerciseError, Case, Mistake, check_function); each lesson's
checkers live in their own module (`lesson00`, `lesson02`, ...), so a notebook does

    from sdlearn.exercises import lesson03 as ex
    ex.check_q_sample(q_sample)
"""

from sdlearn.exercises.core import Case, ExerciseError, Mistake, check_function

__all__ = ["Case", "ExerciseError", "Mistake", "check_function"]
