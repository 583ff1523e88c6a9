"""Recipe: a mini Stable Diffusion trained from scratch on the shapes dataset, on a CPU.

    python -m sdlearn.recipes.mini_sd --out data/mini-sd [--resume] [--steps N] [--overwrite]

Stable Diffusion is three separately trained networks (Rombach et al. 2022); this recipe
trains each at toy size, in SD's order, and saves them as one diffusers pipeline folder.

    stage 1  autoencoder   x (3, 64, 64) -> z (4, 8, 8): the tiny AutoencoderKL, f = 8.
                           The shipped data/tiny-vae is reused when present; otherwise
                           sdlearn.recipes.tiny_vae trains one.
    stage 2  text encoder  TinyCLIP (sdlearn.clip.train_tiny_clip): a 64-wide CLIP text
                           transformer trained contrastively against a small image encoder
                           on shapes images and their (partial) captions, then frozen.
                           `make train-mini-sd` passes --text-encoder data/clip-shapes,
                           lesson 08's (trained by `make train-clip`); without it the
                           recipe trains a smaller one (clip_steps, batch 64), which drew
                           the asked colour and the held-out pairs far less often
                           (data/mini-sd/README.md, "Experiments").
    stage 3  UNet          eps_theta(z_t, t, c) trained on the frozen autoencoder's latents:

        z_0 = scaling_factor * (mu + sigma * n),  n ~ N(0, I)        the posterior sample, as SD
        c   = CLIPTextModel(tokenize(caption)), caption -> "" with probability p_uncond
        t ~ U{0, ..., T-1},  eps ~ N(0, I)
        z_t = sqrt(alpha_bar_t) z_0 + sqrt(1 - alpha_bar_t) eps       (DDPM eq. 4)
        L   = || eps - eps_theta(z_t, t, c) ||^2                      (DDPM eq. 14, "simple")

    with SD's scaled_linear schedule (beta from 0.00085 to 0.012, T = 1000). Dropping the
    caption for a tenth of the examples teaches the same network the unconditional
    prediction that classifier-free guidance needs (Ho & Salimans 2022, section 3.2).

Because the autoencoder and the text encoder are frozen in stage 3, their outputs are
computed once up front: the posterior (mu, sigma) of every training image, and the text
embedding of every distinct caption. A training step then costs one UNet forward and backward.

Every stage writes a checkpoint in a work folder beside the output (`<out>-work/`), so an
interrupted run continues with --resume. The result is a diffusers pipeline folder (unet/,
vae/, text_encoder/, tokenizer/, scheduler/ with SD's schedule for DDIMScheduler) that both
sdlearn.load_pipeline and diffusers' StableDiffusionPipeline load, plus training.json and
samples.png. training.json records what ran: "stages" says whether each of stages 1 and 2
trained its model or reused a folder (named there), "config" holds only the settings that
were used (no clip_* settings when the text encoder was reused, no vae_steps when the
autoencoder was), then the time of each stage and the guidance search.

References: Rombach et al. 2022, "High-Resolution Image Synthesis with Latent Diffusion
Models" (arXiv:2112.10752); Ho et al. 2020, "Denoising Diffusion Probabilistic Models"
(arXiv:2006.11239); Ho & Salimans 2022, "Classifier-Free Diffusion Guidance"
(arXiv:2207.12598); Radford et al. 2021, "Learning Transferable Visual Models From Natural
Language Supervision" (CLIP, arXiv:2103.00020).
"""

import importlib.util
import json
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from sdlearn.models.clip import CLIPTextModel, CLIPTokenizer
from sdlearn.models.files import write_text  # atomic: a failed write keeps the old file
from sdlearn.recipes.clip import train_tiny_clip
from sdlearn.datasets import Shapes, data_dir, to_model_range
from sdlearn.doctor import cpu_name
from sdlearn.pipeline.stable_diffusion import StableDiffusion
from sdlearn.plotting import image_grid
from sdlearn.diffusion.schedules import NoiseSchedule
from sdlearn.ddpm import DiffusionLoss
from sdlearn.cli import POSITIVE_FLOAT, POSITIVE_INT, ArgumentParser, one_line
from sdlearn.recipes import prepare_work_folder, run_keeping_only_resumable_work, work_folder  # noqa: F401 (work_folder: callers ask the recipe)
from sdlearn.train import EMALoss, EMATrainee, train
from sdlearn.models.unet import UNet, UNetConfig
from sdlearn.models.vae import AutoencoderKL

