"""Teach mini-SD a new concept four ways: LoRA, textual inversion, DreamBooth, a hypernetwork.

    python -m sdlearn.recipes.personalise --method lora --concept star --out data/lora-star
    python -m sdlearn.recipes.personalise --method textual-inversion --concept sun --out data/ti-sun
    python -m sdlearn.recipes.personalise --method dreambooth --prior-weight 1 --out /tmp/dreambooth-star
    python -m sdlearn.recipes.personalise --method hypernetwork --out data/hypernetwork-star

Every method trains the same thing with the same loop (sdlearn.train.train, on accelerate) and
the same loss, mini-SD's own (v-prediction, Min-SNR-5 weights; sdlearn.ddpm.DiffusionLoss):

    L = E_{x ~ concept images, t, eps} w(t) || v - UNet(z_t, t, c(prompt)) ||^2,   z_0 = E(x)

and differs only in which numbers it lets move:

    method              trains                                         writes
    lora                A and B of every attention projection          pytorch_lora_weights.safetensors (diffusers/peft)
                        (sdlearn.lora)
    textual-inversion   the new rows of the token-embedding table      learned_embeds.safetensors (diffusers) and
                        (sdlearn.textual_inversion)                    <name>.safetensors (A1111)
    dreambooth          every UNet weight, optionally with prior       unet/ (a diffusers UNet folder)
                        preservation (sdlearn.dreambooth)
    hypernetwork        two small MLPs per context width, in front of  <name>.pt (A1111)
                        every to_k and to_v (sdlearn.hypernetwork)

The concepts (CONCEPTS): "star", a shape the renderer and the referee know but mini-SD was
never taught (its autoencoder draws stars: data/tiny-vae's record), in every colour, size and
position, prompted as "a large red star in the top left"; and "sun", a large yellow circle,
which mini-SD can already draw: textual inversion learns one new word for it ("a <sun> in the
top left"), which is what textual inversion can do. For textual inversion the concept's words
in each prompt are replaced by the placeholder ("a large red <star> in the top left").

Prior preservation (--prior-weight w > 0, any method that trains UNet weights): every batch
also holds as many "class images", which the base model drew once before training for prompts
of the shapes it knows, with loss weight w (sdlearn.dreambooth).

Measuring what was learnt is `python -m sdlearn.evaluate concept --adapter OUT` (what the
shipped folders' evaluation.json holds); data/README.md lists the shipped runs.
"""

import json
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from sdlearn.concepts import CONCEPTS, METHODS, Concept, load_adapter, read_record  # noqa: F401 (the recipe's API too)
from sdlearn.cli import NON_NEGATIVE_FLOAT, POSITIVE_FLOAT, POSITIVE_INT, ArgumentParser, one_line
from sdlearn.datasets import data_dir, to_model_range
from sdlearn.ddpm import DiffusionLoss
from sdlearn.diffusion.schedules import NoiseSchedule
from sdlearn.doctor import cpu_name
from sdlearn.dreambooth import PriorPreservationLoss, interleave
from sdlearn.models.files import write_text
from sdlearn.lora import TARGETS as LORA_TARGETS
from sdlearn.plotting import image_grid
from sdlearn.recipes import check_out_folder, work_folder
from sdlearn.train import train

BASE_MODEL = "mini-sd"  # under data/
INSTANCE_SEED = 11  # the concept's training images (the evaluation draws EVAL_PROMPT_SEED = 2000)
PRIOR_SEED = 12  # the prompts of the class images


