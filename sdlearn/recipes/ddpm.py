"""Recipe: a small pixel-space DDPM on 32x32 shapes images, trained on a CPU.

    python -m sdlearn.recipes.ddpm --out data/ddpm-shapes [--steps N] [--resume] [--overwrite]

What is trained (sdlearn.ddpm has the equations and the reasons): sdlearn's UNet at toy
size (sdlearn.ddpm.unet_config(): 3 channels, 32x32; widths 32/32/64, --channels, where lesson
04's minute of training uses unet_config()'s 16/32/64), predicting v (SD 2's
target; --prediction-type epsilon gives DDPM's eq. 14) with Min-SNR-5 loss weights
(--min-snr-gamma 0: DDPM's unweighted L_simple), SD's scaled_linear betas 0.00085..0.012
(--beta-schedule linear gives DDPM's 1e-4..0.02, squaredcos_cap_v2 Nichol & Dhariwal's
cosine), and offset noise of std 0.1 (--offset-noise).

Told what to draw (--unconditional turns it off). Each training image comes with its colour,
shape and size as a condition vector (sdlearn.ddpm.condition_vector), added to the UNet's
timestep embedding. Each attribute is hidden from the model with probability 0.1
(--attribute-dropout) and all three with probability 0.1 (--unconditional-prob), so one
network learns to draw what it is told, any part of it, or anything at all; the last is the
unconditional model that classifier-free guidance compares against. Position is not told
(sdlearn.ddpm.condition_vector says why). The end of the run measures the clean-shape rate
at each of --guidance-scales and records the best as `guidance_scale` in training.json.

Where the timesteps come from (--timesteps). The Min-SNR weight w(t) is under 0.05 for a
third of SD's 1000 timesteps, so a uniform t spends much of each batch where the loss barely
counts. "importance" draws t with probability proportional to w(t) and divides the weight
out again (sdlearn.ddpm.timestep_probabilities): the same objective, every sample counting.

The course's goal is a clean shape in 90% of DDIM-50 samples after at most 15 minutes of
training on a 2-core CPU (sdlearn.evaluate's referee). data/ddpm-shapes/README.md has what the
shipped run measured (its training.json and evaluation.json hold the figures) and the record of
the experiments that chose these settings.

Data: 10,000 images of the train split of the shapes dataset (seed 0), at 32 px; the
held-out (colour, shape) pairs stay unseen, as for every generator of the course.

Exponential moving average (EMA) of the weights. The weights after each optimizer step
jitter around a good solution; their running average is a better model than any single
step (Polyak averaging; DDPM uses a decay of 0.9999 over 800k steps). For a short run the
average must forget faster, so the decay warms up (Tan & Le, EfficientNet; the diffusers
EMAModel's default):

    theta_ema <- d_k theta_ema + (1 - d_k) theta,     d_k = min(decay, (1 + k) / (10 + k))

The EMA copy lives inside the module that train() optimises (as frozen parameters), so
the training checkpoint carries it and --resume continues exactly. The EMA weights are
what the recipe ships.

Output (a diffusers-style layout): <out>/unet/ (config.json + safetensors, loads in
sdlearn.unet.UNet and diffusers' UNet2DConditionModel), <out>/scheduler/scheduler_config.json
(the schedule, for sdlearn.samplers.sampler_from_config and diffusers' DDPMScheduler),
<out>/training.json (settings, times, losses, the clean-shape rates measured at the end)
and <out>/samples.png. Checkpoints go to <out>-work/ and are removed after a finished run.
"""

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch

from sdlearn.datasets import Shapes
from sdlearn.ddpm import (BETA_RANGES, IMAGE_SIZE, MIN_SNR_GAMMA, PREDICTION_TYPES, DiffusionLoss, condition_vector,
                         sample, schedule, schedule_config, timestep_probabilities, training_batch, unet_config)
from sdlearn.doctor import cpu_name
from sdlearn.cli import (NON_NEGATIVE_FLOAT, NON_NEGATIVE_INT, POSITIVE_FLOAT, POSITIVE_INT, PROBABILITY, SEED, ArgumentParser,
                         one_line)