# Stable Diffusion's training schedule, written for diffusers' DDIMScheduler (the sampler the
# evaluation uses); every sdlearn sampler reads the same keys.
SCHEDULER_CONFIG = {
    "_class_name": "DDIMScheduler",
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "trained_betas": None,
    "clip_sample": False,
    "set_alpha_to_one": False,
    "steps_offset": 1,
    "prediction_type": "epsilon",
    "timestep_spacing": "leading",
}


def scheduler_config(config: "MiniSDConfig") -> dict:
    """SCHEDULER_CONFIG with the prediction type the UNet is trained for."""
    return {**SCHEDULER_CONFIG, "prediction_type": config.prediction_type}

# Prompts drawn during training (sample grids): all four attributes, two held-out pairs last.
SAMPLE_PROMPTS = (
    "a large red circle in the top left",
    "a small blue square in the center",
    "a large green cross in the bottom right",
    "a small yellow triangle on the left",
    "a large purple square at the bottom",
    "a small cyan circle in the top right",
    "a large red triangle in the center",
    "a small blue cross in the top left",
)


@dataclass
class MiniSDConfig:
    """Everything the recipe trains with. `small()` is the shipped model's setting; `smoke()` a seconds-long check."""

    # stage 1
    vae_steps: int | None = None  # None: the tiny_vae recipe's own default
    # stage 2
    clip_steps: int = 2000
    clip_batch_size: int = 64
    clip_lr: float = 2e-3
    # stage 3
    n_images: int = 12000
    caption_drop_prob: float = 0.2  # each of size/colour/position left out of a caption (partial captions)
    p_uncond: float = 0.1  # the whole caption replaced by "" (classifier-free guidance)
    block_out_channels: tuple = (64, 128)
    layers_per_block: int = 1
    attention_head_dim: int = 4  # the number of heads (diffusers' historical name)
    steps: int = 4600  # the shipped model's (data/mini-sd/training.json has its time)
    batch_size: int = 48
    lr: float = 2e-3
    prediction_type: str = "v_prediction"  # or "epsilon" (SD 1.x); v as SD 2.x 768-v (see sdlearn.ddpm)
    min_snr_gamma: float | None = 5.0  # Min-SNR-gamma loss weights (sdlearn.diffusion.schedules); None: DDPM's plain MSE
    ema_decay: float | None = 0.999  # keep an exponential moving average of the UNet and ship it
    sample_every: int = 500
    guidance_scales: tuple = (2.0, 3.0, 4.0, 6.0)  # tried at the end; the best is recorded in training.json
    guidance_prompts: int = 48  # prompts per scale (0: skip, record DEFAULT_GUIDANCE)
    seed: int = 0

    @classmethod
    def small(cls, **overrides) -> "MiniSDConfig":
        return cls(**overrides)

    @classmethod
    def smoke(cls, **overrides) -> "MiniSDConfig":
        values = dict(vae_steps=2, clip_steps=2, clip_batch_size=8, n_images=64, block_out_channels=(32, 32),
                      steps=2, batch_size=8, sample_every=2, guidance_scales=(2.0, 4.0), guidance_prompts=2)
        return cls(**{**values, **overrides})


def unet_config(config: MiniSDConfig, text_width: int) -> UNetConfig:
    """Two levels over 8x8 latents (8x8, then 4x4), cross-attention at both, SD 1.x layout."""
    return UNetConfig(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=tuple(config.block_out_channels),
        down_block_types=("CrossAttnDownBlock2D",) * 2,
        up_block_types=("CrossAttnUpBlock2D",) * 2,
        layers_per_block=config.layers_per_block,
        attention_head_dim=config.attention_head_dim,
        cross_attention_dim=text_width,  # the UNet attends to the tiny text encoder's vectors
        norm_num_groups=min(32, min(config.block_out_channels)),
    )


