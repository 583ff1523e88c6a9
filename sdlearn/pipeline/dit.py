"""Class-conditional generation with a DiT: class labels -> latents -> image, as diffusers' DiTPipeline.

    labels y (names like "red circle", or ids 0 .. K-1)
    z_T ~ N(0, I)  (B, C, S, S), drawn as diffusers' randn_tensor draws it (a CPU generator)
    for t in sampler.timesteps:                                  (the loop written out in full)
        out_c, out_u = DiT(z_t, t, y), DiT(z_t, t, K)            one batch of 2B; K = the null class
        g_c, g_u     = out_c[:, :C], out_u[:, :C]                guidance on the first C channels
        g            = g_u + w (g_c - g_u)                       (Ho & Salimans 2022, eq. 6)
        z_{t-1}      = sampler.step(g, t, z_t)                   learned sigma (channels C..2C) dropped
    x = VAE.decode(z_0 / scaling_factor)

What g is depends on how the DiT was trained, and the sampler follows the folder's scheduler:

- eps (DDPM objective): g is eps, sampled with DDIM (DDIMScheduler) or any alpha_bar sampler;
- flow matching: g is the velocity v = noise - x_0, sampled with flow_euler
  (FlowMatchEulerDiscreteScheduler); guidance on v is the same linear combination.

The guidance splits the channels as diffusers does: the first C = in_channels (the latent's
channels) are guided, the rest (DiT-XL/2's learned variance) are not; when out_channels is 2C
only the first C go to the sampler. (The original facebookresearch/DiT code guides the first
3 channels only, a quirk diffusers does not copy; this module follows diffusers.)

Differences from diffusers' DiTPipeline, none of which changes an image for a deterministic sampler:
- diffusers carries both halves of the batch through the sampler (identical copies); here the
  sampler steps the B latents once.
- diffusers hard-codes the null class as 1000 (ImageNet's K); here it is the model's
  `config.null_class`. A DiT with K != 1000 therefore runs in diffusers only with guidance_scale <= 1,
  which is why sdlearn.recipes.dit gives its 32 classes a table of 1000 (ids 32.. unused).
- names: diffusers' get_label_ids takes a list (a bare string is split into its characters);
  here a string is one name.

Folders: model_index.json (DiTPipeline, with `id2label` as the facebook/DiT-XL-2-256 folder
has it: {"0": "name", ...}; a value may list synonyms separated by commas), transformer/
(DiTTransformer2DModel), vae/ (AutoencoderKL), scheduler/scheduler_config.json.

References: Peebles & Xie 2023 (DiT, arXiv:2212.09748); Ho & Salimans 2022, "Classifier-Free
Diffusion Guidance" (arXiv:2207.12598); diffusers pipelines/dit/pipeline_dit.py.
"""

import json
from pathlib import Path
from typing import Callable

import torch

from sdlearn.diffusion.scheduler_configs import SAMPLER_FOR_SCHEDULER, get_sampler
from sdlearn.models.dit import DiT
from sdlearn.models.files import save_pipeline_folder
from sdlearn.models.noise import randn
from sdlearn.models.vae import AutoencoderKL
from sdlearn.pipeline.images import to_pil
from sdlearn.pipeline.stable_diffusion import _generator, _progress

OUTPUT_TYPES = ("pil", "tensor", "latent")
PIPELINE_CLASS = "DiTPipeline"


def labels_from_id2label(id2label: dict | None) -> dict:
    """name -> id, as diffusers' DiTPipeline builds `labels`: each value split at commas, stripped, sorted by name."""
    labels = {}
    for key, value in (id2label or {}).items():
        for name in str(value).split(","):
            labels[name.strip()] = int(key)
    return dict(sorted(labels.items()))


