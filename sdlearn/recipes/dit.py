"""Recipe: a class-conditional DiT on the tiny VAE's latents of shapes images, trained on a CPU (lesson 14).

    python -m sdlearn.recipes.dit --out data/dit-shapes --steps N --objective eps|flow --threads 1 [--overwrite]

Classes: the 8 colours x 4 shapes of the shapes dataset, 32 in all, id = colour index * 4 +
shape index over sdlearn.datasets' COLOUR_NAMES and SHAPES ("red circle" = 0, "red square" = 1,
..., "pink cross" = 31); size and position are left to chance. Unlike the text-to-image
models, this class-conditional model trains on all 32 pairs (split="all"), the held-out ones
included: a class label cannot be composed from parts, so there is no compositional test to
keep them for. (sdlearn.evaluate dit measures all 32 classes.)

Data: n images (seed 0) encoded once by the frozen tiny autoencoder (data/tiny-vae): the
posterior mean and std, (4, 8, 8) each; a step draws z_0 = scaling_factor * (mu + sigma n), as SD.

Objectives (one recipe, --objective):

    eps   DDPM:  z_t = sqrt(alpha_bar_t) z_0 + sqrt(1 - alpha_bar_t) eps,  L = ||eps - DiT(z_t, t, y)||^2
          with DiT's linear betas 1e-4 .. 0.02 (T = 1000), sampled with DDIM (DDIMScheduler).
          out_channels = in_channels: no learned sigma (DDIM and DPM-Solver ignore it anyway, and
          without it the loss is the plain L_simple).
    flow  rectified flow: z_s = (1 - s) z_0 + s n,  L = ||(n - z_0) - DiT(z_s, 1000 s, y)||^2, s ~ U(0, 1),
          sampled with flow_euler (FlowMatchEulerDiscreteScheduler, shift 1).

Labels are replaced by the null class with probability 0.1 (drop_class_labels) so the same
network learns the unconditional prediction that classifier-free guidance needs.

Size and steps (`DiTRecipeConfig`): chosen from a 30 s probe of steps/second on one thread
(`--probe` prints it; the figures are in the config's comments), for about 15 minutes of
training. Why num_embeds_ada_norm = 1000 for 32 classes: diffusers' DiTPipeline hard-codes the
null class as 1000 (ImageNet's), so only a table of 1000 classes lets it run our model with
guidance; rows 32..999 are never used (and cost one embedding lookup, nothing more).

Output: a diffusers DiTPipeline folder (sdlearn.pipeline.dit): transformer/, vae/ (a copy of
the tiny VAE), scheduler/, model_index.json with id2label (the class names), plus
training.json (settings, steps, seconds, CPU, loss curve summary). Written aside and swapped in;
an existing model is replaced only with --overwrite.

References: Peebles & Xie 2023 (DiT, arXiv:2212.09748); Ho et al. 2020 (DDPM); Liu et al. 2022
and Lipman et al. 2022 (rectified flow / flow matching); Ho & Salimans 2022 (classifier-free guidance).
"""

import argparse
import json
import shutil
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from sdlearn.cli import POSITIVE_FLOAT, POSITIVE_INT, SEED, ArgumentParser, one_line
from sdlearn.datasets import COLOUR_NAMES, SHAPES, Shapes, to_model_range
from sdlearn.diffusion.flow_matching import flow_interpolate, flow_velocity
from sdlearn.diffusion.schedules import NoiseSchedule
from sdlearn.doctor import cpu_name
from sdlearn.models.checkpoint import CheckpointError
from sdlearn.models.dit import DiT, DiTConfig, drop_class_labels
from sdlearn.models.files import write_text  # atomic: a failed write keeps the old file
from sdlearn.models.vae import AutoencoderKL
from sdlearn.pipeline.dit import DiTPipeline
from sdlearn.recipes import prepare_work_folder, run_keeping_only_resumable_work
from sdlearn.train import EMALoss, EMATrainee, train
from sdlearn.vae import load_tiny_vae

OBJECTIVES = ("eps", "flow")
CLASS_NAMES = tuple(f"{colour} {shape}" for colour in COLOUR_NAMES for shape in SHAPES)  # id = colour * 4 + shape
OUTPUTS = ("model_index.json", "transformer", "vae", "scheduler", "training.json")

# DiT's training schedule (the paper's linear betas), for diffusers' DDIMScheduler.
EPS_SCHEDULER = {
    "_class_name": "DDIMScheduler",
    "num_train_timesteps": 1000,
    "beta_start": 0.0001,
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "trained_betas": None,
    "clip_sample": False,
    "set_alpha_to_one": False,
    "steps_offset": 1,
    "prediction_type": "epsilon",
    "timestep_spacing": "trailing",  # the last step starts at t = 999, pure noise (leading starts at 981)
}
FLOW_SCHEDULER = {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 1.0}
SCHEDULERS = {"eps": EPS_SCHEDULER, "flow": FLOW_SCHEDULER}