# ------------------------------------------------------------------------------------------
# Stage 1: the autoencoder
# ------------------------------------------------------------------------------------------


def existing_vae(work: Path, vae_source: Path | None) -> Path | None:
    """The trained autoencoder folder stage 1 uses as it is: `vae_source`, else data/tiny-vae, else
    one a previous run of this recipe trained in the work folder; None when stage 1 must train one."""
    candidates = [vae_source] if vae_source is not None else [data_dir() / "tiny-vae", work / "vae"]
    return next((folder for folder in candidates if folder is not None and (folder / "config.json").is_file()), None)


def stage_vae(work: Path, vae_source: Path | None, config: MiniSDConfig) -> AutoencoderKL:
    """The frozen tiny autoencoder: `vae_source`, else data/tiny-vae, else trained by the tiny_vae recipe."""
    folder = existing_vae(work, vae_source)
    if folder is not None:
        print(f"stage 1: using the autoencoder in {folder}")
        return AutoencoderKL.from_pretrained(folder).eval().requires_grad_(False)
    if vae_source is not None:
        raise FileNotFoundError(f"--vae {vae_source} holds no config.json; expected a diffusers AutoencoderKL folder.")
    if importlib.util.find_spec("sdlearn.recipes.tiny_vae") is None:
        raise FileNotFoundError(
            f"No trained autoencoder in {data_dir() / 'tiny-vae'} and no sdlearn.recipes.tiny_vae to train one. "
            "Pass --vae FOLDER (a diffusers AutoencoderKL folder)."
        )
    command = [sys.executable, "-m", "sdlearn.recipes.tiny_vae", "--out", str(work / "vae")]
    if config.vae_steps is not None:
        command += ["--steps", str(config.vae_steps)]
    print("stage 1: training the autoencoder:", " ".join(command))
    subprocess.run(command, check=True)
    return AutoencoderKL.from_pretrained(work / "vae").eval().requires_grad_(False)


# ------------------------------------------------------------------------------------------
# Stage 2: the text encoder
# ------------------------------------------------------------------------------------------


def text_encoder_folder(source: Path, tokenizer: CLIPTokenizer) -> Path:
    """The CLIPTextModel folder in `source` (itself, or its text_encoder/), checked against the tokenizer.

    Raises a clear error (before the recipe writes anything) if there is none or its
    vocabulary is not the tokenizer's.
    """
    source = Path(source)
    folder = source / "text_encoder" if (source / "text_encoder" / "config.json").is_file() else source
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"--text-encoder {source} holds no CLIPTextModel (config.json, or text_encoder/config.json).")
    vocab_size = json.loads((folder / "config.json").read_text()).get("vocab_size")
    if vocab_size != len(tokenizer):
        raise ValueError(f"The text encoder in {folder} has a vocabulary of {vocab_size} tokens; the shapes tokenizer "
                         f"has {len(tokenizer)}. Use one trained with that tokenizer (e.g. data/clip-shapes).")
    return folder


def stage_text_encoder(work: Path, tokenizer: CLIPTokenizer, config: MiniSDConfig, resume: bool, progress: bool,
                       source: Path | None = None) -> CLIPTextModel:
    """TinyCLIP's text tower, trained contrastively (or loaded when a previous run finished it), frozen.

    source: a trained one to use instead (a CLIPTextModel folder, or a folder holding text_encoder/,
    such as lesson 08's data/clip-shapes); it must use the shapes tokenizer's vocabulary.
    """
    if source is not None:
        folder = text_encoder_folder(source, tokenizer)
        print(f"stage 2: using the text encoder in {folder}")
        return CLIPTextModel.from_pretrained(folder).eval().requires_grad_(False)
    folder = work / "clip"
    if not (folder / "tiny_clip.safetensors").is_file():
        checkpoint = work / "clip.ckpt"
        train_tiny_clip(
            tokenizer, steps=config.clip_steps, batch_size=config.clip_batch_size, lr=config.clip_lr, seed=config.seed,
            out=folder, checkpoint=checkpoint, resume=resume and checkpoint.exists(), progress=progress,
            desc="stage 2: text encoder",
        )
    return CLIPTextModel.from_pretrained(folder / "text_encoder").eval().requires_grad_(False)


