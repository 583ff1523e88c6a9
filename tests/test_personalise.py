"""The personalise recipe (sdlearn.recipes.personalise): each method runs end to end at a tiny
size, writes files that load back and change the pipeline, and bad settings are refused first.
The shipped runs' figures are compared with their READMEs in tests/test_records.py."""

import json

import pytest
import torch

from sdlearn.datasets import data_dir
from sdlearn.evaluate import concept_prompts
from sdlearn.pipeline import load_pipeline
from sdlearn.recipes.personalise import (
    CONCEPTS,
    ConceptBatches,
    PersonaliseConfig,
    load_adapter,
    main,
    personalise,
)

TINY = ["--steps", "2", "--n-images", "8", "--batch-size", "2", "--no-progress"]
PROMPT = "a large red star in the top left"


def image(pipe, prompt=PROMPT):
    return pipe.text_to_image([prompt], steps=4, guidance_scale=4.0, sampler="ddim", seed=0, output_type="tensor")


@pytest.fixture(scope="module")
def base_image():
    return image(load_pipeline(data_dir() / "mini-sd"))


@pytest.mark.parametrize("method, extra, files", [
    ("lora", [], ["pytorch_lora_weights.safetensors"]),
    ("textual-inversion", ["--concept", "star"], ["learned_embeds.safetensors", "star.safetensors"]),
    ("dreambooth", ["--prior-weight", "1", "--n-prior", "4"], ["unet"]),
    ("hypernetwork", [], ["star.pt"]),
])
def test_each_method_runs_and_its_files_change_the_pipeline(tmp_path, base_image, method, extra, files, capsys):
    out = tmp_path / method
    # a learning rate large enough that two steps visibly move the trained numbers
    assert main(["--method", method, "--out", str(out), "--lr", "0.05", *TINY, *extra]) == 0
    assert "numbers trained" in capsys.readouterr().out
    record = json.loads((out / "training.json").read_text())
    assert record["method"] == method and record["files"] == files and record["file_bytes"] > 0
    assert record["trained_parameters"] > 0 and record["seconds"]["training"] >= 0
    assert (out / "samples.png").is_file()
    pipe = load_pipeline(data_dir() / "mini-sd")
    load_adapter(pipe, out)
    prompt = PROMPT.replace("star", "<star>") if method == "textual-inversion" else PROMPT
    changed = image(pipe, prompt)
    assert (changed - base_image).abs().max() > 1e-3, f"{method}: the trained file did not change the image"


def test_textual_inversion_trains_only_the_new_row(tmp_path):
    config = PersonaliseConfig.for_method("textual-inversion", steps=2, n_images=8, batch_size=2, lr=0.05)
    before = load_pipeline(data_dir() / "mini-sd").text_encoder.text_model.embeddings.token_embedding.weight.detach().clone()
    pipe, record, _ = personalise(tmp_path / "ti", config, progress=False)
    after = pipe.text_encoder.text_model.embeddings.token_embedding.weight.detach()
    assert torch.equal(after[: len(before)], before)  # every old word untouched
    assert record["trained_parameters"] == pipe.text_encoder.config.hidden_size  # one new row
    assert record["placeholder"] == "<sun>"


def test_batches_are_reproducible_and_interleave_the_prior():
    instance = {"mean": torch.randn(5, 4, 8, 8), "std": torch.rand(5, 4, 8, 8), "prompt_row": torch.tensor([1, 2, 3, 4, 5])}
    prior = {"mean": torch.randn(3, 4, 8, 8), "std": torch.rand(3, 4, 8, 8), "prompt_row": torch.tensor([6, 7, 8])}
    contexts = torch.arange(9.0)[:, None, None].expand(9, 2, 3)
    batches = ConceptBatches(instance, prior, contexts, 0.5, batch_size=4, p_uncond=0.0, num_train_timesteps=1000, seed=0)
    first, again = batches(7), batches(7)
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    z0, t, eps, context, is_prior = first
    assert z0.shape == (8, 4, 8, 8) and is_prior.tolist() == [False, True] * 4
    assert (context[~is_prior][:, 0, 0] <= 5).all() and (context[is_prior][:, 0, 0] >= 6).all()
    assert not torch.equal(batches(8)[0], z0)


