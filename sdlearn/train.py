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
training checkpoint carries it and a resumed run continues exactly.
"""

import copy
import math
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
    """What train() optimises when an EMA is kept: `model`, and a frozen copy `ema` of its running average."""

    def __init__(self, model: nn.Module, decay: float = 0.999):
        super().__init__()
        self.model = model
        self.ema = copy.deepcopy(model).requires_grad_(False)
        self.decay = decay
        self.register_buffer("ema_updates", torch.zeros((), dtype=torch.int64))

    @torch.no_grad()
    def update_ema(self) -> None:
        """Fold the current weights into the average (with the warm-up decay of the module docstring)."""
        k = int(self.ema_updates)
        d = min(self.decay, (1 + k) / (10 + k))
        for averaged, current in zip(self.ema.parameters(), self.model.parameters()):
            averaged.lerp_(current, 1.0 - d)  # averaged = d * averaged + (1 - d) * current
        self.ema_updates += 1


class EMALoss:
    """loss_fn for an EMATrainee: fold the previous optimizer step's weights into the EMA, then `loss(model, batch)`."""

    def __init__(self, loss: Callable):
        self.loss = loss

    def __call__(self, trainee: EMATrainee, batch) -> torch.Tensor:
        trainee.update_ema()
        return self.loss(trainee.model, batch)

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
) -> History:
    """Train `model` for `steps` optimizer steps on `loss_fn(model, batch)`; return the History.

    With `checkpoint` set, the run is saved there at the end (and every `checkpoint_every`
    steps); `resume=True` continues a saved run from its step, so a run interrupted and
    resumed ends exactly where an uninterrupted one would (data order aside, when `data` is
    an iterable with its own randomness).
    """
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}.")
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {list(PRECISIONS)}, got {precision!r}.")
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

    torch.manual_seed(seed)
    if device is not None:
        model.to(device)
    params = [p for p in (model.parameters() if params is None else params) if p.requires_grad]
    if not params:
        raise ValueError("No trainable parameters: every parameter has requires_grad=False.")
    device_type = params[0].device.type
    # fused: one kernel updates every parameter (about 3x faster than the per-tensor loop on a CPU)
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=device_type in ("cpu", "cuda"))
    history = History()
    start = 0
    if resume:
        if not checkpoint.exists():
            raise FileNotFoundError(f"Cannot resume: {checkpoint} does not exist. Start with resume=False.")
        state = torch.load(checkpoint, map_location="cpu", weights_only=True)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["rng"]["torch"])
        start = int(state["step"])
        history.losses = list(state["losses"])
    history.start_step = 0
    next_batch = _batches(data)

    def save(step: int) -> None:
        checkpoint.parent.mkdir(parents=True, exist_ok=True)
        tmp = checkpoint.with_suffix(checkpoint.suffix + ".tmp")
        torch.save(
            {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step,
             "rng": _rng_state(), "losses": history.losses},
            tmp,
        )
        tmp.replace(checkpoint)  # atomic: an interrupted save never leaves half a file

    model.train()
    precision = resolve_precision(precision, device_type)
    bar = _Progress(steps, start, desc) if progress else None
    began = time.perf_counter()
    done = start
    try:
        for step in range(start, steps):
            for group in optimizer.param_groups:
                group["lr"] = lr * _lr_factor(lr_schedule, step, steps, warmup)
            batch = move_to(next_batch(step), device)
            with torch.autocast(device_type, dtype=torch.bfloat16, enabled=precision == "bf16"):
                loss = loss_fn(model, batch).float()
            if not torch.isfinite(loss):
                raise FloatingPointError(f"The loss became {loss.item()} at step {step}. Try a lower learning rate.")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if grad_clip is not None:
                torch.nn.utils.clip_grad_norm_(params, grad_clip)
            optimizer.step()
            history.losses.append(loss.item())
            if bar is not None:
                bar.update(step, history)
            done = step + 1
            if sample_every and (done % sample_every == 0 or done == steps):
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
