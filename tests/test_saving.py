"""Saving never loses a model: a failed, interrupted or killed save leaves the old one loadable.

save_pretrained (pipelines, models, tokenizers) and save_single_file write aside and swap
their files in (sdlearn.models.files). Checked here: a save that fails while writing or while
swapping leaves the previous model byte-identical; a learner's own files in the folder survive
overwrite=True; no temporary is left behind; files get the umask's permissions; and a save
killed (SIGKILL) at 20 random moments never leaves the folder unloadable.
"""

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import sdlearn.models.checkpoint as checkpoint
import sdlearn.models.files as files
from sdlearn.models.clip import CLIPTextConfig, CLIPTextModel, CLIPTokenizer
from sdlearn.models.unet import UNet, UNetConfig
from sdlearn.models.vae import AutoencoderKL, VAEConfig
from sdlearn.pipeline import StableDiffusion, load_pipeline

REPO = Path(__file__).resolve().parent.parent
SHAPES_TOKENIZER = REPO / "data" / "tokenizers" / "shapes"
SD_DDIM = {
    "_class_name": "DDIMScheduler", "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000, "clip_sample": False, "set_alpha_to_one": False, "steps_offset": 1,
}


def tiny_pipeline(seed: int) -> StableDiffusion:
    """A random tiny pipeline (32 x 32 images, shapes vocabulary) as tests/test_cli.py builds it."""
    torch.manual_seed(seed)
    tokenizer = CLIPTokenizer.from_pretrained(SHAPES_TOKENIZER)
    text_encoder = CLIPTextModel(CLIPTextConfig.tiny(vocab_size=tokenizer.vocab_size))
    unet = UNet(UNetConfig.tiny(sample_size=4, cross_attention_dim=text_encoder.config.hidden_size))
    vae = AutoencoderKL(VAEConfig.tiny(sample_size=32))
    return StableDiffusion(unet, vae, text_encoder, tokenizer, SD_DDIM)


@pytest.fixture(scope="module")
def old():
    return tiny_pipeline(0)


@pytest.fixture(scope="module")
def new():
    return tiny_pipeline(1)