from sdlearn.models.checkpoint import CheckpointError
from sdlearn.models.files import write_text  # atomic: a failed write keeps the old file
from sdlearn.recipes import prepare_work_folder, run_keeping_only_resumable_work, work_folder  # noqa: F401 (work_folder: callers ask the recipe)
from sdlearn.train import PRECISIONS, EMALoss, EMATrainee, resolve_precision, train
from sdlearn.models.unet import UNet

STEPS = 4300  # the shipped model's training length (data/ddpm-shapes/training.json has its time)
TIMESTEP_SAMPLING = ("importance", "uniform")
GUIDANCE_SCALES = (1.5, 2.0, 2.5)  # measured at the end of a conditional run; the best is recorded


OUTPUTS = ("unet/config.json", "unet/diffusion_pytorch_model.safetensors", "scheduler/scheduler_config.json", "training.json")


def check_settings(**settings) -> None:
    """ValueError for a setting the run could not train with, before anything is written or rendered."""
    import math

    def number(name, low=None, high=None, low_open=False, integer=False, allow_none=False):
        value = settings[name]
        if value is None and allow_none:
            return
        kind = "a whole number" if integer else "a number"
        ok = isinstance(value, int) if integer else isinstance(value, (int, float)) and math.isfinite(value)
        ok = ok and not isinstance(value, bool)
        if ok and low is not None:
            ok = value > low if low_open else value >= low
        if ok and high is not None:
            ok = value <= high
        if not ok:
            where = "" if low is None else f" {'>' if low_open else '>='} {low}" + ("" if high is None else f" and <= {high}")
            raise ValueError(f"{name} must be {kind}{where}, got {value!r}.")

    number("steps", 1, integer=True)
    number("batch_size", 1, integer=True)
    number("train_images", 1, integer=True)
    number("eval_samples", 0, integer=True)
    number("seed", 0, 2**32 - 1, integer=True)
    number("lr", 0, low_open=True)
    number("ema_decay", 0, 1)
    number("min_snr_gamma", 0, low_open=True, allow_none=True)
    number("offset_noise", 0)
    for name in ("attribute_dropout", "unconditional_prob"):
        value = settings[name]
        if not (isinstance(value, (int, float)) and not isinstance(value, bool) and 0 <= value <= 1):  # NaN fails too
            raise ValueError(f"{name} must be a probability in [0, 1], got {value!r}.")
    if settings["timesteps"] not in TIMESTEP_SAMPLING:
        raise ValueError(f"timesteps must be one of {list(TIMESTEP_SAMPLING)}, got {settings['timesteps']!r}.")
    if settings["beta_schedule"] not in BETA_RANGES:
        raise ValueError(f"beta_schedule must be one of {sorted(BETA_RANGES)}, got {settings['beta_schedule']!r}.")
    if settings["prediction_type"] not in PREDICTION_TYPES:
        raise ValueError(f"prediction_type must be one of {list(PREDICTION_TYPES)}, got {settings['prediction_type']!r}.")
    scales = settings["guidance_scales"]
    if not scales or not all(isinstance(g, (int, float)) and math.isfinite(g) and g >= 0 for g in scales):
        raise ValueError(f"guidance_scales must be finite numbers >= 0 (at least one), got {scales!r}.")


def check_network(conditional: bool, channels: tuple, layers_per_block) -> None:
    """ValueError for widths the UNet cannot be built with at this image size (before any work)."""
    default = unet_config()
    if len(channels) != default.num_levels:
        raise ValueError(f"--channels takes {default.num_levels} widths, one per level of the UNet, got {list(channels)}.")
    unet_config(conditional, block_out_channels=channels, layers_per_block=layers_per_block)  # heads, layers per level
    groups = default.norm_num_groups
    if any(c % groups for c in channels):
        raise ValueError(f"--channels {list(channels)}: each width must be a multiple of {groups} (the GroupNorm groups).")


