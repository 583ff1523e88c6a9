"""Lesson 00 exercise: bring images into the range the models see.

Images are stored as bytes in [0, 255]; every model in the course works on floats in
[-1, 1] (the DDPM convention: the noise it is mixed with has mean 0 and unit variance, so
the data should be centred too). The exercise: x in [0, 1] -> 2x - 1.
"""

import torch

from sdlearn.exercises.core import Case, Mistake, checker


def to_model_range(x: torch.Tensor) -> torch.Tensor:
    """Reference: images with values in [0, 1] -> [-1, 1]."""
    return x * 2 - 1


def _cases() -> list:
    g = torch.Generator().manual_seed(0)
    return [Case(torch.rand(2, 3, 8, 8, generator=g)), Case(torch.tensor([0.0, 0.5, 1.0]))]


MISTAKES = [
    Mistake(lambda x: x - 0.5, "the values now lie in [-0.5, 0.5]: stretch them too (multiply by 2)."),
    Mistake(lambda x: x * 2, "the values lie in [0, 2]: shift them down by 1 as well."),
    Mistake(lambda x: (x - 1) * 2, "the values lie in [-2, 0]: multiply by 2 first, then subtract 1."),
    Mistake(lambda x: x / 127.5 - 1, "this is the formula for bytes in [0, 255]; here x is already in [0, 1]."),
]


@checker(to_model_range, _cases, name="to_model_range", mistakes=MISTAKES)
def check_to_model_range(fn) -> bool:
    """fn(x with values in [0, 1]) -> the same tensor with values in [-1, 1]."""
