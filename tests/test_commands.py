"""Every command a reader is told to run works end to end, at a tiny size, into a temporary folder.

- each `make train-*` target, run by make itself (with the test's Python, PY=..., and the
  install step skipped, INSTALL=), including the evaluation it runs after training;
- each `python -m sdlearn.evaluate` subcommand and each `sdlearn` CLI command: the make
  targets run `evaluate ddpm` and `evaluate text-to-image`; the others are run by the tests
  named in COVERED, which test_every_command_is_covered checks exist;
- `python -m sdlearn.bench unet --json` (what `make bench` runs), at a toy size.
"""

import json
import os
import re
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
MAKE = shutil.which("make")

# Tiny overrides per target: STEPS for the recipe, SAMPLES (and HELDOUT) for the evaluation after it,
# ARGS for more recipe options, EVAL_ARGS for the evaluation's.
TINY = {
    "train-clip": {"STEPS": "3", "ARGS": "--batch-size 8 --n-images 32"},
    "train-tiny-vae": {"STEPS": "3", "ARGS": "--batch-size 2 --train-images 16 --scaling-images 16 --eval-images 4 --no-progress"},
    "train-classifier": {"STEPS": "3", "SAMPLES": "2", "ARGS": "--batch-size 8 --train-images 64 --eval-images 16"},
    "train-ddpm": {"STEPS": "3", "SAMPLES": "2", "EVAL_ARGS": "--steps 2",
                   "ARGS": "--batch-size 4 --train-images 32 --channels 8 8 8 --eval-samples 0 --no-progress"},
    "train-mini-sd": {"STEPS": "2", "SAMPLES": "2", "HELDOUT": "1", "EVAL_ARGS": "--steps 2", "ARGS": "--smoke --no-progress"},
}
DIT_TINY = {"STEPS": "2", "SAMPLES": "2", "EVAL_ARGS": "--steps 2", "ARGS": "--layers 1 --head-dim 8 --batch-size 4 --train-images 32 --no-progress"}
TINY["train-dit-shapes"] = DIT_TINY
TINY["train-dit-flow"] = DIT_TINY
# Lesson 12's runs: a learning rate large enough that two steps visibly change the image.
PERSONALISE_ARGS = "--n-images 8 --batch-size 2 --n-prior 2 --sample-steps 2 --lr 0.05 --no-progress"
for _target in ("train-lora-star", "train-ti-sun", "train-ti-star", "train-hypernetwork-star", "train-dreambooth-star"):
    TINY[_target] = {"STEPS": "2", "ARGS": PERSONALISE_ARGS, "EVAL_ARGS": "--n 2 --small 1 --original 2 --steps 2"}

# Commands run elsewhere in the suite, and the test that runs each.
COVERED = {
    ("evaluate", "classifier"): "tests/test_commands.py::test_make_target[train-classifier]",
    ("evaluate", "ddpm"): "tests/test_commands.py::test_make_target[train-ddpm]",
    ("evaluate", "text-to-image"): "tests/test_commands.py::test_make_target[train-mini-sd]",
    ("evaluate", "concept"): "tests/test_commands.py::test_make_target[train-lora-star]",
    ("evaluate", "dit"): "tests/test_commands.py::test_make_target[train-dit-shapes]",
    ("sdlearn", "generate"): "tests/test_cli.py::test_python_dash_m_sdlearn",
}


def makefile_targets(prefix: str = "train-") -> list:
    """The targets of the Makefile whose names start with prefix, in order."""
    names = re.findall(rf"^({prefix}[\w-]+):", (REPO / "Makefile").read_text(), flags=re.M)
    return list(dict.fromkeys(names))


def run_make(target: str, out: Path, **overrides) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
    env.pop("MAKEFLAGS", None)
    variables = [f"{k}={v}" for k, v in {"PY": sys.executable, "INSTALL": "", "OUT": str(out), **overrides}.items()]
    return subprocess.run([MAKE, "--no-print-directory", "-C", str(REPO), target, *variables], env=env,
                          capture_output=True, text=True, timeout=600)


