"""Widgets are driven as a learner drives them, by setting `.value`, and must show the right frame."""

import base64
import io

import numpy as np
import pytest
import torch
from PIL import Image

from sdlearn.plotting import to_pil
from sdlearn.samplers import get_sampler, sample
from sdlearn.diffusion.schedules import NoiseSchedule
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
    assert (stepper.slider.min, stepper.slider.max, stepper.slider.value) == (1, 6, 1)  # steps count from 1
    before = {name: image.value for name, image in stepper.images.items()}
    stepper.slider.value = 5
    for name, widget in stepper.images.items():
        assert widget.value == stepper.pngs[name][4] != before[name]
    # the x0 panel shows record.x0_pred[4]: two images in a row, each 16 -> 32 pixels, 2-pixel gaps
    shown = decode(stepper.images["x0_pred"].value)
    for j in range(2):
        left = 2 + j * 34
        assert np.array_equal(shown[2:34:2, left : left + 32 : 2], np.asarray(to_pil(record.x0_pred[4, j])))
    assert "step 5 of 6" in stepper.label.value and f"t = {record.timesteps[4]:g}" in stepper.label.value
    stepper.play.value = 3  # the play button drives the slider
    assert stepper.slider.value == 3 and stepper.images["x_t"].value == stepper.pngs["x_t"][2]
    assert "step 3 of 6" in stepper.label.value
    assert WIDGET_VIEW in stepper._repr_mimebundle_()


def test_stepper_shows_latents_and_refuses_empty_records():
    noise = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    record = record_sampling(fake_model, get_sampler("dpmpp_2m"), noise, steps=3)
    stepper = denoising_stepper(record, size=16)  # 4 channels: the first three shown as RGB
    assert decode(stepper.images["x_t"].value).shape == (20, 20, 3)
    record.timesteps = []
    with pytest.raises(ValueError, match="no steps"):
        denoising_stepper(record)


# Widgets over a latent text-to-image pipeline (a tiny random one: what is tested is that each
# widget shows exactly what the pipeline computed, not image quality) --------------------------


@pytest.fixture(scope="module")
def pipe():
    from sdlearn.clip import CLIPTextConfig, CLIPTextModel, CLIPTokenizer
    from sdlearn.datasets import data_dir
    from sdlearn.pipeline import StableDiffusion
    from sdlearn.unet import UNet, UNetConfig
    from sdlearn.vae import AutoencoderKL, VAEConfig

    torch.manual_seed(0)
    tokenizer = CLIPTokenizer.from_pretrained(data_dir() / "tokenizers" / "shapes")
    text_config = CLIPTextConfig.tiny(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                      bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                                      pad_token_id=tokenizer.pad_token_id)
    unet = UNet(UNetConfig.tiny(sample_size=4, cross_attention_dim=32))  # 4x4 latents: 32x32 images
    vae = AutoencoderKL(VAEConfig.tiny(block_out_channels=(16, 16, 16, 16), norm_num_groups=8))
    scheduler = {"_class_name": "DDIMScheduler", "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
                 "num_train_timesteps": 1000, "clip_sample": False, "set_alpha_to_one": False, "steps_offset": 1}
    return StableDiffusion(unet, vae, CLIPTextModel(text_config), tokenizer, scheduler)


PROMPT = "a large red circle in the top left"


