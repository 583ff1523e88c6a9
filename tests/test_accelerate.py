"""train() under accelerate: 2 processes, or gradient accumulation, do the maths of 1 process with the whole batch.

The model is a tiny text-conditional UNet (tests/accelerate_script.py) trained with
DiffusionLoss on batches that carry their own t and noise, so every way of splitting a
global batch of 8 computes the same mean loss and gradient, up to float rounding.
"""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from accelerate_script import BATCH, LR, CountingLoss, batches, run, tiny_unet
from sdlearn.train import EMALoss, EMATrainee, shard, train

ROOT = Path(__file__).resolve().parents[1]
TOLERANCE = 1e-6  # max abs weight difference allowed between ways of computing the same step


def max_difference(a: dict, b: dict) -> float:
    """The largest absolute difference between two state dicts' weights."""
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a if k != "losses")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def one_thread():
    """The launched processes run one torch thread each; the reference does too (same kernels, same rounding)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def reference(one_thread) -> dict:
    """One process, the whole batch of 8 at each step: its weights, and its History's losses under "losses"."""
    unet, loss, history = run()
    assert loss.rows == [BATCH] * 3
    return {**unet.state_dict(), "losses": torch.tensor(history.losses)}


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory, one_thread) -> Path:
    """tests/accelerate_script.py run by 2 CPU processes (gloo); the folder it wrote."""
    out = tmp_path_factory.mktemp("two_processes")
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
               "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
               str(ROOT / "tests" / "accelerate_script.py"), str(out)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    try:
        done = subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True, timeout=240)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"2 processes did not finish in {e.timeout} s.\nstderr:\n{(e.stderr or b'')[-4000:]}")
    if done.returncode != 0 or not (out / "info.json").is_file():
        pytest.fail(f"{' '.join(command)} failed (exit {done.returncode}).\n"
                    f"stdout:\n{done.stdout[-2000:]}\nstderr:\n{done.stderr[-6000:]}")
    return out


def test_two_processes_equal_one_process(two_processes, reference):
    info = json.loads((two_processes / "info.json").read_text())
    assert info["processes"] == 2 and info["backend"] == "gloo"
    assert info["rows"] == [BATCH // 2] * 3  # each process computed its half of the batch
    # the History's loss: the mean over both processes, i.e. the loss of the whole batch
    assert torch.tensor(info["losses"]) == pytest.approx(reference["losses"], rel=1e-6)
    right = torch.load(two_processes / "right.pt", weights_only=True)
    assert max_difference(right, reference) <= TOLERANCE


def test_two_processes_resume_a_folder_checkpoint_exactly(two_processes):
    right = torch.load(two_processes / "right.pt", weights_only=True)
    resumed = torch.load(two_processes / "resumed.pt", weights_only=True)
    assert max_difference(resumed, right) == 0.0
    assert sorted(p.name for p in (two_processes / "state").glob("random_states_*")) == [
        "random_states_0.pkl", "random_states_1.pkl"]  # each process's RNG state


def test_a_wrong_split_is_caught(two_processes, reference):
    """Both processes on rows 0-3 (rows 4-7 never seen): far outside the tolerance, while the
    weights moved from their initial values by far more than it (the comparison means something)."""
    wrong = torch.load(two_processes / "wrong.pt", weights_only=True)
    assert max_difference(wrong, reference) > 100 * TOLERANCE
    assert max_difference(tiny_unet().state_dict(), reference) > 100 * TOLERANCE


def test_a_loss_without_the_gradient_average_is_stopped(two_processes):
    """A loss calling unet.forward bypasses DistributedDataParallel: the processes' weights part after one step."""
    error = json.loads((two_processes / "info.json").read_text())["bypass_error"]
    assert error is not None and "gradients were not averaged" in error and "model(...)" in error


def test_accumulation_equals_one_batch(reference):
    unet, loss, history = run(accumulation_steps=2)
    assert loss.rows == [BATCH // 2] * 6  # two micro-batches per optimizer step
    assert torch.tensor(history.losses) == pytest.approx(reference["losses"], rel=1e-6)
    assert max_difference(unet.state_dict(), reference) <= TOLERANCE


def test_repeated_calls_in_one_process_are_identical(reference):
    unet, _, history = run()
    assert max_difference(unet.state_dict(), reference) == 0.0
    assert history.losses == reference["losses"].tolist()


def test_ema_is_updated_once_per_optimizer_step():
    def ema_run(k):
        trainee = EMATrainee(tiny_unet(), decay=0.9)
        train(trainee, EMALoss(CountingLoss()), batches, steps=3, lr=LR, progress=False, accumulation_steps=k)
        return trainee

    whole, accumulated = ema_run(1), ema_run(2)
    assert int(whole.ema_updates) == int(accumulated.ema_updates) == 3
    assert max_difference(accumulated.ema.state_dict(), whole.ema.state_dict()) <= TOLERANCE


def test_folder_checkpoint_resumes_exactly(tmp_path):
    """A path without a suffix is an accelerate state folder; stopped at step 2 and resumed, the run ends as an uninterrupted one."""
    def four_steps(unet, **kwargs):
        return train(unet, CountingLoss(), batches, steps=4, lr=1e-3, progress=False, **kwargs)

    uninterrupted = tiny_unet()
    expected = four_steps(uninterrupted)

    folder = tmp_path / "run"
    train(tiny_unet(), CountingLoss(), batches, steps=2, lr=1e-3, progress=False, checkpoint=folder)
    assert (folder / "train_state.json").is_file() and (folder / "model.safetensors").is_file()
    with pytest.raises(FileExistsError, match="resume=True"):
        four_steps(tiny_unet(), checkpoint=folder)  # a fresh run never overwrites it

    resumed = tiny_unet()  # a new process would rebuild the model
    history = four_steps(resumed, checkpoint=folder, resume=True)
    assert history.losses == expected.losses
    assert max_difference(resumed.state_dict(), uninterrupted.state_dict()) == 0.0
    assert json.loads((folder / "train_state.json").read_text())["step"] == 4


def test_uneven_split_is_refused():
    with pytest.raises(ValueError, match=r"batch of 8 examples .* 1 process\(es\) x 3 accumulation"):
        run(accumulation_steps=3)


def test_shard_takes_contiguous_rows_of_every_tensor():
    batch = {"x": torch.arange(8), "pair": (torch.arange(8) * 10, None)}
    micro = shard(batch, rank=1, processes=2, accumulation_steps=2)  # rows 4-5, then 6-7
    assert [m["x"].tolist() for m in micro] == [[4, 5], [6, 7]]
    assert micro[1]["pair"][0].tolist() == [60, 70] and micro[1]["pair"][1] is None
    assert shard(batch, 0, 1, 1) == [batch]  # one process, no accumulation: the batch as it is
    with pytest.raises(ValueError, match="same dim 0"):
        shard((torch.zeros(8), torch.zeros(4)), 0, 2)