# ------------------------------------------------------------------------------------------
# Stage 3: the UNet on latents
# ------------------------------------------------------------------------------------------


@torch.no_grad()
def precompute(vae: AutoencoderKL, text_encoder: CLIPTextModel, tokenizer: CLIPTokenizer, config: MiniSDConfig,
               chunk: int = 256) -> dict:
    """Posterior mean and std of every training image, and the embedding of every distinct caption.

    Row 0 of `embeddings` is the empty caption "" (the unconditional input of guidance).
    """
    dataset = Shapes(config.n_images, seed=config.seed, size=64, split="train", captions="partial",
                     drop_prob=config.caption_drop_prob)
    means, stds = [], []
    for i in range(0, len(dataset), chunk):
        images = to_model_range(np.stack([dataset.pixels(j) for j in range(i, min(i + chunk, len(dataset)))]))  # (chunk, 3, 64, 64)
        posterior = vae.encode(images)
        means.append(posterior.mean)  # (chunk, 4, 8, 8)
        stds.append(posterior.std)
    captions = [""] + sorted(set(dataset.captions))
    index = {caption: k for k, caption in enumerate(captions)}
    embeddings = torch.cat([text_encoder(tokenizer(captions[i:i + chunk])) for i in range(0, len(captions), chunk)])
    return {
        "mean": torch.cat(means), "std": torch.cat(stds),  # (n, 4, 8, 8)
        "caption_index": torch.tensor([index[c] for c in dataset.captions]),  # (n,)
        "embeddings": embeddings,  # (captions, 77, D)
        "captions": captions,
    }


class LatentBatches:
    """train()'s data(step): a batch of (z_0, t, eps, c), the same for the same step (so resuming is exact)."""

    def __init__(self, latents: dict, scaling_factor: float, config: MiniSDConfig, num_train_timesteps: int):
        self.latents, self.scaling_factor, self.config = latents, scaling_factor, config
        self.T = num_train_timesteps

    def __call__(self, step: int):
        g = torch.Generator().manual_seed(self.config.seed * 1_000_003 + step)
        n, B = len(self.latents["mean"]), self.config.batch_size
        index = torch.randint(n, (B,), generator=g)
        mean, std = self.latents["mean"][index], self.latents["std"][index]  # (B, 4, 8, 8)
        z0 = self.scaling_factor * (mean + std * torch.randn(mean.shape, generator=g))
        captions = self.latents["caption_index"][index]
        dropped = torch.rand(B, generator=g) < self.config.p_uncond
        captions = torch.where(dropped, torch.zeros_like(captions), captions)  # row 0 is ""
        context = self.latents["embeddings"][captions]  # (B, 77, D)
        t = torch.randint(self.T, (B,), generator=g)
        eps = torch.randn(z0.shape, generator=g)
        return z0, t, eps, context


class SampleGrid:
    """train()'s sample_fn: one image per SAMPLE_PROMPTS entry (DDIM, guidance), saved as a PNG grid."""

    def __init__(self, vae, text_encoder, tokenizer, folder: Path, scheduler: dict, steps: int = 25, guidance_scale: float = 4.0):
        self.parts = (vae, text_encoder, tokenizer)
        self.folder, self.scheduler, self.steps, self.guidance_scale = folder, scheduler, steps, guidance_scale

    def __call__(self, model, step: int):
        unet = model.ema if isinstance(model, EMATrainee) else model  # draw with the weights that will ship
        pipe = StableDiffusion(unet, *self.parts, scheduler_config=self.scheduler)
        images = pipe.text_to_image(list(SAMPLE_PROMPTS), steps=self.steps, guidance_scale=self.guidance_scale,
                                    sampler="ddim", seed=0)
        grid = image_grid(images, ncols=len(images))
        self.folder.mkdir(parents=True, exist_ok=True)
        grid.save(self.folder / f"step_{step:05d}.png")
        return grid  # train() puts the UNet back in training mode