def snapshot(folder: Path) -> dict:
    """Every file under folder (relative path -> bytes)."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def temporaries(parent: Path) -> list:
    """Anything a save leaves next to or inside its target: names starting with '.' (our temporaries)."""
    return sorted(str(p.relative_to(parent)) for p in parent.rglob(".*"))


def same_weights(a: StableDiffusion, b: StableDiffusion) -> bool:
    return all(
        torch.equal(x, y)
        for part in ("unet", "vae", "text_encoder")
        for x, y in zip(getattr(a, part).state_dict().values(), getattr(b, part).state_dict().values())
    )


class FailAfter:
    """Wraps a function: the first `n` calls pass through, the next one raises `error`."""

    def __init__(self, function, n: int, error: Exception):
        self.function, self.n, self.error, self.calls = function, n, error, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        if self.calls == self.n + 1:
            raise self.error
        return self.function(*args, **kwargs)


# ------------------------------------------------------------------------------------------
# A save that fails keeps the previous model
# ------------------------------------------------------------------------------------------


def test_failure_while_writing_keeps_the_previous_pipeline(old, new, tmp_path, monkeypatch):
    folder = old.save_pretrained(tmp_path / "model")
    before = snapshot(folder)
    # the disk fills up after the first weights file (the unet's) is written
    monkeypatch.setattr(checkpoint, "save_file", FailAfter(checkpoint.save_file, 1, OSError(28, "No space left on device")))
    with pytest.raises(OSError, match="No space left"):
        new.save_pretrained(folder, overwrite=True)
    assert snapshot(folder) == before
    assert temporaries(tmp_path) == []
    assert same_weights(load_pipeline(folder), old)


@pytest.mark.parametrize("fail_at", [0, 3, 7])
def test_failure_while_swapping_restores_every_file(old, new, tmp_path, monkeypatch, fail_at):
    """The n-th rename into the folder fails (a read-only part folder, a full disk): the files already
    swapped are put back, so the folder is byte-identical to the previous model."""
    folder = old.save_pretrained(tmp_path / "model")
    before = snapshot(folder)
    failing = FailAfter(os.replace, fail_at, PermissionError(13, "Permission denied"))
    monkeypatch.setattr(files.os, "replace", failing)
    with pytest.raises(PermissionError):
        new.save_pretrained(folder, overwrite=True)
    monkeypatch.undo()
    assert failing.calls == 2 * fail_at + 1  # fail_at files swapped in, the next refused, fail_at put back
    assert snapshot(folder) == before
    assert temporaries(tmp_path) == []
    assert same_weights(load_pipeline(folder), old)


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write into read-only folders")
def test_read_only_part_folder_keeps_the_previous_pipeline(old, new, tmp_path):
    folder = old.save_pretrained(tmp_path / "model")
    before = snapshot(folder)
    (folder / "vae").chmod(0o555)
    try:
        with pytest.raises(PermissionError):
            new.save_pretrained(folder, overwrite=True)
    finally:
        (folder / "vae").chmod(0o755)
    assert snapshot(folder) == before
    assert temporaries(tmp_path) == []


def test_failed_first_save_leaves_nothing(new, tmp_path, monkeypatch):
    monkeypatch.setattr(files.os, "replace", FailAfter(os.replace, 2, OSError(5, "Input/output error")))
    with pytest.raises(OSError):
        new.save_pretrained(tmp_path / "model")
    assert list(tmp_path.iterdir()) == []


def test_failed_model_and_single_file_saves_keep_the_old_files(old, new, tmp_path, monkeypatch):
    unet_folder = old.unet.save_pretrained(tmp_path / "unet")
    single = old.save_single_file(tmp_path / "model.safetensors")
    before_unet, before_single = snapshot(unet_folder), single.read_bytes()
    monkeypatch.setattr(checkpoint, "save_file", FailAfter(checkpoint.save_file, 0, OSError(28, "No space left on device")))
    with pytest.raises(OSError):
        new.unet.save_pretrained(unet_folder, overwrite=True)
    import safetensors.torch

    monkeypatch.setattr(safetensors.torch, "save_file", FailAfter(safetensors.torch.save_file, 0, OSError(28, "No space left on device")))
    with pytest.raises(OSError):
        new.save_single_file(single, overwrite=True)
    assert snapshot(unet_folder) == before_unet
    assert single.read_bytes() == before_single
    assert temporaries(tmp_path) == []


# ------------------------------------------------------------------------------------------
# What is not ours is kept; what is ours is written whole
# ------------------------------------------------------------------------------------------


def test_overwrite_keeps_the_learners_files(old, new, tmp_path):
    folder = old.save_pretrained(tmp_path / "model")
    mine = {
        "unet/my_lora.safetensors": b"my adapter",
        "notes.md": b"# what I changed",
        "samples/circle.png": b"png bytes",
        "tokenizer/added_tokens.json": b"{}",
    }
    for name, data in mine.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(data)
    (folder / "tokenizer" / "tokenizer.json").write_text("{}")  # a stale fast tokenizer would shadow ours: replaced
    new.save_pretrained(folder, overwrite=True)
    assert {name: (folder / name).read_bytes() for name in mine} == mine
    assert not (folder / "tokenizer" / "tokenizer.json").exists()
    assert same_weights(load_pipeline(folder), new)
    reference = new.save_pretrained(tmp_path / "reference")
    assert {k: v for k, v in snapshot(folder).items() if k not in mine} == snapshot(reference)
    assert temporaries(tmp_path) == []


def test_model_and_tokenizer_saves_keep_other_files(old, new, tmp_path):
    unet_folder = old.unet.save_pretrained(tmp_path / "unet")
    (unet_folder / "my_lora.safetensors").write_bytes(b"mine")
    new.unet.save_pretrained(unet_folder, overwrite=True)
    assert (unet_folder / "my_lora.safetensors").read_bytes() == b"mine"
    assert torch.equal(UNet.from_pretrained(unet_folder).conv_in.weight, new.unet.conv_in.weight)
    tokenizer_folder = old.tokenizer.save_pretrained(tmp_path / "tokenizer")
    (tokenizer_folder / "README.md").write_text("mine")
    new.tokenizer.save_pretrained(tokenizer_folder)
    assert (tokenizer_folder / "README.md").read_text() == "mine"
    assert CLIPTokenizer.from_pretrained(tokenizer_folder)(["a red circle"]).equal(new.tokenizer(["a red circle"]))
    assert temporaries(tmp_path) == []


@pytest.mark.parametrize("umask", [0o022, 0o027, 0o002])
def test_files_get_the_umasks_permissions(new, tmp_path, umask):
    previous = os.umask(umask)
    try:
        folder = new.save_pretrained(tmp_path / "model")
        single = new.save_single_file(tmp_path / "model.safetensors")
        new.save_single_file(single, overwrite=True)  # a replaced file too
    finally:
        os.umask(previous)
    modes = {oct(p.stat().st_mode & 0o777) for p in [*folder.rglob("*"), single] if p.is_file()}
    assert modes == {oct(0o666 & ~umask)}
    dirs = {oct(p.stat().st_mode & 0o777) for p in [folder, *folder.rglob("*")] if p.is_dir()}
    assert dirs == {oct(0o777 & ~umask)}


def test_temporaries_of_a_killed_save_are_removed_by_the_next(new, tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # its pid no longer runs
    folder = tmp_path / "model"
    abandoned_dir = tmp_path / f".model.{dead.pid}.{files.SAVING}-abc123"
    abandoned_file = tmp_path / f".model.safetensors.{dead.pid}.{files.SAVING}-def456"
    abandoned_dir.mkdir()
    (abandoned_dir / "half_written.safetensors").write_bytes(b"\0" * 10)
    abandoned_file.write_bytes(b"\0" * 10)
    alive = tmp_path / f".model.{os.getpid()}.{files.SAVING}-xyz789"  # a save in progress: left alone
    alive.mkdir()
    new.save_pretrained(folder)
    new.save_single_file(tmp_path / "model.safetensors")
    assert not abandoned_dir.exists() and not abandoned_file.exists()
    assert alive.exists()


# ------------------------------------------------------------------------------------------
# Killed at random moments
# ------------------------------------------------------------------------------------------

KILLER = r'''
import hashlib, json, os, random, signal, sys, time
from pathlib import Path

import torch

torch.set_num_threads(1)  # no thread pool: fork() below is safe
sys.path.insert(0, sys.argv[4])
from test_saving import tiny_pipeline
from sdlearn.pipeline import load_pipeline

root, kills, seed = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
versions = [tiny_pipeline(0), tiny_pipeline(1)]
digest = lambda p: hashlib.sha256(p.read_bytes()).hexdigest()
known = {}  # relative path -> {digest: version}
for i, pipe in enumerate(versions):
    ref = pipe.save_pretrained(root / f"ref{i}")
    for p in ref.rglob("*"):
        if p.is_file():
            seen = known.setdefault(str(p.relative_to(ref)), {})
            seen[digest(p)] = "both" if digest(p) in seen else i  # e.g. config.json: the same in both
folder = versions[0].save_pretrained(root / "model")
(folder / "unet" / "my_lora.safetensors").write_bytes(b"mine")
start = time.perf_counter()
versions[1].save_pretrained(root / "timing")
one_save = time.perf_counter() - start

rng = random.Random(seed)
rounds = []
for k in range(kills):
    delay = rng.uniform(0.0, 3.0 * one_save)
    pid = os.fork()
    if pid == 0:  # the child saves alternately the two versions until it is killed
        i = 0
        while True:
            versions[i % 2].save_pretrained(folder, overwrite=True)
            i += 1
    time.sleep(delay)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    left = sorted(p.name for p in root.iterdir() if p.name.startswith(".model."))
    state = {}
    for rel, digests in known.items():
        path = folder / rel
        state[rel] = digests.get(digest(path), "torn") if path.is_file() else "missing"
    try:
        load_pipeline(folder)
        loads = True
    except Exception as error:
        loads = repr(error)
    rounds.append({
        "delay": delay, "mid_write": bool(left), "temporaries": left, "loads": loads,
        "versions": sorted({v for v in state.values() if v in (0, 1)}),
        "bad": {rel: v for rel, v in state.items() if v not in (0, 1, "both")},
        "mine": (folder / "unet" / "my_lora.safetensors").read_bytes() == b"mine",
    })
versions[0].save_pretrained(folder, overwrite=True)  # a later save cleans up the killed ones' temporaries
final = sorted(p.name for p in root.iterdir() if p.name.startswith("."))
print(json.dumps({"one_save_s": one_save, "rounds": rounds, "final_temporaries": final}))
'''

KILLS = 20


def test_a_save_killed_at_random_moments_never_leaves_an_unloadable_folder(tmp_path):
    script = tmp_path / "killer.py"
    script.write_text(KILLER)
    root = tmp_path / "work"
    root.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run(
        [sys.executable, str(script), str(root), str(KILLS), "1234", str(Path(__file__).parent)],
        capture_output=True, text=True, timeout=600, cwd=REPO, env=env,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    rounds = report["rounds"]
    assert len(rounds) == KILLS
    for r in rounds:
        assert r["loads"] is True, r
        assert r["bad"] == {}, r  # every file whole: the old or the new version, never torn or missing
        assert r["mine"], r
    mid_write = sum(r["mid_write"] for r in rounds)
    mixed = sum(len(r["versions"]) > 1 for r in rounds)  # killed during the swap: some files old, some new
    print(f"{mid_write} of {KILLS} kills landed mid-save, {mixed} of them during the swap (one save: {report['one_save_s'] * 1000:.0f} ms)")
    assert mid_write >= KILLS // 2  # the child does nothing but save: most kills must land inside one
    assert report["final_temporaries"] == []
