"""StableDiffusion against diffusers' pipelines on identical random weights.

A tiny random diffusers StableDiffusionPipeline (SD 1.x layout, SD's noise schedule, the
CLIP ViT-L/14 vocabulary shipped in data/tokenizers/clip-vit-l14) is saved with diffusers'
save_pretrained and loaded with sdlearn.load_pipeline. For the same seed both must give the
same image: text-to-image with every sampler, guidance and negative prompts,
image-to-image, inpainting; and a folder that sdlearn writes must load in diffusers.
"""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    PNDMScheduler,
    StableDiffusionImg2ImgPipeline,
    StableDiffusionInpaintPipeline,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from diffusers import AutoencoderKL as DiffusersAutoencoderKL
from PIL import Image, ImageDraw
from transformers import CLIPTextConfig as HFCLIPTextConfig
from transformers import CLIPTextModel as HFCLIPTextModel
from transformers import CLIPTokenizer as HFCLIPTokenizer

import sdlearn
from sdlearn.pipeline import SD_SCHEDULER_CONFIG, StableDiffusion, StepRecord, StepRecorder, mask_to_tensor
from sdlearn.widgets import sampling_record_from_steps
from sdlearn.pipeline import load_pipeline

REPO = Path(__file__).resolve().parent.parent
SD_VOCAB = REPO / "data" / "tokenizers" / "clip-vit-l14"
# Max abs error of images in [-1, 1] (fp32). Measured: usually below 1e-7, rarely up to 3e-4 when a
# CPU kernel rounds differently in one run (guidance 7.5 amplifies it through random weights).
# For scale: guidance 7.4 instead of 7.5 moves the image by 8e-3, one more step by 0.16.
TOL = 1e-3
PROMPT = "a large red circle in the top left"
STEPS = 4

# SD 1.x's noise schedule with DDIM, as diffusers writes it for SD-style DDIM folders.
SD_DDIM = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False, steps_offset=1)

# sdlearn sampler -> the diffusers scheduler that diffusers users would swap in with from_config.
DIFFUSERS_SCHEDULERS = {
    "ddpm": (DDPMScheduler, {}),
    "ddim": (DDIMScheduler, {}),
    "plms": (PNDMScheduler, {"skip_prk_steps": True}),  # SD's PLMS: no Runge-Kutta warm-up (SD 1.5's config)
    "euler": (EulerDiscreteScheduler, {}),
    "euler_a": (EulerAncestralDiscreteScheduler, {}),
    "dpmpp_2m": (DPMSolverMultistepScheduler, {}),
}