def stage_unet(work: Path, vae, text_encoder, tokenizer, config: MiniSDConfig, resume: bool, progress: bool):
    """Train the UNet on precomputed latents; returns (unet, history)."""
    latents_path = work / "latents.pt"
    if latents_path.is_file():
        latents = torch.load(latents_path, weights_only=False)
    else:
        latents = precompute(vae, text_encoder, tokenizer, config)
        torch.save(latents, latents_path)
    torch.manual_seed(config.seed)
    unet = UNet(unet_config(config, text_encoder.config.hidden_size))
    scheduler = scheduler_config(config)
    schedule = NoiseSchedule(**{k: scheduler[k] for k in ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule")})
    loss = DiffusionLoss(schedule, config.prediction_type, config.min_snr_gamma)
    model = unet
    if config.ema_decay:
        model, loss = EMATrainee(unet, config.ema_decay), EMALoss(loss)
    checkpoint = work / "unet.ckpt"
    history = train(
        model, loss, LatentBatches(latents, vae.config.scaling_factor, config, schedule.num_train_timesteps),
        steps=config.steps, lr=config.lr, seed=config.seed, lr_schedule="cosine", warmup=min(100, config.steps // 10),
        checkpoint=checkpoint, checkpoint_every=max(1, min(250, config.steps // 4)), resume=resume and checkpoint.exists(),
        sample_every=config.sample_every, sample_fn=SampleGrid(vae, text_encoder, tokenizer, work / "samples", scheduler),
        progress=progress, desc="stage 3: UNet",
    )
    if config.ema_decay:
        model.update_ema()  # the last optimizer step joins the average too
        unet = model.ema
    return unet.eval().requires_grad_(False), history


# ------------------------------------------------------------------------------------------
# The whole recipe
# ------------------------------------------------------------------------------------------


DEFAULT_GUIDANCE = 4.0


def choose_guidance(pipe: StableDiffusion, scales, n: int, steps: int = 25) -> dict:
    """{scale: fraction of n prompts with all four attributes right} (DDIM, 25 steps).

    The prompts are scenes of their own seed, not those of `python -m sdlearn.evaluate`, so
    the reported evaluation does not grade the same prompts the scale was chosen on.
    """
    from sdlearn.evaluate import EVAL_PROMPT_SEED, generate, prompt_set
    from sdlearn.referee import faithfulness

    prompts, requested = prompt_set(n, "train", seed=EVAL_PROMPT_SEED + 7)
    return {float(s): faithfulness(generate(pipe, prompts, "ddim", steps, s), requested)["all"]["accuracy"] for s in scales}


OUTPUTS = ("model_index.json", "unet", "vae", "text_encoder", "tokenizer", "scheduler", "training.json")


def check_config(config: MiniSDConfig) -> None:
    """ValueError for a setting the recipe could not train with (checked before anything is written)."""
    import math

    def bad(name, what):
        raise ValueError(f"{name} must be {what}, got {getattr(config, name)!r}.")

    for name in ("clip_steps", "clip_batch_size", "n_images", "steps", "batch_size", "layers_per_block", "attention_head_dim",
                 "sample_every"):
        value = getattr(config, name)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            bad(name, "a whole number >= 1")
    if config.vae_steps is not None and (not isinstance(config.vae_steps, int) or config.vae_steps < 1):
        bad("vae_steps", "None or a whole number >= 1")
    if not isinstance(config.guidance_prompts, int) or config.guidance_prompts < 0:
        bad("guidance_prompts", "a whole number >= 0")
    if not isinstance(config.seed, int) or not 0 <= config.seed < 2**32:
        bad("seed", "a whole number in [0, 2**32)")
    for name in ("lr", "clip_lr"):
        value = getattr(config, name)
        if not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
            bad(name, "a finite number > 0")
    for name in ("caption_drop_prob", "p_uncond"):
        value = getattr(config, name)
        if not isinstance(value, (int, float)) or not 0 <= value <= 1:
            bad(name, "a probability in [0, 1]")
    if config.ema_decay is not None and not (isinstance(config.ema_decay, (int, float)) and 0 <= config.ema_decay < 1):
        bad("ema_decay", "None or a number in [0, 1)")
    if config.min_snr_gamma is not None and not (isinstance(config.min_snr_gamma, (int, float)) and math.isfinite(config.min_snr_gamma)
                                                 and config.min_snr_gamma > 0):
        bad("min_snr_gamma", "None or a finite number > 0")
    if config.prediction_type not in ("epsilon", "v_prediction"):
        bad("prediction_type", "'epsilon' or 'v_prediction'")
    if not config.guidance_scales or not all(isinstance(g, (int, float)) and math.isfinite(g) for g in config.guidance_scales):
        bad("guidance_scales", "finite numbers (at least one)")
    if config.batch_size > config.n_images:
        raise ValueError(f"batch_size {config.batch_size} is larger than n_images {config.n_images}.")
    if config.clip_batch_size > config.n_images:
        raise ValueError(f"clip_batch_size {config.clip_batch_size} is larger than n_images {config.n_images}.")
    unet_config(config, 64)  # widths, heads and levels the UNet can be built with


def _shown_path(folder: Path) -> str:
    """A folder as the record shows it: relative to the current directory when inside it."""
    folder = Path(folder).resolve()
    try:
        return str(folder.relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(folder)


def train_mini_sd(out, config: MiniSDConfig | None = None, resume: bool = False, overwrite: bool = False,
                  vae=None, progress: bool = True, keep_work: bool = False, text_encoder_source=None) -> StableDiffusion:
    """Run the three stages and save the pipeline to `out`; returns the StableDiffusion.

    text_encoder_source: a trained text encoder folder to use instead of stage 2's training.
    """
    config = config or MiniSDConfig.small()
    check_config(config)
    out = Path(out)
    tokenizer = CLIPTokenizer.from_pretrained(data_dir() / "tokenizers" / "shapes")
    source = Path(text_encoder_source) if text_encoder_source is not None else None
    if source is not None:
        text_encoder_folder(source, tokenizer)  # a wrong folder fails before anything is written
    if vae is not None and not (Path(vae) / "config.json").is_file():
        raise FileNotFoundError(f"--vae {vae} holds no config.json; expected a diffusers AutoencoderKL folder.")
    work = prepare_work_folder(out, OUTPUTS, "a pipeline", resume, overwrite)
    write_text(work / "config.json", json.dumps(asdict(config), indent=2) + "\n")

    seconds = {}
    began = time.perf_counter()
    reused_vae = existing_vae(work, Path(vae) if vae is not None else None)
    reused_vae = None if reused_vae is not None and reused_vae.parent == work else reused_vae  # trained by this run
    vae_model = stage_vae(work, Path(vae) if vae is not None else None, config)
    seconds["stage 1: autoencoder"] = time.perf_counter() - began

    began = time.perf_counter()
    text_encoder = stage_text_encoder(work, tokenizer, config, resume, progress, source)
    seconds["stage 2: text encoder"] = time.perf_counter() - began

    began = time.perf_counter()
    unet, history = stage_unet(work, vae_model, text_encoder, tokenizer, config, resume, progress)
    seconds["stage 3: UNet"] = time.perf_counter() - began

    pipe = StableDiffusion(unet, vae_model, text_encoder, tokenizer, scheduler_config=scheduler_config(config))
    began = time.perf_counter()
    guidance = choose_guidance(pipe, config.guidance_scales, config.guidance_prompts) if config.guidance_prompts else {}
    seconds["choosing the guidance scale"] = time.perf_counter() - began
    pipe.save_pretrained(out, overwrite=overwrite)
    if history.samples:
        history.samples[-1][1].save(out / "samples.png")
    # The record names only settings that were used: a stage that reused a trained model records its folder instead.
    settings = asdict(config)
    stages = {"autoencoder": "trained", "text encoder": "trained"}
    if reused_vae is not None:
        del settings["vae_steps"]
        stages["autoencoder"] = f"reused, frozen: {_shown_path(reused_vae)}"
    if source is not None:
        for key in ("clip_steps", "clip_batch_size", "clip_lr"):
            del settings[key]
        stages["text encoder"] = f"reused, frozen: {_shown_path(source)}"
    record = {
        "command": "python -m sdlearn.recipes.mini_sd " + " ".join(sys.argv[1:]) if __name__ == "__main__" else None,
        "stages": stages,
        "config": settings,
        "seconds": {k: round(v, 1) for k, v in seconds.items()},
        "total_seconds": round(sum(seconds.values()), 1),
        "final_loss": sum(history.losses[-100:]) / max(1, len(history.losses[-100:])),
        "guidance_scale": max(guidance, key=guidance.get) if guidance else DEFAULT_GUIDANCE,
        "guidance_search": {f"{k:g}": v for k, v in guidance.items()},
        "torch_threads": torch.get_num_threads(),
        "cpu": cpu_name(),
    }
    write_text(out / "training.json", json.dumps(record, indent=2) + "\n")
    if not keep_work:
        shutil.rmtree(work)
    return pipe


def main(argv=None) -> int:
    parser = ArgumentParser(prog="python -m sdlearn.recipes.mini_sd", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="the pipeline folder to write, e.g. data/mini-sd")
    parser.add_argument("--resume", action="store_true", help="continue an interrupted run (from <out>-work/)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing pipeline in --out")
    defaults = MiniSDConfig.small()
    parser.add_argument("--steps", type=POSITIVE_INT, default=None, help=f"UNet training steps (default {defaults.steps})")
    parser.add_argument("--clip-steps", type=POSITIVE_INT, default=None, help=f"text encoder training steps (default {defaults.clip_steps})")
    parser.add_argument("--vae-steps", type=POSITIVE_INT, default=None, help="autoencoder steps, if one must be trained")
    parser.add_argument("--batch-size", type=POSITIVE_INT, default=None, help=f"UNet batch size (default {defaults.batch_size})")
    parser.add_argument("--lr", type=POSITIVE_FLOAT, default=None, help="UNet peak learning rate")
    parser.add_argument("--vae", default=None, help="use this diffusers AutoencoderKL folder (default: data/tiny-vae)")
    parser.add_argument("--text-encoder", default=None,
                        help="use this trained text encoder instead of training one (e.g. data/clip-shapes, lesson 08's)")
    parser.add_argument("--smoke", action="store_true", help="a seconds-long run with tiny settings (for tests)")
    parser.add_argument("--threads", type=POSITIVE_INT, default=None, help="torch CPU threads (1 is fastest on a busy machine)")
    parser.add_argument("--keep-work", action="store_true", help="keep <out>-work/ (checkpoints, sample grids) afterwards")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    overrides = {k: v for k, v in (("steps", args.steps), ("clip_steps", args.clip_steps), ("vae_steps", args.vae_steps),
                                   ("batch_size", args.batch_size), ("lr", args.lr)) if v is not None}
    config = MiniSDConfig.smoke(**overrides) if args.smoke else MiniSDConfig.small(**overrides)
    if config.sample_every > config.steps:
        config.sample_every = config.steps
    try:
        pipe = run_keeping_only_resumable_work(args.out, lambda: train_mini_sd(
            args.out, config, resume=args.resume, overwrite=args.overwrite, vae=args.vae, progress=not args.no_progress,
            keep_work=args.keep_work, text_encoder_source=args.text_encoder))
    except (FileExistsError, FileNotFoundError, ValueError, OSError) as error:
        print(f"{parser.prog}: error: {one_line(error)}", file=sys.stderr)
        return 2
    record = json.loads((Path(args.out) / "training.json").read_text())
    print(pipe)
    for stage, s in record["seconds"].items():
        print(f"{stage}: {s / 60:.1f} min")
    print(f"saved to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
