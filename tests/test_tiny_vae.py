"""The shipped tiny AutoencoderKL (data/tiny-vae) and the recipe that trains it."""

import json
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKL as DiffusersAutoencoderKL

from sdlearn import referee
from sdlearn.autoencoder import psnr
from sdlearn.datasets import Shapes
from sdlearn.recipes import tiny_vae
from sdlearn.train import train
from sdlearn.vae import AutoencoderKL

SHIPPED = Path(__file__).resolve().parent.parent / "data" / "tiny-vae"


@pytest.fixture(scope="module")
def shipped():
    return AutoencoderKL.from_pretrained(SHIPPED).eval()


@pytest.fixture(scope="module")
def heldout():
    return Shapes(200, seed=0, split="test").tensors()  # only the four held-out (colour, shape) pairs


def test_shipped_folder_is_small_and_f8_with_4_channels(shipped):
    files = {p.name for p in SHIPPED.iterdir()}
    assert {"config.json", "diffusion_pytorch_model.safetensors", "training.json"} <= files
    assert tiny_vae.STATE_NAME not in files
    assert sum(p.stat().st_size for p in SHIPPED.iterdir()) < 5 * 2**20
    assert shipped.config.downscale_factor == 8 and shipped.config.latent_channels == 4
    with torch.no_grad():
        z = shipped.encode(torch.zeros(1, 3, 64, 64)).mean
    assert z.shape == (1, 4, 8, 8)


def test_shipped_reconstructs_heldout_shapes_at_30_db(shipped, heldout):
    score = psnr(tiny_vae.reconstruct(shipped, heldout), heldout).item()
    assert score >= 30.0, f"held-out PSNR {score:.2f} dB"
    recorded = json.loads((SHIPPED / "training.json").read_text())["heldout_psnr_db"]
    assert abs(score - recorded) < 0.05  # the number in training.json is the one measured here


def test_shipped_decoder_keeps_the_shape_readable(shipped):
    """The referee reads all four attributes of nearly every reconstruction, held-out pairs included."""
    scores = tiny_vae.referee_on_reconstructions(shipped, n=64)
    for split, row in scores.items():
        assert row["all"] >= 0.9, (split, row)
    recorded = json.loads((SHIPPED / "training.json").read_text())["referee_on_reconstructions"]
    assert recorded["held_out"]["all"] >= 0.9


def test_shipped_reconstructs_the_wider_world_at_30_db(shipped):
    """Stars, diamonds, hexagons, rings, the extra colours and multi-shape scenes, none of which
    mini-SD is taught, come back at >= 30 dB, as recorded (wider_world_psnr_db in training.json)."""
    measured = tiny_vae.wider_world_psnr(shipped, n=200)
    recorded = json.loads((SHIPPED / "training.json").read_text())
    assert recorded["world"] == "wide" and set(measured) == set(recorded["wider_world_psnr_db"])
    assert set(measured) == {"star", "diamond", "hexagon", "ring", "new_colours", "scenes"}
    for name, value in measured.items():  # the numbers in training.json are the ones measured here
        assert abs(value - recorded["wider_world_psnr_db"][name]) < 0.05, name
    assert min(measured.values()) >= 30.0, measured
    # The referee reads a reconstructed star as a star (lesson 12 builds on that).
    stars = Shapes(64, seed=9, split="all", shapes=("star",)).tensors()
    read = referee.classify(tiny_vae.reconstruct(shipped, stars)).names()
    assert sum(r["shape"] == "star" for r in read) >= 0.95 * len(read)


def test_the_recipe_trains_on_half_shapes_half_scenes():
    datasets = tiny_vae.training_data("wide", 32, seed=0)
    assert [type(d).__name__ for d in datasets] == ["Shapes", "Scenes"]
    batch = tiny_vae.ShapesBatches(datasets, 5, seed=0)(0)
    shapes, scenes = ({x.numpy().tobytes() for x in d.tensors()} for d in datasets)
    assert batch.shape == (5, 3, 64, 64)
    assert [x.numpy().tobytes() in shapes for x in batch] == [True] * 3 + [False] * 2  # the first share takes the remainder
    assert all(x.numpy().tobytes() in scenes for x in batch[3:])
    assert torch.equal(batch, tiny_vae.ShapesBatches(datasets, 5, seed=0)(0))  # deterministic in (seed, step)
    assert len(tiny_vae.training_data("shapes", 32, seed=0)) == 1
    with pytest.raises(ValueError, match="world must be one of"):
        tiny_vae.training_data("photos", 32, seed=0)


