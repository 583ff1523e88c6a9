"""Adapter files that sdlearn writes, used by diffusers' StableDiffusionPipeline: whole images.

tests/test_lora.py and tests/test_textual_inversion.py check the UNet output and the prompt
encoding; here the question is the one a learner asks: does my LoRA / embedding file give the
same picture in diffusers as in sdlearn? The shipped mini-SD (64x64, v-prediction, DDIM) runs
in both pipelines from the same seed (sdlearn draws the initial latents as diffusers does), fp32,
6 DDIM steps, guidance 7.5, two or three prompts. The adapters are random and non-zero (a LoRA with
B = 0 is the base model and would prove nothing), and each test also checks that the image
without the adapter is clearly different, so that the PSNR bound means something.

Measured (fp32, CPU, torch 2.13, diffusers 0.42): adapter images agree to PSNR ~130 dB (max abs
~2e-6 in [0, 1]); without the adapter the image is at PSNR 10-22 dB from the one with it; the
weights of diffusers' fuse_lora equal sdlearn's merge_lora bit for bit (max abs 0).
"""

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline

from sdlearn.datasets import data_path
from sdlearn.lora import add_lora, lora_layers, merge_lora, save_lora
from sdlearn.pipeline import load_pipeline
from sdlearn.textual_inversion import add_tokens, load_embedding, placeholder_ids, save_embedding

STEPS, GUIDANCE, SEED = 6, 7.5, 0
MIN_PSNR = 40.0  # dB, images in [0, 1]: the same picture
MAX_PSNR_WITHOUT = 30.0  # dB: the adapter must change the picture clearly more than that
WEIGHT_TOL = 1e-5


@pytest.fixture(scope="module")
def folder():
    path = data_path("mini-sd", "train-mini-sd")
    before = snapshot(path)
    yield path
    assert snapshot(path) == before, "a test wrote into the shipped data/mini-sd folder"


def snapshot(path):
    return sorted((str(p.relative_to(path)), p.stat().st_size, p.stat().st_mtime_ns) for p in path.rglob("*"))


def diffusers_pipeline(folder) -> StableDiffusionPipeline:
    pipe = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, feature_extractor=None,
                                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def diffusers_images(pipe, prompts) -> torch.Tensor:
    """(B, 3, 64, 64) in [0, 1]."""
    with torch.no_grad():
        return pipe(prompts, num_inference_steps=STEPS, guidance_scale=GUIDANCE,
                    generator=torch.Generator().manual_seed(SEED), output_type="pt").images


def sdlearn_images(pipe, prompts) -> torch.Tensor:
    """(B, 3, 64, 64) in [0, 1], from sdlearn's tensor output in [-1, 1]."""
    with torch.no_grad():
        images = pipe.text_to_image(prompts, steps=STEPS, guidance_scale=GUIDANCE, seed=SEED, output_type="tensor")
    return (images / 2 + 0.5).clamp(0, 1)


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = torch.mean((a.double() - b.double()) ** 2).item()
    return float("inf") if mse == 0 else 10 * np.log10(1.0 / mse)


def compare(ours, theirs, base, label):
    """Assert ours == theirs (PSNR >= 40 dB) and that both differ clearly from the image without the adapter."""
    same, err = psnr(ours, theirs), (ours - theirs).abs().max().item()
    without = psnr(theirs, base)
    print(f"\n{label}: PSNR {same:.1f} dB, max abs {err:.2e}; without the adapter PSNR {without:.1f} dB")
    assert same >= MIN_PSNR, f"{label}: PSNR {same:.1f} dB < {MIN_PSNR} (max abs {err:.2e})"
    assert without < MAX_PSNR_WITHOUT, f"{label}: the adapter hardly changes the image (PSNR {without:.1f} dB to the base image)"


# 1. LoRA -----------------------------------------------------------------------------------

LORA_PROMPTS = ["a large red circle in the top left", "a small blue square on the right"]


@pytest.fixture(scope="module")
def lora(folder, tmp_path_factory):
    """sdlearn's mini-SD with a rank-4 LoRA (alpha 8) on every attention projection, A and B random, saved in both formats.

    Returns (sdlearn pipeline, its images, folder of the files, diffusers' images without the LoRA).
    """
    tmp = tmp_path_factory.mktemp("lora")
    pipe = load_pipeline(folder)
    add_lora(pipe.unet, rank=4, alpha=8.0)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for layer in lora_layers(pipe.unet).values():
            layer.lora_A.copy_(torch.randn(layer.lora_A.shape, generator=g) * 0.2)
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g) * 0.2)
    for format in ("diffusers", "kohya"):
        save_lora(pipe.unet, tmp, format=format, weight_name=f"{format}.safetensors")
    return pipe, sdlearn_images(pipe, LORA_PROMPTS), tmp, diffusers_images(diffusers_pipeline(folder), LORA_PROMPTS)


@pytest.mark.parametrize("format", ["diffusers", "kohya"])
def test_lora_file_gives_the_same_image_in_diffusers(folder, lora, format):
    _, ours, files, base = lora
    theirs = diffusers_pipeline(folder)
    theirs.load_lora_weights(str(files), weight_name=f"{format}.safetensors")
    compare(ours, diffusers_images(theirs, LORA_PROMPTS), base, f"LoRA ({format})")