class NoisyShapes:
    """data(step) -> (x0, t, eps) or, conditional, (x0, t, eps, None, condition): a training batch.

    Every image gets a random timestep and noise; a conditional batch also gets each image's
    condition vector with attributes hidden at random (`attribute_dropout` each,
    `unconditional_prob` all at once). Deterministic in (seed, step), so runs are
    reproducible and --resume continues exactly.
    """

    def __init__(self, images: torch.Tensor, batch_size: int, T: int, seed: int = 0, offset_noise: float = 0.0,
                 labels: torch.Tensor | None = None, attribute_dropout: float = 0.1, unconditional_prob: float = 0.1,
                 timestep_probabilities: torch.Tensor | None = None):
        self.images, self.batch_size, self.T, self.seed, self.offset_noise = images, batch_size, T, seed, offset_noise
        self.labels, self.attribute_dropout, self.unconditional_prob = labels, attribute_dropout, unconditional_prob
        self.timestep_probabilities = timestep_probabilities

    def __call__(self, step: int) -> tuple:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
        index = torch.randint(len(self.images), (self.batch_size,), generator=g)
        batch = training_batch(self.images[index], self.T, generator=g, offset_noise=self.offset_noise,
                               timestep_probabilities=self.timestep_probabilities)
        if self.labels is None:
            return batch
        labels = self.labels[index, :3].clone()  # (B, 3) colour, shape, size
        hidden = torch.rand(labels.shape, generator=g) < self.attribute_dropout
        hidden |= torch.rand(len(labels), 1, generator=g) < self.unconditional_prob
        labels[hidden] = -1  # not told
        return (*batch, None, condition_vector(labels))