def test_record_pipeline_decodes_every_step_of_the_run(pipe):
    from sdlearn.widgets import record_pipeline

    record = record_pipeline(pipe, [PROMPT, "a blue square"], steps=4, guidance_scale=5.0, seed=3)
    assert record.space == "latent" and record.sampler == "ddim" and len(record) == 4
    assert record.x_t.shape == record.x0_pred.shape == (4, 2, 3, 32, 32)  # decoded frames
    assert record.eps_pred.shape == (4, 2, 4, 4, 4)  # latent noise
    # the last decoded frame is the image the pipeline returns for the same seed
    image = pipe.text_to_image([PROMPT, "a blue square"], steps=4, guidance_scale=5.0, seed=3, output_type="tensor")
    assert torch.allclose(record.x_t[-1], image, atol=1e-5)
    # each frame is the VAE's decoding of that step's latents and x0 prediction (checked for step 1)
    from sdlearn.pipeline import StepRecorder

    recorder = StepRecorder()
    pipe.text_to_image([PROMPT, "a blue square"], steps=4, guidance_scale=5.0, seed=3, callback=recorder)
    assert torch.allclose(record.x_t[1], pipe.decode_latents(recorder.records[1].latents), atol=1e-5)
    assert torch.allclose(record.x0_pred[1], pipe.decode_latents(recorder.records[1].x0_pred), atol=1e-5)
    assert torch.equal(record.eps_pred[1], recorder.records[1].eps)
    assert not torch.allclose(record.x0_pred[0], record.x0_pred[-1])  # the prediction changes over the run


def test_latent_stepper_shows_decoded_frames_of_the_slider_step(pipe):
    from sdlearn.widgets import latent_stepper

    stepper = latent_stepper(pipe, PROMPT, steps=3, guidance_scale=3.0, seed=1, size=32)
    assert set(stepper.images) == {"x_t", "x0_pred", "eps_pred"}
    assert "decoded" in stepper.widget.children[2].children[0].children[0].value  # latent titles
    assert "3 of 4 channels" in stepper.widget.children[2].children[2].children[0].value
    first = stepper.images["x0_pred"].value
    stepper.slider.value = 3
    assert stepper.images["x0_pred"].value == stepper.pngs["x0_pred"][2] != first
    assert stepper.images["x_t"].value == stepper.pngs["x_t"][2]
    shown = decode(stepper.images["x_t"].value)[2:34, 2:34]  # 2-pixel border, 32 px image
    assert np.array_equal(shown, np.asarray(to_pil(stepper.record.x_t[2, 0])))
    assert "step 3 of 3" in stepper.label.value


def test_guidance_frames_are_the_pipeline_images_at_each_scale(pipe):
    from sdlearn.widgets import guidance_explorer, guidance_frames

    frames = guidance_frames(pipe, PROMPT, scales=(1, 3, 7.5), steps=3, seed=5)
    assert frames.scales == [1.0, 3.0, 7.5] and frames.images.shape == (3, 1, 3, 32, 32)
    for k, s in enumerate(frames.scales):
        expected = pipe.text_to_image(PROMPT, steps=3, guidance_scale=s, seed=5, output_type="tensor")
        assert torch.equal(frames.images[k], expected)
    assert not torch.allclose(frames.images[0], frames.images[2])  # guidance changes the image

    explorer = guidance_explorer(pipe, PROMPT, scales=(1, 3, 7.5), steps=3, seed=5, size=32)
    assert explorer.slider.value == 1.0
    explorer.slider.value = 7.5
    assert [image.value for image in explorer.images] == explorer.pngs[2] != explorer.pngs[0]
    assert np.array_equal(decode(explorer.images[0].value), np.asarray(to_pil(explorer.frames.images[2, 0])))
    assert "s = 7.5" in explorer.label.value
    changed = explorer.frames.changed(2).item()  # the share of pixels that moved from s = 1, in the label
    assert f"{changed:.0%} of the pixels differ from s = 1" in explorer.label.value
    moved = ((frames.images[2] - frames.images[0]).abs().amax(1) > 1e-3).float().mean().item()
    assert explorer.frames.changed(2, threshold=1e-3).item() == pytest.approx(moved) and moved > 0
    assert PROMPT in explorer.widget.children[2].children[0].children[0].value  # each panel captioned with its prompt
    with pytest.raises(ValueError, match="distinct"):
        guidance_frames(pipe, PROMPT, scales=(2, 2))


