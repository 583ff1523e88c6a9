"""One small, reusable training loop for every lesson and training script.

    history = train(model, loss_fn, data, steps=500, lr=1e-3)

The loop is the textbook one, written out once:

    for step in range(steps):
        batch = next(data)                      # cycled iterable, or data(step)
        loss = loss_fn(model, batch)            # the lesson decides what is learned
        loss.backward(); clip; optimizer.step(); optimizer.zero_grad()

around it: seeding (the same seed gives the same run), AdamW with an optional cosine
schedule, a progress bar with the running loss (one summary line in its place when the
run ends), a loss history, periodic samples, and a checkpoint that can be resumed exactly
(model, optimizer, step and RNG state). A checkpoint that exists is never overwritten by a
fresh run: resume it, or choose another path.

Exponential moving average (EMA) of the weights (`EMATrainee`, `EMALoss`). The weights after
each optimizer step jitter around a good solution; their running average is a better model
than any single step (Polyak averaging; DDPM averages with a decay of 0.9999 over 800k
steps). A short run must forget faster, so the decay warms up (as diffusers' EMAModel does):

    theta_ema <- d_k theta_ema + (1 - d_k) theta,     d_k = min(decay, (1 + k) / (10 + k))

The EMA copy lives inside the module that train() optimises, as frozen parameters, so the
training checkpoint carries it and a resumed run continues exactly. train() folds the weights
in once per optimizer step, on the unwrapped model (every process holds the same weights).

One loop for one CPU, one GPU, several GPUs or machines: Hugging Face accelerate. train()
makes an `accelerate.Accelerator` (cpu=True when the model trains on the CPU), hands it the
model and the optimizer (`accelerator.prepare`: with several processes the model is wrapped in
DistributedDataParallel, which averages the gradients across processes during backward), and
uses `accelerator.backward`, `accelerator.clip_grad_norm_`, `accelerator.accumulate` and
`accelerator.reduce`. The same script then runs as it is, or launched on several processes:

    python your_script.py                                              one process (CPU or one GPU)
    python -m torch.distributed.run --nproc_per_node 2 your_script.py  2 processes on the CPU (gloo)
    accelerate launch --multi_gpu --num_processes 2 your_script.py     the same 2 CPU processes
    accelerate launch --num_processes N your_script.py                 N GPUs (train(..., device="cuda"))

On a CPU, `accelerate launch --num_processes 2 --cpu your_script.py` starts only ONE process
(accelerate 1.16 uses its single-process launcher there, unless `accelerate config` set up
multi-CPU training with mpirun); `--multi_gpu` starts 2 processes through torch.distributed.run
and, the model being on the CPU, train() makes them talk over gloo. Each process runs the whole
script, so build the model, the data and the seed the same way in all of them.

The sharding rule. data(step) gives the GLOBAL batch of B examples (a tensor, or a tuple, list
or dict of tensors whose dim 0 is the batch). With w processes and `accumulation_steps` k,
process r takes the contiguous rows [r B/w, (r+1) B/w) and cuts them into k micro-batches of
B/(w k) rows; the gradients of the k micro-batches are summed (each loss divided by k), then
averaged across the w processes, and one optimizer step follows. For a loss that is a mean over
its batch this is exactly the gradient of the global batch:

    grad (1/B) sum_i l_i  =  (1/w) sum_r (1/k) sum_j grad (1/m) sum_{i in micro-batch (r, j)} l_i,   m = B/(w k)

so 2 processes with a global batch of 8 (4 each) do the maths of 1 process with batch 8, up to
float rounding, provided all randomness is in the batch (as in mini-SD's LatentBatches, which
carries t and eps). B must be a multiple of w k. The History's loss per step is the mean over
all micro-batches and processes. Under several processes loss_fn gets the wrapped model:
calling it runs DistributedDataParallel's forward (needed for the average); other attributes
are the model's own. Only the main process prints progress, draws samples and writes checkpoints.

Mixed precision stays sdlearn's own (`precision=`, a bf16 autocast): the Accelerator is made
with mixed_precision="no". accelerate's state is process-wide, so each train() call clears it
first and every call behaves the same (tests and notebooks call train() many times).

Checkpoints: a path with a suffix (work/unet.ckpt) is one file (model, optimizer, step, RNG
state, losses); a path without one (work/unet) is a folder in accelerate's own format
(`accelerator.save_state`: weights, optimizer, every process's RNG state) plus train_state.json
(step and losses). Both resume exactly.
"""