def test_fuse_lora_equals_merge_lora(folder, lora):
    pipe, _, files, _ = lora
    theirs = diffusers_pipeline(folder)
    theirs.load_lora_weights(str(files), weight_name="diffusers.safetensors")
    theirs.fuse_lora()
    theirs.unload_lora_weights()  # the fused weights stay, the LoRA layers go: plain UNet keys again
    fused = theirs.unet.state_dict()
    merge_lora(pipe.unet)  # the last test to use the sdlearn pipeline
    merged = {k: v for k, v in pipe.unet.state_dict().items() if ".lora_" not in k}
    assert sorted(fused) == sorted(merged)
    base = diffusers_pipeline(folder).unet.state_dict()
    changed = [k for k in fused if not torch.equal(fused[k], base[k])]
    assert len(changed) == len(lora_layers(pipe.unet))  # one weight per LoRA layer, nothing else
    err = max((fused[k] - merged[k]).abs().max().item() for k in fused)
    print(f"\nfuse_lora vs merge_lora: max abs {err:.2e} over {len(fused)} UNet tensors ({len(changed)} changed)")
    assert err <= WEIGHT_TOL


# 2. Textual inversion ----------------------------------------------------------------------
#
# One random 2-vector concept, written as three files under three trigger words; both pipelines
# load all three and draw one batch, a prompt per file (fewer runs on a 2-core CPU).

KINDS = ["diffusers", "a1111-safetensors", "a1111-pt"]
WORDS = {"diffusers": "<star>", "a1111-safetensors": "shapex", "a1111-pt": "shapey"}
TI_PROMPTS = [f"a large {WORDS[kind]} in the top left" for kind in KINDS]


@pytest.fixture(scope="module")
def embeddings(folder, tmp_path_factory):
    """{kind: image} from sdlearn, the same from diffusers, and diffusers' images without the embeddings."""
    tmp = tmp_path_factory.mktemp("embeddings")
    pipe = load_pipeline(folder)
    ids = add_tokens(pipe.tokenizer, pipe.text_encoder, "<star>", num_vectors=2)
    vectors = torch.randn(2, pipe.text_encoder.config.hidden_size, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        pipe.text_encoder.text_model.embeddings.token_embedding.weight[ids] = vectors
    torch.save({"string_to_param": {"*": vectors.clone()}, "name": "shapey"}, tmp / "shapey.pt")
    files = {  # kind: (path, diffusers' token=)
        "diffusers": (save_embedding(pipe.tokenizer, pipe.text_encoder, "<star>", tmp), None),
        # A1111 takes the trigger word from the file name; diffusers needs it as token=
        "a1111-safetensors": (save_embedding(pipe.tokenizer, pipe.text_encoder, "<star>", tmp / "shapex.safetensors",
                                             format="a1111"), "shapex"),
        "a1111-pt": (tmp / "shapey.pt", None),
    }
    base = diffusers_images(diffusers_pipeline(folder), TI_PROMPTS)
    ours, theirs = load_pipeline(folder), diffusers_pipeline(folder)
    for kind, (path, token) in files.items():
        assert load_embedding(path, ours.tokenizer, ours.text_encoder) == placeholder_ids(ours.tokenizer, WORDS[kind])
        theirs.load_textual_inversion(str(path), token=token)
    images = sdlearn_images(ours, TI_PROMPTS), diffusers_images(theirs, TI_PROMPTS), base
    return [{kind: x[i:i + 1] for i, kind in enumerate(KINDS)} for x in images]


@pytest.mark.parametrize("kind", KINDS)
def test_embedding_file_gives_the_same_image_in_diffusers(embeddings, kind):
    ours, theirs, base = (images[kind] for images in embeddings)
    compare(ours, theirs, base, f"embedding ({kind})")


# 3. The shipped runs (lesson 12) -----------------------------------------------------------

STAR_PROMPTS = ["a large red star in the top left", "a small blue star in the center"]


@pytest.mark.parametrize("format", ["diffusers", "kohya"])
def test_shipped_lora_star_gives_the_same_image_in_diffusers(folder, tmp_path, format):
    from sdlearn.lora import WEIGHT_NAME, load_lora

    shipped = data_path("lora-star", "train-lora-star")
    ours = load_pipeline(folder)
    load_lora(ours.unet, shipped / WEIGHT_NAME)
    files = shipped if format == "diffusers" else save_lora(ours.unet, tmp_path, format="kohya", weight_name="star.safetensors").parent
    theirs = diffusers_pipeline(folder)
    theirs.load_lora_weights(str(files), weight_name=WEIGHT_NAME if format == "diffusers" else "star.safetensors")
    base = diffusers_images(diffusers_pipeline(folder), STAR_PROMPTS)
    compare(sdlearn_images(ours, STAR_PROMPTS), diffusers_images(theirs, STAR_PROMPTS), base, f"data/lora-star ({format})")


@pytest.mark.parametrize("name, token", [("learned_embeds.safetensors", None), ("sun.safetensors", "<sun>")])
def test_shipped_sun_embedding_gives_the_same_image_in_diffusers(folder, name, token):
    path = data_path("ti-sun", "train-ti-sun") / name
    prompts = ["a <sun> in the top left"]
    ours, theirs = load_pipeline(folder), diffusers_pipeline(folder)
    load_embedding(path, ours.tokenizer, ours.text_encoder, token="<sun>")
    theirs.load_textual_inversion(str(path), token=token)
    base = diffusers_images(diffusers_pipeline(folder), ["a circle in the top left"])
    compare(sdlearn_images(ours, prompts), diffusers_images(theirs, prompts), base, f"data/ti-sun ({name})")
