"""sdlearn.evaluate: the command line parses and runs (without --guidance it takes the model's
recorded scale), the referee's names are still importable from here, and one
recommended_guidance serves the DDPM and the text-to-image evaluation.

The referee itself (classifier, clean-shape check, faithfulness) is tested in tests/test_referee.py.
"""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from sdlearn import ddpm, evaluate as ev, referee
from sdlearn.datasets import data_path

SD_DDIM = {
    "_class_name": "DDIMScheduler", "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000, "clip_sample": False, "set_alpha_to_one": False, "steps_offset": 1,
}
REFEREE_NAMES = ["HEADS", "CONFIDENCE", "DEAD_ZONE", "MAX_RENDER_ERROR", "STRAY_LEVEL", "MAX_STRAY", "DEFAULT_FOLDER",
                 "MAKE_TARGET", "EVAL_SEED", "ClassifierConfig", "ShapesClassifier", "load_classifier", "as_batch", "Predictions",
                 "classify", "render_errors", "CleanShapeScores", "clean_shape_scores", "is_clean_shape", "faithfulness",
                 "format_faithfulness", "render_accuracy"]


def test_referee_names_are_still_importable_from_evaluate():
    """Notebooks write `from sdlearn.evaluate import is_clean_shape`: the same objects as sdlearn.referee's."""
    for name in REFEREE_NAMES:
        assert getattr(ev, name) is getattr(referee, name), name
    assert ev.recommended_guidance is ddpm.recommended_guidance  # one definition


def test_recommended_guidance_reads_the_record_else_the_default(tmp_path):
    assert ddpm.recommended_guidance(tmp_path) == 1.0  # no training.json: no guidance
    assert ddpm.recommended_guidance(tmp_path, default=ev.TEXT_TO_IMAGE_GUIDANCE) == 4.0
    (tmp_path / "training.json").write_text(json.dumps({"steps": 10}))
    assert ddpm.recommended_guidance(tmp_path, default=4.0) == 4.0  # a record without the scale
    (tmp_path / "training.json").write_text(json.dumps({"guidance_scale": 2.5}))
    assert ddpm.recommended_guidance(tmp_path) == ddpm.recommended_guidance(tmp_path, default=4.0) == 2.5
    shipped = json.loads((data_path(ddpm.DEFAULT_FOLDER) / "training.json").read_text())["guidance_scale"]
    assert ddpm.recommended_guidance() == shipped  # data/ddpm-shapes by default


@pytest.mark.parametrize("command", ["classifier", "ddpm", "text-to-image"])
def test_every_subcommand_parses_and_has_help(command, capsys):
    with pytest.raises(SystemExit) as exit_:
        ev.main([command, "--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert f"python -m sdlearn.evaluate {command}" in out and "--seed" in out
    if command != "classifier":
        assert "--guidance" in out and "--json" in out


def test_python_m_sdlearn_evaluate_help():
    result = subprocess.run([sys.executable, "-m", "sdlearn.evaluate", "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert all(command in result.stdout for command in ("classifier", "ddpm", "text-to-image"))


def test_command_line_prints_accuracy_per_head(capsys):
    assert ev.main(["classifier", "--n", "40"]) == 0
    out = capsys.readouterr().out
    assert "64 px" in out and "32 px" in out and "position" in out and "clean-shape rate" in out


@pytest.fixture
def tiny_text_to_image(tmp_path):
    """A random tiny text-to-image pipeline folder (32 x 32 images) whose training.json records guidance 3."""
    from sdlearn.models.clip import CLIPTextConfig, CLIPTextModel, CLIPTokenizer
    from sdlearn.models.unet import UNet, UNetConfig
    from sdlearn.models.vae import AutoencoderKL, VAEConfig
    from sdlearn.pipeline import StableDiffusion

    torch.manual_seed(0)
    tokenizer = CLIPTokenizer.from_pretrained(data_path("tokenizers") / "shapes")
    text_encoder = CLIPTextModel(CLIPTextConfig.tiny(vocab_size=tokenizer.vocab_size))
    unet = UNet(UNetConfig.tiny(sample_size=4, cross_attention_dim=text_encoder.config.hidden_size))
    vae = AutoencoderKL(VAEConfig.tiny(sample_size=32))
    folder = StableDiffusion(unet, vae, text_encoder, tokenizer, SD_DDIM).save_pretrained(tmp_path / "tiny-sd")
    (folder / "training.json").write_text(json.dumps({"guidance_scale": 3.0}))
    return folder


def test_text_to_image_command_without_guidance_uses_the_recorded_scale(tiny_text_to_image, tmp_path, capsys):
    """Regression: without --guidance, `python -m sdlearn.evaluate text-to-image` crashed with an
    UnboundLocalError (main imported a second recommended_guidance, from sdlearn.ddpm, in its ddpm
    branch, which made the name local to all of main). It must run with the model's recorded scale."""
    out = tmp_path / "report.json"
    args = ["text-to-image", "--model", str(tiny_text_to_image), "--n", "2", "--heldout", "1", "--steps", "1"]
    assert ev.main([*args, "--json", str(out)]) == 0
    assert "guidance 3)" in capsys.readouterr().out
    report = json.loads(out.read_text())
    assert report["guidance_scale"] == 3.0 and report["n"] == 2 and report["heldout"] == 1
    row = report["samplers"]["ddim"]
    assert row["train_pairs"]["colour"]["total"] == 2 and row["held_out"]["colour"]["total"] == 1
    # A model folder without a record gets the text-to-image default, 4.
    (tiny_text_to_image / "training.json").unlink()
    assert ev.main(args) == 0
    assert "guidance 4)" in capsys.readouterr().out


class RenderingPipe:
    """Stands in for a text-to-image pipeline: draws each prompt's scene with `shape` instead of the asked one."""

    def __init__(self, shape=None):
        self.shape = shape

    def text_to_image(self, prompts, steps, guidance_scale, sampler, seed, output_type, negative_prompt=None):
        from sdlearn.datasets import parse_caption, render, to_model_range

        images = []
        for prompt in prompts:
            attrs = parse_caption(prompt)
            attrs["shape"] = self.shape or attrs["shape"]
            images.append(np.asarray(render(**attrs)))
        return to_model_range(np.stack(images))


def test_unknown_word_report_counts_what_is_drawn_for_the_word():
    from sdlearn.evaluate import format_unknown_word_report, unknown_word_report

    obeys = unknown_word_report(RenderingPipe(), "star", n=12)
    assert obeys["drawn_rate"] == 1.0 and obeys["clean_drawn_rate"] == 1.0 and obeys["read_as"]["star"] == 1.0
    circles = unknown_word_report(RenderingPipe("circle"), "star", n=12)
    assert circles["drawn_rate"] == 0.0 and circles["read_as"]["circle"] == 1.0
    assert "drawn 0.0% of the time" in format_unknown_word_report(circles)
    with pytest.raises(ValueError, match="cannot read 'hexagon'"):
        unknown_word_report(RenderingPipe(), "hexagon", n=2)
