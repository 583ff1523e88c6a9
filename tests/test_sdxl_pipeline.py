"""StableDiffusionXL against diffusers' StableDiffusionXLPipeline on a tiny random model.

A tiny random SDXL pipeline (two text encoders, the second with its projection and a tokenizer
that pads with "!", a text_time UNet, SDXL's Euler scheduler) is saved with diffusers'
save_pretrained and loaded with StableDiffusionXL.from_pretrained; for the same seed both must
give the same image.
"""

import functools
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL as DiffusersAutoencoderKL
from diffusers import EulerAncestralDiscreteScheduler, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig as HFCLIPTextConfig
from transformers import CLIPTextModel as HFCLIPTextModel
from transformers import CLIPTextModelWithProjection as HFCLIPTextModelWithProjection
from transformers import CLIPTokenizer as HFCLIPTokenizer

from sdlearn.pipeline import StableDiffusion, StableDiffusionXL, StepRecorder, load_pipeline
from sdlearn.unet import UNet, UNetConfig, config_dict_for_diffusers
from tests.test_pipeline import SD_VOCAB, perturb

TOL = 1e-3  # max abs error of images in [-1, 1], fp32 (as tests/test_pipeline.py)
PROMPT = "a large red circle in the top left"
STEPS = 4
# SDXL base 1.0's scheduler/scheduler_config.json (EulerDiscreteScheduler), as published.
SDXL_SCHEDULER = dict(_class_name="EulerDiscreteScheduler", beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", interpolation_type="linear",
                      num_train_timesteps=1000, prediction_type="epsilon", sample_max_value=1.0, set_alpha_to_one=False,
                      skip_prk_steps=True, steps_offset=1, timestep_spacing="leading", trained_betas=None,
                      use_karras_sigmas=False)


def build_diffusers_sdxl(folder: Path) -> Path:
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**config_dict_for_diffusers(UNetConfig.tiny_sdxl(sample_size=8)))  # 64 x 64 images
    vae = DiffusersAutoencoderKL(
        block_out_channels=(16, 32, 32, 32), down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        latent_channels=4, layers_per_block=1, norm_num_groups=8, sample_size=64,
    )
    common = dict(vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                  bos_token_id=49406, eos_token_id=49407, pad_token_id=1)
    text_encoder = HFCLIPTextModel(HFCLIPTextConfig(**common, hidden_act="quick_gelu"))
    text_encoder_2 = HFCLIPTextModelWithProjection(HFCLIPTextConfig(**common, hidden_act="gelu", projection_dim=32))
    for i, module in enumerate((unet, vae, text_encoder, text_encoder_2)):
        perturb(module, seed=i)
    pipe = StableDiffusionXLPipeline(
        vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2,
        tokenizer=HFCLIPTokenizer.from_pretrained(SD_VOCAB),
        tokenizer_2=HFCLIPTokenizer.from_pretrained(SD_VOCAB, pad_token="!"),  # SDXL's second tokenizer pads with "!"
        unet=unet, scheduler=EulerDiscreteScheduler.from_config(SDXL_SCHEDULER), add_watermarker=False,
    )
    pipe.save_pretrained(folder)
    return folder