def check_output(target: str, out: Path, stdout: str) -> None:
    """What each target must leave behind, read back as a reader would."""
    if target == "train-clip":
        from sdlearn.models.clip import TinyCLIP

        record = json.loads((out / "training.json").read_text())
        assert record["settings"]["steps"] == 3 and record["settings"]["batch_size"] == 8
        assert set(record["caption_accuracy"]) == {"train", "test"} and record["train_seconds"] >= 0
        assert record["final_loss_mean_of_100"] > 0 and record["cpu"]
        assert TinyCLIP.from_pretrained(out).settings["image_size"] == 32
        assert "right caption among 32" in stdout
    elif target == "train-tiny-vae":
        from sdlearn.vae import AutoencoderKL

        assert json.loads((out / "training.json").read_text())["steps"] == 3
        assert AutoencoderKL.from_pretrained(out).config.latent_channels == 4
    elif target == "train-classifier":
        from sdlearn.referee import load_classifier

        assert json.loads((out / "training.json").read_text())["settings"]["steps"] == 3
        load_classifier(out)
        report = json.loads((out / "evaluation.json").read_text())
        assert report["n"] == 2 and f"--classifier {out}" in report["command"] and set(report["sizes"]) == {"64px", "32px"}
        for row in report["sizes"].values():
            assert 0 <= row["clean_rate"] <= 1 and set(row["accuracy"]) == {"colour", "shape", "size", "position"}
        assert "clean-shape rate" in stdout
    elif target == "train-ddpm":
        record = json.loads((out / "training.json").read_text())
        assert record["settings"]["steps"] == 3
        report = json.loads((out / "evaluation.json").read_text())
        assert report["samples"] == 2 and f"--model {out}" in report["command"]
        from sdlearn.ddpm import SAMPLER_NAMES

        assert [(row["sampler"], row["steps"]) for row in report["results"]] == [(name, 2) for name in SAMPLER_NAMES]
        for row in report["results"]:
            assert 0 <= row["asked_rate"] <= row["clean_rate"] <= 1
            assert set(row["judges_agree"]) == {"colour", "shape", "size", "position", "all"}
        assert "render-matching judge" in stdout
    elif target == "train-mini-sd":
        record = json.loads((out / "training.json").read_text())
        assert record["config"]["steps"] == 2
        # Stages 1 and 2 reused trained models: the record names them, not settings they never used.
        assert record["stages"] == {"autoencoder": "reused, frozen: data/tiny-vae", "text encoder": "reused, frozen: data/clip-shapes"}
        assert not {"vae_steps", "clip_steps", "clip_batch_size", "clip_lr"} & set(record["config"])
        report = json.loads((out / "evaluation.json").read_text())
        assert report["n"] == 2 and report["heldout"] == 1 and report["guidance_scale"] == record["guidance_scale"]
        assert set(report["samplers"]) == {"ddim", "euler", "dpmpp_2m"}
        for row in report["samplers"].values():
            assert row["train_pairs_clean_and_asked"]["total"] == 2 and row["held_out_clean_and_asked"]["total"] == 1
            assert row["train_pairs_clean_and_asked"]["accuracy"] <= row["train_pairs"]["all"]["accuracy"]
            assert 0 <= row["judges_agree"]["all"] <= 1
        assert "clean+asked" in stdout and "render-matching judge" in stdout
    elif target in ("train-lora-star", "train-ti-sun", "train-ti-star", "train-hypernetwork-star"):
        check_personalise_run(out, {"train-lora-star": "lora", "train-hypernetwork-star": "hypernetwork"}.get(target, "textual-inversion"))
    elif target == "train-dreambooth-star":
        for variant in ("with-prior", "without-prior"):
            check_personalise_run(out / variant, "dreambooth")
    elif target in ("train-dit-shapes", "train-dit-flow"):
        check_dit_run(out, "eps" if target == "train-dit-shapes" else "flow", stdout)
    else:
        pytest.fail(f"no check written for {target}: add one to check_output and TINY")


