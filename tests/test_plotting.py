"""Conversions between tensors and PIL images round-trip; figures build; bad input is explained."""

import pytest
import torch
from PIL import Image

from sdlearn.datasets import Shapes
from sdlearn.plotting import image_grid, plot_loss, show_images, to_pil, to_tensor


def test_tensor_pil_round_trip_is_exact_on_pixel_values():
    x = Shapes(4, seed=0, size=32).tensors()
    pils = to_pil(x)
    assert len(pils) == 4 and pils[0].size == (32, 32)
    assert torch.allclose(to_tensor(pils), x, atol=1e-6)


def test_to_pil_clips_and_handles_greyscale():
    img = to_pil(torch.full((1, 8, 8), 5.0))
    assert img.mode == "L" and img.getpixel((0, 0)) == 255


def test_grid_size():
    grid = image_grid([Image.new("RGB", (10, 10))] * 6, ncols=3, pad=2)
    assert grid.size == (3 * 10 + 4 * 2, 2 * 10 + 3 * 2)  # pad between and around


def test_figures_build():
    fig = show_images(Shapes(6, seed=0, size=32).tensors(), captions=["x"] * 6, ncols=3)
    assert len(fig.axes) >= 6
    assert plot_loss([3.0, 2.0, 1.5, 1.0]) is not None


@pytest.mark.parametrize(
    "bad, error, message",
    [
        (torch.zeros(8, 8, 3), ValueError, "permute"),
        (torch.zeros(4, 8, 8), ValueError, "latents"),
        (torch.full((3, 4, 4), float("nan")), ValueError, "NaN"),
        ("image.png", TypeError, "torch.Tensor"),
    ],
)
def test_bad_input(bad, error, message):
    with pytest.raises(error, match=message):
        to_pil(bad)
