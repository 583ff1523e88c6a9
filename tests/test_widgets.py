"""Widgets are driven as a learner drives them, by setting `.value`, and must show the right frame."""

import io

import numpy as np
import pytest
import torch
from PIL import Image

from sdlearn.plotting import to_pil
from sdlearn.samplers import get_sampler, sample
from sdlearn.schedules import NoiseSchedule
from sdlearn.widgets import denoising_stepper, noise_explorer, noise_frames, record_sampling

WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"


def decode(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))


def image(seed=0, size=32):
    return torch.rand(3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_noise_frames_are_q_sample_with_one_eps():
    s = NoiseSchedule.ddpm()
    frames = noise_frames(image(), s, timesteps=[0, 10, 500, 999], seed=3)
    assert frames.x_t.shape == (4, 3, 32, 32)
    for k, t in enumerate(frames.timesteps):
        assert torch.equal(frames.x_t[k], s.q_sample(frames.x0, t, frames.eps)[0])
    assert torch.equal(frames.alpha_bar, s.alpha_bar[[0, 10, 500, 999]])
    default = noise_frames(image(), s)
    assert default.timesteps[0] == 0 and default.timesteps[-1] == 999 and len(default.timesteps) == 51


def test_noise_explorer_shows_the_frame_of_the_slider_value():
    explorer = noise_explorer(image(size=32), NoiseSchedule.sd(), size=64, seed=1)
    assert explorer.slider.value == 0
    first_image, first_plot = explorer.image.value, explorer.plot.value
    explorer.slider.value = 500
    k = explorer.frames.timesteps.index(500)
    assert explorer.image.value == explorer.image_pngs[k] != first_image
    assert explorer.plot.value == explorer.plot_pngs[k] != first_plot
    # the displayed pixels are x_500: a 2-pixel border, then each pixel enlarged 2x (32 -> 64)
    shown = decode(explorer.image.value)[2:66:2, 2:66:2]
    assert np.array_equal(shown, np.asarray(to_pil(explorer.frames.x_t[k])))
    assert "t = 500" in explorer.label.value
    assert f"{NoiseSchedule.sd().alpha_bar[500].item():.4f}" in explorer.label.value
    assert "dB" in explorer.label.value
    # the marker moves right as t grows: the grey line is at a larger x
    def marker_x(png):
        pixels = decode(png).astype(int)
        grey = (np.abs(pixels - 90).sum(-1) < 10).sum(0)  # count of (90, 90, 90) pixels per column
        return int(grey.argmax())

    explorer.slider.value = 200
    x200 = marker_x(explorer.plot.value)
    explorer.slider.value = 800
    assert marker_x(explorer.plot.value) > x200
    assert WIDGET_VIEW in explorer._repr_mimebundle_()


def test_noise_explorer_takes_a_pil_image_and_custom_timesteps():
    pil = to_pil(image(size=24))
    explorer = noise_explorer(pil, NoiseSchedule.cosine(), timesteps=[0, 250, 750], start=250, size=48)
    assert explorer.slider.options == (0, 250, 750) and explorer.slider.value == 250
    assert explorer.image.value == explorer.image_pngs[1]
    with pytest.raises(ValueError, match="empty"):
        noise_frames(pil, timesteps=[])
    with pytest.raises(ValueError, match="0..999"):
        noise_frames(pil, timesteps=[1000])
    with pytest.raises(ValueError, match="one image"):
        noise_frames(torch.zeros(2, 3, 8, 8))


def fake_model(x, t):
    return 0.8 * x + 0.05 * torch.sin(torch.tensor(float(t) / 100))


@pytest.mark.parametrize("name", ["ddim", "euler"])
def test_record_sampling_keeps_every_step(name):
    sampler = get_sampler(name)
    noise = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    record = record_sampling(fake_model, sampler, noise, steps=8, keep=2)
    assert len(record) == 8 and record.timesteps == sampler.timesteps.tolist()
    assert record.x_t.shape == record.x0_pred.shape == record.eps_pred.shape == (8, 2, 3, 16, 16)
    # x_t is the model input: x_T * init_noise_sigma scaled back to unit variance (Euler) or x_T itself (DDIM)
    assert torch.allclose(record.x_t[0], sampler.scale_model_input(noise[:2] * sampler.init_noise_sigma, sampler.timesteps[0]))
    assert torch.allclose(record.eps_pred[3], fake_model(record.x_t[3], record.timesteps[3]), atol=1e-6)
    assert torch.equal(record.final, sample(fake_model, sampler, noise, steps=8)[:2])


def test_denoising_stepper_shows_the_step_of_the_slider_and_plays():
    noise = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    record = record_sampling(fake_model, get_sampler("ddpm"), noise, steps=6, generator=torch.Generator().manual_seed(1))
    stepper = denoising_stepper(record, size=32)
    before = {name: image.value for name, image in stepper.images.items()}
    stepper.slider.value = 4
    for name, widget in stepper.images.items():
        assert widget.value == stepper.pngs[name][4] != before[name]
    # the x0 panel shows record.x0_pred[4]: two images in a row, each 16 -> 32 pixels, 2-pixel gaps
    shown = decode(stepper.images["x0_pred"].value)
    for j in range(2):
        left = 2 + j * 34
        assert np.array_equal(shown[2:34:2, left : left + 32 : 2], np.asarray(to_pil(record.x0_pred[4, j])))
    assert "step 5 of 6" in stepper.label.value and f"t = {record.timesteps[4]:g}" in stepper.label.value
    stepper.play.value = 2  # the play button drives the slider
    assert stepper.slider.value == 2 and stepper.images["x_t"].value == stepper.pngs["x_t"][2]
    assert WIDGET_VIEW in stepper._repr_mimebundle_()


def test_stepper_shows_latents_and_refuses_empty_records():
    noise = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    record = record_sampling(fake_model, get_sampler("dpmpp_2m"), noise, steps=3)
    stepper = denoising_stepper(record, size=16)  # 4 channels: the first three shown as RGB
    assert decode(stepper.images["x_t"].value).shape == (20, 20, 3)
    record.timesteps = []
    with pytest.raises(ValueError, match="no steps"):
        denoising_stepper(record)