def test_concept_prompts_name_the_concept():
    prompts, requested = concept_prompts(CONCEPTS["star"], 12, sizes=("large",))
    assert all(" star" in p and r["size"] == "large" and r["shape"] == "star" for p, r in zip(prompts, requested))
    assert len({r["colour"] for r in requested}) > 3 and len({r["position"] for r in requested}) > 3
    placeholders, _ = concept_prompts(CONCEPTS["star"], 12, sizes=("large",), placeholder=True)
    assert placeholders[0] == prompts[0].replace("star", "<star>")
    suns, wanted = concept_prompts(CONCEPTS["sun"], 5, placeholder=True)
    assert all(p.startswith("a <sun>") for p in suns) and {w["colour"] for w in wanted} == {"yellow"}


def test_bad_settings_are_refused_before_training(tmp_path, capsys):
    assert main(["--method", "textual-inversion", "--prior-weight", "1", "--out", str(tmp_path / "a"), *TINY]) == 2
    assert "Prior preservation protects UNet weights" in capsys.readouterr().err
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "training.json").write_text("{}")
    assert main(["--method", "lora", "--out", str(tmp_path / "b"), *TINY]) == 2
    assert "--overwrite" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--method", "full-finetune", "--out", str(tmp_path / "c")])
    with pytest.raises(FileNotFoundError, match="written by python -m sdlearn.recipes.personalise"):
        load_adapter(load_pipeline(data_dir() / "mini-sd"), tmp_path / "nothing-here")


def test_your_own_images_folder(tmp_path, capsys):
    from PIL import Image

    from sdlearn.datasets import render

    folder = tmp_path / "my-subject"
    folder.mkdir()
    for i, colour in enumerate(("red", "blue", "green")):  # pictures of any size and shape: centre-cropped and resized
        render(colour, "star", "large", "center").resize((96, 80)).save(folder / f"{i}.png")
    (folder / "notes.txt").write_text("not an image")
    assert main(["--method", "lora", "--images", str(folder), "--prompt", "a photo of sks", "--class-prompt", "a circle",
                 "--prior-weight", "1", "--n-prior", "2", "--out", str(tmp_path / "out"), "--sample-steps", "2", *TINY]) == 0
    record = json.loads((tmp_path / "out" / "training.json").read_text())
    assert record["concept"] is None and record["images"] == {"folder": str(folder), "count": 3}
    assert record["config"]["prompt"] == "a photo of sks" and "n_images" not in record["config"]
    from sdlearn import evaluate  # the referee grades the renderer's concepts only, not your pictures

    assert evaluate.main(["concept", "--adapter", str(tmp_path / "out")]) == 2
    assert "images of your own" in capsys.readouterr().err
    pipe = load_pipeline(data_dir() / "mini-sd")
    load_adapter(pipe, tmp_path / "out")  # loads like any other run


@pytest.mark.parametrize("args, message", [
    (["--method", "lora", "--images", "{tmp}"], "--images needs --prompt"),
    (["--method", "lora", "--images", "{tmp}/missing", "--prompt", "x"], "no such folder"),
    (["--method", "lora", "--images", "{tmp}", "--prompt", "x"], "holds no"),
    (["--method", "dreambooth", "--images", "{tmp}", "--prompt", "x", "--prior-weight", "1"], "needs --class-prompt"),
    (["--method", "textual-inversion", "--images", "{tmp}", "--prompt", "a photo"], "needs --placeholder"),
    (["--method", "textual-inversion", "--images", "{tmp}", "--prompt", "a <x>", "--placeholder", "<x>"], "needs --initializer"),
    (["--method", "lora", "--prompt", "a photo"], "only apply to your own images"),
    (["--method", "lora", "--targets", "to_nothing"], "no linear layer of this UNet"),
])
def test_your_own_images_bad_settings(tmp_path, capsys, args, message):
    args = [a.replace("{tmp}", str(tmp_path / "empty")) for a in args]
    (tmp_path / "empty").mkdir()
    assert main([*args, "--out", str(tmp_path / "out"), *TINY]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