def train_ddpm(out, steps: int = STEPS, batch_size: int = 32, lr: float = 2e-3, ema_decay: float = 0.999,
               train_images: int = 10_000, seed: int = 0, resume: bool = False, overwrite: bool = False,
               eval_samples: int = 200, progress: bool = True, command: str = "", beta_schedule: str = "scaled_linear",
               prediction_type: str = "v_prediction", min_snr_gamma: float | None = MIN_SNR_GAMMA,
               channels: tuple = (32, 32, 64), layers_per_block: int | tuple = 1, offset_noise: float = 0.1, keep_work: bool = False,
               precision: str = "fp32", conditional: bool = True, attribute_dropout: float = 0.1,
               unconditional_prob: float = 0.1, timesteps: str = "importance",
               guidance_scales: tuple = GUIDANCE_SCALES) -> dict:
    """Train, save to `out`, and return the training report (also written to out/training.json)."""
    check_settings(steps=steps, batch_size=batch_size, lr=lr, ema_decay=ema_decay, train_images=train_images, seed=seed,
                   eval_samples=eval_samples, min_snr_gamma=min_snr_gamma, offset_noise=offset_noise,
                   attribute_dropout=attribute_dropout, unconditional_prob=unconditional_prob, timesteps=timesteps,
                   guidance_scales=guidance_scales, beta_schedule=beta_schedule, prediction_type=prediction_type)
    check_network(conditional, tuple(channels), layers_per_block)
    out = Path(out)
    work = prepare_work_folder(out, OUTPUTS, "a DDPM", resume, overwrite)

    precision = resolve_precision(precision)  # "auto": bf16 where the CPU has it natively, else fp32
    wall, cpu = time.perf_counter(), time.process_time()
    dataset = Shapes(train_images, seed=0, size=IMAGE_SIZE, split="train")
    images = dataset.tensors()  # (N, 3, 32, 32)
    torch.manual_seed(seed)
    config = schedule_config(beta_schedule, prediction_type)
    noise_schedule = schedule(config)
    p_t = timestep_probabilities(noise_schedule, prediction_type, min_snr_gamma) if timesteps == "importance" else None
    config_of_unet = unet_config(conditional, block_out_channels=tuple(channels), layers_per_block=layers_per_block)
    model = EMATrainee(UNet(config_of_unet), ema_decay)
    checkpoint = work / "train.ckpt"
    loss = EMALoss(DiffusionLoss(noise_schedule, prediction_type, min_snr_gamma, timestep_probabilities=p_t))
    data = NoisyShapes(images, batch_size, config["num_train_timesteps"], seed, offset_noise,
                       dataset.labels if conditional else None, attribute_dropout, unconditional_prob, p_t)
    history = train(
        model, loss, data, steps=steps, lr=lr, lr_schedule="cosine",
        seed=seed, checkpoint=checkpoint, checkpoint_every=max(1, min(250, steps // 4)),
        resume=resume and checkpoint.exists(), progress=progress, desc="ddpm", precision=precision,
    )
    model.update_ema()  # the last optimizer step joins the average too
    train_seconds = time.perf_counter() - wall

    unet = model.ema.eval()
    unet.save_pretrained(out / "unet", overwrite=overwrite)
    (out / "scheduler").mkdir(parents=True, exist_ok=True)
    write_text(out / "scheduler" / "scheduler_config.json", json.dumps(config, indent=2) + "\n")

    settings = dict(steps=steps, batch_size=batch_size, lr=lr, lr_schedule="cosine", ema_decay=ema_decay,
                    train_images=train_images, seed=seed, image_size=IMAGE_SIZE, beta_schedule=beta_schedule,
                    prediction_type=prediction_type, min_snr_gamma=min_snr_gamma, timesteps=timesteps,
                    block_out_channels=list(channels), layers_per_block=layers_per_block, offset_noise=offset_noise,
                    precision=precision, conditional=conditional)
    if conditional:
        settings.update(attribute_dropout=attribute_dropout, unconditional_prob=unconditional_prob)
    report = {
        "command": command,
        "settings": settings,
        "unet_parameters": unet.num_parameters(),
        "loss_first_50": float(np.mean(history.losses[:50])),
        "loss_last_200": float(np.mean(history.losses[-200:])),
        "train_wall_seconds": round(train_seconds, 1),
        "train_cpu_seconds": round(time.process_time() - cpu, 1),
        "torch_threads": torch.get_num_threads(),
        "cpu": cpu_name(),
        "resumed": bool(resume),
    }
    if eval_samples:
        report.update(measure_end_of_run(unet, config, eval_samples, conditional, guidance_scales, out / "samples.png"))
    write_text(out / "training.json", json.dumps(report, indent=2) + "\n")
    if not keep_work:
        shutil.rmtree(work)
    return report


def measure_end_of_run(unet: UNet, config: dict, n: int, conditional: bool, guidance_scales, grid_path: Path) -> dict:
    """Clean-shape rates of n DDIM-50 samples (per guidance scale when conditional); saves a grid of the best."""
    from sdlearn.evaluate import EVAL_PROMPT_SEED, attribute_set
    from sdlearn.referee import is_clean_shape
    from sdlearn.plotting import image_grid

    def measure(**kwargs) -> tuple:
        began = time.perf_counter()
        x = sample(unet, "ddim", n, seed=0, steps=50, schedule_config=config, **kwargs)
        return x, {"samples": n, "rate": is_clean_shape(x).float().mean().item(), "seconds": round(time.perf_counter() - began, 1)}

    if not conditional:
        x, result = measure()
        image_grid(x[:32], ncols=8).save(grid_path)
        return {"clean_rate_ddim_50": result}
    asked = attribute_set(n, seed=EVAL_PROMPT_SEED + 7)  # other scenes than sdlearn.evaluate's, which judges the choice
    rates, best = {}, None
    for scale in guidance_scales:
        x, rate = measure(attributes=asked, guidance_scale=scale)
        rates[f"{scale:g}"] = rate
        if best is None or rate["rate"] > best[0]["rate"]:
            best = (rate, scale, x)
    _, unconditional = measure()
    image_grid(best[2][:32], ncols=8).save(grid_path)
    return {"guidance_scale": best[1], "clean_rate_ddim_50": best[0],
            "clean_rate_ddim_50_by_guidance": rates, "clean_rate_ddim_50_unconditional": unconditional}


def main(argv=None) -> int:
    parser = ArgumentParser(prog="python -m sdlearn.recipes.ddpm", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="output folder, e.g. data/ddpm-shapes")
    parser.add_argument("--steps", type=POSITIVE_INT, default=STEPS)
    parser.add_argument("--batch-size", type=POSITIVE_INT, default=32)
    parser.add_argument("--lr", type=POSITIVE_FLOAT, default=2e-3)
    parser.add_argument("--ema-decay", type=PROBABILITY, default=0.999)
    parser.add_argument("--train-images", type=POSITIVE_INT, default=10_000)
    parser.add_argument("--seed", type=SEED, default=0)
    parser.add_argument("--beta-schedule", choices=sorted(BETA_RANGES), default="scaled_linear")
    parser.add_argument("--prediction-type", choices=PREDICTION_TYPES, default="v_prediction", help="what the UNet learns to output")
    parser.add_argument("--min-snr-gamma", type=NON_NEGATIVE_FLOAT, default=MIN_SNR_GAMMA, help="Min-SNR loss weights (0: unweighted, DDPM's L_simple)")
    parser.add_argument("--timesteps", choices=TIMESTEP_SAMPLING, default="importance",
                        help="draw t in proportion to its loss weight (importance) or uniformly")
    parser.add_argument("--offset-noise", type=NON_NEGATIVE_FLOAT, default=0.1, help="std of the per-image, per-channel noise offset (0: plain N(0, I))")
    parser.add_argument("--channels", type=POSITIVE_INT, nargs="+", default=[32, 32, 64], help="UNet block_out_channels")
    parser.add_argument("--layers-per-block", type=POSITIVE_INT, nargs="+", default=[1],
                        help="UNet layers_per_block: one number, or one per level")
    parser.add_argument("--unconditional", action="store_true", help="do not tell the model colour, shape and size")
    # (these two are checked by train_ddpm's check_settings: "must be a probability in [0, 1]")
    parser.add_argument("--attribute-dropout", type=float, default=0.1, help="probability of hiding each attribute from the model")
    parser.add_argument("--unconditional-prob", type=float, default=0.1, help="probability of hiding all three at once")
    parser.add_argument("--guidance-scales", type=NON_NEGATIVE_FLOAT, nargs="+", default=list(GUIDANCE_SCALES),
                        help="guidance scales measured at the end; the best is recorded (conditional models)")
    parser.add_argument("--eval-samples", type=NON_NEGATIVE_INT, default=200, help="DDIM-50 samples scored at the end, per guidance scale (0: skip)")
    parser.add_argument("--resume", action="store_true", help="continue an interrupted run (from <out>-work/)")
    parser.add_argument("--overwrite", action="store_true", help="replace a DDPM already in --out")
    parser.add_argument("--threads", type=POSITIVE_INT, default=None, help="torch CPU threads (default: torch's choice, one per core)")
    parser.add_argument("--precision", choices=PRECISIONS, default="fp32",
                        help="bf16: mixed precision (faster only on CPUs with native bf16: AVX-512 BF16 or AMX); "
                             "auto: bf16 where native, else fp32")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--keep-work", action="store_true", help="keep <out>-work/ (the last training checkpoint) afterwards")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    command = "python -m sdlearn.recipes.ddpm " + " ".join(sys.argv[1:] if argv is None else argv)
    try:
        report = run_keeping_only_resumable_work(args.out, lambda: train_ddpm(
            args.out, steps=args.steps, batch_size=args.batch_size, lr=args.lr, ema_decay=args.ema_decay,
            train_images=args.train_images, seed=args.seed, resume=args.resume, overwrite=args.overwrite,
            eval_samples=args.eval_samples, progress=not args.no_progress, command=command,
            beta_schedule=args.beta_schedule, prediction_type=args.prediction_type,
            min_snr_gamma=args.min_snr_gamma or None, channels=tuple(args.channels),
            layers_per_block=args.layers_per_block[0] if len(args.layers_per_block) == 1 else tuple(args.layers_per_block),
            offset_noise=args.offset_noise,
            keep_work=args.keep_work, precision=args.precision, conditional=not args.unconditional,
            attribute_dropout=args.attribute_dropout, unconditional_prob=args.unconditional_prob,
            timesteps=args.timesteps, guidance_scales=tuple(args.guidance_scales),
        ))
    except (CheckpointError, FileExistsError, ValueError, OSError) as exc:
        print(f"{parser.prog}: error: {one_line(exc)}", file=sys.stderr)
        return 1
    print(json.dumps(report, indent=2))
    print(f"saved to {args.out}: {report['train_wall_seconds']:.0f} s wall, {report['train_cpu_seconds']:.0f} s CPU")
    return 0


if __name__ == "__main__":
    sys.exit(main())