def class_id(colour: str, shape: str) -> int:
    """The class of a (colour, shape) pair: colour index * 4 + shape index ("red circle" -> 0)."""
    return COLOUR_NAMES.index(colour) * len(SHAPES) + SHAPES.index(shape)


@dataclass
class DiTRecipeConfig:
    """What the recipe trains with. The defaults are the shipped runs'; `smoke()` a seconds-long check.

    Probe (`--probe 30 --threads 1`, batch 64, an AMD EPYC shared with other work, 2026-12-06):
        width 128, 6 blocks, patch 1 (64 tokens)       1.55 steps/s   2.88M parameters
        width 128, 6 blocks, patch 2 (16 tokens)       4.41 steps/s   2.88M   <- the default
        width 128, 8 blocks, patch 2                   3.84 steps/s   3.83M
        the default with a table of 32 classes         5.48 steps/s   2.14M   (the 1000-row tables cost 20%)
    4000 steps at 4.4 steps/s: about 15 minutes.
    """

    num_layers: int = 6
    num_attention_heads: int = 4
    attention_head_dim: int = 32  # D = 128
    patch_size: int = 2  # an 8x8 latent: 16 tokens of 2x2 latent pixels (16x16 image pixels); patch 1: 64 tokens, 2.8x slower
    num_embeds_ada_norm: int = 1000  # diffusers' DiTPipeline's null class is 1000 (see the module docstring)
    steps: int = 4000
    batch_size: int = 64
    lr: float = 1e-3
    ema_decay: float = 0.999
    n_images: int = 16000
    p_uncond: float = 0.1
    seed: int = 0

    @classmethod
    def smoke(cls, **overrides) -> "DiTRecipeConfig":
        values = dict(num_layers=1, attention_head_dim=8, steps=2, batch_size=8, n_images=64)
        return cls(**{**values, **overrides})

    def dit_config(self) -> DiTConfig:
        return DiTConfig(num_attention_heads=self.num_attention_heads, attention_head_dim=self.attention_head_dim,
                         in_channels=4, out_channels=4, num_layers=self.num_layers, sample_size=8,
                         patch_size=self.patch_size, num_embeds_ada_norm=self.num_embeds_ada_norm)


@torch.no_grad()
def precompute(vae: AutoencoderKL, n: int, seed: int = 0, chunk: int = 256) -> dict:
    """The posterior mean and std (n, 4, 8, 8) of n shapes images (all 32 pairs) and their class ids (n,)."""
    dataset = Shapes(n, seed=seed, size=64, split="all")
    means, stds = [], []
    for i in range(0, n, chunk):
        images = to_model_range(np.stack([dataset.pixels(j) for j in range(i, min(i + chunk, n))]))  # (chunk, 3, 64, 64)
        posterior = vae.encode(images)
        means.append(posterior.mean)
        stds.append(posterior.std)
    labels = dataset.labels[:, 0] * len(SHAPES) + dataset.labels[:, 1]  # colour * 4 + shape
    return {"mean": torch.cat(means), "std": torch.cat(stds), "labels": labels.clone()}


class LatentBatches:
    """train()'s data(step): (z_0, t, noise, y) for the objective, the same for the same step (resuming is exact).

    eps: t an integer timestep in 0..T-1; flow: t = s, a level in (0, 1). y has the null class
    with probability p_uncond.
    """

    def __init__(self, latents: dict, scaling_factor: float, config: DiTRecipeConfig, objective: str, null_class: int):
        self.latents, self.scaling_factor, self.config = latents, scaling_factor, config
        self.objective, self.null_class = objective, null_class

    def __call__(self, step: int):
        g = torch.Generator().manual_seed(self.config.seed * 1_000_003 + step)
        B = self.config.batch_size
        index = torch.randint(len(self.latents["mean"]), (B,), generator=g)
        mean, std = self.latents["mean"][index], self.latents["std"][index]  # (B, 4, 8, 8)
        z0 = self.scaling_factor * (mean + std * torch.randn(mean.shape, generator=g))
        labels = drop_class_labels(self.latents["labels"][index], self.null_class, self.config.p_uncond, generator=g)
        t = torch.randint(1000, (B,), generator=g) if self.objective == "eps" else torch.rand(B, generator=g)
        noise = torch.randn(z0.shape, generator=g)
        return z0, t, noise, labels