def check_dit_run(out: Path, objective: str, stdout: str) -> None:
    """A lesson-14 run: a DiTPipeline folder both sdlearn and diffusers open, its record and its evaluation."""
    from diffusers import DiTPipeline as DiffusersDiTPipeline

    from sdlearn.pipeline.dit import DiTPipeline

    record = json.loads((out / "training.json").read_text())
    assert record["objective"] == objective and record["steps"] == 2 and record["cpu"] and record["loss"]["last_100"] > 0
    pipe = DiTPipeline.from_pretrained(out)
    assert pipe.get_label_ids(["red circle", "pink cross"]) == [0, 31] and pipe.is_flow == (objective == "flow")
    theirs = DiffusersDiTPipeline.from_pretrained(out)
    assert theirs.get_label_ids(["red circle", "pink cross"]) == [0, 31]
    report = json.loads((out / "evaluation.json").read_text())
    assert report["n"] == 2 and f"--model {out}" in report["command"] and [row["steps"] for row in report["results"]] == [2]
    assert all(0 <= row["both"] <= min(row["colour"], row["shape"]) for row in report["results"])
    assert "colour" in stdout and "shape" in stdout


def check_personalise_run(out: Path, method: str) -> None:
    """A lesson-12 run: its record, its evaluation, and files that load back and change mini-SD's image."""
    from sdlearn.datasets import data_dir
    from sdlearn.pipeline import load_pipeline
    from sdlearn.recipes.personalise import load_adapter

    record = json.loads((out / "training.json").read_text())
    assert record["method"] == method and record["config"]["steps"] == 2 and record["trained_parameters"] > 0
    assert record["file_bytes"] > 0 and (out / "samples.png").is_file()
    report = json.loads((out / "evaluation.json").read_text())
    assert report["n"] == 2 and report["original"] == 2 and f"--adapter {out}" in report["command"]
    assert report["method"] == method and set(report["adapted"]) == {"concept", "original"}
    assert report["base"]["original"]["faithfulness"]["all"]["total"] == 2
    placeholder = record["placeholder"]
    prompt = f"a {placeholder} in the top left" if placeholder else "a large red star in the top left"
    draw = lambda pipe, p: pipe.text_to_image([p], steps=3, guidance_scale=4.0, sampler="ddim", seed=0, output_type="tensor")  # noqa: E731
    base = draw(load_pipeline(data_dir() / "mini-sd"), prompt.replace(placeholder, "circle") if placeholder else prompt)
    pipe = load_pipeline(data_dir() / "mini-sd")
    load_adapter(pipe, out)
    assert (draw(pipe, prompt) - base).abs().max() > 1e-3, f"{method}: the trained file does not change the image"


@pytest.mark.skipif(MAKE is None, reason="needs make")
@pytest.mark.parametrize("target", makefile_targets())
def test_make_target(target, tmp_path):
    """`make <target>` with tiny overrides trains, saves and (train-ddpm, train-mini-sd) evaluates into tmp_path."""
    assert target in TINY, f"{target} is in the Makefile but has no tiny overrides here"
    out = tmp_path / target.removeprefix("train-")
    result = run_make(target, out, **TINY[target])
    assert result.returncode == 0, f"make {target} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    assert str(out) in result.stdout  # make echoed commands that write into OUT, not into data/
    check_output(target, out, result.stdout)