def perturb(module: torch.nn.Module, seed: int) -> None:
    """Add seeded noise to every parameter, so that no path is silent (zero-initialised layers)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=g))


def build_diffusers_pipeline(folder: Path, sd2: bool = False, prediction_type: str = "epsilon") -> Path:
    """A tiny random diffusers StableDiffusionPipeline, saved with diffusers' save_pretrained."""
    torch.manual_seed(0)
    width = 48 if sd2 else 32
    unet = UNet2DConditionModel(
        sample_size=4,  # 32 x 32 pixel images
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=width,
        attention_head_dim=(2, 4) if sd2 else 2,
        use_linear_projection=sd2,
        upcast_attention=sd2,
        norm_num_groups=8,
    )
    vae = DiffusersAutoencoderKL(
        block_out_channels=(16, 32, 32, 32),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=8,
        sample_size=32,
    )
    text_encoder = HFCLIPTextModel(
        HFCLIPTextConfig(
            vocab_size=49408, hidden_size=width, intermediate_size=2 * width, num_hidden_layers=2, num_attention_heads=4,
            hidden_act="gelu" if sd2 else "quick_gelu", bos_token_id=49406, eos_token_id=49407, pad_token_id=1,
        )
    )
    for i, module in enumerate((unet, vae, text_encoder)):
        perturb(module, seed=i)
    tokenizer = HFCLIPTokenizer.from_pretrained(SD_VOCAB)
    scheduler = DDIMScheduler(**SD_DDIM, prediction_type=prediction_type, timestep_spacing="leading")
    pipe = StableDiffusionPipeline(
        unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.save_pretrained(folder)
    return folder


def load_diffusers(folder: Path) -> StableDiffusionPipeline:
    pipe = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def with_sampler(pipe, sampler: str):
    """pipe with its scheduler swapped for the one matching `sampler` (as diffusers users do)."""
    cls, extra = DIFFUSERS_SCHEDULERS[sampler]
    pipe.scheduler = cls.from_config(pipe.scheduler.config, **extra)
    return pipe


def diffusers_image(pipe_cls, reference, sampler: str, seed: int, **kwargs) -> torch.Tensor:
    """diffusers' output as (B, 3, H, W) in [-1, 1] (its "pt" output is in [0, 1])."""
    original = reference.scheduler
    try:
        pipe = pipe_cls(**with_sampler(reference, sampler).components)
        pipe.set_progress_bar_config(disable=True)
        images = pipe(generator=torch.Generator().manual_seed(seed), output_type="pt", **kwargs).images
    finally:
        reference.scheduler = original
    return images * 2 - 1


def shapes_image(size: int = 32) -> Image.Image:
    """A small picture to edit: a red disc and a blue bar on white."""
    image = Image.new("RGB", (size, size), "white")
    draw = ImageDraw.Draw(image)
    draw.ellipse((3, 3, size // 2, size // 2), fill=(220, 40, 40))
    draw.rectangle((size // 2, size // 2 + 4, size - 3, size - 6), fill=(40, 80, 220))
    return image


def square_mask(size: int = 32) -> Image.Image:
    """White (repaint) in the lower right quarter, black (keep) elsewhere."""
    mask = Image.new("L", (size, size), 0)
    ImageDraw.Draw(mask).rectangle((size // 2, size // 2, size - 1, size - 1), fill=255)
    return mask


def psnr(a: Image.Image, b: Image.Image) -> float:
    x, y = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    mse = np.mean((x - y) ** 2)
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


class UNetCalls:
    """Counts UNet calls and records their batch sizes (a forward pre-hook)."""

    def __init__(self, unet):
        self.batches = []
        self.handle = unet.register_forward_pre_hook(self.hook)

    def hook(self, module, args):
        self.batches.append(args[0].shape[0])

    def remove(self):
        self.handle.remove()


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return build_diffusers_pipeline(tmp_path_factory.mktemp("sd") / "tiny-sd")


@pytest.fixture(scope="module")
def pipe(folder) -> StableDiffusion:
    return load_pipeline(folder)


@pytest.fixture(scope="module")
def reference(folder) -> StableDiffusionPipeline:
    return load_diffusers(folder)


# ------------------------------------------------------------------------------------------
# Loading
# ------------------------------------------------------------------------------------------


def test_load_pipeline_reads_a_diffusers_folder(pipe, reference):
    assert sdlearn.load_pipeline is load_pipeline  # exposed lazily at the top level
    assert pipe.default_sampler == "ddim"  # the folder's DDIMScheduler
    assert pipe.scheduler_config["_class_name"] == "DDIMScheduler"
    assert pipe.default_size == 32
    for ours, theirs in ((pipe.unet, reference.unet), (pipe.vae, reference.vae), (pipe.text_encoder, reference.text_encoder)):
        want = {k.removeprefix("text_model.") if k.startswith("text_model.") else k: v for k, v in theirs.state_dict().items()}
        got = {k.removeprefix("text_model.") if k.startswith("text_model.") else k: v for k, v in ours.state_dict().items()}
        want.pop("embeddings.position_ids", None)
        assert set(want) == set(got)
        assert all(torch.equal(want[k], got[k]) for k in want)
    ids = reference.tokenizer([PROMPT], padding="max_length", max_length=77, return_tensors="pt").input_ids
    assert torch.equal(pipe.tokenizer([PROMPT]), ids)


def test_load_pipeline_device_and_dtype(folder):
    pipe = load_pipeline(folder, device="cpu", dtype=torch.float64)
    assert pipe.dtype == torch.float64 and pipe.device.type == "cpu"
    assert all(p.dtype == torch.float64 for m in (pipe.unet, pipe.vae, pipe.text_encoder) for p in m.parameters())
    image = pipe.text_to_image(PROMPT, steps=2, seed=0, output_type="tensor")
    assert image.dtype == torch.float64 and image.shape == (1, 3, 32, 32)


# ------------------------------------------------------------------------------------------
# Text to image: the same image as diffusers for the same seed
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("sampler", list(DIFFUSERS_SCHEDULERS))
def test_text_to_image_matches_diffusers_for_every_sampler(pipe, reference, sampler):
    want = diffusers_image(StableDiffusionPipeline, reference, sampler, seed=1, prompt=PROMPT, num_inference_steps=STEPS, guidance_scale=7.5)
    got = pipe.text_to_image(PROMPT, steps=STEPS, guidance_scale=7.5, sampler=sampler, seed=1, output_type="tensor")
    assert got.shape == want.shape == (1, 3, 32, 32)
    assert (got - want).abs().max().item() <= TOL
    assert got.std() > 0.05  # a real image, not a constant


def test_pil_output_matches_diffusers_and_default_sampler_is_the_folders(pipe, reference):
    want = reference(PROMPT, num_inference_steps=STEPS, generator=torch.Generator().manual_seed(3)).images
    got = pipe.text_to_image(PROMPT, steps=STEPS, seed=3)  # sampler=None: the folder's DDIM
    assert isinstance(got, list) and len(got) == 1 and isinstance(got[0], Image.Image)
    assert got[0].size == (32, 32) and got[0].mode == "RGB"
    assert psnr(got[0], want[0]) >= 40


def test_ddim_with_eta_matches_diffusers(pipe, reference):
    want = diffusers_image(StableDiffusionPipeline, reference, "ddim", seed=2, prompt=PROMPT, num_inference_steps=STEPS, eta=0.7)
    got = pipe.text_to_image(PROMPT, steps=STEPS, sampler="ddim", eta=0.7, seed=2, output_type="tensor")
    assert (got - want).abs().max().item() <= TOL
    deterministic = pipe.text_to_image(PROMPT, steps=STEPS, sampler="ddim", eta=0.0, seed=2, output_type="tensor")
    assert (got - deterministic).abs().max().item() > 1e-3  # eta's noise changed the image


def test_negative_prompt_matches_diffusers_and_changes_the_image(pipe, reference):
    negative = "a blue square"
    want = diffusers_image(StableDiffusionPipeline, reference, "euler", seed=4, prompt=PROMPT, negative_prompt=negative, num_inference_steps=STEPS, guidance_scale=5.0)
    got = pipe.text_to_image(PROMPT, negative_prompt=negative, steps=STEPS, guidance_scale=5.0, sampler="euler", seed=4, output_type="tensor")
    assert (got - want).abs().max().item() <= TOL
    plain = pipe.text_to_image(PROMPT, steps=STEPS, guidance_scale=5.0, sampler="euler", seed=4, output_type="tensor")
    assert (got - plain).abs().max().item() > 1e-3


def test_guidance_at_most_one_skips_the_unconditional_branch_like_diffusers(pipe, reference):
    want = diffusers_image(StableDiffusionPipeline, reference, "ddim", seed=5, prompt=PROMPT, num_inference_steps=STEPS, guidance_scale=1.0)
    calls, recorder = UNetCalls(pipe.unet), StepRecorder()
    try:
        got = pipe.text_to_image(PROMPT, steps=STEPS, guidance_scale=1.0, sampler="ddim", seed=5, output_type="tensor", callback=recorder)
    finally:
        calls.remove()
    assert (got - want).abs().max().item() <= TOL
    assert calls.batches == [1] * STEPS  # one half only, one call per step
    assert all(r.eps_uncond is None for r in recorder.records)


def test_batches_of_prompts_and_images_per_prompt_match_diffusers(pipe, reference):
    prompts, negatives = [PROMPT, "a small green cross"], ["", "a blue square"]
    want = diffusers_image(
        StableDiffusionPipeline, reference, "dpmpp_2m", seed=6, prompt=prompts, negative_prompt=negatives,
        num_images_per_prompt=2, num_inference_steps=STEPS,
    )
    calls = UNetCalls(pipe.unet)
    try:
        got = pipe.text_to_image(prompts, negative_prompt=negatives, num_images_per_prompt=2, steps=STEPS, sampler="dpmpp_2m", seed=6, output_type="tensor")
    finally:
        calls.remove()
    assert got.shape == (4, 3, 32, 32)
    assert (got - want).abs().max().item() <= TOL
    assert calls.batches == [8] * STEPS  # guidance: negative and positive halves in one call


def test_v_prediction_sd2_layout_matches_diffusers(tmp_path):
    folder = build_diffusers_pipeline(tmp_path / "tiny-sd2", sd2=True, prediction_type="v_prediction")
    pipe, reference = load_pipeline(folder), load_diffusers(folder)
    assert pipe.scheduler_config["prediction_type"] == "v_prediction"
    for sampler in ("ddim", "euler"):
        want = diffusers_image(StableDiffusionPipeline, reference, sampler, seed=7, prompt=PROMPT, num_inference_steps=STEPS)
        got = pipe.text_to_image(PROMPT, steps=STEPS, sampler=sampler, seed=7, output_type="tensor")
        assert (got - want).abs().max().item() <= TOL, sampler


def test_latent_output_and_decode(pipe, reference):
    want = reference(PROMPT, num_inference_steps=STEPS, generator=torch.Generator().manual_seed(8), output_type="latent").images
    latents = pipe.text_to_image(PROMPT, steps=STEPS, seed=8, output_type="latent")
    assert latents.shape == (1, 4, 4, 4)
    assert (latents - want).abs().max().item() <= TOL
    image = pipe.text_to_image(PROMPT, steps=STEPS, seed=8, output_type="tensor")
    assert torch.allclose(pipe.decode_latents(latents), image)
    assert image.min() >= -1 and image.max() <= 1


# ------------------------------------------------------------------------------------------
# The step callback
# ------------------------------------------------------------------------------------------


def test_callback_receives_every_step(pipe):
    recorder = StepRecorder()
    seen = []

    def count_only(record):  # returns nothing: the run is unchanged
        seen.append(record.step)

    a = pipe.text_to_image(PROMPT, steps=5, sampler="euler", seed=9, callback=recorder, output_type="latent")
    b = pipe.text_to_image(PROMPT, steps=5, sampler="euler", seed=9, callback=count_only, output_type="latent")
    sampler = pipe.make_sampler("euler")
    sampler.set_timesteps(5)
    assert len(recorder) == 5 and seen == [0, 1, 2, 3, 4]
    assert recorder.timesteps == pytest.approx(sampler.timesteps.tolist())
    assert all(isinstance(r, StepRecord) for r in recorder.records)
    assert recorder.stack("x0_pred").shape == (5, 1, 4, 4, 4)
    assert recorder.stack("eps_uncond").shape == recorder.stack("eps_cond").shape == (5, 1, 4, 4, 4)
    assert torch.equal(recorder.records[-1].latents, a) and torch.equal(a, b)
    first = recorder.records[0]  # eps is the guided prediction: e_neg + 7.5 (e_cond - e_neg)
    assert torch.allclose(first.eps, first.eps_uncond + 7.5 * (first.eps_cond - first.eps_uncond))
    # the last x0 prediction of Euler is where the last step lands (sigma -> 0)
    assert (recorder.records[-1].x0_pred - a).abs().max() < 1e-5


def test_recorded_run_drives_the_denoising_stepper(pipe):
    from sdlearn.widgets import denoising_stepper

    recorder = StepRecorder()
    final = pipe.text_to_image([PROMPT, "a small green cross"], steps=3, seed=17, callback=recorder, output_type="tensor")
    record = sampling_record_from_steps(recorder, pipe, sampler="ddim")
    assert record.timesteps == recorder.timesteps and len(record) == 3
    assert record.x0_pred.shape == record.x_t.shape == (3, 2, 3, 32, 32)  # decoded images
    assert record.eps_pred.shape == (3, 2, 4, 4, 4)  # latent noise
    assert torch.allclose(record.final, final, atol=1e-6)
    stepper = denoising_stepper(record)
    stepper.slider.value = 3  # step 3 of 3 (steps count from 1)
    assert stepper.images["x0_pred"].value == stepper.pngs["x0_pred"][2]


def test_callback_may_replace_the_latents(pipe):
    def zero_at_last_step(record):
        return torch.zeros_like(record.latents) if record.step == STEPS - 1 else None

    latents = pipe.text_to_image(PROMPT, steps=STEPS, seed=0, callback=zero_at_last_step, output_type="latent")
    assert torch.count_nonzero(latents) == 0
    with pytest.raises(TypeError, match="return None or a latents tensor"):
        pipe.text_to_image(PROMPT, steps=STEPS, seed=0, callback=lambda record: "oops", output_type="latent")


# ------------------------------------------------------------------------------------------
# Image to image and inpainting
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("sampler", ["ddim", "euler", "dpmpp_2m"])
def test_image_to_image_matches_diffusers(pipe, reference, sampler):
    image, steps = shapes_image(), 10
    want = diffusers_image(StableDiffusionImg2ImgPipeline, reference, sampler, seed=10, prompt=PROMPT, image=image, strength=0.6, num_inference_steps=steps)
    recorder = StepRecorder()
    got = pipe.image_to_image(PROMPT, image, strength=0.6, steps=steps, sampler=sampler, seed=10, output_type="tensor", callback=recorder)
    assert (got - want).abs().max().item() <= TOL
    assert len(recorder) == 6  # int(10 * 0.6) of the 10 steps run


def test_image_to_image_strength_zero_returns_the_reconstruction(pipe):
    image = shapes_image()
    got = pipe.image_to_image(PROMPT, image, strength=0.0, steps=10, seed=11, output_type="latent")
    z0 = pipe.encode_image(pipe_input(image), torch.Generator().manual_seed(11))
    assert torch.equal(got, z0)


def pipe_input(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)[None] * 2 - 1


@pytest.mark.parametrize("sampler,strength", [("ddim", 1.0), ("euler_a", 1.0), ("ddim", 0.75)])
def test_inpaint_matches_diffusers_with_a_4_channel_unet(pipe, reference, sampler, strength):
    image, mask, steps = shapes_image(), square_mask(), 8
    want = diffusers_image(
        StableDiffusionInpaintPipeline, reference, sampler, seed=12, prompt=PROMPT, image=image, mask_image=mask,
        strength=strength, num_inference_steps=steps,
    )
    got = pipe.inpaint(PROMPT, image, mask, strength=strength, steps=steps, sampler=sampler, seed=12, output_type="tensor")
    assert (got - want).abs().max().item() <= TOL


def test_inpaint_keeps_the_unmasked_latents_exactly(pipe):
    image, mask = shapes_image(), square_mask()
    latents = pipe.inpaint(PROMPT, image, mask, steps=6, seed=13, output_type="latent")
    z0 = pipe.encode_image(pipe_input(image), torch.Generator().manual_seed(13))  # the first draw, as in inpaint
    keep = mask_to_tensor(mask)[:, :, ::8, ::8] == 0  # (1, 1, 4, 4) latent pixels to keep
    keep = keep.expand_as(latents)
    assert torch.equal(latents[keep], z0[keep])
    assert (latents[~keep] - z0[~keep]).abs().max() > 0.1  # the masked quarter was repainted
    # a tensor mask (1 = repaint) gives the same result as the PIL mask
    same = pipe.inpaint(PROMPT, image, mask_to_tensor(mask)[0, 0], steps=6, seed=13, output_type="latent")
    assert torch.equal(same, latents)


# ------------------------------------------------------------------------------------------
# Saving: diffusers loads what sdlearn writes
# ------------------------------------------------------------------------------------------


def test_save_pretrained_loads_in_diffusers_and_gives_the_same_image(pipe, tmp_path):
    folder = pipe.save_pretrained(tmp_path / "saved")
    for part in ("unet/config.json", "vae/config.json", "text_encoder/config.json", "tokenizer/vocab.json", "tokenizer/merges.txt",
                 "scheduler/scheduler_config.json", "model_index.json"):
        assert (folder / part).is_file(), part
    theirs = load_diffusers(folder)
    assert type(theirs.scheduler).__name__ == "DDIMScheduler"
    want = theirs(PROMPT, num_inference_steps=STEPS, generator=torch.Generator().manual_seed(14), output_type="pt").images * 2 - 1
    got = pipe.text_to_image(PROMPT, steps=STEPS, seed=14, output_type="tensor")
    assert (got - want).abs().max().item() <= TOL
    # transformers reads the tokenizer folder (vocab.json + merges.txt) and gives the same ids
    ids = HFCLIPTokenizer.from_pretrained(folder / "tokenizer")([PROMPT], padding="max_length", max_length=77, return_tensors="pt").input_ids
    assert torch.equal(ids, pipe.tokenizer([PROMPT]))
    # and sdlearn reads it back
    again = load_pipeline(folder).text_to_image(PROMPT, steps=STEPS, seed=14, output_type="tensor")
    assert torch.equal(again, got)


def test_save_pretrained_refuses_to_overwrite(pipe, tmp_path):
    folder = pipe.save_pretrained(tmp_path / "saved")
    index = folder / "model_index.json"
    before = {p: p.stat().st_mtime_ns for p in folder.rglob("*") if p.is_file()}
    with pytest.raises(FileExistsError, match="overwrite=True"):
        pipe.save_pretrained(folder)
    assert {p: p.stat().st_mtime_ns for p in folder.rglob("*") if p.is_file()} == before
    stale = folder / "tokenizer" / "tokenizer.json"  # e.g. left by diffusers; transformers would prefer it
    stale.write_text("{}")
    pipe.save_pretrained(folder, overwrite=True)
    assert json.loads(index.read_text())["_class_name"] == "StableDiffusionPipeline"
    assert not stale.exists()
    assert load_pipeline(folder).tokenizer([PROMPT]).equal(pipe.tokenizer([PROMPT]))


def test_pipeline_built_in_memory_uses_sd_scheduler_and_plms(pipe, tmp_path):
    built = StableDiffusion(pipe.unet, pipe.vae, pipe.text_encoder, pipe.tokenizer)
    assert built.scheduler_config == SD_SCHEDULER_CONFIG and built.default_sampler == "plms"
    folder = built.save_pretrained(tmp_path / "plms")
    theirs = load_diffusers(folder)
    assert type(theirs.scheduler).__name__ == "PNDMScheduler" and theirs.scheduler.config.skip_prk_steps
    want = theirs(PROMPT, num_inference_steps=STEPS, generator=torch.Generator().manual_seed(15), output_type="pt").images * 2 - 1
    got = built.text_to_image(PROMPT, steps=STEPS, seed=15, output_type="tensor")
    assert (got - want).abs().max().item() <= TOL


# ------------------------------------------------------------------------------------------
# Bad input: a clear error before any work, and nothing written
# ------------------------------------------------------------------------------------------


def bad_calls(pipe):
    image, mask = shapes_image(), square_mask()
    return {
        "height not a multiple": (lambda: pipe.text_to_image(PROMPT, height=36, steps=2), ValueError, "multiples of 16"),
        "width zero": (lambda: pipe.text_to_image(PROMPT, width=0, steps=2), ValueError, "width=0"),
        "strength above 1": (lambda: pipe.image_to_image(PROMPT, image, strength=1.5, steps=2), ValueError, r"strength must be a number in \[0, 1\]"),
        "strength below 0": (lambda: pipe.inpaint(PROMPT, image, mask, strength=-0.1, steps=2), ValueError, "strength"),
        "mask of the wrong size": (lambda: pipe.inpaint(PROMPT, image, square_mask(64), steps=2), ValueError, "mask is 64x64"),
        "empty prompt list": (lambda: pipe.text_to_image([], steps=2), ValueError, "prompt list is empty"),
        "prompt not text": (lambda: pipe.text_to_image(3, steps=2), TypeError, "prompt must be a string"),
        "negatives do not match": (lambda: pipe.text_to_image([PROMPT, PROMPT], negative_prompt=["x"], steps=2), ValueError, "2 prompts but 1 negative"),
        "zero steps": (lambda: pipe.text_to_image(PROMPT, steps=0), ValueError, "steps must be a positive integer"),
        "unknown sampler": (lambda: pipe.text_to_image(PROMPT, steps=2, sampler="heun"), ValueError, "Unknown sampler 'heun'"),
        "eta without ddim": (lambda: pipe.text_to_image(PROMPT, steps=2, sampler="euler", eta=0.5), ValueError, "eta"),
        "seed and generator": (lambda: pipe.text_to_image(PROMPT, steps=2, seed=0, generator=torch.Generator()), ValueError, "either seed= or generator="),
        "output type": (lambda: pipe.text_to_image(PROMPT, steps=2, output_type="np"), ValueError, "output_type must be one of"),
        "image tensor in [0, 255]": (lambda: pipe.image_to_image(PROMPT, torch.full((3, 32, 32), 200.0), steps=2), ValueError, r"\[-1, 1\]"),
        "image size not a multiple": (lambda: pipe.image_to_image(PROMPT, shapes_image(40), steps=2), ValueError, "multiples of 16"),
        "image not an image": (lambda: pipe.image_to_image(PROMPT, "photo.png", steps=2), TypeError, "PIL image"),
    }


@pytest.mark.parametrize("case", list(bad_calls(None)))
def test_bad_input_gives_a_clear_error_before_any_work(pipe, case):
    call, error, message = bad_calls(pipe)[case]
    calls = UNetCalls(pipe.unet)
    try:
        with pytest.raises(error, match=message):
            call()
    finally:
        calls.remove()
    assert calls.batches == []  # the UNet never ran


def test_negative_prompt_without_guidance_warns_and_is_ignored(pipe):
    with pytest.warns(UserWarning, match="negative prompt is ignored"):
        got = pipe.text_to_image(PROMPT, negative_prompt="a blue square", guidance_scale=1.0, steps=STEPS, seed=16, output_type="tensor")
    plain = pipe.text_to_image(PROMPT, guidance_scale=1.0, steps=STEPS, seed=16, output_type="tensor")
    assert torch.equal(got, plain)


def test_over_long_prompt_warns_naming_the_dropped_words(pipe):
    prompt = " ".join(["red"] * 80) + " zebra giraffe"
    with pytest.warns(UserWarning, match="zebra giraffe"):
        pipe.text_to_image(prompt, steps=1, seed=0, output_type="latent")


def test_load_pipeline_rejects_what_is_not_a_pipeline(folder, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # never touch the network in tests
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(ValueError, match="no model_index.json.*one model"):
        load_pipeline(folder / "unet")
    with pytest.raises(ValueError, match="Nothing at"):
        load_pipeline(tmp_path / "missing")
    with pytest.raises(ValueError, match="hub id"):
        load_pipeline("someone/some-model")
    single = tmp_path / "model.safetensors"
    single.write_bytes(b"")
    with pytest.raises(ValueError, match="not a valid safetensors file"):  # single files: tests/test_pretrained.py
        load_pipeline(single)
    other = tmp_path / "other"
    other.mkdir()
    (other / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusion3Pipeline"}))
    with pytest.raises(ValueError, match="StableDiffusion3Pipeline"):
        load_pipeline(other)
    (other / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionXLPipeline"}))
    with pytest.raises(ValueError, match="no unet/ folder; an SDXL base pipeline needs it"):  # an incomplete SDXL copy
        load_pipeline(other)
    with pytest.raises(TypeError, match="path or a hub id"):
        load_pipeline(42)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_on_cuda_matches_diffusers(folder, dtype):
    """On a GPU, in float32 and float16: the same image as diffusers on the same GPU (noise drawn on the CPU)."""
    pipe = load_pipeline(folder, device="cuda", dtype=dtype)
    reference = StableDiffusionPipeline.from_pretrained(
        folder, torch_dtype=dtype, safety_checker=None, feature_extractor=None, requires_safety_checker=False
    ).to("cuda")
    reference.set_progress_bar_config(disable=True)
    want = reference(PROMPT, num_inference_steps=STEPS, generator=torch.Generator().manual_seed(0), output_type="pt").images * 2 - 1
    got = pipe.text_to_image(PROMPT, steps=STEPS, seed=0, output_type="tensor")
    assert got.device.type == "cuda" and got.dtype == torch.float32  # the VAE decodes in float32 (force_upcast)
    assert pipe.vae_dtype == torch.float32 and pipe.dtype == dtype
    assert (got.float() - want.float()).abs().max().item() <= (TOL if dtype == torch.float32 else 2e-2)


def test_bench_pipeline_runs_and_both_sides_agree(capsys):
    """`python -m sdlearn.bench pipeline` at toy size: three timings, and both pipelines computed the same thing."""
    from sdlearn.bench import main

    assert main(["pipeline", "--config", "tiny", "--size", "32", "--steps", "2", "--repeats", "1", "--cpu-only"]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if "ratio" in line]
    assert [line.split(",")[0] for line in lines] == ["UNet step with guidance", "VAE decode", "text_to_image 2 DDIM steps"]
    for line in lines:
        assert float(line.rsplit("max |diff| ", 1)[1]) <= TOL
