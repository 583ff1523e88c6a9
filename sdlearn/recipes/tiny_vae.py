"""Recipe: the tiny AutoencoderKL of lesson 02 and of the mini Stable Diffusion, trained on a CPU.

    python -m sdlearn.recipes.tiny_vae --out data/tiny-vae [--steps N] [--resume] [--overwrite]

The model is sdlearn.vae.AutoencoderKL with VAEConfig.tiny() (overridable with
--block-out-channels): four levels, so f = 8, and 4 latent channels; a 64x64 shapes image
becomes a 4x8x8 latent, 48 times fewer numbers, the same ratio as SD's 3x512x512 -> 4x64x64.

Loss. SD's autoencoder (Rombach et al. 2022; CompVis' LPIPSWithDiscriminator, kl_weight in
autoencoder_kl_f8's config)
minimises, per image,

    L = sum_pixels |x - x_hat| + kl_weight * KL(q(z | x) || N(0, I)),    kl_weight = 1e-6

(plus a perceptual LPIPS term and, later in training, a patch GAN, both left out here),
with x_hat decoded from a posterior *sample* z = mu + sigma * eps. The KL weight is tiny on
purpose: it only keeps the latents from drifting to huge values, it does not make them
N(0, I) — a strong KL term would blur the reconstructions (the beta trade-off of lesson 02)
and the diffusion model does not need a tidy prior, only a compact, faithful code. We use the
same loss, divided by the number of pixel values per image (3 x 64 x 64), which changes only
its scale, and add the squared error with the same weight as the absolute one: the squared
error is what PSNR measures, and it pulls large errors (edges) down faster.

Per-pixel weights. The shape covers 1-8% of a shapes image; the rest is flat white. With a
uniform loss a short run learns the background first and the shape last, and the average
PSNR hides it: a model trained with it drew green as teal and small squares and crosses as
blobs, and the shapes referee (sdlearn.evaluate) read far fewer of its reconstructions right
(data/tiny-vae/README.md, "Experiments"). Every image a latent diffusion model draws
passes through this decoder, so that is the ceiling of mini-SD's faithfulness. SD's
perceptual (LPIPS) term plays this part for photographs: it weighs edges and objects, not flat
areas. We weight each pixel instead,

    w = 1 + ink_weight * ink(x) + edge_weight * edges(x)

with ink(x) = how far the target pixel is from white and edges(x) = the largest difference to
a neighbouring pixel (the outline, where corners are). training.json records the referee's
reading of the reconstructions ("referee_on_reconstructions").

Scaling factor. Because the KL weight is tiny, the latents are not unit-variance. After
training, the recipe encodes training images, draws posterior samples z as SD's training
does, and writes scaling_factor = 1 / std(z) into config.json (SD 1.x: 0.18215 = 1 / 5.49).

The world it learns. SD's autoencoder was trained on far more images than any diffusion model
built on it is taught, which is why fine-tuning, ControlNet and newer denoisers reuse it. This
one is too: by default (--world wide) each batch is half the default shapes dataset (the
training split mini-SD learns from) and half Scenes, a wider world of one to three shapes per
image in any of ALL_COLOURS (14) and ALL_SHAPES (8: the star, diamond, hexagon and ring
besides the four mini-SD draws). So the star that lesson 12 teaches mini-SD is already
drawable by its decoder. --world shapes trains on the default dataset alone (the first
version of this model, which snapped every unknown shape to a known one). Neither world
contains a HELD_OUT pair, so the held-out PSNR below stays held out; training.json also
records the PSNR on renders of each extra shape, of the extra colours and of fresh scenes.

Output: a diffusers AutoencoderKL folder (config.json, diffusion_pytorch_model.safetensors)
plus training.json (settings, times, PSNR). An existing folder is refused unless
--overwrite; an interrupted run continues from <out>/train_state.pt with --resume.
Held-out quality: the mean PSNR of 200 test-split images (Shapes(200, split="test"): only
the four (colour, shape) pairs the training split never shows), decoded from the posterior
mean and clamped to [-1, 1].
"""

import json
import sys
import time
from pathlib import Path

import torch

from sdlearn.autoencoder import latent_scaling_factor, psnr
from sdlearn.cli import FINITE_FLOAT, NON_NEGATIVE_FLOAT, POSITIVE_FLOAT, POSITIVE_INT, SEED, ArgumentParser, one_line
from sdlearn.datasets import EXTRA_COLOURS, EXTRA_SHAPES, SHAPES, Scenes, Shapes
from sdlearn.models.files import write_text  # atomic: a failed write keeps the old file
from sdlearn.recipes import check_out_folder
from sdlearn.train import train
from sdlearn.models.vae import AutoencoderKL, VAEConfig