class DiTPipeline:
    """A DiT, the autoencoder that decodes its latents, and a scheduler config; `generate` draws images of classes.

    Build from parts, or `DiTPipeline.from_pretrained(folder)` for a diffusers DiTPipeline folder;
    `save_pretrained(folder)` writes one that diffusers' DiTPipeline.from_pretrained loads.
    """

    def __init__(self, transformer: DiT, vae: AutoencoderKL, scheduler_config: dict, id2label: dict | None = None):
        if not isinstance(transformer, DiT):
            raise TypeError(f"transformer must be a sdlearn DiT, got {type(transformer).__name__}.")
        if transformer.config.in_channels != vae.config.latent_channels:
            raise ValueError(f"The DiT reads {transformer.config.in_channels}-channel latents but the VAE makes "
                             f"{vae.config.latent_channels}; use the autoencoder the DiT was trained on.")
        if scheduler_config.get("_class_name") not in SAMPLER_FOR_SCHEDULER:
            raise ValueError(f"scheduler_config names {scheduler_config.get('_class_name')!r}; sdlearn samples with one of "
                             f"{sorted(SAMPLER_FOR_SCHEDULER)}.")
        self.transformer, self.vae = transformer.eval(), vae.eval()
        self.scheduler_config = dict(scheduler_config)
        self.id2label = {int(k): v for k, v in (id2label or {}).items()}
        self.labels = labels_from_id2label(self.id2label)

    # -- loading and saving ----------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, folder, device=None, dtype=None) -> "DiTPipeline":
        """Load a diffusers DiTPipeline folder (transformer/, vae/, scheduler/, model_index.json)."""
        folder = Path(folder)
        index_path = folder / "model_index.json"
        if not index_path.is_file():
            raise FileNotFoundError(f"{folder} holds no model_index.json; expected a diffusers DiTPipeline folder.")
        index = json.loads(index_path.read_text())
        if index.get("_class_name") != PIPELINE_CLASS:
            raise ValueError(f"{index_path} describes a {index.get('_class_name')!r}, not a {PIPELINE_CLASS}. "
                             "For Stable Diffusion folders use sdlearn.load_pipeline.")
        scheduler = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
        transformer = DiT.from_pretrained(folder / "transformer", device=device, dtype=dtype)
        vae = AutoencoderKL.from_pretrained(folder / "vae", device=device)  # float32: decoding is cheap and exact
        return cls(transformer, vae, scheduler, index.get("id2label"))

    def save_pretrained(self, folder, overwrite: bool = False) -> Path:
        """Write a diffusers DiTPipeline folder; the class names go to model_index.json's id2label.

        An existing pipeline is replaced only with overwrite=True; the folder is written aside and
        swapped in (sdlearn.models.files.save_folder), so a failure leaves the old one intact.
        """
        folder = Path(folder)
        parts = ("model_index.json", "transformer", "vae", "scheduler")
        existing = [p for p in parts if (folder / p).exists()]
        if existing and not overwrite:
            raise FileExistsError(f"{folder} already holds {existing}. Choose another folder or pass overwrite=True.")
        model_index = {
            "_class_name": PIPELINE_CLASS,
            "scheduler": ["diffusers", self.scheduler_config["_class_name"]],
            "transformer": ["diffusers", "DiTTransformer2DModel"],
            "vae": ["diffusers", "AutoencoderKL"],
            "id2label": {str(k): v for k, v in sorted(self.id2label.items())},  # JSON keys are strings, as on the hub
        }

        return save_pipeline_folder(folder, {"transformer": self.transformer, "vae": self.vae}, self.scheduler_config, model_index)

    # -- parts -----------------------------------------------------------------------------

    @property
    def device(self) -> torch.device:
        return next(self.transformer.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.transformer.parameters()).dtype

    @property
    def default_sampler(self) -> str:
        return SAMPLER_FOR_SCHEDULER[self.scheduler_config["_class_name"]]

    @property
    def is_flow(self) -> bool:
        """Whether the DiT predicts a flow-matching velocity (its folder's scheduler is flow_euler's)."""
        return bool(getattr(self.make_sampler(), "is_flow", False))

    def make_sampler(self, name: str | None = None):
        """A fresh sampler `name` (default: the folder's scheduler) on the folder's schedule."""
        config = {k: v for k, v in self.scheduler_config.items() if not k.startswith("_")}
        return get_sampler(name or self.default_sampler, **config)

    def get_label_ids(self, label) -> list[int]:
        """Class names -> ids ("red circle" -> 0); a string is one name."""
        names = [label] if isinstance(label, str) else list(label)
        unknown = [name for name in names if name not in self.labels]
        if unknown:
            raise ValueError(f"Unknown class name(s) {unknown}. The model knows: {list(self.labels)}.")
        return [self.labels[name] for name in names]

    def class_ids(self, class_labels) -> torch.Tensor:
        """Names or ids -> a (B,) LongTensor of ids in 0 .. K-1 (K = num_embeds_ada_norm), checked."""
        items = [class_labels] if isinstance(class_labels, (str, int)) else list(class_labels)
        if not items:
            raise ValueError("class_labels is empty: give at least one class name or id.")
        ids = [self.get_label_ids(x)[0] if isinstance(x, str) else x for x in items]
        K = self.transformer.config.null_class
        bad = [i for i in ids if not isinstance(i, int) or isinstance(i, bool) or not 0 <= i < K]
        if bad:
            raise ValueError(f"Class ids must be integers in 0..{K - 1} (K = {K} is the null class), got {bad}.")
        return torch.tensor(ids, dtype=torch.long, device=self.device)

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents (B, C, h, w) -> images (B, 3, 8h, 8w) in [-1, 1]."""
        images = self.vae.decode(latents.to(torch.float32) / self.vae.config.scaling_factor)
        return images.clamp(-1.0, 1.0)

    def guided_output(self, latents: torch.Tensor, t, labels: torch.Tensor, guidance_scale: float) -> torch.Tensor:
        """The sampler's input at one step: the DiT's first C output channels, guided when guidance_scale > 1."""
        C = self.transformer.config.in_channels
        if guidance_scale > 1:
            null = torch.full_like(labels, self.transformer.config.null_class)
            out = self.transformer(torch.cat([latents, latents]), t, torch.cat([labels, null]))  # (2B, C_out, h, w)
            cond, uncond = out[:, :C].chunk(2)  # eps (or v) only; a learned variance is not guided
            return uncond + guidance_scale * (cond - uncond)
        return self.transformer(latents, t, labels)[:, :C]

    # -- generation ------------------------------------------------------------------------

    @torch.no_grad()
    def generate(self, class_labels, guidance_scale: float = 4.0, steps: int = 50, sampler: str | None = None,
                 seed: int | None = None, generator: torch.Generator | None = None, output_type: str = "pil",
                 callback: Callable | None = None, progress: bool = False):
        """Images of the given classes (names or ids; one image each), as diffusers' DiTPipeline(class_labels, ...).

        guidance_scale > 1 turns classifier-free guidance on (diffusers' default is 4.0); sampler
        defaults to the folder's scheduler; the same seed (or CPU generator) gives the same starting
        noise as diffusers. callback(i, t, latents) is called after every step.
        output_type: "pil", "tensor" (B, 3, H, W) in [0, 1], or "latent".
        """
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {OUTPUT_TYPES}, got {output_type!r}.")
        if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
            raise ValueError(f"steps must be a positive integer, got {steps!r}.")
        labels = self.class_ids(class_labels)  # (B,)
        generator = _generator(seed, generator)
        c = self.transformer.config
        sampler = self.make_sampler(sampler)
        sampler.set_timesteps(steps)

        # 1. z_T ~ N(0, I), as diffusers' randn_tensor draws it (sample_size is the latent side).
        latents = randn((len(labels), c.in_channels, c.sample_size, c.sample_size), generator=generator,
                        device=self.device, dtype=self.dtype)
        latents = latents * sampler.init_noise_sigma  # 1 for DDIM and flow_euler, as in DiTPipeline
        # 2. The reverse process, one guided model call per step.
        for i, t in enumerate(_progress(sampler.timesteps, progress)):
            model_input = sampler.scale_model_input(latents, t)
            output = self.guided_output(model_input, t, labels, guidance_scale)  # (B, C, h, w): eps or v
            latents = sampler.step(output, t, latents, generator=generator).prev_sample
            if callback is not None:
                callback(i, t, latents)
        if output_type == "latent":
            return latents
        # 3. Decode: x = D(z_0 / scaling_factor).
        images = self.decode_latents(latents)
        return (images + 1) / 2 if output_type == "tensor" else to_pil(images.float().cpu())

    __call__ = generate

    def __repr__(self) -> str:
        c = self.transformer.config
        return (f"DiTPipeline(DiT {c.num_layers} blocks x {c.inner_dim} wide, patch {c.patch_size}, "
                f"{len(self.id2label)} named classes, sampler {self.default_sampler!r})")


__all__ = ["DiTPipeline", "labels_from_id2label", "OUTPUT_TYPES"]
