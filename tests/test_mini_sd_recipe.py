"""The mini-SD recipe end to end at smoke size: a few steps of every stage into a tmp folder.

The folder it writes must load in sdlearn.load_pipeline and in diffusers'
StableDiffusionPipeline and give the same image for the same seed; a second run must refuse
to overwrite it; an interrupted run must refuse to start over without --resume.
"""

import json

import numpy as np
import pytest
import torch

from sdlearn.recipes.mini_sd import MiniSDConfig, main, scheduler_config, work_folder
from sdlearn.vae import AutoencoderKL, VAEConfig


@pytest.fixture(scope="module")
def vae_folder(tmp_path_factory):
    """A (random) tiny autoencoder folder, so the smoke run does not depend on a trained one."""
    folder = tmp_path_factory.mktemp("vae")
    torch.manual_seed(0)
    AutoencoderKL(VAEConfig.tiny(block_out_channels=(16, 16, 16, 16), norm_num_groups=8)).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def trained(tmp_path_factory, vae_folder):
    out = tmp_path_factory.mktemp("run") / "mini-sd"
    assert main(["--out", str(out), "--smoke", "--vae", str(vae_folder), "--no-progress"]) == 0
    return out


def test_recipe_writes_a_pipeline_both_libraries_load(trained):
    import sdlearn
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    for part in ("model_index.json", "unet", "vae", "text_encoder", "tokenizer", "scheduler", "samples.png", "training.json"):
        assert (trained / part).exists(), part
    assert not work_folder(trained).exists()  # checkpoints removed after a finished run
    record = json.loads((trained / "training.json").read_text())
    assert set(record["seconds"]) == {"stage 1: autoencoder", "stage 2: text encoder", "stage 3: UNet",
                                      "choosing the guidance scale"}
    assert record["guidance_scale"] in (2.0, 4.0) and set(record["guidance_search"]) == {"2", "4"}
    expected = {**MiniSDConfig.smoke().__dict__, "block_out_channels": [32, 32], "guidance_scales": [2.0, 4.0]}
    del expected["vae_steps"]  # stage 1 reused --vae: its setting is not recorded
    assert record["config"] == expected and record["stages"]["text encoder"] == "trained"
    assert json.loads((trained / "scheduler" / "scheduler_config.json").read_text()) == scheduler_config(MiniSDConfig.smoke())

    pipe = sdlearn.load_pipeline(trained)
    assert pipe.unet.config.cross_attention_dim == pipe.text_encoder.config.hidden_size == 64
    assert pipe.unet.config.sample_size == 8 and pipe.default_size == 64 and pipe.default_sampler == "ddim"
    reference = StableDiffusionPipeline.from_pretrained(trained, safety_checker=None, requires_safety_checker=False)
    assert isinstance(reference.scheduler, DDIMScheduler)
    reference.set_progress_bar_config(disable=True)
    ours = pipe.text_to_image("a large red circle in the top left", steps=3, guidance_scale=4.0, seed=0, output_type="tensor")
    theirs = reference("a large red circle in the top left", num_inference_steps=3, guidance_scale=4.0,
                       generator=torch.Generator().manual_seed(0), output_type="np").images  # (1, H, W, 3) in [0, 1]
    assert ours.shape == (1, 3, 64, 64)
    assert np.abs((ours[0].permute(1, 2, 0).numpy() + 1) / 2 - theirs[0]).max() < 1e-3


def test_recipe_refuses_to_overwrite(trained, vae_folder, capsys):
    before = (trained / "unet" / "diffusion_pytorch_model.safetensors").read_bytes()
    assert main(["--out", str(trained), "--smoke", "--vae", str(vae_folder), "--no-progress"]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert (trained / "unet" / "diffusion_pytorch_model.safetensors").read_bytes() == before


def test_unfinished_run_needs_resume(tmp_path, vae_folder, capsys):
    out = tmp_path / "mini-sd"
    work_folder(out).mkdir(parents=True)  # what an interrupted run leaves behind
    assert main(["--out", str(out), "--smoke", "--vae", str(vae_folder), "--no-progress"]) == 2
    assert "--resume" in capsys.readouterr().err
    assert main(["--out", str(out), "--smoke", "--vae", str(vae_folder), "--no-progress", "--resume"]) == 0
    assert (out / "model_index.json").is_file()


def test_recipe_can_use_a_trained_text_encoder(tmp_path, vae_folder, capsys):
    """--text-encoder takes lesson 08's folder layout (text_encoder/ inside) and uses it frozen, unchanged."""
    from transformers import CLIPTextConfig, CLIPTextModel

    import sdlearn

    source = tmp_path / "clip"
    torch.manual_seed(1)
    encoder = CLIPTextModel(CLIPTextConfig(vocab_size=596, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                           num_attention_heads=4, max_position_embeddings=77, bos_token_id=594,
                                           eos_token_id=595, pad_token_id=595))
    encoder.save_pretrained(source / "text_encoder")
    out = tmp_path / "mini-sd"
    assert main(["--out", str(out), "--smoke", "--vae", str(vae_folder), "--no-progress", "--text-encoder", str(source)]) == 0
    assert "using the text encoder in" in capsys.readouterr().out
    shipped = CLIPTextModel.from_pretrained(out / "text_encoder").state_dict()
    assert shipped.keys() == encoder.state_dict().keys()
    assert all(torch.equal(shipped[k], v) for k, v in encoder.state_dict().items())
    assert sdlearn.load_pipeline(out).text_encoder is not None

    wrong = tmp_path / "nothing-here"
    wrong.mkdir()
    assert main(["--out", str(tmp_path / "other"), "--smoke", "--vae", str(vae_folder), "--no-progress",
                 "--text-encoder", str(wrong)]) == 2
    assert "holds no CLIPTextModel" in capsys.readouterr().err
    assert not (tmp_path / "other").exists() and not work_folder(tmp_path / "other").exists()  # nothing written
