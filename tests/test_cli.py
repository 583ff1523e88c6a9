"""The `sdlearn generate` command, on a tiny random pipeline folder made by sdlearn."""

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sdlearn.cli import main
from sdlearn.clip import CLIPTextConfig, CLIPTextModel, CLIPTokenizer
from sdlearn.pipeline import StableDiffusion
from sdlearn.pipeline import load_pipeline
from sdlearn.unet import UNet, UNetConfig
from sdlearn.vae import AutoencoderKL, VAEConfig

REPO = Path(__file__).resolve().parent.parent
PROMPT = "a large red circle in the top left"
SD_DDIM = {
    "_class_name": "DDIMScheduler", "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000, "clip_sample": False, "set_alpha_to_one": False, "steps_offset": 1,
}


def tiny_shapes_pipeline() -> StableDiffusion:
    """A random tiny pipeline (32 x 32 images) with the shapes vocabulary (also used by test_guards)."""
    torch.manual_seed(0)
    tokenizer = CLIPTokenizer.from_pretrained(REPO / "data" / "tokenizers" / "shapes")
    text_encoder = CLIPTextModel(CLIPTextConfig.tiny(vocab_size=tokenizer.vocab_size))
    unet = UNet(UNetConfig.tiny(sample_size=4, cross_attention_dim=text_encoder.config.hidden_size))
    vae = AutoencoderKL(VAEConfig.tiny(sample_size=32))
    return StableDiffusion(unet, vae, text_encoder, tokenizer, SD_DDIM)


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    """tiny_shapes_pipeline(), saved by sdlearn."""
    return tiny_shapes_pipeline().save_pretrained(tmp_path_factory.mktemp("cli") / "tiny-sd")