def test_edges_mark_the_outline_and_the_loss_weights_it():
    x = torch.ones(1, 3, 8, 8)
    x[..., 2:6, 2:6] = -1.0  # a black square on white
    e = tiny_vae.edges(x)
    assert e.shape == (1, 1, 8, 8)
    assert e[0, 0, 0, 0] == 0 and e[0, 0, 3, 3] == 0  # flat background, flat interior
    assert e[0, 0, 2, 2] == 1 and e[0, 0, 1, 3] == 1  # both sides of the outline
    torch.manual_seed(0)
    model = AutoencoderKL.from_config(tiny_vae.recipe_config()).eval()
    x64 = Shapes(4, seed=0).tensors()
    torch.manual_seed(1)
    uniform = tiny_vae.AutoencoderLoss()(model, x64)
    torch.manual_seed(1)
    weighted = tiny_vae.AutoencoderLoss(ink_weight=3.0, edge_weight=10.0)(model, x64)
    assert weighted > uniform  # same sample, extra weight on the shape's pixels


def test_shipped_scaling_factor_is_one_over_latent_std(shipped):
    dataset = Shapes(512, seed=0, split="train")
    images = torch.stack([dataset[i]["image"] for i in range(512)])
    measured = tiny_vae.measure_scaling_factor(shipped, images, seed=0)
    assert shipped.config.scaling_factor != 1.0  # the tiny preset's placeholder was replaced
    assert measured == pytest.approx(shipped.config.scaling_factor, rel=1e-3)
    with torch.no_grad():
        z = shipped.encode(images[:256]).sample(torch.Generator().manual_seed(1))
    assert (shipped.config.scaling_factor * z).std().item() == pytest.approx(1.0, abs=0.05)


def test_diffusers_loads_the_shipped_folder_and_agrees(shipped, heldout):
    reference = DiffusersAutoencoderKL.from_pretrained(SHIPPED).eval()
    assert reference.config.scaling_factor == shipped.config.scaling_factor
    x = heldout[:8]
    with torch.no_grad():
        mean_ours, mean_ref = shipped.encode(x).mean, reference.encode(x).latent_dist.mean
        decoded_ours, decoded_ref = shipped.decode(mean_ours), reference.decode(mean_ours).sample
    assert (mean_ours - mean_ref).abs().max().item() <= 1e-4
    assert (decoded_ours - decoded_ref).abs().max().item() <= 1e-4


# ------------------------------------------------------------------------------------------
# The recipe: a few steps into a temporary folder
# ------------------------------------------------------------------------------------------

SMOKE = ["--steps", "3", "--batch-size", "2", "--train-images", "16", "--scaling-images", "16",
         "--eval-images", "4", "--threads", "1", "--no-progress"]


def test_recipe_smoke_run_then_refuses_to_overwrite(tmp_path, capsys):
    out = tmp_path / "vae"
    assert tiny_vae.main(["--out", str(out), *SMOKE]) == 0
    assert "held-out PSNR" in capsys.readouterr().out
    assert {p.name for p in out.iterdir()} == {"config.json", "diffusion_pytorch_model.safetensors", "training.json"}
    summary = json.loads((out / "training.json").read_text())
    config = json.loads((out / "config.json").read_text())
    assert summary["steps"] == 3 and config["scaling_factor"] == summary["scaling_factor"] != 1.0
    DiffusersAutoencoderKL.from_pretrained(out)  # a diffusers folder

    weights = (out / "diffusion_pytorch_model.safetensors").read_bytes()
    assert tiny_vae.main(["--out", str(out), *SMOKE]) == 1
    assert "--overwrite" in capsys.readouterr().err
    assert (out / "diffusion_pytorch_model.safetensors").read_bytes() == weights  # untouched

    assert tiny_vae.main(["--out", str(out), *SMOKE, "--seed", "1", "--overwrite"]) == 0
    assert (out / "diffusion_pytorch_model.safetensors").read_bytes() != weights
    assert json.loads((out / "training.json").read_text())["seed"] == 1


def test_recipe_resumes_an_interrupted_run(tmp_path, capsys):
    out = tmp_path / "vae"
    assert tiny_vae.main(["--out", str(out), "--resume", *SMOKE]) == 1
    assert "Cannot resume" in capsys.readouterr().err
    # An interrupted run: the training state after 2 of 4 steps, as the recipe's checkpoint leaves it.
    torch.manual_seed(0)
    model = AutoencoderKL.from_config(tiny_vae.recipe_config())
    tiny_vae.start_small_sigma(model, tiny_vae.LOGVAR_INIT)
    data = tiny_vae.ShapesBatches(tiny_vae.training_data("wide", 16, seed=0), 2, seed=0)
    train(model, tiny_vae.AutoencoderLoss(), data, steps=2, checkpoint=out / tiny_vae.STATE_NAME, progress=False)
    smoke = [a if a != "3" else "4" for a in SMOKE]  # --steps 4
    assert tiny_vae.main(["--out", str(out), "--resume", *smoke]) == 0
    summary = json.loads((out / "training.json").read_text())
    assert summary["resumed"] and summary["steps"] == 4
    assert not (out / tiny_vae.STATE_NAME).exists()