@dataclass
class PersonaliseConfig:
    """The settings of one run; `for_method` gives each method's shipped defaults."""

    method: str = "lora"
    concept: str = "star"
    n_images: int = 400  # instance images of the concept
    steps: int = 400
    batch_size: int = 32  # instance images per step (as many class images more with a prior)
    lr: float = 1e-3
    caption_drop_prob: float = 0.2  # each of size/colour/position left out of a prompt, as mini-SD was trained
    p_uncond: float = 0.1  # the prompt replaced by "" (keeps classifier-free guidance working)
    prior_weight: float = 0.0  # w of prior preservation; 0: no class images
    n_prior: int = 400  # class images drawn by the base model
    rank: int = 4  # lora
    targets: tuple = LORA_TARGETS  # lora: the linear layers it adapts
    num_vectors: int = 1  # textual-inversion
    layer_structure: tuple = (1, 2, 1)  # hypernetwork
    activation: str = "linear"  # hypernetwork: A1111's default; "relu" etc. (sdlearn.hypernetwork)
    seed: int = 0
    # your own images instead of a concept of the renderer (e.g. an SD 1.x folder on a GPU)
    images: str | None = None  # a folder of .png/.jpg/.webp images of one subject
    prompt: str | None = None  # their prompt, e.g. "a photo of sks dog" (textual inversion: holding the placeholder)
    class_prompt: str | None = None  # the class images' prompt for the prior, e.g. "a photo of a dog"
    placeholder: str | None = None  # textual inversion's new word with --images, e.g. "<sks>"
    initializer: str | None = None  # the word the new rows start from, e.g. "dog"
    sample_steps: int = 25  # sampler steps of the samples.png grid
    precision: str = "fp32"  # or "bf16" / "auto" (sdlearn.train: bf16 autocast where the device has it)
    accumulation_steps: int = 1  # split each step's batch into this many micro-batches (less memory)

    @classmethod
    def for_method(cls, method: str, **overrides) -> "PersonaliseConfig":
        defaults = {  # the shipped runs' settings (data/README.md); each found by a few runs, see the folders' READMEs
            "lora": dict(rank=8, lr=2e-3, batch_size=16, prior_weight=2.0,
                         targets=LORA_TARGETS + ("ff.net.0.proj", "ff.net.2")),
            "textual-inversion": dict(concept="sun", lr=1e-2),
            "dreambooth": dict(lr=2e-4, prior_weight=1.0, batch_size=16),
            "hypernetwork": dict(lr=3e-3, prior_weight=1.0, batch_size=16),
        }
        if method not in defaults:
            raise ValueError(f"Unknown method {method!r}; choose one of {', '.join(METHODS)}.")
        return cls(**{"method": method, **defaults[method], **overrides})


def base_pipeline(folder=None):
    from sdlearn.pipeline import load_pipeline

    return load_pipeline(Path(folder) if folder is not None else data_dir() / BASE_MODEL)


# 1. The data --------------------------------------------------------------------------------


@torch.no_grad()
def encode_images(vae, pixels: np.ndarray, chunk: int = 256) -> tuple:
    """Posterior mean and std (n, 4, H/8, W/8), on the CPU in float32, of uint8 images (n, H, W, 3)."""
    weight = next(vae.parameters())
    chunk = chunk if pixels.shape[1] <= 64 else 4  # a real SD autoencoder at 512 px: a few images at a time
    means, stds = [], []
    for i in range(0, len(pixels), chunk):
        posterior = vae.encode(to_model_range(pixels[i:i + chunk]).to(weight.device, weight.dtype))
        means.append(posterior.mean.float().cpu())
        stds.append(posterior.std.float().cpu())
    return torch.cat(means), torch.cat(stds)


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def folder_images(folder, size: int) -> np.ndarray:
    """Every image in `folder`, centre-cropped to a square and resized to size x size: (n, size, size, 3) uint8."""
    from PIL import Image, ImageOps

    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"--images {folder}: no such folder; give a folder of .png/.jpg images of your subject.")
    paths = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not paths:
        raise ValueError(f"--images {folder} holds no {'/'.join(IMAGE_SUFFIXES)} file; put 3-20 pictures of your subject there.")
    pictures = []
    for path in paths:
        with Image.open(path) as picture:
            square = ImageOps.fit(ImageOps.exif_transpose(picture).convert("RGB"), (size, size), Image.Resampling.LANCZOS)
        pictures.append(np.asarray(square))
    return np.stack(pictures)


def instance_set(concept: Concept, config: PersonaliseConfig, size: int = 64) -> tuple:
    """(pixels (n, size, size, 3) uint8, prompts): the concept's training images and their prompts
    (partial prompts of the renderer's scenes, or --prompt for every image of an --images folder)."""
    if config.images is not None:
        pixels = folder_images(config.images, size)
        return pixels, [config.prompt] * len(pixels)
    dataset, keep = concept.images(config.n_images, INSTANCE_SEED)
    rng = np.random.default_rng([INSTANCE_SEED, config.seed])
    ti = config.method == "textual-inversion"
    prompts = [concept.caption(dataset.attributes(i), rng, config.caption_drop_prob, placeholder=ti) for i in keep]
    return np.stack([dataset.pixels(i) for i in keep]), prompts