def pixels(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def test_generate_writes_the_pipelines_image(model, tmp_path, capsys):
    out = tmp_path / "circle.png"
    assert main(["generate", PROMPT, "--model", str(model), "--steps", "3", "--seed", "0", "--out", str(out)]) == 0
    assert out.is_file()
    assert f"seed 0" in capsys.readouterr().out
    want = load_pipeline(model).text_to_image(PROMPT, steps=3, seed=0)[0]
    assert np.array_equal(pixels(out), np.asarray(want))
    assert pixels(out).shape == (32, 32, 3)


def test_generate_options_reach_the_pipeline(model, tmp_path):
    out = tmp_path / "options.png"
    args = ["generate", PROMPT, "--model", str(model), "--steps", "2", "--seed", "3", "--sampler", "euler", "--guidance", "4",
            "--negative", "a blue square", "--height", "48", "--width", "64", "--out", str(out), "--quiet"]
    assert main(args) == 0
    want = load_pipeline(model).text_to_image(
        PROMPT, negative_prompt="a blue square", steps=2, seed=3, sampler="euler", guidance_scale=4.0, height=48, width=64
    )[0]
    assert np.array_equal(pixels(out), np.asarray(want))
    assert pixels(out).shape == (48, 64, 3)


def test_without_seed_a_fresh_seed_is_printed_and_reproduces(model, tmp_path, capsys):
    first, second = tmp_path / "a.png", tmp_path / "b.png"
    assert main(["generate", PROMPT, "--model", str(model), "--steps", "2", "--out", str(first)]) == 0
    seed = int(re.search(r"seed (\d+)", capsys.readouterr().out).group(1))
    assert main(["generate", PROMPT, "--model", str(model), "--steps", "2", "--seed", str(seed), "--out", str(second)]) == 0
    assert np.array_equal(pixels(first), pixels(second))


def test_refuses_to_overwrite_unless_asked(model, tmp_path, capsys):
    out = tmp_path / "keep.png"
    out.write_bytes(b"precious")
    assert main(["generate", PROMPT, "--model", str(model), "--steps", "1", "--seed", "0", "--out", str(out)]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert out.read_bytes() == b"precious"
    assert main(["generate", PROMPT, "--model", str(model), "--steps", "1", "--seed", "0", "--out", str(out), "--overwrite", "--quiet"]) == 0
    assert pixels(out).shape == (32, 32, 3)


def test_missing_default_model_names_the_make_target(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SDLEARN_DATA", str(tmp_path / "empty-data"))
    out = tmp_path / "x.png"
    assert main(["generate", PROMPT, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "make train-mini-sd" in err and "mini-sd" in err and "--model" in err
    assert not out.exists()


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--height", "40"], "multiples of 16"),
        (["--steps", "0"], "--steps must be at least 1"),
        (["--sampler", "heun"], "Unknown sampler 'heun'"),
        (["--eta", "0.5", "--sampler", "euler"], "eta"),
        (["--guidance", "-1"], "guidance_scale must be a finite number >= 0"),
        (["--device", "banana"], "not a device torch knows"),
    ],
)
def test_bad_options_give_one_clear_line_and_write_nothing(model, tmp_path, capsys, extra, message):
    out = tmp_path / "bad.png"
    assert main(["generate", PROMPT, "--model", str(model), "--out", str(out), "--quiet", *extra]) == 2
    err = capsys.readouterr().err
    assert err.startswith("sdlearn generate: error:") and message in err
    assert not out.exists()


def test_bad_paths_give_clear_errors(model, tmp_path, capsys):
    cases = [
        (["--model", str(tmp_path / "nowhere"), "--out", str(tmp_path / "a.png")], "Nothing at"),
        (["--model", str(model / "unet"), "--out", str(tmp_path / "a.png")], "not a pipeline folder"),
        (["--model", str(model), "--out", str(tmp_path / "no-such-folder" / "a.png")], "does not exist"),
        (["--model", str(model), "--out", str(tmp_path / "a.xyz")], "image extension"),
        (["--model", str(model), "--out", str(tmp_path)], "is a folder"),
    ]
    for args, message in cases:
        assert main(["generate", PROMPT, *args]) == 2
        assert message in capsys.readouterr().err, message
    assert not (tmp_path / "a.png").exists()


def test_python_dash_m_sdlearn(model, tmp_path):
    out = tmp_path / "sub.png"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run(
        [sys.executable, "-m", "sdlearn", "generate", PROMPT, "--model", str(model), "--steps", "2", "--seed", "5", "--out", str(out)],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert "seed 5" in done.stdout
    want = load_pipeline(model).text_to_image(PROMPT, steps=2, seed=5)[0]
    assert np.array_equal(pixels(out), np.asarray(want))
    usage = subprocess.run([sys.executable, "-m", "sdlearn"], capture_output=True, text=True, env=env, timeout=120)
    assert usage.returncode == 2 and "generate" in usage.stderr


# Adapters: --lora, --embedding, --hypernetwork on the shipped mini-SD ------------------------


@pytest.fixture(scope="module")
def mini_sd():
    from sdlearn.datasets import data_path

    return data_path("mini-sd", "train-mini-sd")


@pytest.fixture(scope="module")
def adapters(mini_sd, tmp_path_factory):
    """Small random adapters for mini-SD, written the way their tools write them."""
    from safetensors.torch import save_file

    from sdlearn.hypernetwork import add_hypernetwork, hypernetwork_of, save_hypernetwork
    from sdlearn.lora import add_lora, lora_layers, save_lora

    folder = tmp_path_factory.mktemp("adapters")
    g = torch.Generator().manual_seed(0)
    unet = UNet.from_pretrained(mini_sd / "unet")
    add_lora(unet, rank=4)
    with torch.no_grad():
        for layer in lora_layers(unet).values():
            layer.lora_A.copy_(torch.randn(layer.lora_A.shape, generator=g) * 0.3)
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g) * 0.3)
    save_lora(unet, folder / "lora")
    unet = UNet.from_pretrained(mini_sd / "unet")
    add_hypernetwork(unet, activation="relu")
    with torch.no_grad():
        for p in hypernetwork_of(unet).parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    save_hypernetwork(unet, folder / "shapes.pt")
    save_file({"<star>": torch.randn(2, 64, generator=g)}, folder / "learned_embeds.safetensors")  # diffusers, 2 vectors
    torch.save({"string_to_param": {"*": torch.randn(1, 64, generator=g)}, "name": "<blob>"}, folder / "blob.pt")  # A1111
    return folder


def generate_mini(mini_sd, out, *extra, prompt=PROMPT):
    return main(["generate", prompt, "--model", str(mini_sd), "--steps", "2", "--seed", "1", "--out", str(out), *extra])


@pytest.fixture(scope="module")
def plain(mini_sd, tmp_path_factory):
    out = tmp_path_factory.mktemp("plain") / "plain.png"
    assert generate_mini(mini_sd, out, "--quiet") == 0
    return pixels(out)


def test_lora_changes_the_image_and_scale_zero_is_the_plain_model(mini_sd, adapters, plain, tmp_path, capsys):
    from sdlearn.lora import load_lora

    assert generate_mini(mini_sd, tmp_path / "lora.png", "--lora", str(adapters / "lora"), "--lora-scale", "0.8") == 0
    assert "LoRA" in capsys.readouterr().out
    image = pixels(tmp_path / "lora.png")
    assert np.abs(image.astype(int) - plain).max() > 10
    pipe = load_pipeline(mini_sd)
    load_lora(pipe.unet, adapters / "lora" / "pytorch_lora_weights.safetensors", scale=0.8)
    assert np.array_equal(image, np.asarray(pipe.text_to_image(PROMPT, steps=2, seed=1)[0]))
    assert generate_mini(mini_sd, tmp_path / "zero.png", "--lora", str(adapters / "lora"), "--lora-scale", "0", "--quiet") == 0
    assert np.array_equal(pixels(tmp_path / "zero.png"), plain)


def test_embeddings_add_words_the_prompt_can_use(mini_sd, adapters, plain, tmp_path, capsys):
    from sdlearn.textual_inversion import load_embedding

    prompt = "a large <star> <blob> in the top left"
    args = ["--embedding", str(adapters / "learned_embeds.safetensors"), "--embedding", str(adapters / "blob.pt")]
    assert generate_mini(mini_sd, tmp_path / "star.png", *args, prompt=prompt) == 0
    out = capsys.readouterr().out
    assert "the prompt can now use <star> (2 vectors)" in out and "the prompt can now use <blob>" in out
    image = pixels(tmp_path / "star.png")
    assert np.abs(image.astype(int) - plain).max() > 10
    pipe = load_pipeline(mini_sd)
    load_embedding(adapters / "learned_embeds.safetensors", pipe.tokenizer, pipe.text_encoder)
    load_embedding(adapters / "blob.pt", pipe.tokenizer, pipe.text_encoder)
    assert np.array_equal(image, np.asarray(pipe.text_to_image(prompt, steps=2, seed=1)[0]))


def test_hypernetwork_changes_the_image_and_strength_zero_is_the_plain_model(mini_sd, adapters, plain, tmp_path):
    hn = str(adapters / "shapes.pt")
    assert generate_mini(mini_sd, tmp_path / "hn.png", "--hypernetwork", hn, "--strength", "0.7", "--quiet") == 0
    assert np.abs(pixels(tmp_path / "hn.png").astype(int) - plain).max() > 10
    assert generate_mini(mini_sd, tmp_path / "zero.png", "--hypernetwork", hn, "--strength", "0", "--quiet") == 0
    assert np.array_equal(pixels(tmp_path / "zero.png"), plain)


def test_bad_adapter_files_give_one_clear_line(mini_sd, model, adapters, tmp_path, capsys):
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    torch.save({"emb_params": torch.zeros(1, 64)}, tmp_path / "embedding.pt")
    cases = [
        (mini_sd, ["--lora", str(tmp_path / "missing")], "--lora "),
        (mini_sd, ["--lora", str(adapters / "shapes.pt")], "--lora: "),
        (mini_sd, ["--lora", str(tmp_path / "junk.safetensors")], "--lora"),
        (mini_sd, ["--lora-scale", "0.5"], "--lora-scale needs --lora"),
        (mini_sd, ["--strength", "0.5"], "--strength needs --hypernetwork"),
        (mini_sd, ["--embedding", str(adapters / "shapes.pt")], "--embedding: "),
        (mini_sd, ["--hypernetwork", str(tmp_path / "embedding.pt")], "--hypernetwork: "),
        (mini_sd, ["--hypernetwork", str(adapters / "learned_embeds.safetensors")], "usually a LoRA"),
        (model, ["--hypernetwork", str(adapters / "shapes.pt")], "no attention layer of this UNet sees"),  # widths differ
        (model, ["--lora", str(adapters / "lora")], "--lora: "),  # the tiny model's modules differ
    ]
    for folder, extra, message in cases:
        out = tmp_path / "bad.png"
        assert main(["generate", PROMPT, "--model", str(folder), "--steps", "1", "--out", str(out), "--quiet", *extra]) == 2, extra
        err = capsys.readouterr().err
        assert err.startswith("sdlearn generate: error:") and message in err, (extra, err)
        assert err.count("\n") == 1, err
        assert not out.exists()