class DiTLoss:
    """train()'s loss_fn: the objective's MSE with the DiT's call DiT(z, t, y) (the course's DiffusionLoss and
    FlowMatchingLoss call a UNet with a text context; the equations are theirs, eps unweighted)."""

    def __init__(self, objective: str, schedule: NoiseSchedule | None = None):
        self.objective, self.schedule = objective, schedule

    def __call__(self, dit, batch) -> torch.Tensor:
        z0, t, noise, labels = batch
        if self.objective == "eps":
            z_t = self.schedule.q_sample(z0, t, noise)  # sqrt(alpha_bar) z_0 + sqrt(1 - alpha_bar) eps
            return F.mse_loss(dit(z_t, t, labels), noise)
        z_s = flow_interpolate(z0, noise, t)  # (1 - s) z_0 + s n
        return F.mse_loss(dit(z_s, 1000 * t, labels), flow_velocity(z0, noise))  # target v = n - z_0


def probe(config: DiTRecipeConfig, objective: str = "eps", seconds: float = 30.0) -> dict:
    """Steps per second of the config's DiT on random latents (forward, backward, AdamW step)."""
    torch.manual_seed(0)
    dit = DiT(config.dit_config())
    optimizer = torch.optim.AdamW(dit.parameters(), lr=config.lr)
    loss_fn = DiTLoss(objective, NoiseSchedule(1000, 0.0001, 0.02, "linear"))
    latents = {"mean": torch.randn(256, 4, 8, 8), "std": torch.full((256, 4, 8, 8), 0.1), "labels": torch.randint(32, (256,))}
    data = LatentBatches(latents, 1.0, config, objective, config.num_embeds_ada_norm)
    steps, began = 0, time.perf_counter()
    while time.perf_counter() - began < seconds:
        loss = loss_fn(dit, data(steps))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        steps += 1
    elapsed = time.perf_counter() - began
    return {"steps_per_second": round(steps / elapsed, 2), "steps": steps, "seconds": round(elapsed, 1),
            "parameters": dit.num_parameters(), "threads": torch.get_num_threads(), "cpu": cpu_name()}


def loss_summary(losses: list) -> dict:
    """The loss curve in a few numbers: the mean of the first and last 100 steps and of each tenth of the run."""
    tenths = np.array_split(np.asarray(losses, dtype=np.float64), min(10, len(losses)))
    return {"first_100": round(float(np.mean(losses[:100])), 5), "last_100": round(float(np.mean(losses[-100:])), 5),
            "by_tenth": [round(float(part.mean()), 5) for part in tenths]}


