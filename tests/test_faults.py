"""Fault injection: bad input, corrupted files and concurrent use give a clear error before any work,
never a silent wrong answer, a traceback or a changed file.

Each case asserts the error text and that nothing on disk changed (a snapshot of the files
involved, bytes and modes, before and after). Commands are run through their main() and through
`python -m` (runpy, the same code path as the shell); stderr must be one line without
"Traceback". Saving faults (killed and failing saves) are in tests/test_saving.py, generation
guards in tests/test_guards.py.
"""

import hashlib
import json
import runpy
import shutil
import struct
import subprocess
import sys
import threading
import warnings
from pathlib import Path

import pytest
import torch
from test_cli import PROMPT, tiny_shapes_pipeline

from sdlearn.models.attention import Attention, Transformer2DModel, record_attention
from sdlearn.models.checkpoint import CheckpointError
from sdlearn.models.clip import CLIPTextConfig, CLIPTextModel, CLIPTokenizer
from sdlearn.models.unet import UNet, UNetConfig
from sdlearn.models.vae import AutoencoderKL, VAEConfig
from sdlearn.pipeline.loading import load_pipeline

REPO = Path(__file__).resolve().parents[1]


def snapshot(*roots: Path) -> dict:
    """{path: (sha256, mode)} of every file under roots (a root that is missing maps to None)."""
    files = {}
    for root in roots:
        root = Path(root)
        if not root.exists():
            files[str(root)] = None
            continue
        for path in sorted([root] if root.is_file() else root.rglob("*")):
            if path.is_file():
                files[str(path)] = (hashlib.sha256(path.read_bytes()).hexdigest(), path.stat().st_mode)
    return files


def one_line_error(stderr: str, *fragments: str) -> str:
    """The single line of stderr, checked to hold every fragment and no traceback."""
    assert "Traceback" not in stderr, stderr
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, stderr
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


@pytest.fixture(scope="module")
def pipe():
    return tiny_shapes_pipeline()


@pytest.fixture(scope="module")
def model(pipe, tmp_path_factory) -> Path:
    return pipe.save_pretrained(tmp_path_factory.mktemp("faults") / "tiny-sd")


# ------------------------------------------------------------------------------------------
# Config files: wrong types and wrong classes
# ------------------------------------------------------------------------------------------

PART_CLASSES = {"unet": UNet, "vae": AutoencoderKL, "text_encoder": CLIPTextModel}
CONFIG_FAULTS = [
    ("unet", "block_out_channels", 64, "'block_out_channels' must be a list, got 64"),
    ("unet", "in_channels", "4", "'in_channels' must be an integer, got \"4\""),
    ("unet", "norm_num_groups", 32.0, "'norm_num_groups' must be an integer, got 32.0"),
    ("unet", "block_out_channels", [32.0, 64.0], "must be a list of integers"),
    ("unet", "attention_head_dim", [2, "4"], "must be a list of integers"),
    ("unet", "use_linear_projection", "false", "must be true or false"),
    ("unet", "norm_eps", float("nan"), "'norm_eps' must be a number, got NaN"),
    ("unet", "_class_name", "ControlNetModel", "names the class ControlNetModel"),
    ("vae", "block_out_channels", 64, "'block_out_channels' must be a list"),
    ("vae", "latent_channels", 4.0, "'latent_channels' must be an integer, got 4.0"),
    ("vae", "scaling_factor", "0.18", "'scaling_factor' must be a number"),
    ("vae", "_class_name", "UNet2DConditionModel", "names the class UNet2DConditionModel"),
    ("text_encoder", "hidden_size", "64", "'hidden_size' must be an integer"),
    ("text_encoder", "num_hidden_layers", 2.0, "'num_hidden_layers' must be an integer, got 2.0"),
    ("text_encoder", "model_type", "clip_vision_model", "model_type 'clip_vision_model'"),
    ("text_encoder", "architectures", ["CLIPVisionModel"], "not ['CLIPTextModel']"),
]


