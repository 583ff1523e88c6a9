"""The personalise recipe (sdlearn.recipes.personalise): batches, prompts, your own image folders,
two processes, and bad settings refused first. Each method's make target runs end to end (and its
files load back and change the image) in tests/test_commands.py; the shipped runs' figures are
compared with their READMEs in tests/test_records.py."""

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

TINY = ["--steps", "2", "--n-images", "8", "--batch-size", "2", "--sample-steps", "2", "--no-progress"]


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
                 "--prior-weight", "1", "--n-prior", "2", "--out", str(tmp_path / "out"), *TINY]) == 0
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
    (["--method", "lora", "--images", "{tmp}", "--prompt", "x"], "or train without it: --prior-weight 0"),
    (["--method", "lora", "--images", "{tmp}/missing", "--prompt", "x", "--prior-weight", "0"], "no such folder"),
    (["--method", "lora", "--images", "{tmp}", "--prompt", "x", "--prior-weight", "0"], "holds no"),
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


def test_two_processes_train_and_only_the_first_writes(tmp_path):
    """The recipe as `accelerate launch` / torch.distributed.run starts it: 2 CPU processes (gloo)."""
    import os
    import subprocess
    import sys

    from tests.test_accelerate import ROOT, free_port

    out = tmp_path / "two"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
               "--master_port", str(free_port()), "-m", "sdlearn.recipes.personalise", "--method", "lora", "--out", str(out),
               "--prior-weight", "1", "--n-prior", "4", *TINY]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    record = json.loads((out / "training.json").read_text())
    assert record["processes"] == 2 and record["device"] == "cpu"
    assert done.stdout.count("numbers trained") == 1  # one process reports and writes
    load_adapter(load_pipeline(data_dir() / "mini-sd"), out)


def test_an_interrupted_run_resumes_to_the_same_weights(tmp_path, monkeypatch):
    from safetensors.torch import load_file

    from sdlearn.lora import WEIGHT_NAME

    config = PersonaliseConfig.for_method("lora", steps=4, n_images=8, batch_size=2, n_prior=2, sample_steps=2, lr=0.05)
    personalise(tmp_path / "whole", config, progress=False)
    draw = ConceptBatches.__call__

    def stopped_at_step_3(self, step):
        if step == 3:
            raise KeyboardInterrupt  # Ctrl-C after the checkpoint of step 2
        return draw(self, step)

    monkeypatch.setattr(ConceptBatches, "__call__", stopped_at_step_3)
    with pytest.raises(KeyboardInterrupt):
        personalise(tmp_path / "cut", config, progress=False, checkpoint_every=2)
    monkeypatch.setattr(ConceptBatches, "__call__", draw)
    assert (tmp_path / "cut-work" / "state").is_dir() and not (tmp_path / "cut").exists()
    with pytest.raises(FileExistsError, match="pass --resume"):
        personalise(tmp_path / "cut", config, progress=False, checkpoint_every=2)
    _, record, _ = personalise(tmp_path / "cut", config, progress=False, checkpoint_every=2, resume=True)
    assert record["resumed"] and not (tmp_path / "cut-work").exists()
    whole, cut = load_file(tmp_path / "whole" / WEIGHT_NAME), load_file(tmp_path / "cut" / WEIGHT_NAME)
    assert whole.keys() == cut.keys()
    assert max((whole[k] - cut[k]).abs().max().item() for k in whole) <= 1e-6
    with pytest.raises(FileNotFoundError, match="holds no saved run"):
        personalise(tmp_path / "again", config, progress=False, resume=True)