@torch.no_grad()
def class_images(pipe, n: int, seed: int = PRIOR_SEED, steps: int = 25, guidance_scale: float = 4.0,
                 class_prompt: str | None = None) -> tuple:
    """(images (n, 3, H, W) in [-1, 1], prompts): what the base model draws for n prompts of the
    shapes it knows (or n times `class_prompt`, e.g. "a photo of a dog", for your own images)."""
    from sdlearn.evaluate import generate, prompt_set

    prompts = prompt_set(n, "train", seed=seed)[0] if class_prompt is None else [class_prompt] * n
    batch_size = 100 if pipe.default_size <= 64 else 4
    images = generate(pipe, prompts, "ddim", steps, guidance_scale, seed=seed, batch_size=batch_size)
    return images, prompts


class TextThenUNet(nn.Module):
    """The text encoder in front of the UNet, for textual inversion:
    forward(z_t, t, token_ids) = UNet(z_t, t, text_encoder(token_ids)).

    Textual inversion trains rows of the text encoder's table, so the prompt must pass through
    the encoder at every step (the other methods encode every prompt once, before training).
    """

    def __init__(self, text_encoder: nn.Module, unet: nn.Module):
        super().__init__()
        self.text_encoder, self.unet = text_encoder, unet

    def forward(self, z_t, t, token_ids, class_labels=None):
        return self.unet(z_t, t, self.text_encoder(token_ids), class_labels=class_labels)


class ConceptBatches:
    """train()'s data(step): (z_0, t, eps, context) for `batch_size` instance images, and with a
    prior as many class images interleaved plus the is_prior flags (sdlearn.dreambooth).

    context is a row of `contexts` (precomputed text embeddings, or token ids for textual
    inversion); row 0 is the empty prompt, used with probability p_uncond. The batch depends
    on the step only, so a resumed run continues exactly.
    """

    def __init__(self, instance: dict, prior: dict | None, contexts: torch.Tensor, scaling_factor: float,
                 batch_size: int, p_uncond: float, num_train_timesteps: int, seed: int):
        self.instance, self.prior, self.contexts = instance, prior, contexts
        self.scaling_factor, self.batch_size, self.p_uncond = scaling_factor, batch_size, p_uncond
        self.T, self.seed = num_train_timesteps, seed

    def _draw(self, part: dict, g: torch.Generator) -> tuple:
        B = self.batch_size
        index = torch.randint(len(part["mean"]), (B,), generator=g)
        z0 = self.scaling_factor * (part["mean"][index] + part["std"][index] * torch.randn(part["mean"][index].shape, generator=g))
        rows = part["prompt_row"][index]
        rows = torch.where(torch.rand(B, generator=g) < self.p_uncond, torch.zeros_like(rows), rows)
        return z0, rows

    def __call__(self, step: int):
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
        z0, rows = self._draw(self.instance, g)
        if self.prior is not None:
            z0_prior, rows_prior = self._draw(self.prior, g)
            z0, rows = interleave(z0, z0_prior), interleave(rows, rows_prior)
        t = torch.randint(self.T, (len(z0),), generator=g)
        eps = torch.randn(z0.shape, generator=g)
        batch = (z0, t, eps, self.contexts[rows])
        if self.prior is not None:
            batch += (torch.arange(len(z0)) % 2 == 1,)  # is_prior: the odd rows
        return batch


# 2. The methods ---------------------------------------------------------------------------------