import copy
import json
import math
import shutil
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
from torch import nn


@dataclass
class History:
    """What a training run produced: the loss at every step, samples, and wall time."""

    losses: list = field(default_factory=list)
    samples: list = field(default_factory=list)  # (step, sample)
    seconds: float = 0.0
    start_step: int = 0

    def smoothed(self, window: int = 20) -> list:
        """Running mean over `window` steps (what the progress bar shows)."""
        out, total = [], 0.0
        for i, loss in enumerate(self.losses):
            total += loss
            if i >= window:
                total -= self.losses[i - window]
            out.append(total / min(i + 1, window))
        return out

    def plot(self, ax=None, window: int = 20, title: str = "training loss"):
        import matplotlib.pyplot as plt

        if ax is None:
            _, ax = plt.subplots(figsize=(5, 3), dpi=80)
        steps = range(self.start_step, self.start_step + len(self.losses))
        ax.plot(steps, self.losses, alpha=0.3, label="per step")
        ax.plot(steps, self.smoothed(window), label=f"mean of {window}")
        ax.set(xlabel="step", ylabel="loss", title=title)
        ax.legend()
        return ax


class EMATrainee(nn.Module):
    """What train() optimises when an EMA is kept: `model`, and a frozen copy `ema` of its running average.

    Calling the trainee calls `model` (so a loss that calls it goes through the forward of
    whatever wraps it: DistributedDataParallel averages gradients there), and any attribute it
    lacks is `model`'s (a loss may read `unet.config`). train() folds the weights into the
    average at the start of each optimizer step (`update_ema`): the initial weights first, then
    those after each step; the caller folds in the last step's weights once training ends.
    """

    def __init__(self, model: nn.Module, decay: float = 0.999):
        super().__init__()
        self.model = model
        self.ema = copy.deepcopy(model).requires_grad_(False)
        self.decay = decay
        self.register_buffer("ema_updates", torch.zeros((), dtype=torch.int64))

    def forward(self, *args, **kwargs):
        return self.model(*args, **kwargs)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)  # parameters, buffers and submodules (model, ema)
        except AttributeError:
            if name == "model":
                raise
            return getattr(self.model, name)

    @torch.no_grad()
    def update_ema(self) -> None:
        """Fold the current weights into the average (with the warm-up decay of the module docstring)."""
        k = int(self.ema_updates)
        d = min(self.decay, (1 + k) / (10 + k))
        for averaged, current in zip(self.ema.parameters(), self.model.parameters()):
            averaged.lerp_(current, 1.0 - d)  # averaged = d * averaged + (1 - d) * current
        self.ema_updates += 1


class EMALoss:
    """loss_fn for an EMATrainee: `loss(trainee, batch)`, the trainee standing in for its model.

    The trainee (not trainee.model) is what the loss calls, so under several processes the
    call goes through DistributedDataParallel's forward. train() updates the average itself,
    once per optimizer step (also with gradient accumulation, where the loss runs k times a step).
    """

    def __init__(self, loss: Callable):
        self.loss = loss

    def __call__(self, trainee: EMATrainee, batch) -> torch.Tensor:
        return self.loss(trainee, batch)

    def __repr__(self) -> str:
        return f"EMALoss({self.loss!r})"


def move_to(batch: Any, device) -> Any:
    """Move tensors (also inside tuples, lists and dicts) to `device`; leave the rest."""
    if device is None:
        return batch
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, (tuple, list)):
        return type(batch)(move_to(b, device) for b in batch)
    if isinstance(batch, dict):
        return {k: move_to(v, device) for k, v in batch.items()}
    return batch