def test_token_attention_maps_are_probabilities_over_the_prompt_tokens(pipe):
    from sdlearn.widgets import token_attention

    attention = token_attention(pipe, PROMPT, steps=3, guidance_scale=4.0, seed=2)
    assert attention.tokens[0] == "<|startoftext|>" and attention.tokens[-1] == "<|endoftext|>"
    assert [t.replace("</w>", "") for t in attention.tokens[1:-1]] == PROMPT.split()
    assert attention.maps.shape == (77, 32, 32) and attention.image.shape == (3, 32, 32)
    cross = [name for name, _ in pipe.unet.named_modules() if name.endswith("attn2")]
    assert attention.layers == cross and len(cross) == 4  # down, mid and two up blocks of the tiny UNet
    # a softmax over the 77 text positions, averaged and resized linearly: sums to 1 at every pixel
    assert torch.allclose(attention.maps.sum(0), torch.ones(32, 32), atol=1e-5)
    assert (attention.maps >= 0).all()
    # the image is the pipeline's for the same seed (recording does not change the numbers much)
    image = pipe.text_to_image(PROMPT, steps=3, guidance_scale=4.0, seed=2, output_type="tensor")[0]
    assert (attention.image - image).abs().max() < 1e-4
    # one layer only: its own head-averaged map, conditional half, resized
    one = token_attention(pipe, PROMPT, steps=3, guidance_scale=4.0, seed=2, layers=attention.layers[:1])
    assert not torch.allclose(one.maps, attention.maps)
    with pytest.raises(ValueError, match="No cross-attention recorded"):
        token_attention(pipe, PROMPT, steps=1, layers=["not.a.layer"])
    with pytest.raises(TypeError, match="one prompt"):
        token_attention(pipe, [PROMPT, PROMPT], steps=1)


def test_attention_viewer_shows_the_map_of_the_chosen_token(pipe):
    from sdlearn.widgets import attention_viewer

    viewer = attention_viewer(pipe, PROMPT, steps=2, guidance_scale=4.0, seed=0, size=64)
    n = len(viewer.attention.tokens)
    assert len(viewer.pngs) == n == len(viewer.dropdown.options)
    assert viewer.dropdown.value == 1 and "<b>a</b>" in viewer.label.value  # the first word
    viewer.dropdown.value = 3  # "red"
    assert viewer.heatmap.value == viewer.pngs[3] and "red" in viewer.label.value
    assert viewer.scale.value == viewer.scale_pngs[3] and len(viewer.scale_pngs) == n  # the colour scale follows the token
    assert viewer.pngs[3] != viewer.pngs[0]
    with pytest.raises(ValueError, match="start"):
        attention_viewer(pipe, PROMPT, steps=1, start=n)


def test_every_widget_displays_with_a_saved_picture_of_its_key_frames(pipe):
    """In a notebook each widget leaves two outputs: the live widget (text: run the cell) and a PNG of key frames."""
    from IPython.core.interactiveshell import InteractiveShell

    from sdlearn.widgets import RUN_TO_RESTORE, attention_viewer, guidance_explorer, latent_stepper

    image = Image.new("RGB", (32, 32), "white")
    record = record_sampling(fake_model, get_sampler("ddim"), torch.randn(1, 3, 8, 8), steps=4)
    made = [noise_explorer(image, size=32), denoising_stepper(record, size=16),
            latent_stepper(pipe, PROMPT, steps=2, seed=0, size=32),
            guidance_explorer(pipe, [PROMPT, "a blue square"], scales=(1, 4), steps=2, seed=0, size=32),
            attention_viewer(pipe, PROMPT, steps=2, seed=0, size=32)]
    shell = InteractiveShell.instance()
    for widget in made:
        published = []
        shell.display_pub.publish = lambda data, **kwargs: published.append(data)
        widget._ipython_display_()
        assert [sorted(data) for data in published] == [sorted([WIDGET_VIEW, "text/plain"]), ["image/png", "text/plain"]]
        assert published[0]["text/plain"] == RUN_TO_RESTORE
        png = published[1]["image/png"]
        picture = decode(base64.b64decode(png) if isinstance(png, str) else png)  # IPython may give base64 text
        assert picture.shape[0] > 60 and picture.shape[1] > 100 and picture.std() > 10  # a drawn picture, not blank