def load_diffusers(folder: Path) -> StableDiffusionXLPipeline:
    pipe = StableDiffusionXLPipeline.from_pretrained(folder, add_watermarker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def diffusers_images(reference, seed: int, scheduler=None, **kwargs) -> torch.Tensor:
    """diffusers' output as (B, 3, H, W) in [-1, 1]."""
    original = reference.scheduler
    try:
        if scheduler is not None:
            reference.scheduler = scheduler.from_config(original.config)
        out = reference(generator=torch.Generator().manual_seed(seed), output_type="pt", num_inference_steps=STEPS, **kwargs)
    finally:
        reference.scheduler = original
    return out.images * 2 - 1


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR in dB of two image batches in [-1, 1], as 8-bit pixels."""
    x, y = ((t.clamp(-1, 1) + 1) * 127.5 for t in (a, b))
    mse = float(((x.double() - y.double()) ** 2).mean())
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return build_diffusers_sdxl(tmp_path_factory.mktemp("sdxl") / "tiny-sdxl")


@pytest.fixture(scope="module")
def pipe(folder) -> StableDiffusionXL:
    return StableDiffusionXL.from_pretrained(folder)


@pytest.fixture(scope="module")
def reference(folder) -> StableDiffusionXLPipeline:
    return load_diffusers(folder)


def check(got: torch.Tensor, want: torch.Tensor) -> None:
    assert got.shape == want.shape
    err, db = (got - want).abs().max().item(), psnr(got, want)
    assert err <= TOL and db >= 40, (err, db)


def test_load_pipeline_reads_an_sdxl_folder(pipe, folder):
    loaded = load_pipeline(folder)
    assert isinstance(loaded, StableDiffusionXL) and loaded.tokenizer_2.pad_token_id == 0  # "!" pads, as SDXL's
    assert repr(loaded).startswith("StableDiffusionXL(unet 2.0M, vae 0.3M, text_encoder 1.6M, text_encoder_2 1.6M")
    for name in ("unet", "text_encoder_2"):
        for key, value in getattr(pipe, name).state_dict().items():
            assert torch.equal(getattr(loaded, name).state_dict()[key], value)


def test_prompt_embeddings_equal_diffusers(pipe, reference):
    context, pooled = pipe.encode_prompt([PROMPT, ""])
    want = reference.encode_prompt([PROMPT, ""], do_classifier_free_guidance=False)
    assert context.shape == (2, 77, 64) and pooled.shape == (2, 32)
    assert (context - want[0]).abs().max().item() <= 1e-5
    assert (pooled - want[2]).abs().max().item() <= 1e-5


def test_text_to_image_matches_diffusers(pipe, reference):
    got = pipe.text_to_image(PROMPT, steps=STEPS, seed=3, output_type="tensor")  # the folder's sampler: euler
    check(got, diffusers_images(reference, 3, prompt=PROMPT))
    assert pipe.default_sampler == "euler" and got.shape == (1, 3, 64, 64)


def test_negative_prompt_sampler_and_batches_match_diffusers(pipe, reference):
    # A negative prompt is encoded (no zeros then); two prompts, two images each; Euler ancestral draws noise every step
    got = pipe.text_to_image([PROMPT, "a blue square"], negative_prompt="green", steps=STEPS, seed=5, sampler="euler_a",
                             num_images_per_prompt=2, output_type="tensor", guidance_scale=7.5)
    want = diffusers_images(reference, 5, scheduler=EulerAncestralDiscreteScheduler, prompt=[PROMPT, "a blue square"],
                            negative_prompt=["green"] * 2, num_images_per_prompt=2, guidance_scale=7.5)
    check(got, want)
    assert not torch.allclose(got, pipe.text_to_image([PROMPT, "a blue square"], steps=STEPS, seed=5, sampler="euler_a",
                                                      num_images_per_prompt=2, output_type="tensor", guidance_scale=7.5))


def test_size_and_no_guidance_match_diffusers(pipe, reference):
    got = pipe.text_to_image(PROMPT, height=64, width=96, steps=STEPS, seed=1, guidance_scale=1.0, output_type="tensor")
    check(got, diffusers_images(reference, 1, prompt=PROMPT, height=64, width=96, guidance_scale=1.0))


def test_time_ids_reach_the_unet_and_slicing_changes_nothing(pipe, monkeypatch):
    recorder = StepRecorder()
    base = pipe.text_to_image(PROMPT, steps=2, seed=0, output_type="latent", callback=recorder)
    assert len(recorder) == 2 and recorder.records[0].eps_uncond is not None
    assert pipe.time_ids(64, 96).tolist() == [[64.0, 96.0, 0.0, 0.0, 64.0, 96.0]]
    try:
        pipe.enable_slicing()
        assert torch.allclose(pipe.text_to_image(PROMPT, steps=2, seed=0, output_type="latent"), base, atol=1e-4)
    finally:
        pipe.enable_slicing(False)
    monkeypatch.setattr(pipe, "time_ids", functools.partial(pipe.time_ids, crop_top_left=(16, 16)))
    assert not torch.allclose(base, pipe.text_to_image(PROMPT, steps=2, seed=0, output_type="latent"))


def test_save_pretrained_loads_in_diffusers(pipe, tmp_path):
    pipe.save_pretrained(tmp_path / "ours")
    theirs = load_diffusers(tmp_path / "ours")
    assert isinstance(theirs, StableDiffusionXLPipeline) and theirs.tokenizer_2.pad_token == "!"
    got = pipe.text_to_image(PROMPT, steps=STEPS, seed=2, output_type="tensor")
    check(got, diffusers_images(theirs, 2, prompt=PROMPT))
    again = StableDiffusionXL.from_pretrained(tmp_path / "ours")
    assert torch.equal(again.text_to_image(PROMPT, steps=STEPS, seed=2, output_type="tensor"), got)
    with pytest.raises(FileExistsError):
        pipe.save_pretrained(tmp_path / "ours")


def test_wrong_parts_and_missing_features_are_clear(pipe, tmp_path):
    with pytest.raises(ValueError, match="addition_embed_type='text_time'"):
        StableDiffusionXL(UNet(UNetConfig.tiny(cross_attention_dim=64)), pipe.vae, pipe.text_encoder, pipe.text_encoder_2,
                          pipe.tokenizer, pipe.tokenizer_2)
    with pytest.raises(TypeError, match="text_encoder_2"):
        StableDiffusionXL(pipe.unet, pipe.vae, pipe.text_encoder, pipe.text_encoder, pipe.tokenizer, pipe.tokenizer_2)
    with pytest.raises(ValueError, match="64-wide text vectors"):
        StableDiffusion(pipe.unet, pipe.vae, pipe.text_encoder, pipe.tokenizer)  # SD's pipeline with SDXL parts
    with pytest.raises(NotImplementedError, match="text_to_image only"):
        pipe.image_to_image(PROMPT, None)
    (tmp_path / "model_index.json").write_text('{"_class_name": "StableDiffusionPipeline"}')
    (tmp_path / "scheduler").mkdir()
    (tmp_path / "scheduler" / "scheduler_config.json").write_text("{}")
    with pytest.raises(ValueError, match="not a StableDiffusionXLPipeline"):
        StableDiffusionXL.from_pretrained(tmp_path)