def attach(method: str, pipe, concept: Concept, config: PersonaliseConfig) -> tuple:
    """Make `pipe` trainable the method's way: (the model train() runs, its trainable parameters)."""
    unet, text_encoder = pipe.unet, pipe.text_encoder
    unet.requires_grad_(False)
    text_encoder.requires_grad_(False)
    if method == "lora":
        from sdlearn.lora import add_lora

        return unet, add_lora(unet, rank=config.rank, targets=tuple(config.targets))
    if method == "textual-inversion":
        from sdlearn.textual_inversion import add_tokens, trainable_embeddings

        ids = add_tokens(pipe.tokenizer, text_encoder, concept.placeholder, config.num_vectors, concept.initializer)
        return TextThenUNet(text_encoder, unet), trainable_embeddings(text_encoder, ids)
    if method == "dreambooth":
        unet.requires_grad_(True)
        return unet, list(unet.parameters())
    if method == "hypernetwork":
        from sdlearn.hypernetwork import add_hypernetwork

        return unet, add_hypernetwork(unet, layer_structure=tuple(config.layer_structure), activation=config.activation,
                                      name=concept.name)
    raise ValueError(f"Unknown method {method!r}; choose one of {', '.join(METHODS)}.")


def outputs(method: str, concept: Concept) -> tuple:
    """The files a run writes into --out (besides training.json and samples.png)."""
    name = concept.name
    return {"lora": ("pytorch_lora_weights.safetensors",),
            "textual-inversion": ("learned_embeds.safetensors", f"{name}.safetensors"),
            "dreambooth": ("unet",),
            "hypernetwork": (f"{name}.pt",)}[method]


def save_result(method: str, pipe, concept: Concept, out: Path, overwrite: bool) -> list:
    """Write the trained numbers in the formats other tools read; return the paths written."""
    if method == "lora":
        from sdlearn.lora import save_lora

        return [save_lora(pipe.unet, out, overwrite=overwrite)]
    if method == "textual-inversion":
        from sdlearn.textual_inversion import save_embedding

        return [save_embedding(pipe.tokenizer, pipe.text_encoder, concept.placeholder, out / name, format=fmt, overwrite=overwrite)
                for name, fmt in zip(outputs(method, concept), ("diffusers", "a1111"))]
    if method == "dreambooth":
        pipe.unet.save_pretrained(out / "unet", overwrite=overwrite)
        return [out / "unet"]
    if method == "hypernetwork":
        from sdlearn.hypernetwork import save_hypernetwork

        return [save_hypernetwork(pipe.unet, out / f"{concept.name}.pt", overwrite=overwrite)]
    raise ValueError(method)


def _size(paths) -> int:
    total = 0
    for path in paths:
        path = Path(path)
        total += sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else path.stat().st_size
    return total


SAMPLE_PROMPTS = {  # the grid saved as samples.png: the concept in several colours, sizes and places
    "star": ("a large red star in the top left", "a large blue star in the center", "a small green star in the bottom right",
             "a large yellow star on the left", "a small purple star at the bottom", "a large cyan star in the top right"),
    "sun": ("a <sun> in the top left", "a <sun> in the center", "a <sun> in the bottom right", "a <sun> on the right"),
}


def sample_prompts(concept: Concept, method: str) -> list:
    prompts = list(SAMPLE_PROMPTS.get(concept.name, ()))
    if method == "textual-inversion" and concept.name == "star":
        prompts = [p.replace(" star", f" {concept.placeholder}") for p in prompts]
    return prompts


def process_rank() -> int:
    """This process's rank among those `accelerate launch` / torch.distributed.run started (0 when alone)."""
    return int(os.environ.get("RANK", "0"))