def _batches(data) -> Callable[[int], Any]:
    """Turn `data` into a function step -> batch: callables are used as they are,
    iterables are cycled (re-iterated, so a shuffling DataLoader reshuffles each epoch)."""
    if callable(data) and not isinstance(data, Iterable):
        return data

    def forever():
        while True:
            empty = True
            for batch in data:
                empty = False
                yield batch
            if empty:
                raise ValueError("train() got an empty dataset: it yielded no batches.")

    stream = forever()
    return lambda step: next(stream)


def _batch_size(batch) -> int | None:
    """The size of dim 0 shared by every tensor in `batch` (tensor, tuple, list or dict of them); None without tensors."""
    sizes = set()

    def visit(b):
        if isinstance(b, torch.Tensor):
            sizes.add(b.shape[0] if b.dim() else None)
        elif isinstance(b, (tuple, list)):
            for x in b:
                visit(x)
        elif isinstance(b, dict):
            for x in b.values():
                visit(x)

    visit(batch)
    if None in sizes or len(sizes) > 1:
        raise ValueError(
            f"With several processes or accumulation_steps > 1, train() splits each batch along dim 0, so every "
            f"tensor in it must have the same dim 0 (the batch); got sizes {sorted(sizes, key=str)}. "
            "Return per-example tensors only from data(step).")
    return sizes.pop() if sizes else None


def _rows(batch, start: int, stop: int):
    """Rows [start, stop) of every tensor in `batch` (also inside tuples, lists and dicts); the rest as it is."""
    if isinstance(batch, torch.Tensor):
        return batch[start:stop]
    if isinstance(batch, (tuple, list)):
        return type(batch)(_rows(b, start, stop) for b in batch)
    if isinstance(batch, dict):
        return {k: _rows(v, start, stop) for k, v in batch.items()}
    return batch


def shard(batch, rank: int, processes: int, accumulation_steps: int = 1) -> list:
    """This process's micro-batches of a global batch: the sharding rule of the module docstring.

    Rank r of w processes takes the contiguous rows [r B/w, (r+1) B/w) and cuts them into
    `accumulation_steps` = k equal micro-batches of B/(w k) rows, in order. Each loss is a mean
    over its micro-batch, so the mean of the w k losses (and of their gradients) is the mean over
    the global batch: the same maths as one process with the whole batch.
    """
    parts = processes * accumulation_steps
    if parts == 1:
        return [batch]
    size = _batch_size(batch)
    if size is None or size % parts:
        raise ValueError(
            f"A global batch of {size} examples cannot be split evenly across {processes} process(es) x "
            f"{accumulation_steps} accumulation step(s) = {parts} micro-batches. Make data(step)'s batch size "
            f"a multiple of {parts}, or change the number of processes or accumulation_steps.")
    rows = size // parts
    first = rank * accumulation_steps
    return [_rows(batch, (first + i) * rows, (first + i + 1) * rows) for i in range(accumulation_steps)]


class _DistributedModel:
    """What loss_fn gets when several processes train: calling it runs DistributedDataParallel's forward
    (which arranges the gradient average across processes); any other attribute is the model's own."""

    def __init__(self, wrapped: nn.Module, model: nn.Module):
        self._wrapped, self._model = wrapped, model

    def __call__(self, *args, **kwargs):
        return self._wrapped(*args, **kwargs)

    def __getattr__(self, name: str):
        return getattr(self._model, name)


def _fresh_accelerator(cpu: bool, accumulation_steps: int):
    """A new Accelerator for one train() call, behaving the same on every call in a process.

    accelerate keeps process-wide singletons (AcceleratorState, GradientState); a second
    Accelerator asking for other settings would raise or inherit the first run's state, so
    they are cleared first. PartialState (the processes and their group) is kept when several
    processes run, and cleared in a single process so that cpu=True/False is honoured.
    """
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState

    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    AcceleratorState._reset_state(reset_partial_state=not distributed)
    GradientState._reset_state()
    # mixed_precision="no": train() keeps its own bf16 autocast (precision=)
    return Accelerator(cpu=cpu, mixed_precision="no", gradient_accumulation_steps=accumulation_steps,
                       device_placement=False)


def _is_folder_checkpoint(checkpoint: Path) -> bool:
    """A path without a suffix (work/run) is an accelerate state folder; work/run.ckpt is one file."""
    return checkpoint.suffix == ""


