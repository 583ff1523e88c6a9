"""Recipe: a small pixel-space DDPM on 32x32 shapes images, trained on a CPU.

    python -m sdlearn.recipes.ddpm --out data/ddpm-shapes [--steps N] [--resume] [--overwrite]

What is trained (sdlearn.ddpm has the equations and the reasons): sdlearn's UNet at toy
size (sdlearn.ddpm.unet_config(): 3 channels, 32x32, widths 16/32/64), predicting v (SD 2's
target; --prediction-type epsilon gives DDPM's eq. 14) with Min-SNR-5 loss weights
(--min-snr-gamma 0: DDPM's unweighted L_simple): t uniform on 0..999, SD's scaled_linear betas
0.00085..0.012 (--beta-schedule linear gives DDPM's 1e-4..0.02), and offset noise of std 0.1
(--offset-noise). On the 2-core CPU, eps + L_simple for 3,200 steps drew a clean shape 20% of
the time; v + Min-SNR-5 for the same time 55-70% (sdlearn.ddpm explains why).
(--beta-schedule squaredcos_cap_v2 gives Nichol & Dhariwal's cosine schedule.)

How the clean-shape rate grows with training (200 DDIM-50 samples each, seed 0, fp32, runs
made two at a time with --threads 1 on an AVX2-only 2-core CPU; everything else as the
defaults): batch 32 for 1,400 steps 6.5%; the same with the cosine schedule and no offset
noise 7.5%; with --lr 5e-3 10.5%; batch 16 for 2,800 steps (the same images seen) 33%;
batch 16 for 3,500 steps 50.5%; batch 8 for 6,000 steps 49.5%; the shipped batch 32 for
3,400 steps (bf16, trained on a CPU with native bf16) 60%. Small batches learn faster per image early on, but not past about 3,000
steps; the rate is still climbing steeply where the 15-minute budget ends.
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
<out>/training.json (settings, times, losses, the clean-shape rate measured at the end)
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
from sdlearn.ddpm import (BETA_RANGES, IMAGE_SIZE, MIN_SNR_GAMMA, PREDICTION_TYPES, DiffusionLoss, sample, schedule,
                         schedule_config, training_batch, unet_config)
from sdlearn.recipes import prepare_work_folder, work_folder  # noqa: F401 (work_folder: callers ask the recipe)
from sdlearn.train import PRECISIONS, EMALoss, EMATrainee, resolve_precision, train
from sdlearn.unet import UNet


STEPS = 3400  # the shipped model's training length: 858 s with --threads 1 --precision bf16 on a 2-core CPU with native bf16 (an AVX2-only 2-core CPU measured 0.32-0.37 s per fp32 step with 2 threads)


class NoisyShapes:
    """data(step) -> (x0, t, eps): training images with a random timestep and noise each.

    Deterministic in (seed, step), so runs are reproducible and --resume continues exactly.
    """

    def __init__(self, images: torch.Tensor, batch_size: int, T: int, seed: int = 0, offset_noise: float = 0.0):
        self.images, self.batch_size, self.T, self.seed, self.offset_noise = images, batch_size, T, seed, offset_noise

    def __call__(self, step: int) -> tuple:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
        x0 = self.images[torch.randint(len(self.images), (self.batch_size,), generator=g)]
        return training_batch(x0, self.T, generator=g, offset_noise=self.offset_noise)


def train_ddpm(out, steps: int = STEPS, batch_size: int = 32, lr: float = 2e-3, ema_decay: float = 0.999,
               train_images: int = 10_000, seed: int = 0, resume: bool = False, overwrite: bool = False,
               eval_samples: int = 64, progress: bool = True, command: str = "", beta_schedule: str = "scaled_linear",
               prediction_type: str = "v_prediction", min_snr_gamma: float | None = MIN_SNR_GAMMA,
               channels: tuple = (16, 32, 64), offset_noise: float = 0.1, keep_work: bool = False,
               precision: str = "fp32") -> dict:
    """Train, save to `out`, and return the training report (also written to out/training.json)."""
    out = Path(out)
    work = prepare_work_folder(out, "unet/config.json", "a DDPM", resume, overwrite)

    precision = resolve_precision(precision)  # "auto": bf16 where the CPU has it natively, else fp32
    wall, cpu = time.perf_counter(), time.process_time()
    images = Shapes(train_images, seed=0, size=IMAGE_SIZE, split="train").tensors()  # (N, 3, 32, 32)
    torch.manual_seed(seed)
    config = schedule_config(beta_schedule, prediction_type)
    model = EMATrainee(UNet(unet_config(block_out_channels=tuple(channels))), ema_decay)
    checkpoint = work / "train.ckpt"
    loss = EMALoss(DiffusionLoss(schedule(config), prediction_type, min_snr_gamma))
    history = train(
        model, loss, NoisyShapes(images, batch_size, config["num_train_timesteps"], seed, offset_noise), steps=steps, lr=lr, lr_schedule="cosine",
        seed=seed, checkpoint=checkpoint, checkpoint_every=max(1, min(250, steps // 4)),
        resume=resume and checkpoint.exists(), progress=progress, desc="ddpm", precision=precision,
    )
    model.update_ema()  # the last optimizer step joins the average too
    train_seconds = time.perf_counter() - wall

    unet = model.ema.eval()
    unet.save_pretrained(out / "unet", overwrite=overwrite)
    (out / "scheduler").mkdir(parents=True, exist_ok=True)
    (out / "scheduler" / "scheduler_config.json").write_text(json.dumps(config, indent=2) + "\n")

    report = {
        "command": command,
        "settings": dict(steps=steps, batch_size=batch_size, lr=lr, lr_schedule="cosine", ema_decay=ema_decay,
                         train_images=train_images, seed=seed, image_size=IMAGE_SIZE, beta_schedule=beta_schedule,
                         prediction_type=prediction_type, min_snr_gamma=min_snr_gamma,
                         block_out_channels=list(channels), offset_noise=offset_noise, precision=precision),
        "unet_parameters": unet.num_parameters(),
        "loss_first_50": float(np.mean(history.losses[:50])),
        "loss_last_200": float(np.mean(history.losses[-200:])),
        "train_wall_seconds": round(train_seconds, 1),
        "train_cpu_seconds": round(time.process_time() - cpu, 1),
        "torch_threads": torch.get_num_threads(),
        "resumed": bool(resume),
    }
    if eval_samples:
        from sdlearn.evaluate import is_clean_shape
        from sdlearn.plotting import image_grid

        began = time.perf_counter()
        x = sample(unet, "ddim", eval_samples, seed=0, steps=50, schedule_config=config)
        report["clean_rate_ddim_50"] = {"samples": eval_samples, "rate": is_clean_shape(x).float().mean().item(),
                                        "seconds": round(time.perf_counter() - began, 1)}
        image_grid(x[:32], ncols=8).save(out / "samples.png")
    (out / "training.json").write_text(json.dumps(report, indent=2) + "\n")
    if not keep_work:
        shutil.rmtree(work)
    return report


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sdlearn.recipes.ddpm", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="output folder, e.g. data/ddpm-shapes")
    parser.add_argument("--steps", type=int, default=STEPS)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--ema-decay", type=float, default=0.999)
    parser.add_argument("--train-images", type=int, default=10_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--beta-schedule", choices=sorted(BETA_RANGES), default="scaled_linear")
    parser.add_argument("--prediction-type", choices=PREDICTION_TYPES, default="v_prediction", help="what the UNet learns to output")
    parser.add_argument("--min-snr-gamma", type=float, default=MIN_SNR_GAMMA, help="Min-SNR loss weights (0: unweighted, DDPM's L_simple)")
    parser.add_argument("--offset-noise", type=float, default=0.1, help="std of the per-image, per-channel noise offset (0: plain N(0, I))")
    parser.add_argument("--channels", type=int, nargs="+", default=[16, 32, 64], help="UNet block_out_channels")
    parser.add_argument("--eval-samples", type=int, default=64, help="DDIM-50 samples scored at the end (0: skip)")
    parser.add_argument("--resume", action="store_true", help="continue an interrupted run (from <out>-work/)")
    parser.add_argument("--overwrite", action="store_true", help="replace a DDPM already in --out")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice; 1 is fastest on a busy machine)")
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
        report = train_ddpm(
            args.out, steps=args.steps, batch_size=args.batch_size, lr=args.lr, ema_decay=args.ema_decay,
            train_images=args.train_images, seed=args.seed, resume=args.resume, overwrite=args.overwrite,
            eval_samples=args.eval_samples, progress=not args.no_progress, command=command,
            beta_schedule=args.beta_schedule, prediction_type=args.prediction_type,
            min_snr_gamma=args.min_snr_gamma or None, channels=tuple(args.channels), offset_noise=args.offset_noise,
            keep_work=args.keep_work, precision=args.precision,
        )
    except FileExistsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(report, indent=2))
    print(f"saved to {args.out}: {report['train_wall_seconds']:.0f} s wall, {report['train_cpu_seconds']:.0f} s CPU")
    return 0


if __name__ == "__main__":
    sys.exit(main())
