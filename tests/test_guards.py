"""Generation methods refuse inputs that would give a silent wrong answer or exhaust memory, before any work.

Each error says what was expected, what was given and what to do. The UNet, VAE and text
encoder must not run at all (checked with forward hooks).
"""

import math

import pytest
import torch
from PIL import Image, ImageDraw

from test_cli import PROMPT, SD_DDIM, tiny_shapes_pipeline

from sdlearn.pipeline import StableDiffusion


@pytest.fixture(scope="module")
def pipe() -> StableDiffusion:
    """A random tiny pipeline (32 x 32 images), as tests/test_cli.py builds it."""
    return tiny_shapes_pipeline()


@pytest.fixture
def no_work(pipe):
    """Fails the test if any network runs."""
    calls = []
    hooks = [m.register_forward_pre_hook(lambda *_: calls.append(1)) for m in (pipe.unet, pipe.vae, pipe.text_encoder)]
    yield calls
    for h in hooks:
        h.remove()
    assert calls == [], "a network ran before the error"


def image(size: int = 32) -> Image.Image:
    im = Image.new("RGB", (size, size), "white")
    ImageDraw.Draw(im).ellipse((3, 3, size // 2, size // 2), fill=(220, 40, 40))
    return im


def nan_image() -> torch.Tensor:
    x = torch.zeros(1, 3, 32, 32)
    x[0, 1, 5, 7] = float("nan")
    return x


def mask(values: torch.Tensor | None = None) -> torch.Tensor:
    m = torch.zeros(32, 32)
    m[16:, 16:] = 1
    return m if values is None else values


def bad_mask(value: float) -> torch.Tensor:
    m = mask()
    m[0, 0] = value
    return m


def calls(pipe):
    im = image()
    return {
        "guidance NaN": (lambda: pipe.text_to_image(PROMPT, steps=2, guidance_scale=float("nan")),
                         r"guidance_scale must be a finite number >= 0 .*got nan.*pass e\.g\. guidance_scale=7\.5"),
        "guidance inf": (lambda: pipe.image_to_image(PROMPT, im, steps=2, guidance_scale=math.inf),
                         r"finite number >= 0 .*got inf"),
        "guidance negative": (lambda: pipe.inpaint(PROMPT, im, mask(), steps=2, guidance_scale=-1.0), r"finite number >= 0 .*got -1\.0"),
        "image with NaN (img2img)": (lambda: pipe.image_to_image(PROMPT, nan_image(), steps=2),
                                     r"finite values in \[-1, 1\], got 1 NaN or infinite values of 3072.*nan_to_num"),
        "image with NaN (inpaint)": (lambda: pipe.inpaint(PROMPT, nan_image(), mask(), steps=2), r"got 1 NaN or infinite"),
        "mask above 1": (lambda: pipe.inpaint(PROMPT, im, bad_mask(255.0), steps=2),
                         r"mask tensor with values in \[0, 1\].*got 1 values outside it \(range \[0, 255\], 0 NaN\).*mask / 255"),
        "mask below 0": (lambda: pipe.inpaint(PROMPT, im, bad_mask(-0.5), steps=2), r"range \[-0\.5, 1\]"),
        "mask NaN": (lambda: pipe.inpaint(PROMPT, im, bad_mask(float("nan")), steps=2), r"1 values outside it .*1 NaN.*nan_to_num"),
        "strength runs no step (img2img)": (lambda: pipe.image_to_image(PROMPT, im, strength=0.01, steps=50),
                                            r"strength=0\.01 with steps=50 runs int\(50 \* 0\.01\) = 0 denoising steps.*smallest strength "
                                            r"that runs one step is 0\.02.*strength=0 to keep"),
        "strength runs no step (inpaint)": (lambda: pipe.inpaint(PROMPT, im, mask(), strength=0.2, steps=3),
                                            r"smallest strength that runs one step is 0\.3334"),
        "steps beyond the schedule": (lambda: pipe.text_to_image(PROMPT, steps=1000),
                                      r"1000 steps .*steps_offset=1 reach timestep 1000, outside the schedule's 0\.\.999\. Use at most 999 steps"),
        "seed negative": (lambda: pipe.text_to_image(PROMPT, steps=2, seed=-1),
                          r"seed must be in \[0, 2\*\*64\) .*got -1\. Pass e\.g\. seed % 2\*\*64"),
        "seed too large": (lambda: pipe.text_to_image(PROMPT, steps=2, seed=2**64), r"got 18446744073709551616"),
        "height 0": (lambda: pipe.text_to_image(PROMPT, steps=2, height=0), r"height=0: image sides must be positive multiples of 16.*e\.g\. 16"),
        "width 0 (img2img)": (lambda: pipe.image_to_image(PROMPT, im, steps=2, width=0), r"width=0: image sides must be positive multiples"),
        "image too large": (lambda: pipe.text_to_image(PROMPT, steps=2, height=8192, width=4096),
                            r"4096x8192 \(WxH\) is 33\.6 million pixels per image, over this pipeline's limit of max_pixels=16777216 "
                            r".*pipe\.max_pixels = 33554432"),
        "batch too large": (lambda: pipe.text_to_image([PROMPT] * 2, steps=2, height=4096, width=4096, num_images_per_prompt=3),
                            r"6 images of 4096x4096 \(WxH\) are 100\.7 million pixels in one batch, over this pipeline's limit of "
                            r"max_batch_pixels=67108864.*at most 4 at this size.*pipe\.max_batch_pixels = 100663296"),
        "img2img resize too large": (lambda: pipe.image_to_image(PROMPT, im, steps=2, height=8192, width=8192), r"max_pixels"),
    }


CASES = list(calls(None))  # the lambdas do not touch the pipeline until called


@pytest.mark.parametrize("case", CASES)
def test_bad_input_is_refused_before_any_work(pipe, no_work, case):
    call, message = calls(pipe)[case]
    with pytest.raises(ValueError, match=message):
        call()


def test_smallest_strength_in_the_message_runs_one_step():
    for steps in range(1, 1001):
        smallest = math.ceil(1e4 / steps) / 1e4
        assert int(steps * smallest) >= 1, steps


def test_limits_can_be_raised_or_lifted(pipe):
    """max_pixels / max_batch_pixels are per-pipeline attributes; valid requests still run."""
    small = StableDiffusion(pipe.unet, pipe.vae, pipe.text_encoder, pipe.tokenizer, SD_DDIM)
    small.max_pixels = 32 * 32 - 1
    with pytest.raises(ValueError, match="max_pixels=1023"):
        small.text_to_image(PROMPT, steps=1, seed=0, output_type="latent")
    small.max_pixels = None
    small.max_batch_pixels = 32 * 32
    with pytest.raises(ValueError, match="at most 1 at this size"):
        small.text_to_image(PROMPT, steps=1, seed=0, num_images_per_prompt=2, output_type="latent")
    small.max_batch_pixels = None
    got = small.text_to_image(PROMPT, steps=1, seed=0, num_images_per_prompt=2, output_type="latent")
    assert torch.equal(got, pipe.text_to_image(PROMPT, steps=1, seed=0, num_images_per_prompt=2, output_type="latent"))


def test_edge_values_that_are_valid_still_run(pipe):
    pipe.text_to_image(PROMPT, steps=1, seed=2**64 - 1, output_type="latent")
    pipe.image_to_image(PROMPT, image(), strength=0.02, steps=50, seed=0, guidance_scale=1.0, output_type="latent")
    pipe.image_to_image(PROMPT, image(), strength=0.0, steps=10, seed=0, output_type="latent")  # keeps the image, on purpose
    pipe.inpaint(PROMPT, image(), mask().bool(), steps=1, seed=0, output_type="latent")