STATE_JSON = "train_state.json"  # in a folder checkpoint, beside accelerate's files: step and losses


def _lr_factor(schedule: str | None, step: int, steps: int, warmup: int) -> float:
    if schedule is None:
        return 1.0
    if schedule == "cosine":
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, steps - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    raise ValueError(f"lr_schedule must be None or 'cosine', got {schedule!r}.")


# "bf16": the forward pass in bfloat16 where it is safe (torch.autocast), weights, optimizer and
# gradients in float32 (mixed precision). About 1.4x faster on CPUs with AVX-512 BF16 or AMX, but
# on CPUs without them (AVX2 only) bfloat16 is emulated and a step is about 14x SLOWER (measured on a
# 2-core AVX2 machine: 6.5 s against 0.47 s per DDPM step). "auto" picks bf16 only where it is native.
PRECISIONS = ("fp32", "bf16", "auto")


def native_bf16(device_type: str = "cpu") -> bool:
    """True when bfloat16 arithmetic is native on this device (CPU: AVX-512 BF16 or AMX; any CUDA GPU with bf16)."""
    if device_type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device_type == "cpu":
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    return False


def resolve_precision(precision: str, device_type: str = "cpu") -> str:
    """The precision a run will use: "auto" becomes "bf16" where bfloat16 is native, else "fp32"."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {list(PRECISIONS)}, got {precision!r}.")
    if precision == "auto":
        return "bf16" if native_bf16(device_type) else "fp32"
    if precision == "bf16" and not native_bf16(device_type):
        warnings.warn(
            f"precision='bf16' on a {device_type} without native bfloat16: each step will be much slower "
            "than in fp32. Use precision='auto' (or 'fp32') on this machine.", stacklevel=3)
    return precision


def _rng_state() -> dict:
    return {"torch": torch.get_rng_state()}


class _Progress:
    """A run's progress bar while it runs, and one plain summary line in its place once it ends.

    In a terminal the bar is tqdm's text bar; in a notebook it is tqdm's ipywidgets bar, shown
    through a display handle. At the end the bar goes (leave=False) and the summary line takes
    its place (in a notebook: the same output, updated), so a saved notebook reads
    "training: 500 steps in 45.2 s, final running loss 158.9", not the frozen text fallback
    "0%| | 0/500" that a widget leaves once its state is stripped.
    """

    def __init__(self, steps: int, start: int, desc: str):
        from tqdm.auto import notebook_tqdm, std_tqdm, tqdm

        self.steps, self.start, self.desc = steps, start, desc
        self.began = time.perf_counter()
        self.handle = None
        if notebook_tqdm is not std_tqdm:  # a Jupyter kernel with ipywidgets: the widget bar
            from IPython.display import display

            self.bar = tqdm(total=steps, initial=start, desc=desc, leave=False, display=False)
            self.handle = display(self.bar.container, display_id=True)
        else:
            self.bar = tqdm(total=steps, initial=start, desc=desc, leave=False)

    def update(self, step: int, history: "History") -> None:
        self.bar.update(1)
        if step % 10 == 0 or step == self.steps - 1:
            self.bar.set_postfix(loss=f"{history.smoothed()[-1]:.4f}")

    def finish(self, history: "History", done: int) -> None:
        """Close the bar and show the summary; `done` is the step reached (below `steps` when the run stopped early)."""
        self.bar.close()
        seconds = time.perf_counter() - self.began
        ran = done - self.start
        if done < self.steps:
            line = f"{self.desc}: stopped after {ran} of {self.steps - self.start} steps ({seconds:.1f} s)"
        else:
            line = f"{self.desc}: {ran} steps in {seconds:.1f} s"
            if self.start:
                line += f" (resumed at step {self.start} of {self.steps})"
        if history.losses:
            line += f", final running loss {history.smoothed()[-1]:.4g}"
        if self.handle is not None:
            self.handle.update({"text/plain": line}, raw=True)
        else:
            print(line)


def train(
    model: nn.Module,
    loss_fn: Callable[[nn.Module, Any], torch.Tensor],
    data,
    *,
    steps: int,
    lr: float = 1e-3,
    weight_decay: float = 0.0,
    grad_clip: float | None = 1.0,
    seed: int = 0,
    params=None,
    device=None,
    checkpoint=None,
    checkpoint_every: int | None = None,
    resume: bool = False,
    sample_every: int | None = None,
    sample_fn: Callable[[nn.Module, int], Any] | None = None,
    lr_schedule: str | None = None,
    warmup: int = 50,
    progress: bool = True,
    desc: str = "training",
    precision: str = "fp32",
    accumulation_steps: int = 1,
) -> History:
    """Train `model` for `steps` optimizer steps on `loss_fn(model, batch)`; return the History.

    With `checkpoint` set, the run is saved there at the end (and every `checkpoint_every`
    steps); `resume=True` continues a saved run from its step, so a run interrupted and
    resumed ends exactly where an uninterrupted one would (data order aside, when `data` is
    an iterable with its own randomness). A checkpoint path with a suffix (run.ckpt) is one
    file; one without (run) is a folder in accelerate's format (save_state / load_state).

    `data` gives the global batch of each step; with w processes and `accumulation_steps` k,
    each process computes the gradient of k micro-batches of B/(w k) rows (see `shard`) and one
    optimizer step follows. History.losses holds the mean loss over all of them, per step.
    """
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}.")
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {list(PRECISIONS)}, got {precision!r}.")
    if not isinstance(accumulation_steps, int) or accumulation_steps < 1:
        raise ValueError(f"accumulation_steps must be a whole number of at least 1, got {accumulation_steps!r}.")
    if sample_every is not None and sample_fn is None:
        raise ValueError("sample_every is set but sample_fn is not: pass sample_fn(model, step).")
    checkpoint = Path(checkpoint) if checkpoint is not None else None
    if resume and checkpoint is None:
        raise ValueError("resume=True needs the checkpoint path to resume from.")
    if checkpoint is not None and checkpoint.exists() and not resume:
        raise FileExistsError(
            f"{checkpoint} already exists. Pass resume=True to continue that run, "
            "or choose another checkpoint path (it is never overwritten by a fresh run)."
        )
    if resume and not checkpoint.exists():
        raise FileNotFoundError(f"Cannot resume: {checkpoint} does not exist. Start with resume=False.")

    # The device: the one asked for, else where the model is. Several processes on GPUs: one GPU each.
    first = next(iter(model.parameters()), None)
    wanted = torch.device(device) if device is not None else (first.device if first is not None else torch.device("cpu"))
    accelerator = _fresh_accelerator(cpu=wanted.type == "cpu", accumulation_steps=accumulation_steps)
    rank, processes = accelerator.process_index, accelerator.num_processes
    if processes > 1 and wanted.type != "cpu":
        device = accelerator.device
    main = accelerator.is_main_process

    torch.manual_seed(seed)
    if device is not None:
        model.to(device)
    params = [p for p in (model.parameters() if params is None else params) if p.requires_grad]
    if not params:
        raise ValueError("No trainable parameters: every parameter has requires_grad=False.")
    device_type = params[0].device.type
    # fused: one kernel updates every parameter (about 3x faster than the per-tensor loop on a CPU)
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=device_type in ("cpu", "cuda"))
    # One process: `wrapped` is `model` itself. Several: DistributedDataParallel around it.
    wrapped, optimizer = accelerator.prepare(model, optimizer)
    trainee = wrapped if wrapped is model else _DistributedModel(wrapped, model)
    folder = checkpoint is not None and _is_folder_checkpoint(checkpoint)
    history = History()
    start = 0
    if resume and folder:
        accelerator.load_state(str(checkpoint))  # weights, optimizer and every process's RNG states
        state = json.loads((checkpoint / STATE_JSON).read_text())
        start = int(state["step"])
        history.losses = list(state["losses"])
    elif resume:
        state = torch.load(checkpoint, map_location="cpu", weights_only=True)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["rng"]["torch"])
        start = int(state["step"])
        history.losses = list(state["losses"])
    history.start_step = 0
    next_batch = _batches(data)

    def save(step: int) -> None:
        if folder:  # every process writes its RNG state; the main process the rest
            tmp, old = checkpoint.with_name(checkpoint.name + ".tmp"), checkpoint.with_name(checkpoint.name + ".old")
            if main and tmp.exists():
                shutil.rmtree(tmp)  # left by an interrupted save
            accelerator.wait_for_everyone()
            accelerator.save_state(str(tmp))
            accelerator.wait_for_everyone()
            if main:
                (tmp / STATE_JSON).write_text(json.dumps({"step": step, "losses": history.losses}))
                if checkpoint.exists():
                    checkpoint.rename(old)
                tmp.rename(checkpoint)  # the old folder goes only once the new one is complete
                if old.exists():
                    shutil.rmtree(old)
        elif main:
            checkpoint.parent.mkdir(parents=True, exist_ok=True)
            tmp = checkpoint.with_suffix(checkpoint.suffix + ".tmp")
            torch.save(
                {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step,
                 "rng": _rng_state(), "losses": history.losses},
                tmp,
            )
            tmp.replace(checkpoint)  # atomic: an interrupted save never leaves half a file
        accelerator.wait_for_everyone()

    model.train()
    precision = resolve_precision(precision, device_type)
    autocast = dict(device_type=device_type, dtype=torch.bfloat16, enabled=precision == "bf16")
    ema = model if isinstance(model, EMATrainee) else None
    bar = _Progress(steps, start, desc) if progress and main else None
    began = time.perf_counter()
    done = start
    try:
        for step in range(start, steps):
            for group in optimizer.param_groups:
                group["lr"] = lr * _lr_factor(lr_schedule, step, steps, warmup)
            if ema is not None:
                ema.update_ema()  # fold in the weights of the previous optimizer step
            optimizer.zero_grad(set_to_none=True)
            losses = []
            for micro in shard(next_batch(step), rank, processes, accumulation_steps):
                # the first k-1 micro-batches skip the all-reduce (no_sync); the k-th averages the sum
                with accelerator.accumulate(wrapped):
                    with torch.autocast(**autocast):
                        loss = loss_fn(trainee, move_to(micro, device)).float()
                    accelerator.backward(loss)  # gradient of loss / k, added to .grad
                losses.append(loss.detach())
            # the step's loss: mean over micro-batches, then over processes (the global batch mean)
            loss = accelerator.reduce(torch.stack(losses).mean(), reduction="mean")
            if not torch.isfinite(loss):
                raise FloatingPointError(f"The loss became {loss.item()} at step {step}. Try a lower learning rate.")
            if grad_clip is not None:
                accelerator.clip_grad_norm_(params, grad_clip)
            optimizer.step()
            history.losses.append(loss.item())
            if processes > 1 and step == start:
                _check_in_step(accelerator, params)
            if bar is not None:
                bar.update(step, history)
            done = step + 1
            if main and sample_every and (done % sample_every == 0 or done == steps):
                model.eval()
                with torch.no_grad():
                    history.samples.append((done, sample_fn(model, done)))
                model.train()
            if checkpoint is not None and checkpoint_every and done % checkpoint_every == 0 and done < steps:
                save(done)
    finally:
        if bar is not None:
            bar.finish(history, done)
    model.eval()
    history.seconds = time.perf_counter() - began
    if checkpoint is not None:
        save(steps)
    return history


def _check_in_step(accelerator, params) -> None:
    """After the first step of several processes: their weights must still agree (one checksum each,
    the sum of squared weights; equal to rounding, as processes on different hardware may round differently)."""
    checksum = torch.stack([p.detach().double().pow(2).sum() for p in params]).sum().reshape(1)
    sums = accelerator.gather(checksum)
    if not torch.allclose(sums, sums[:1].expand_as(sums), rtol=1e-9, atol=0.0):
        raise RuntimeError(
            f"After one step the {accelerator.num_processes} processes hold different weights (checksums "
            f"{sums.tolist()}): their gradients were not averaged. loss_fn must compute the loss by calling "
            "the model it is given (model(...), its forward); methods like model.encode(...) bypass the "
            "gradient average of DistributedDataParallel. Train such a model in one process.")