STATE_NAME = "train_state.pt"  # the resumable training checkpoint, removed after a finished run
OUTPUT_NAMES = ("config.json", "diffusion_pytorch_model.safetensors", "training.json", STATE_NAME)
# VAEConfig.tiny() is (32, 64, 64, 64) with 16 groups; narrower first levels train twice as fast
# on a CPU (the 64x64 and 32x32 convolutions dominate the cost), and 8 groups keep two channels per group.
BLOCK_OUT_CHANNELS = (16, 32, 64, 64)
NORM_NUM_GROUPS = 8
# The posterior starts with sigma = exp(-3) = 0.05 instead of 1 (see start_small_sigma).
LOGVAR_INIT = -6.0
# The shape covers a few percent of a 64x64 image; its pixels get this much extra loss weight.
INK_WEIGHT = 3.0
EDGE_WEIGHT = 10.0  # ... and its outline this much (corners tell a small square from a circle)


WORLDS = ("wide", "shapes")


class ShapesBatches:
    """data(step) -> (B, 3, 64, 64) images, an equal share from each dataset (the first ones
    take the remainder); depends only on (seed, step)."""

    def __init__(self, datasets, batch_size: int, seed: int = 0):
        self.datasets = list(datasets) if isinstance(datasets, (list, tuple)) else [datasets]
        self.batch_size, self.seed = batch_size, seed

    def __call__(self, step: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
        images = []
        for k, dataset in enumerate(self.datasets):
            share = self.batch_size // len(self.datasets) + (k < self.batch_size % len(self.datasets))
            index = torch.randint(len(dataset), (share,), generator=g)
            images += [dataset[int(i)]["image"] for i in index]
        return torch.stack(images)


def training_data(world: str, train_images: int, seed: int) -> list:
    """The datasets a batch is drawn from: [Shapes] for "shapes", [Shapes, Scenes] for "wide"."""
    if world not in WORLDS:
        raise ValueError(f"world must be one of {', '.join(WORLDS)}, got {world!r}.")
    datasets = [Shapes(train_images, seed=seed, split="train")]
    if world == "wide":
        datasets.append(Scenes(train_images, seed=seed))
    return datasets


def edges(x: torch.Tensor) -> torch.Tensor:
    """(B, 1, H, W) in [0, 1]: where the image changes, the outline of its shape (and its corners),
    one pixel wide on either side: the largest neighbouring-pixel difference over channels, /2."""
    dx = (x[..., :, 1:] - x[..., :, :-1]).abs().amax(dim=1, keepdim=True)  # (B, 1, H, W-1)
    dy = (x[..., 1:, :] - x[..., :-1, :]).abs().amax(dim=1, keepdim=True)  # (B, 1, H-1, W)
    grad = torch.zeros_like(x[:, :1])
    grad[..., :, 1:] = torch.maximum(grad[..., :, 1:], dx)
    grad[..., :, :-1] = torch.maximum(grad[..., :, :-1], dx)
    grad[..., 1:, :] = torch.maximum(grad[..., 1:, :], dy)
    grad[..., :-1, :] = torch.maximum(grad[..., :-1, :], dy)
    return (grad / 2).clamp(0, 1)


class AutoencoderLoss:
    """(w * (|x - x_hat| + (x - x_hat)^2) summed per image + kl_weight * KL) / values per image, batch mean.

    w = 1 + ink_weight * ink(x) + edge_weight * edges(x) per pixel, with ink(x) the mean over
    channels of (1 - x) / 2 (0 on the white background, up to 1 on a dark colour): see the
    module docstring.
    """

    def __init__(self, kl_weight: float = 1e-6, ink_weight: float = 0.0, edge_weight: float = 0.0):
        self.kl_weight, self.ink_weight, self.edge_weight = kl_weight, ink_weight, edge_weight

    def __call__(self, model: AutoencoderKL, x: torch.Tensor) -> torch.Tensor:
        posterior = model.encode(x)
        x_hat = model.decode(posterior.sample())  # decoded from a sample, as SD trains it
        error = x - x_hat
        weight = 1.0 + self.ink_weight * ((1.0 - x) / 2).mean(dim=1, keepdim=True)  # (B, 1, H, W)
        if self.edge_weight:
            weight = weight + self.edge_weight * edges(x)
        rec = (weight * (error.abs() + error**2)).flatten(1).sum(dim=1)  # (B,)
        kl = posterior.kl()  # (B,), summed over the 4 x 8 x 8 latent
        return (rec + self.kl_weight * kl).mean() / x[0].numel()

    def __repr__(self) -> str:
        return f"AutoencoderLoss(kl_weight={self.kl_weight}, ink_weight={self.ink_weight}, edge_weight={self.edge_weight})"


@torch.no_grad()
def start_small_sigma(model: AutoencoderKL, logvar: float) -> None:
    """Start every posterior log-variance near `logvar` (the logvar half of quant_conv's bias).

    With the default initialisation sigma starts near 1, as large as the spread of the means,
    so the decoder first learns from latents that are mostly noise. Under a KL weight of 1e-6
    the encoder would shrink sigma anyway, which SD's long training affords; a short CPU run
    starts where that ends. The KL term still acts on sigma throughout training.
    """
    L = model.config.latent_channels
    model.quant_conv.bias[L:] = logvar  # channels [L, 2L) of the moments are logvar


@torch.no_grad()
def reconstruct(model: AutoencoderKL, images: torch.Tensor, batch_size: int = 50) -> torch.Tensor:
    """decode(posterior mean), clamped to [-1, 1]: what the model shows for `images`."""
    model.eval()
    parts = [model.decode(model.encode(images[i : i + batch_size]).mean) for i in range(0, len(images), batch_size)]
    return torch.cat(parts).clamp(-1, 1)


@torch.no_grad()
def measure_scaling_factor(model: AutoencoderKL, images: torch.Tensor, seed: int = 0, batch_size: int = 64) -> float:
    """1 / std of posterior samples of `images`, as SD measured 0.18215 (rounded to 5 significant digits)."""
    g = torch.Generator().manual_seed(seed)
    latents = torch.cat([model.encode(images[i : i + batch_size]).sample(g) for i in range(0, len(images), batch_size)])
    return float(f"{latent_scaling_factor(latents):.5g}")


def heldout_psnr(model: AutoencoderKL, n: int = 200) -> float:
    """Mean PSNR (dB) on n test-split images: only (colour, shape) pairs never seen in training."""
    images = Shapes(n, seed=0, split="test").tensors()
    return psnr(reconstruct(model, images), images).item()


def wider_world(n: int = 200, seed: int = 2000) -> dict:
    """What mini-SD is never taught, n fresh renders each: every extra shape (in the eight
    default colours), the extra colours (on the four default shapes), and multi-shape scenes."""
    worlds = {shape: Shapes(n, seed=seed, split="all", shapes=(shape,)) for shape in EXTRA_SHAPES}
    worlds["new_colours"] = Shapes(n, seed=seed, split="all", colours=tuple(EXTRA_COLOURS), shapes=SHAPES)
    worlds["scenes"] = Scenes(n, seed=seed)
    return worlds


def wider_world_psnr(model: AutoencoderKL, n: int = 200) -> dict:
    """Mean PSNR (dB) of reconstructions of wider_world(n): {name: dB}."""
    scores = {}
    for name, dataset in wider_world(n).items():
        images = dataset.tensors()
        scores[name] = round(psnr(reconstruct(model, images), images).item(), 2)
    return scores


def referee_on_reconstructions(model: AutoencoderKL, n: int = 200) -> dict:
    """How often the shapes referee (sdlearn.evaluate) reads all four attributes of a reconstruction right.

    Whatever a latent diffusion model draws passes through this decoder, so this is the
    ceiling of its faithfulness. {"train_pairs": ..., "held_out": ...}, on fresh scenes.
    """
    from sdlearn.referee import faithfulness  # the referee is only needed for this measurement

    scores = {}
    for name, split in (("train_pairs", "train"), ("held_out", "test")):
        dataset = Shapes(n, seed=1000, split=split)
        images = dataset.tensors()
        table = faithfulness(reconstruct(model, images), [dataset.attributes(i) for i in range(n)])
        scores[name] = {head: round(row["accuracy"], 4) for head, row in table.items()}
    return scores


def prepare_folder(out: Path, resume: bool, overwrite: bool) -> None:
    """Refuse to replace a finished model unless asked; clear our own files when asked."""
    if resume:
        if not (out / STATE_NAME).is_file():
            raise FileNotFoundError(
                f"Cannot resume: {out / STATE_NAME} does not exist (a finished run removes it). "
                "Start a new run without --resume, into an empty folder or with --overwrite."
            )
        return
    existing = [name for name in OUTPUT_NAMES if (out / name).exists()]
    if existing and not overwrite:
        raise FileExistsError(
            f"{out} already holds {', '.join(existing)}. Pass --overwrite to replace it, --resume to continue "
            "an interrupted run, or choose another --out."
        )
    for name in existing:
        (out / name).unlink()


def check_settings(**settings) -> None:
    """ValueError for a setting the run could not train with (checked before anything is written)."""
    import math

    if settings["world"] not in WORLDS:
        raise ValueError(f"world must be one of {', '.join(WORLDS)}, got {settings['world']!r}.")
    for name in ("steps", "batch_size", "train_images", "scaling_images", "eval_images"):
        value = settings[name]
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be a whole number >= 1, got {value!r}.")
    if not isinstance(settings["seed"], int) or not 0 <= settings["seed"] < 2**32:
        raise ValueError(f"seed must be a whole number in [0, 2**32), got {settings['seed']!r}.")
    for name, low_open in (("lr", True), ("kl_weight", False), ("ink_weight", False), ("edge_weight", False)):
        value = settings[name]
        if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0 or (low_open and value == 0):
            raise ValueError(f"{name} must be a finite number {'>' if low_open else '>='} 0, got {value!r}.")
    value = settings["logvar_init"]
    if value is not None and (not isinstance(value, (int, float)) or not math.isfinite(value)):
        raise ValueError(f"logvar_init must be a finite number or None, got {value!r}.")
    if settings["world"] == "wide" and settings["batch_size"] < 2:
        raise ValueError("batch_size must be at least 2 with world 'wide': half of each batch is shapes, half scenes.")
    if settings["batch_size"] > settings["train_images"]:
        raise ValueError(f"batch_size {settings['batch_size']} is larger than train_images {settings['train_images']}.")


def recipe_config(block_out_channels: tuple = BLOCK_OUT_CHANNELS, norm_num_groups: int = NORM_NUM_GROUPS) -> VAEConfig:
    """VAEConfig.tiny() with the widths this recipe trains (f = 8, 4 latent channels either way)."""
    return VAEConfig.tiny(block_out_channels=tuple(block_out_channels), norm_num_groups=norm_num_groups)


def train_tiny_vae(
    out,
    steps: int = 3000,
    batch_size: int = 16,
    world: str = "wide",
    lr: float = 1e-3,
    kl_weight: float = 1e-6,
    ink_weight: float = INK_WEIGHT,
    edge_weight: float = EDGE_WEIGHT,
    train_images: int = 10_000,
    block_out_channels: tuple = BLOCK_OUT_CHANNELS,
    norm_num_groups: int = NORM_NUM_GROUPS,
    logvar_init: float | None = LOGVAR_INIT,
    seed: int = 0,
    scaling_images: int = 512,
    eval_images: int = 200,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
) -> dict:
    """Train, measure the scaling factor, save to `out`; return the summary written to training.json."""
    check_settings(steps=steps, batch_size=batch_size, lr=lr, kl_weight=kl_weight, ink_weight=ink_weight,
                   edge_weight=edge_weight, train_images=train_images, seed=seed, scaling_images=scaling_images,
                   eval_images=eval_images, logvar_init=logvar_init, world=world)
    config = recipe_config(block_out_channels, norm_num_groups)  # widths that do not fit fail here, before any work
    out = Path(out)
    check_out_folder(out, (), "a model", overwrite)  # a file, or a place nothing can be written
    prepare_folder(out, resume, overwrite)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    model = AutoencoderKL.from_config(config)
    if logvar_init is not None:
        start_small_sigma(model, logvar_init)
    datasets = training_data(world, train_images, seed)
    dataset = datasets[0]  # the default shapes: the scaling factor is measured on what mini-SD encodes

    wall, cpu = time.perf_counter(), time.process_time()
    history = train(
        model, AutoencoderLoss(kl_weight, ink_weight, edge_weight), ShapesBatches(datasets, batch_size, seed), steps=steps, lr=lr,
        lr_schedule="cosine", seed=seed, checkpoint=out / STATE_NAME, checkpoint_every=100, resume=resume,
        progress=progress, desc="tiny AutoencoderKL",
    )
    train_wall, train_cpu = time.perf_counter() - wall, time.process_time() - cpu

    model.eval()
    sample = torch.stack([dataset[i]["image"] for i in range(min(scaling_images, len(dataset)))])
    model.config.scaling_factor = measure_scaling_factor(model, sample, seed=seed)
    quality = heldout_psnr(model, eval_images)
    model.save_pretrained(out, overwrite=True)
    summary = {
        "world": world, "steps": steps, "batch_size": batch_size, "lr": lr, "lr_schedule": "cosine", "kl_weight": kl_weight,
        "ink_weight": ink_weight, "edge_weight": edge_weight,
        "train_images": train_images, "seed": seed, "logvar_init": logvar_init,
        "block_out_channels": list(config.block_out_channels), "norm_num_groups": config.norm_num_groups,
        "parameters": sum(p.numel() for p in model.parameters()),
        "train_seconds_wall": round(train_wall, 1), "train_seconds_cpu": round(train_cpu, 1),
        "resumed": resume, "threads": torch.get_num_threads(),
        "final_loss_mean_last_100": round(sum(history.losses[-100:]) / len(history.losses[-100:]), 5),
        "scaling_factor": model.config.scaling_factor, "scaling_images": len(sample),
        "heldout_psnr_db": round(quality, 2), "heldout_images": eval_images,
        "wider_world_psnr_db": wider_world_psnr(model, eval_images),
        "referee_on_reconstructions": referee_on_reconstructions(model, eval_images),
    }
    write_text(out / "training.json", json.dumps(summary, indent=2) + "\n")
    (out / STATE_NAME).unlink()
    return summary


def main(argv=None) -> int:
    parser = ArgumentParser(prog="python -m sdlearn.recipes.tiny_vae", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="output folder, e.g. data/tiny-vae")
    parser.add_argument("--steps", type=POSITIVE_INT, default=3000)
    parser.add_argument("--world", choices=WORLDS, default="wide", help="wide: half default shapes, half multi-shape scenes of 14 colours and 8 shapes; shapes: the default dataset only")
    parser.add_argument("--batch-size", type=POSITIVE_INT, default=16)
    parser.add_argument("--lr", type=POSITIVE_FLOAT, default=1e-3)
    parser.add_argument("--kl-weight", type=NON_NEGATIVE_FLOAT, default=1e-6)
    parser.add_argument("--ink-weight", type=NON_NEGATIVE_FLOAT, default=INK_WEIGHT, help="extra loss weight on the shape's pixels (0: SD's uniform loss)")
    parser.add_argument("--edge-weight", type=NON_NEGATIVE_FLOAT, default=EDGE_WEIGHT, help="extra loss weight on the shape's outline")
    parser.add_argument("--train-images", type=POSITIVE_INT, default=10_000)
    parser.add_argument("--block-out-channels", type=POSITIVE_INT, nargs=4, default=BLOCK_OUT_CHANNELS, help="widths of the 4 levels")
    parser.add_argument("--norm-num-groups", type=POSITIVE_INT, default=NORM_NUM_GROUPS)
    parser.add_argument("--logvar-init", type=FINITE_FLOAT, default=LOGVAR_INIT, help="initial posterior log-variance")
    parser.add_argument("--seed", type=SEED, default=0)
    parser.add_argument("--scaling-images", type=POSITIVE_INT, default=512, help="training images encoded to measure the scaling factor")
    parser.add_argument("--eval-images", type=POSITIVE_INT, default=200, help="held-out images for the PSNR")
    parser.add_argument("--threads", type=POSITIVE_INT, default=None, help="torch CPU threads (1 can be faster on a busy machine)")
    parser.add_argument("--resume", action="store_true", help=f"continue an interrupted run from <out>/{STATE_NAME}")
    parser.add_argument("--overwrite", action="store_true", help="replace a model already in --out")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        summary = train_tiny_vae(
            args.out, steps=args.steps, world=args.world, batch_size=args.batch_size, lr=args.lr, kl_weight=args.kl_weight,
            ink_weight=args.ink_weight, edge_weight=args.edge_weight,
            train_images=args.train_images, block_out_channels=tuple(args.block_out_channels),
            norm_num_groups=args.norm_num_groups, logvar_init=args.logvar_init, seed=args.seed,
            scaling_images=args.scaling_images, eval_images=args.eval_images,
            resume=args.resume, overwrite=args.overwrite, progress=not args.no_progress,
        )
    except (FileExistsError, FileNotFoundError, ValueError, OSError) as exc:
        print(f"{parser.prog}: error: {one_line(exc)}", file=sys.stderr)
        return 1
    print(
        f"trained {summary['steps']} steps in {summary['train_seconds_wall']:.0f} s "
        f"({summary['train_seconds_cpu']:.0f} s CPU); scaling_factor {summary['scaling_factor']}; "
        f"held-out PSNR {summary['heldout_psnr_db']:.2f} dB; saved to {args.out}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