@pytest.mark.parametrize("part, key, value, message", CONFIG_FAULTS, ids=[f"{p}-{k}={v}" for p, k, v, _ in CONFIG_FAULTS])
def test_config_field_types_and_class_names(model, tmp_path, part, key, value, message):
    folder = tmp_path / part
    shutil.copytree(model / part, folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, key: value}))
    before = snapshot(folder)
    with pytest.raises(CheckpointError) as error:
        PART_CLASSES[part].from_pretrained(folder)
    assert message in str(error.value) and str(folder / "config.json") in str(error.value)
    assert snapshot(folder) == before


def test_config_checks_accept_the_libraries_configs(model):
    """What diffusers and transformers write passes: ints for float fields, null upcast_attention, per-level lists."""
    config = UNetConfig.tiny().to_dict()
    UNet.from_config({**config, "mid_block_scale_factor": 1, "upcast_attention": None, "attention_head_dim": [2, 4]})
    diffusers = pytest.importorskip("diffusers")
    theirs = diffusers.UNet2DConditionModel(**{k: v for k, v in config.items() if not k.startswith("_")}).config
    UNet.from_config(dict(theirs))
    for part, cls in PART_CLASSES.items():
        cls.from_pretrained(model / part)


# ------------------------------------------------------------------------------------------
# Corrupted weights and tokenizer files
# ------------------------------------------------------------------------------------------