def train_dit(out: Path, config: DiTRecipeConfig, objective: str = "eps", overwrite: bool = False, resume: bool = False,
              vae_folder=None, progress: bool = True, command: str = "") -> dict:
    """Train, save the DiTPipeline folder and training.json to `out`, return the record."""
    if objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {OBJECTIVES}, got {objective!r}.")
    if not 0 <= config.p_uncond <= 1:
        raise ValueError(f"p_uncond must be a probability in [0, 1], got {config.p_uncond}.")
    out = Path(out)
    dit_config = config.dit_config()  # a bad size is refused here, before anything is written
    if vae_folder is not None and not (Path(vae_folder) / "config.json").is_file():
        raise FileNotFoundError(f"--vae {vae_folder} holds no config.json; expected a diffusers AutoencoderKL folder.")
    work = prepare_work_folder(out, OUTPUTS, "a DiT pipeline", resume, overwrite)
    wall, cpu = time.perf_counter(), time.process_time()
    vae = load_tiny_vae(vae_folder).eval().requires_grad_(False)
    latents_path = work / "latents.pt"
    if latents_path.is_file():
        latents = torch.load(latents_path, weights_only=False)
    else:
        latents = precompute(vae, config.n_images, config.seed)
        torch.save(latents, latents_path)
    precompute_seconds = time.perf_counter() - wall

    torch.manual_seed(config.seed)
    model = EMATrainee(DiT(dit_config), config.ema_decay)
    schedule = NoiseSchedule(1000, EPS_SCHEDULER["beta_start"], EPS_SCHEDULER["beta_end"], EPS_SCHEDULER["beta_schedule"])
    loss = EMALoss(DiTLoss(objective, schedule))
    data = LatentBatches(latents, vae.config.scaling_factor, config, objective, dit_config.null_class)
    checkpoint = work / "train.ckpt"
    began = time.perf_counter()
    history = train(model, loss, data, steps=config.steps, lr=config.lr, weight_decay=0.0, lr_schedule="cosine",
                    seed=config.seed, checkpoint=checkpoint, checkpoint_every=max(1, min(500, config.steps // 4)),
                    resume=resume and checkpoint.exists(), progress=progress, desc=f"dit ({objective})")
    model.update_ema()  # the last step joins the average
    train_seconds = time.perf_counter() - began

    dit = model.ema.eval()
    pipe = DiTPipeline(dit, vae, SCHEDULERS[objective], dict(enumerate(CLASS_NAMES)))
    record = {
        "command": command,
        "objective": objective,
        "steps": config.steps,
        "config": asdict(config),
        "transformer_config": dit_config.to_dict(),
        "parameters": dit.num_parameters(),
        "classes": len(CLASS_NAMES),
        "held_out_pairs": "trained on (class-conditional: all 32 colour x shape pairs)",
        "loss": loss_summary(history.losses),
        "precompute_seconds": round(precompute_seconds, 1),
        "train_wall_seconds": round(train_seconds, 1),
        "steps_per_second": round(len(history.losses) / max(train_seconds, 1e-9), 2),
        "total_cpu_seconds": round(time.process_time() - cpu, 1),
        "torch_threads": torch.get_num_threads(),
        "cpu": cpu_name(),
        "resumed": bool(resume),
    }
    pipe.save_pretrained(out, overwrite=overwrite)
    write_text(out / "training.json", json.dumps(record, indent=2) + "\n")
    shutil.rmtree(work)
    return record


def main(argv=None) -> int:
    parser = ArgumentParser(prog="python -m sdlearn.recipes.dit", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    defaults = DiTRecipeConfig()
    parser.add_argument("--out", type=Path, help="output folder, e.g. data/dit-shapes")
    parser.add_argument("--objective", choices=OBJECTIVES, default="eps", help="eps: DDPM's noise prediction; flow: flow matching (velocity)")
    parser.add_argument("--steps", type=POSITIVE_INT, default=defaults.steps)
    parser.add_argument("--batch-size", type=POSITIVE_INT, default=defaults.batch_size)
    parser.add_argument("--lr", type=POSITIVE_FLOAT, default=defaults.lr)
    parser.add_argument("--layers", type=POSITIVE_INT, default=defaults.num_layers, help="DiT blocks")
    parser.add_argument("--heads", type=POSITIVE_INT, default=defaults.num_attention_heads)
    parser.add_argument("--head-dim", type=POSITIVE_INT, default=defaults.attention_head_dim)
    parser.add_argument("--patch-size", type=POSITIVE_INT, choices=(1, 2, 4, 8), default=defaults.patch_size)
    parser.add_argument("--train-images", type=POSITIVE_INT, default=defaults.n_images)
    parser.add_argument("--seed", type=SEED, default=0)
    parser.add_argument("--vae", type=Path, default=None, help="the autoencoder folder (default: data/tiny-vae)")
    parser.add_argument("--probe", type=POSITIVE_FLOAT, default=None, metavar="SECONDS",
                        help="only measure training steps/second for SECONDS and print them (no --out needed)")
    parser.add_argument("--resume", action="store_true", help="continue an interrupted run (from <out>-work/)")
    parser.add_argument("--overwrite", action="store_true", help="replace a model already in --out")
    parser.add_argument("--threads", type=POSITIVE_INT, default=None, help="torch CPU threads (default: one per core)")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    config = replace(defaults, steps=args.steps, batch_size=args.batch_size, lr=args.lr, num_layers=args.layers,
                     num_attention_heads=args.heads, attention_head_dim=args.head_dim, patch_size=args.patch_size,
                     n_images=args.train_images, seed=args.seed)
    if args.probe:
        print(json.dumps(probe(config, args.objective, args.probe), indent=2))
        return 0
    if args.out is None:
        parser.error("--out is required (the folder to write the DiTPipeline into)")
    command = "python -m sdlearn.recipes.dit " + " ".join(sys.argv[1:] if argv is None else argv)
    try:
        record = run_keeping_only_resumable_work(args.out, lambda: train_dit(
            args.out, config, args.objective, overwrite=args.overwrite, resume=args.resume, vae_folder=args.vae,
            progress=not args.no_progress, command=command))
    except (CheckpointError, FileExistsError, ValueError, OSError) as exc:
        print(f"{parser.prog}: error: {one_line(exc)}", file=sys.stderr)
        return 1
    print(json.dumps({k: record[k] for k in ("objective", "steps", "parameters", "loss", "train_wall_seconds", "cpu")}, indent=2))
    print(f"saved to {args.out}: {record['train_wall_seconds']:.0f} s of training")
    return 0


if __name__ == "__main__":
    sys.exit(main())