@pytest.mark.skipif(MAKE is None, reason="needs make")
def test_make_targets_default_to_the_shipped_runs():
    """Without overrides each target writes the shipped folder with the shipped size (make -n prints, runs nothing)."""
    result = subprocess.run([MAKE, "-n", "--no-print-directory", "-C", str(REPO), *makefile_targets(), "bench", "INSTALL=",
                             "PY=python"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    lines = result.stdout
    assert "sdlearn.recipes.clip train-tiny data/clip-shapes --steps 3000 --batch-size 128" in lines
    assert "sdlearn.recipes.tiny_vae --out data/tiny-vae --steps 3000" in lines
    assert "sdlearn.recipes.classifier --out data/shapes-classifier --steps 3000" in lines
    assert "sdlearn.evaluate classifier --classifier data/shapes-classifier --n 500 --json data/shapes-classifier/evaluation.json" in lines
    assert "sdlearn.recipes.ddpm --out data/ddpm-shapes --steps 4300" in lines
    assert "sdlearn.evaluate ddpm --model data/ddpm-shapes --samples 200" in lines
    assert "sdlearn.recipes.mini_sd --out data/mini-sd --text-encoder data/clip-shapes --steps 4600" in lines
    assert ("sdlearn.evaluate text-to-image --model data/mini-sd --samplers ddim euler dpmpp_2m --n 200 --heldout 100"
            in lines)
    assert "sdlearn.bench unet --repeats 31 --count-ops --json data/bench/unet-cpu.json" in lines
    for method, concept, out, steps in (("lora", "star", "data/lora-star", 1500), ("textual-inversion", "sun", "data/ti-sun", 800),
                                        ("textual-inversion", "star", "data/ti-star", 800),
                                        ("hypernetwork", "star", "data/hypernetwork-star", 800)):
        assert f"sdlearn.recipes.personalise --method {method} --concept {concept} --out {out} --steps {steps}" in lines
        assert f"sdlearn.evaluate --threads 1 concept --adapter {out}  --json {out}/evaluation.json" in lines
    assert "sdlearn.recipes.dit --out data/dit-shapes --objective eps --steps 4000 --threads 1" in lines
    assert "sdlearn.recipes.dit --out data/dit-flow-shapes --objective flow --steps 4000 --threads 1" in lines
    for out in ("data/dit-shapes", "data/dit-flow-shapes"):
        assert f"sdlearn.evaluate --threads 1 dit --model {out} --n 200  --json {out}/evaluation.json" in lines
    for variant, weight in (("with-prior", 1), ("without-prior", 0)):
        assert (f"sdlearn.recipes.personalise --method dreambooth --concept star --prior-weight {weight} "
                f"--out data/dreambooth-star/{variant} --steps 400") in lines


def test_every_command_is_covered(capsys):
    """Every evaluate subcommand and CLI command is run by a test: here (make) or one named in COVERED."""
    from sdlearn import cli, evaluate

    with pytest.raises(SystemExit):
        evaluate.main(["--help"])
    listed = re.search(r"\{([\w,-]+)\}", capsys.readouterr().out).group(1).split(",")
    commands = {("evaluate", name) for name in listed}
    commands |= {("sdlearn", name) for name in cli.build_parser()._subparsers._group_actions[0].choices}
    assert commands == set(COVERED), "a command was added or removed: run it in a test and name the test in COVERED"
    for node in COVERED.values():
        path, name = node.split("::")
        function = name.split("[")[0]
        assert re.search(rf"^def {function}\(", (REPO / path).read_text(), flags=re.M), node
        if "[" in name:
            assert name.split("[")[1].rstrip("]") in makefile_targets()


def test_bench_writes_its_record(tmp_path, capsys):
    """`python -m sdlearn.bench unet ... --json` (make bench) records every number its line prints."""
    from sdlearn import bench

    out = tmp_path / "bench" / "unet.json"
    assert bench.main(["unet", "--config", "tiny", "--size", "8", "--repeats", "2", "--warmup", "0", "--cpu-only",
                       "--count-ops", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    record = json.loads(out.read_text())
    assert record["command"].startswith("python -m sdlearn.bench unet --config tiny") and record["cpu"]
    (row,) = record["results"]
    assert row["calls"] == 2 == len(row["sdlearn_calls_ms"]) == len(row["diffusers_calls_ms"])
    assert row["max_abs_diff"] == 0.0 and row["operator_calls"]["sdlearn"] > 0
    assert abs(row["ratio"] - row["sdlearn_ms"] / row["diffusers_ms"]) < 2e-3
    assert abs(row["sdlearn_ms"] - statistics.median(row["sdlearn_calls_ms"])) < 2e-3
    assert row["fastest_ratio"] == round(min(row["sdlearn_calls_ms"]) / min(row["diffusers_calls_ms"]), 3) or abs(
        row["fastest_ratio"] - min(row["sdlearn_calls_ms"]) / min(row["diffusers_calls_ms"])) < 2e-3
    assert f"ratio {row['ratio']:.3f}" in printed and f"sdlearn {row['operator_calls']['sdlearn']}," in printed