def corrupt_tensor(path: Path) -> str:
    """Write NaN over the first value of a float32 tensor inside a safetensors file; returns its name."""
    data = bytearray(path.read_bytes())
    size = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + size])
    names = sorted(k for k, v in header.items() if k != "__metadata__" and v["dtype"] == "F32")
    name = names[len(names) // 2]
    start = 8 + size + header[name]["data_offsets"][0]
    data[start:start + 4] = struct.pack("<f", float("nan"))
    path.write_bytes(bytes(data))
    return name


@pytest.mark.parametrize("part", sorted(PART_CLASSES))
def test_corrupted_tensor_bytes_are_refused_naming_file_and_tensor(model, tmp_path, part):
    folder = tmp_path / part
    shutil.copytree(model / part, folder)
    weights = next(folder.glob("*.safetensors"))
    name = corrupt_tensor(weights)
    before = snapshot(folder)
    with pytest.raises(CheckpointError, match="NaN or infinite") as error:
        PART_CLASSES[part].from_pretrained(folder)
    assert str(weights) in str(error.value) and repr(name) in str(error.value)
    # The check is what refuses: asked not to check, the file loads, and holds the NaN.
    loaded = PART_CLASSES[part].from_pretrained(folder, check_finite=False)
    assert torch.isnan(loaded.state_dict()[name]).any()
    assert snapshot(folder) == before


def test_corrupted_pipeline_folder_and_single_file_are_refused(model, pipe, tmp_path):
    folder = tmp_path / "tiny-sd"
    shutil.copytree(model, folder)
    name = corrupt_tensor(folder / "vae" / "diffusion_pytorch_model.safetensors")
    with pytest.raises(CheckpointError, match=f"'{name}' holds 1 NaN"):
        load_pipeline(folder)
    single = tmp_path / "tiny.safetensors"
    pipe.save_single_file(single)
    config = {"unet": pipe.unet.config.to_dict(), "vae": pipe.vae.config.to_dict(),
              "text_encoder": pipe.text_encoder.config.to_dict(), "scheduler": pipe.scheduler_config,
              "tokenizer": REPO / "data" / "tokenizers" / "shapes"}
    load_pipeline(single, config=config, family="sd1")  # loads before the corruption
    name = corrupt_tensor(single)
    before = snapshot(single)
    with pytest.raises(CheckpointError, match="NaN or infinite") as error:
        load_pipeline(single, config=config, family="sd1")
    assert str(single) in str(error.value) and repr(name) in str(error.value)
    assert snapshot(single) == before


def copy_tokenizer(tmp_path: Path, name: str = "shapes") -> Path:
    folder = tmp_path / name
    shutil.copytree(REPO / "data" / "tokenizers" / name, folder)
    return folder


@pytest.mark.parametrize("cut", [1, 10, 40])
def test_merges_cut_at_a_line_boundary_are_detected(tmp_path, cut):
    folder = copy_tokenizer(tmp_path)
    lines = (folder / "merges.txt").read_text(encoding="utf-8").splitlines()
    (folder / "merges.txt").write_text("\n".join(lines[:-cut]) + "\n", encoding="utf-8")
    before = snapshot(folder)
    with pytest.raises(CheckpointError, match=f"its last {cut} merges are missing"):
        CLIPTokenizer.from_pretrained(folder)
    assert snapshot(folder) == before


def test_vocab_cut_short_or_broken_is_detected(tmp_path):
    folder = copy_tokenizer(tmp_path)
    vocab = json.loads((folder / "vocab.json").read_text(encoding="utf-8"))
    kept = dict(list(vocab.items())[:-12]) | {k: vocab[k] for k in ("<|startoftext|>", "<|endoftext|>")}
    (folder / "vocab.json").write_text(json.dumps(kept), encoding="utf-8")
    with pytest.raises(CheckpointError, match="merges make tokens that are not in the vocabulary"):
        CLIPTokenizer.from_pretrained(folder)
    text = json.dumps(vocab)
    (folder / "vocab.json").write_text(text[: len(text) // 2], encoding="utf-8")
    with pytest.raises(CheckpointError, match="vocab.json is not valid JSON"):
        CLIPTokenizer.from_pretrained(folder)


def test_complete_tokenizers_still_load():
    """CLIP's own 49,408-token vocabulary and the shapes one pass the completeness check."""
    assert len(CLIPTokenizer.from_pretrained(REPO / "data" / "tokenizers" / "clip-vit-l14")) == 49408
    assert len(CLIPTokenizer.from_pretrained(REPO / "data" / "tokenizers" / "shapes").merges) > 50


@pytest.mark.parametrize("dtype", [torch.int8, torch.int32, torch.uint8, torch.bool, torch.float8_e4m3fn, torch.complex64, "float16"])
def test_save_single_file_refuses_dtypes_that_are_not_float_weights(pipe, tmp_path, dtype):
    path = tmp_path / "model.safetensors"
    with pytest.raises(TypeError, match="must be one of"):
        pipe.save_single_file(path, dtype=dtype)
    assert list(tmp_path.iterdir()) == []  # not even a temporary


# ------------------------------------------------------------------------------------------
# record_attention belongs to the thread that opened it
# ------------------------------------------------------------------------------------------


def test_record_attention_ignores_other_threads():
    torch.manual_seed(0)
    model = Transformer2DModel(4, 8, 32, num_layers=1, cross_attention_dim=24, norm_num_groups=8).eval()
    x, context = torch.randn(1, 32, 4, 4), torch.randn(1, 7, 24)
    inside, done = threading.Event(), threading.Event()
    result = {}

    def recording_thread():
        with torch.no_grad(), record_attention(model) as maps:
            inside.set()
            done.wait(30)  # the main thread generates meanwhile
            model(x, context)  # this thread's own generation: the only one recorded
        result["maps"] = maps

    thread = threading.Thread(target=recording_thread)
    thread.start()
    assert inside.wait(30)
    with torch.no_grad():
        other = model(2 * x, context)  # another thread's generation, while the recording is open
    assert all(m.recorder is None for m in model.modules() if isinstance(m, Attention))  # not ours, here
    done.set()
    thread.join(30)
    maps = result["maps"]
    assert maps.calls == {"transformer_blocks.0.attn2": 1}
    with torch.no_grad(), record_attention(model) as own:
        model(x, context)
    assert torch.equal(maps["transformer_blocks.0.attn2"], own["transformer_blocks.0.attn2"])
    assert not torch.isnan(other).any()


# ------------------------------------------------------------------------------------------
# Paths and devices
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("typo, meant", [("tiny-sdd", "tiny-sd"), ("tiny-sd/unett", "tiny-sd/unet"), ("tiny-s", "tiny-sd")])
def test_mistyped_local_paths_say_no_such_folder(model, monkeypatch, typo, meant):
    monkeypatch.chdir(model.parent)
    for source in (typo, f"./{typo}"):
        with pytest.raises(ValueError) as error:
            load_pipeline(source)
        message = str(error.value)
        assert f"Nothing at {source}: no such file or folder. Did you mean {meant}?" in message
        assert "hub" not in message.split(".")[0] and "taken for a Hugging Face hub id" not in message


@pytest.mark.parametrize("device, message", [("meta", "holds no data"), ("cuda:7", "cuda"), ("nonsense", "not a device torch knows"),
                                             ("xla", "not available")])
def test_devices_that_cannot_run_are_refused(model, device, message):
    if device.startswith("cuda") and torch.cuda.device_count() > 7:
        pytest.skip("this machine has 8 GPUs")
    with pytest.raises(ValueError, match=message):
        load_pipeline(model, device=device)


# ------------------------------------------------------------------------------------------
# Commands: one line on stderr, non-zero status, no traceback, nothing written
# ------------------------------------------------------------------------------------------


def run_module(module: str, args: list, capsys) -> tuple[int, str]:
    """`python -m module args` in this process (runpy: the module's own __main__ code path)."""
    argv = sys.argv
    sys.argv = [module, *args]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # runpy: "found in sys.modules" (imported by this file)
            runpy.run_module(module, run_name="__main__", alter_sys=True)
        code = 0
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else 1
    finally:
        sys.argv = argv
    return code, capsys.readouterr().err


def generate_faults(model: Path, out: Path) -> list:
    g = ["generate", PROMPT, "--model", str(model), "--out", str(out)]
    return [
        (g + ["--steps", "-1"], "--steps must be at least 1, got -1"),
        (g + ["--steps", "many"], "expected a whole number, got 'many'"),
        (g + ["--guidance", "nan"], "--guidance must be a finite number, got nan"),
        (g + ["--seed", str(2**64)], "--seed must be a whole number in [0, 18446744073709551615]"),
        (g + ["--height", "0"], "--height must be at least 1, got 0"),
        (g + ["--width", "100000"], "--width 100000 is more than 8x this model's training size (32 px)"),
        (g + ["--eta", "-1"], "--eta must be at least 0"),
        (g + ["--device", "meta"], 'device "meta" holds no data'),
        (["generate", PROMPT, "--model", str(model) + "x", "--out", str(out)], "no such file or folder"),
        (["generate", PROMPT, "--model", str(model), "--out", str(out.parent / "missing" / "a.png")], "does not exist"),
        (["generate", PROMPT, "--model", str(model), "--out", "/proc/a.png"], "cannot write in /proc"),
        (["generate", PROMPT, "--model", str(model / "unet"), "--out", str(out)], "not a pipeline folder"),
        (["bogus"], "invalid choice: 'bogus'"),
    ]


def test_cli_user_errors_are_one_line(model, tmp_path, capsys):
    out = tmp_path / "a.png"
    before = snapshot(model)
    for args, message in generate_faults(model, out):
        code, err = run_module("sdlearn", args, capsys)
        assert code == 2, (args, err)
        one_line_error(err, message)
        assert not out.exists()
    assert snapshot(model) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == []


EVALUATE_FAULTS = [
    (["--threads", "0", "classifier"], "--threads must be at least 1"),
    (["classifier", "--n", "0"], "--n must be a whole number in [1, 100000], got 0"),
    (["classifier", "--seed", "-1"], "--seed must be a whole number in [0, 4294967295]"),
    (["classifier", "--classifier", "nowhere"], "No trained shapes classifier in nowhere"),
    (["ddpm", "--model", "nowhere"], "--model nowhere: no such folder"),
    (["ddpm", "--samples", "0"], "--samples must be a whole number in [1, 100000]"),
    (["ddpm", "--steps", "10", "0"], "--steps must be at least 1, got 0"),
    (["ddpm", "--steps", "5000", "--samplers", "ddim"], "num_inference_steps must be between 1 and num_train_timesteps=1000, got 5000"),
    (["ddpm", "--samplers", "ddim", "bogus"], "invalid choice: 'bogus'"),
    (["ddpm", "--guidance", "nan"], "--guidance must be a finite number, got nan"),
    (["ddpm", "--json", "MISSING/x.json"], "the folder MISSING does not exist"),
    (["ddpm", "--json", "/proc/x.json"], "cannot write in /proc"),
    (["text-to-image", "--model", "data/mini-sdd"], "Nothing at data/mini-sdd: no such file or folder. Did you mean data/mini-sd?"),
    (["text-to-image", "--model", "data/mini-sd/unet"], "not a pipeline folder"),
    (["text-to-image", "--n", "-1"], "--n must be a whole number in [1, 100000], got -1"),
    (["text-to-image", "--heldout", "0"], "--heldout must be a whole number in [1, 100000], got 0"),
    (["text-to-image", "--steps", "2000"], "got 2000"),
    (["text-to-image", "--samplers", "bogus"], "invalid choice: 'bogus'"),
    (["text-to-image", "--guidance", "inf"], "--guidance must be a finite number, got inf"),
    (["text-to-image", "--json", "TMP"], "--json TMP is a folder"),
    (["bogus"], "invalid choice: 'bogus'"),
]


@pytest.fixture
def no_evaluation(monkeypatch):
    """Fails the test if an evaluation starts."""
    import sdlearn.evaluate as evaluate

    def started(*args, **kwargs):
        raise AssertionError("the evaluation started before the argument error")

    for name in ("ddpm_clean_rates", "text_to_image_report", "render_accuracy"):
        monkeypatch.setattr(evaluate, name, started)


def test_evaluate_refuses_every_bad_argument_before_evaluating(tmp_path, capsys, monkeypatch, no_evaluation):
    monkeypatch.chdir(REPO)
    before = snapshot(REPO / "data" / "ddpm-shapes", REPO / "data" / "mini-sd", REPO / "data" / "shapes-classifier")
    for args, message in EVALUATE_FAULTS:
        args = [str(tmp_path / "missing" / "x.json") if a == "MISSING/x.json" else str(tmp_path) if a == "TMP" else a for a in args]
        message = message.replace("MISSING", str(tmp_path / "missing")).replace("TMP", str(tmp_path))
        code, err = run_module("sdlearn.evaluate", args, capsys)
        assert code == 2, (args, err)
        one_line_error(err, message)
    assert list(tmp_path.iterdir()) == []
    assert snapshot(REPO / "data" / "ddpm-shapes", REPO / "data" / "mini-sd", REPO / "data" / "shapes-classifier") == before


def test_evaluate_json_into_a_missing_folder_as_a_command(tmp_path):
    """The shell's view: exit status 2 within seconds, one line, no traceback, no evaluation."""
    done = subprocess.run([sys.executable, "-m", "sdlearn.evaluate", "ddpm", "--json", str(tmp_path / "no" / "x.json")],
                          capture_output=True, text=True, cwd=REPO, timeout=120)
    assert done.returncode == 2 and done.stdout == ""
    one_line_error(done.stderr, "does not exist; create it first")


BENCH_FAULTS = [
    (["unet", "--config", "tiny", "--repeats", "-1", "--cpu-only"], "--repeats must be at least 1, got -1"),
    (["unet", "--config", "tiny", "--batch", "0", "--cpu-only"], "--batch must be at least 1, got 0"),
    (["unet", "--config", "tiny", "--size", "0", "--cpu-only"], "--size must be at least 1, got 0"),
    (["unet", "--config", "tiny", "--size", "12", "--cpu-only"], "--size must be a multiple of 8, got 12"),
    (["unet", "--config", "tiny", "--warmup", "x"], "--warmup expected a whole number, got 'x'"),
    (["pipeline", "--config", "tiny", "--size", "0"], "--size must be at least 1, got 0"),
    (["pipeline", "--config", "tiny", "--steps", "0"], "--steps must be at least 1, got 0"),
    (["pipeline", "--config", "tiny", "--size", "36"], "--size must be a multiple of 8, got 36"),
    (["pipeline", "--config", "tiny", "--json", "TMP"], "is a folder; give a file name"),
    (["pipeline", "--config", "tiny", "--json", "FILE/x.json"], "a-file is a file, not a folder"),
]


def test_bench_refuses_bad_arguments_before_timing(tmp_path, capsys, monkeypatch):
    import sdlearn.bench as bench

    def timed(*args, **kwargs):
        raise AssertionError("the benchmark started before the argument error")

    monkeypatch.setattr(bench, "bench_unet", timed)
    monkeypatch.setattr(bench, "bench_pipeline", timed)
    (tmp_path / "a-file").write_text("mine")
    for args, message in BENCH_FAULTS:
        args = [str(tmp_path / "a-file" / "x.json") if a == "FILE/x.json" else str(tmp_path) if a == "TMP" else a for a in args]
        code = bench.main(args) if "--json" in args else None
        if code is None:
            with pytest.raises(SystemExit) as exit_:
                bench.main(args)
            code = exit_.value.code
        assert code == 2, (args, capsys.readouterr())
        one_line_error(capsys.readouterr().err, message)
    assert [p.name for p in tmp_path.iterdir()] == ["a-file"] and (tmp_path / "a-file").read_text() == "mine"


RECIPE_FAULTS = {
    "sdlearn.recipes.ddpm": [
        (["--steps", "-1"], "--steps must be at least 1, got -1"),
        (["--lr", "nan"], "--lr must be a finite number, got nan"),
        (["--batch-size", "0"], "--batch-size must be at least 1, got 0"),
        (["--ema-decay", "1.5"], "--ema-decay must be a number in [0, 1], got 1.5"),
        (["--attribute-dropout", "-0.1"], "attribute_dropout must be a probability in [0, 1], got -0.1"),
        (["--unconditional-prob", "nan"], "unconditional_prob must be a probability in [0, 1], got nan"),
        (["--guidance-scales", "2", "inf"], "--guidance-scales must be a finite number, got inf"),
        (["--seed", "-3"], "--seed must be a whole number in [0, 4294967295]"),
        (["--channels", "32", "64"], "--channels takes 3 widths"),
        (["--channels", "30", "60", "64"], "cannot be split into 4 heads"),
        (["--eval-samples", "-1"], "--eval-samples must be at least 0"),
    ],
    "sdlearn.recipes.mini_sd": [
        (["--steps", "-1"], "--steps must be at least 1, got -1"),
        (["--lr", "nan"], "--lr must be a finite number, got nan"),
        (["--batch-size", "0"], "--batch-size must be at least 1, got 0"),
        (["--clip-steps", "0"], "--clip-steps must be at least 1, got 0"),
        (["--vae", "/nonexistent"], "--vae /nonexistent holds no config.json"),
        (["--text-encoder", "/nonexistent"], "holds no CLIPTextModel"),
    ],
    "sdlearn.recipes.tiny_vae": [
        (["--steps", "-1"], "--steps must be at least 1, got -1"),
        (["--lr", "nan"], "--lr must be a finite number, got nan"),
        (["--batch-size", "0"], "--batch-size must be at least 1, got 0"),
        (["--norm-num-groups", "7"], "not divisible by norm_num_groups=7"),
        (["--kl-weight", "-1"], "--kl-weight must be at least 0"),
        (["--resume"], "Cannot resume"),
    ],
    "sdlearn.recipes.classifier": [
        (["--steps", "-1"], "--steps must be at least 1, got -1"),
        (["--lr", "nan"], "--lr must be a finite number, got nan"),
        (["--batch-size", "1"], "--batch-size must be at least 2, got 1"),
    ],
    "sdlearn.recipes.clip": [
        (["train-tiny", "OUT", "--steps", "-1"], "--steps must be at least 1, got -1"),
        (["train-tiny", "OUT", "--lr", "nan"], "--lr must be a finite number, got nan"),
        (["train-tiny", "OUT", "--batch-size", "0"], "--batch-size must be at least 1, got 0"),
        (["train-tiny", "OUT", "--batch-size", "64", "--n-images", "10"], "batch_size 64 is larger than the 10 images"),
    ],
}
RECIPE_FAULTS["sdlearn.recipes.dit"] = [
    (["--steps", "-1"], "--steps must be at least 1, got -1"),
    (["--lr", "nan"], "--lr must be a finite number, got nan"),
    (["--batch-size", "0"], "--batch-size must be at least 1, got 0"),
    (["--objective", "v"], "invalid choice: 'v'"),
    (["--heads", "3", "--head-dim", "5"], "must be a multiple of 4"),
    (["--vae", "/nonexistent"], "--vae /nonexistent holds no config.json"),
]
LEFTOVERS = {  # a file of a previous model in --out
    "sdlearn.recipes.ddpm": "unet/diffusion_pytorch_model.safetensors",
    "sdlearn.recipes.mini_sd": "unet/config.json",
    "sdlearn.recipes.tiny_vae": "diffusion_pytorch_model.safetensors",
    "sdlearn.recipes.classifier": "model.safetensors",
    "sdlearn.recipes.clip": "text_encoder/model.safetensors",
    "sdlearn.recipes.dit": "transformer/diffusion_pytorch_model.safetensors",
}


def recipe_args(module: str, out: Path, args: list) -> list:
    if module == "sdlearn.recipes.clip":
        return [str(out) if a == "OUT" else a for a in (args or ["train-tiny", "OUT"])]
    return ["--out", str(out), *args]


@pytest.mark.parametrize("module", sorted(RECIPE_FAULTS))
def test_recipes_refuse_bad_arguments_and_leftovers_before_training(module, tmp_path, capsys, monkeypatch):
    import sdlearn.train

    def trained(*args, **kwargs):
        raise AssertionError("training started before the argument error")

    for name in ("ddpm", "mini_sd", "tiny_vae", "classifier", "clip", "dit"):  # first: importing a recipe binds the real train
        monkeypatch.setattr(f"sdlearn.recipes.{name}.train", trained)
    monkeypatch.setattr(sdlearn.train, "train", trained)
    out = tmp_path / "model"
    for args, message in RECIPE_FAULTS[module]:
        code, err = run_module(module, recipe_args(module, out, args), capsys)
        assert code != 0, (args, err)
        one_line_error(err, message)
        assert list(tmp_path.iterdir()) == [], (args, list(tmp_path.iterdir()))  # no --out, no <out>-work
    # A previous model's file in --out: refused without --overwrite, untouched.
    (out / LEFTOVERS[module]).parent.mkdir(parents=True)
    (out / LEFTOVERS[module]).write_bytes(b"the learner's model")
    before = snapshot(tmp_path)
    code, err = run_module(module, recipe_args(module, out, []), capsys)
    assert code != 0
    one_line_error(err, str(out), "--overwrite")
    assert snapshot(tmp_path) == before
    # An --out that is a file, or where nothing can be written.
    for where, message in ((tmp_path / "a-file", "is a file"), (Path("/proc/sdlearn-model"), "nothing can be written in /proc")):
        if where.name == "a-file":
            where.write_text("notes")
        code, err = run_module(module, recipe_args(module, where, []), capsys)
        assert code != 0
        one_line_error(err, message)
    assert (tmp_path / "a-file").read_text() == "notes"


@pytest.mark.parametrize("module", ["ddpm", "mini_sd"])
def test_a_run_that_fails_before_its_first_checkpoint_does_not_block_the_next(module, tmp_path, capsys, monkeypatch):
    """The failed run's work folder (nothing to resume in it) is removed; the corrected command starts."""
    import importlib

    recipe = importlib.import_module(f"sdlearn.recipes.{module}")
    out, attempts = tmp_path / "model", []

    def failing(*args, **kwargs):
        attempts.append(recipe.work_folder(out).is_dir())
        raise FloatingPointError("The loss became nan at step 3. Try a lower learning rate.")

    monkeypatch.setattr(recipe, "train", failing)
    if module == "mini_sd":  # the first stage fails (after the run wrote its settings into the work folder)
        monkeypatch.setattr(recipe, "stage_vae", failing)
        args = ["--out", str(out), "--smoke", "--no-progress"]
    else:
        args = ["--out", str(out), "--steps", "4", "--batch-size", "4", "--train-images", "8", "--eval-samples", "0", "--no-progress"]
    for _ in range(2):  # the first failure must not turn the second attempt into "holds an unfinished run"
        with pytest.raises(FloatingPointError):
            recipe.main(args)
        assert not recipe.work_folder(out).exists()
    assert attempts == [True, True]  # the failure came after the work folder was made
    assert "unfinished run" not in capsys.readouterr().err
