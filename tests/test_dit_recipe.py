"""sdlearn.recipes.dit at a seconds-long size: classes, data, both objectives, the folder and its refusals."""

import json

import pytest
import torch

from sdlearn.datasets import COLOUR_NAMES, HELD_OUT, SHAPES
from sdlearn.pipeline.dit import DiTPipeline
from sdlearn.recipes.dit import CLASS_NAMES, DiTRecipeConfig, LatentBatches, class_id, main, precompute, train_dit
from sdlearn.vae import load_tiny_vae


def test_class_names_are_colour_times_four_plus_shape():
    assert len(CLASS_NAMES) == len(COLOUR_NAMES) * len(SHAPES) == 32
    assert CLASS_NAMES[0] == "red circle" and CLASS_NAMES[31] == "pink cross"
    for colour in COLOUR_NAMES:
        for shape in SHAPES:
            assert CLASS_NAMES[class_id(colour, shape)] == f"{colour} {shape}"


def test_precompute_labels_match_the_images_and_include_the_held_out_pairs():
    latents = precompute(load_tiny_vae(), 256)
    assert latents["mean"].shape == latents["std"].shape == (256, 4, 8, 8)
    seen = {CLASS_NAMES[i] for i in latents["labels"].tolist()}
    assert any(f"{c} {s}" in seen for c, s in HELD_OUT)  # class-conditional: all 32 pairs are trained on


def test_batches_drop_labels_to_the_null_class_and_repeat_per_step():
    config = DiTRecipeConfig.smoke(batch_size=512, p_uncond=0.1)
    latents = {"mean": torch.zeros(8, 4, 8, 8), "std": torch.ones(8, 4, 8, 8), "labels": torch.arange(8)}
    for objective in ("eps", "flow"):
        data = LatentBatches(latents, 1.0, config, objective, 1000)
        z0, t, noise, labels = data(3)
        assert torch.equal(data(3)[0], z0) and 0.05 < (labels == 1000).float().mean() < 0.15
        assert (t.dtype == torch.long) == (objective == "eps")


@pytest.mark.parametrize("objective", ["eps", "flow"])
def test_smoke_run_writes_a_dit_pipeline_and_refuses_to_overwrite(tmp_path, objective):
    out = tmp_path / objective
    record = train_dit(out, DiTRecipeConfig.smoke(steps=3), objective, progress=False)
    assert record["objective"] == objective and record["steps"] == 3 and record["loss"]["first_100"] > 0
    assert json.loads((out / "training.json").read_text())["config"]["steps"] == 3
    assert not (tmp_path / f"{objective}-work").exists()
    pipe = DiTPipeline.from_pretrained(out)
    assert pipe.is_flow == (objective == "flow") and pipe.transformer.config.null_class == 1000
    assert len(pipe.generate(["red circle", "blue cross"], steps=2, seed=0)) == 2
    with pytest.raises(FileExistsError, match="overwrite"):
        train_dit(out, DiTRecipeConfig.smoke(steps=3), objective, progress=False)
    assert main(["--out", str(out), "--steps", "2", "--layers", "1", "--head-dim", "8", "--batch-size", "4",
                 "--train-images", "32", "--objective", objective, "--no-progress"]) == 1
    assert main(["--out", str(out), "--steps", "2", "--layers", "1", "--head-dim", "8", "--batch-size", "4",
                 "--train-images", "32", "--objective", objective, "--no-progress", "--overwrite"]) == 0
    assert json.loads((out / "training.json").read_text())["steps"] == 2