def process_count() -> int:
    """How many processes train together (WORLD_SIZE, set by the launcher; 1 when alone)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def check_settings(config: PersonaliseConfig) -> Concept:
    """The concept to teach, after refusing settings that do not fit together (before any work)."""
    if config.method not in METHODS:
        raise ValueError(f"Unknown method {config.method!r}; choose one of {', '.join(METHODS)}.")
    if config.prior_weight > 0 and config.method == "textual-inversion":
        raise ValueError("Prior preservation protects UNet weights; textual inversion trains none. Use --prior-weight 0.")
    processes = process_count()
    if config.batch_size % processes:
        raise ValueError(f"--batch-size {config.batch_size} does not split over {processes} processes; "
                         f"use a multiple of {processes} (each process trains on an equal share).")
    if config.images is None:
        unused = [flag for flag, value in (("--prompt", config.prompt), ("--class-prompt", config.class_prompt),
                                           ("--placeholder", config.placeholder), ("--initializer", config.initializer))
                  if value is not None]
        if unused:
            raise ValueError(f"{', '.join(unused)} only apply to your own images (--images); the concept {config.concept!r} "
                             "brings its own prompts. Leave them out, or add --images FOLDER.")
        if config.concept not in CONCEPTS:
            raise ValueError(f"Unknown concept {config.concept!r}; choose one of {', '.join(CONCEPTS)}.")
        return CONCEPTS[config.concept]
    if not config.prompt:
        raise ValueError('--images needs --prompt, the prompt of every image, e.g. --prompt "a photo of sks dog".')
    if config.prior_weight > 0 and not config.class_prompt:
        raise ValueError(f'Prior preservation (--prior-weight {config.prior_weight:g}, the {config.method} default) with --images '
                         'needs --class-prompt, e.g. --class-prompt "a photo of a dog"; or train without it: --prior-weight 0.')
    name = Path(config.images).name or "concept"
    if config.method == "textual-inversion":
        if not config.placeholder or config.placeholder not in config.prompt:
            raise ValueError('Textual inversion with --images needs --placeholder, a new word that --prompt uses, '
                             'e.g. --placeholder "<sks>" --prompt "a photo of <sks>".')
        if not config.initializer:
            raise ValueError('Textual inversion with --images needs --initializer, a one-token word the new rows start from, '
                             'e.g. --initializer dog.')
        return Concept(name, {}, placeholder=config.placeholder, initializer=config.initializer)
    return Concept(name, {})


def personalise(out, config: PersonaliseConfig, base=None, overwrite: bool = False, progress: bool = True, device=None,
                checkpoint_every: int | None = None, resume: bool = False):
    """Train `config.method` on `config.concept` (or on the --images folder) from the base pipeline,
    save to `out`; return (pipe, record, history). Under several processes (accelerate launch)
    every process trains its share and only the main one writes.

    checkpoint_every: save the training state every that many steps into <out>-work/state
    (accelerate's save_state format, sdlearn.train); resume=True continues from it, to the same
    weights an uninterrupted run ends with. The work folder is removed when the run is saved.
    """
    concept = check_settings(config)
    out = Path(out)
    check_out_folder(out, outputs(config.method, concept) + ("training.json", "samples.png"), f"a {config.method} run", overwrite)
    checkpoint = None
    if checkpoint_every or resume:
        checkpoint = work_folder(out) / "state"
        if resume and not checkpoint.exists():
            raise FileNotFoundError(f"--resume: {checkpoint} holds no saved run to continue; start without --resume.")
        if not resume and checkpoint.exists():
            raise FileExistsError(f"{checkpoint} holds an unfinished run: pass --resume to continue it, "
                                  f"or delete {checkpoint.parent} to start again.")
        checkpoint.parent.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(config.seed)
    pipe = base_pipeline(base)
    if device is not None:
        pipe.to(device)
    if config.method == "lora":
        from sdlearn.lora import LoRAError, _targeted

        if not _targeted(pipe.unet, tuple(config.targets)):
            raise LoRAError(f"--targets {' '.join(config.targets)}: no linear layer of this UNet is named so; "
                            f"use e.g. {' '.join(LORA_TARGETS)}.")
    seconds = {}

    began = time.perf_counter()
    pixels, prompts = instance_set(concept, config, pipe.default_size)
    mean, std = encode_images(pipe.vae, pixels)
    prior = None
    prior_prompts = []
    if config.prior_weight > 0:
        images, prior_prompts = class_images(pipe, config.n_prior, seed=PRIOR_SEED + config.seed, class_prompt=config.class_prompt)
        prior_pixels = ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).movedim(1, -1).numpy()
        prior = dict(zip(("mean", "std"), encode_images(pipe.vae, prior_pixels)))
    seconds["data"] = time.perf_counter() - began

    model, params = attach(config.method, pipe, concept, config)  # after class_images: the base model drew them
    table = [""] + sorted(set(prompts) | set(prior_prompts))  # row 0: the empty prompt
    row = {p: k for k, p in enumerate(table)}
    with torch.no_grad():
        token_ids = torch.cat([pipe.tokenizer(table[i:i + 256]) for i in range(0, len(table), 256)])
        contexts = token_ids if config.method == "textual-inversion" else torch.cat(
            [pipe.text_encoder(token_ids[i:i + 256].to(pipe.device)).float().cpu() for i in range(0, len(table), 256)])
    instance = {"mean": mean, "std": std, "prompt_row": torch.tensor([row[p] for p in prompts])}
    if prior is not None:
        prior["prompt_row"] = torch.tensor([row[p] for p in prior_prompts])
    scheduler = pipe.scheduler_config
    schedule = NoiseSchedule(**{k: scheduler[k] for k in ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule")})
    loss = DiffusionLoss(schedule, scheduler.get("prediction_type", "epsilon"), min_snr_gamma=5.0)
    if prior is not None:
        loss = PriorPreservationLoss(loss, config.prior_weight)
    batches = ConceptBatches(instance, prior, contexts, pipe.vae.config.scaling_factor, config.batch_size, config.p_uncond,
                             schedule.num_train_timesteps, config.seed)
    trainable = sum(p.numel() for p in params)
    if config.method == "textual-inversion":
        trainable = config.num_vectors * pipe.text_encoder.config.hidden_size  # the new rows only
    history = train(model, loss, batches, steps=config.steps, lr=config.lr, params=params, seed=config.seed,
                    lr_schedule="cosine", warmup=min(50, config.steps // 10), progress=progress,
                    desc=f"{config.method}: {concept.name}", device=pipe.device,
                    precision=config.precision, accumulation_steps=config.accumulation_steps,
                    checkpoint=checkpoint, checkpoint_every=checkpoint_every, resume=resume)
    seconds["training"] = history.seconds
    pipe.unet.eval().requires_grad_(False)
    pipe.text_encoder.eval().requires_grad_(False)
    if process_rank() != 0:
        return pipe, None, history

    out.mkdir(parents=True, exist_ok=True)
    written = save_result(config.method, pipe, concept, out, overwrite)
    prompts_shown = sample_prompts(concept, config.method) if config.images is None else [config.prompt] * 4
    grid = pipe.text_to_image(prompts_shown, steps=config.sample_steps, guidance_scale=4.0, sampler="ddim", seed=0)
    image_grid(grid, ncols=len(grid)).save(out / "samples.png")
    record = {
        "command": "python -m sdlearn.recipes.personalise " + " ".join(sys.argv[1:]) if __name__ == "__main__" else None,
        "method": config.method,
        "concept": concept.name if config.images is None else None,
        "images": None if config.images is None else {"folder": str(config.images), "count": len(pixels)},
        "placeholder": concept.placeholder if config.method == "textual-inversion" else None,
        "base_model": f"data/{BASE_MODEL}" if base is None else str(base),
        "config": {k: v for k, v in asdict(config).items() if v is not None and not (config.images and k in ("concept", "n_images"))},
        "trained_parameters": trainable,
        "file_bytes": _size(written),
        "files": [p.name for p in written],
        "seconds": {k: round(v, 1) for k, v in seconds.items()},
        "final_loss": sum(history.losses[-50:]) / len(history.losses[-50:]),
        "torch_threads": torch.get_num_threads(),
        "cpu": cpu_name(),
        "device": torch.cuda.get_device_name(pipe.device) if pipe.device.type == "cuda" else str(pipe.device),
        "processes": process_count(),
    }
    if resume:
        record["resumed"] = True  # seconds["training"] counts the resumed part only
    write_text(out / "training.json", json.dumps(record, indent=2) + "\n")
    if checkpoint is not None:
        shutil.rmtree(checkpoint.parent, ignore_errors=True)  # the run is saved: nothing left to resume
    return pipe, record, history


def main(argv=None) -> int:
    parser = ArgumentParser(prog="python -m sdlearn.recipes.personalise", description=__doc__.split("\n\n")[0])
    parser.add_argument("--method", required=True, choices=METHODS, help="what to train")
    parser.add_argument("--concept", default=None, choices=sorted(CONCEPTS), help="what to teach (default: star; sun for textual-inversion)")
    parser.add_argument("--out", required=True, help="the folder to write, e.g. data/lora-star")
    parser.add_argument("--base", default=None, help="the base pipeline folder (default: data/mini-sd)")
    parser.add_argument("--steps", type=POSITIVE_INT, default=None, help="training steps")
    parser.add_argument("--batch-size", type=POSITIVE_INT, default=None, help="concept images per step")
    parser.add_argument("--lr", type=POSITIVE_FLOAT, default=None, help="peak learning rate")
    parser.add_argument("--n-images", type=POSITIVE_INT, default=None, help="concept images to train on")
    parser.add_argument("--prior-weight", type=NON_NEGATIVE_FLOAT, default=None, help="prior preservation weight w (0: none)")
    parser.add_argument("--n-prior", type=POSITIVE_INT, default=None, help="class images the base model draws for the prior")
    parser.add_argument("--rank", type=POSITIVE_INT, default=None, help="LoRA rank")
    parser.add_argument("--targets", nargs="+", default=None, help="LoRA: the layers it adapts (default: to_q to_k to_v to_out.0; "
                        "add ff.net.0.proj ff.net.2 for the feed-forward layers)")
    parser.add_argument("--activation", default=None, help="hypernetwork: the MLP's activation (default linear, A1111's; or relu, ...)")
    parser.add_argument("--num-vectors", type=POSITIVE_INT, default=None, help="textual inversion: vectors per placeholder")
    parser.add_argument("--seed", type=int, default=None, help="random seed")
    parser.add_argument("--images", default=None, help="a folder of pictures of your own subject (instead of --concept)")
    parser.add_argument("--prompt", default=None, help='with --images: their prompt, e.g. "a photo of sks dog"')
    parser.add_argument("--class-prompt", default=None, help='with --images and --prior-weight: e.g. "a photo of a dog"')
    parser.add_argument("--placeholder", default=None, help='textual inversion with --images: the new word, e.g. "<sks>"')
    parser.add_argument("--initializer", default=None, help="textual inversion with --images: the word it starts from, e.g. dog")
    parser.add_argument("--precision", default=None, choices=("fp32", "bf16", "auto"), help="training precision (default fp32)")
    parser.add_argument("--accumulation-steps", type=POSITIVE_INT, default=None, help="micro-batches per step (less memory)")
    parser.add_argument("--sample-steps", type=POSITIVE_INT, default=None, help="sampler steps of samples.png (default 25)")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: this process's GPU if there is one, else cpu)")
    parser.add_argument("--threads", type=POSITIVE_INT, default=None, help="torch CPU threads")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing run in --out")
    parser.add_argument("--checkpoint-every", type=POSITIVE_INT, default=None, help="save the training state every N steps (<out>-work/state)")
    parser.add_argument("--resume", action="store_true", help="continue an interrupted run from <out>-work/state")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    overrides = {key: getattr(args, key) for key in ("concept", "steps", "batch_size", "lr", "n_images", "prior_weight",
                                                     "n_prior", "rank", "targets", "activation", "num_vectors", "seed", "images", "prompt",
                                                     "class_prompt", "placeholder", "initializer", "sample_steps",
                                                     "precision", "accumulation_steps")
                 if getattr(args, key) is not None}
    from accelerate import PartialState

    # under accelerate launch: this process's own GPU (cuda:LOCAL_RANK), never every process on cuda:0
    device = PartialState().device if args.device in (None, "cuda") else args.device
    try:
        config = PersonaliseConfig.for_method(args.method, **overrides)
        _, record, _ = personalise(args.out, config, base=args.base, overwrite=args.overwrite, progress=not args.no_progress,
                                   device=device, checkpoint_every=args.checkpoint_every, resume=args.resume)
    except (FileExistsError, FileNotFoundError, ValueError, OSError) as error:
        print(f"{parser.prog}: error: {one_line(error)}", file=sys.stderr)
        return 2
    if record is None:  # not the main process of several
        return 0
    taught = record["concept"] or record["images"]["folder"]
    print(f"{record['method']} taught {taught!r}: {record['trained_parameters']:,} numbers trained in "
          f"{record['seconds']['training']:.0f} s; {record['file_bytes']:,} bytes written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
