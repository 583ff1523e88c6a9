"""Latent text-to-image: the sampling loop of Stable Diffusion.

Stable Diffusion (Rombach et al. 2022) is four parts and one loop. The tokenizer and the
CLIP text encoder turn a prompt into vectors c; the UNet eps_theta(z_t, t, c) predicts the
noise in a noisy latent z_t; a sampler takes a step from z_t towards less noise; the
autoencoder turns the final latent into pixels. Notation as in sdlearn.diffusion.schedules
(alpha_bar_t, sigma_t, eps), with z for latents and s for the guidance scale:

    1. text      c     = CLIPTextModel(tokenize(prompt))                      (B, 77, D)
                 c_neg = CLIPTextModel(tokenize(negative_prompt or ""))        (B, 77, D)
    2. noise     z_T   = init_noise_sigma * eps,  eps ~ N(0, I)               (B, 4, H/8, W/8)
    3. loop      for t in the sampler's timesteps (most noise first):
                   [e_neg, e_cond] = UNet([z_t, z_t], t, [c_neg, c])          one batched call
                   e = e_neg + s (e_cond - e_neg)                              classifier-free guidance
                   z_prev, x0_pred = sampler.step(e, t, z_t)
    4. decode    x = VAE.decode(z_0 / scaling_factor)                          (B, 3, H, W) in [-1, 1]

Classifier-free guidance (Ho & Salimans 2022, eq. 6): the same UNet, trained with the
caption sometimes dropped, predicts the noise with and without the prompt; stepping along
e_neg + s (e_cond - e_neg) with s > 1 exaggerates what the prompt changes. A negative
prompt replaces the empty prompt, so the image is pushed away from it. With s <= 1 the
unconditional half is skipped entirely (one UNet call per step), exactly as diffusers'
`do_classifier_free_guidance = guidance_scale > 1` does; a negative prompt then has no
effect, and the pipeline warns.

Image-to-image (SDEdit, Meng et al. 2022). Start the loop part-way down instead of from
pure noise: encode the image, z_0 = scaling_factor * E(x).sample(), keep the last
n = int(steps * strength) timesteps t_1 > ... > t_n, and noise z_0 to the first of them,

    z_{t_1} = sqrt(alpha_bar_{t_1}) z_0 + sqrt(1 - alpha_bar_{t_1}) eps      (the sampler's add_noise)

strength 1 starts (almost) from noise and ignores the image; strength 0 runs no step and
returns the autoencoder's reconstruction of the image.

Inpainting with an ordinary 4-channel UNet (the blend of SD 1.x's "legacy" inpainting, in
the spirit of RePaint, Lugmayr et al. 2022). A mask m at latent resolution marks what to
repaint (1, white) and what to keep (0, black). After every step the kept region is
overwritten with the original latent, noised to the level of the next step:

    z_prev <- m * z_prev + (1 - m) * add_noise(z_0, eps, t_next)             (z_0 itself after the last step)

so the model only ever invents the masked region, and sees the rest of the picture at the
right noise level. The same seed and sampler give diffusers' StableDiffusionInpaintPipeline
result with a 4-channel UNet.

Everything is drawn from the random generator in diffusers' order, so a seed gives the same
image as the matching diffusers pipeline (tests/test_pipeline.py proves it).

References: Rombach et al. 2022, "High-Resolution Image Synthesis with Latent Diffusion
Models" (arXiv:2112.10752); Ho & Salimans 2022, "Classifier-Free Diffusion Guidance"
(arXiv:2207.12598); Meng et al. 2022, "SDEdit" (arXiv:2108.01073); Lugmayr et al. 2022,
"RePaint" (arXiv:2201.09865); diffusers' pipeline_stable_diffusion.py,
pipeline_stable_diffusion_img2img.py and pipeline_stable_diffusion_inpaint.py.
"""

import json
import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from sdlearn.diffusion.guidance import classifier_free_guidance
from sdlearn.models.clip import CLIPTextModel, CLIPTokenizer
from sdlearn.models.files import save_pipeline_folder
from sdlearn.pipeline.images import image_to_tensor, mask_to_tensor, to_pil  # noqa: F401 (mask_to_tensor: public here too)
from sdlearn.diffusion.samplers import SAMPLER_NAMES
from sdlearn.diffusion.scheduler_configs import SAMPLER_FOR_SCHEDULER, SD_SCHEDULER_CONFIG, get_sampler
from sdlearn.models.noise import randn
from sdlearn.models.unet import UNet
from sdlearn.models.vae import AutoencoderKL

OUTPUT_TYPES = ("pil", "tensor", "latent")


# ------------------------------------------------------------------------------------------
# What a step callback receives
# ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StepRecord:
    """One step of the loop, as a callback sees it (tensors are the loop's own, not copies).

    For a v-prediction model (SD 2.x 768-v) eps_uncond / eps_cond hold the predicted v.
    """

    step: int  # 0, 1, ... within this run (image_to_image runs fewer steps than asked)
    t: int | float  # the timestep the UNet saw (fractional for Euler with "linspace" spacing)
    latents: torch.Tensor  # z after this step (and after inpainting's blend)   (B, 4, h, w)
    x0_pred: torch.Tensor  # the sampler's estimate of the clean latent z_0     (B, 4, h, w)
    eps_uncond: torch.Tensor | None  # UNet output for the negative / empty prompt; None without guidance
    eps_cond: torch.Tensor  # UNet output for the prompt                        (B, 4, h, w)
    eps: torch.Tensor  # what the sampler used: eps_uncond + s (eps_cond - eps_uncond)


class StepRecorder:
    """A step callback that keeps every StepRecord on the CPU, for plots and widgets.

        recorder = StepRecorder()
        pipe.text_to_image("a red circle", callback=recorder)
        recorder.stack("x0_pred")   # (steps, B, 4, h, w)
    """

    def __init__(self):
        self.records = []

    def __call__(self, record: StepRecord) -> None:
        def cpu(x):
            return None if x is None else x.detach().to("cpu", copy=True)

        self.records.append(
            StepRecord(record.step, record.t, cpu(record.latents), cpu(record.x0_pred), cpu(record.eps_uncond),
                       cpu(record.eps_cond), cpu(record.eps))
        )

    def __len__(self) -> int:
        return len(self.records)

    @property
    def timesteps(self) -> list:
        return [r.t for r in self.records]

    def stack(self, field: str) -> torch.Tensor:
        """One field of every record stacked along a new first axis: (steps, B, 4, h, w)."""
        names = ("latents", "x0_pred", "eps_uncond", "eps_cond", "eps")
        if field not in names:
            raise ValueError(f"field must be one of {names}, got {field!r}.")
        if not self.records:
            raise ValueError("Nothing recorded yet: pass the recorder as callback= to a generation method first.")
        values = [getattr(r, field) for r in self.records]
        if values[0] is None:
            raise ValueError(f"{field} was not recorded: the run used guidance_scale <= 1 (no unconditional branch).")
        return torch.stack(values)


# Requests bigger than these are refused before anything is allocated (a clear error instead of
# an out-of-memory crash, or a machine that swaps for minutes). Per pipeline they are the
# attributes max_pixels and max_batch_pixels: raise them, or set None, to go bigger on purpose.
MAX_PIXELS = 4096 * 4096  # pixels per image
MAX_BATCH_PIXELS = 64 * 1024 * 1024  # outputs x pixels in one call: 64 images of 1024x1024, 4 of 4096x4096


# ------------------------------------------------------------------------------------------
# What every generation method prepares before the loop
# ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Run:
    """One generation call, checked and ready for the loop (built by StableDiffusion._prepare)."""

    batch: int  # B = prompts x num_images_per_prompt
    cond: torch.Tensor  # text embeddings of the prompts, one row per output       (B, 77, D)
    uncond: torch.Tensor | None  # of the negative / empty prompts; None without guidance (s <= 1)
    sampler: object  # a fresh sampler, set_timesteps(steps) done
    timesteps: torch.Tensor  # the ones to run, most noise first (fewer than steps when strength < 1)
    generator: torch.Generator | None
    guidance_scale: float
    callback: Callable | None
    progress: bool
    output_type: str  # "pil", "tensor" or "latent"
    # SDXL's extra UNet inputs, stacked like the context ([uncond, cond] under guidance); None for SD 1.x/2.x
    added_cond_kwargs: dict | None = None


# ------------------------------------------------------------------------------------------
# The pipeline
# ------------------------------------------------------------------------------------------


class StableDiffusion:
    """Stable Diffusion 1.x/2.x: `text_to_image`, `image_to_image`, `inpaint`, `save_pretrained`, `save_single_file`.

    Attributes: unet, vae, text_encoder, tokenizer (sdlearn modules) and scheduler_config
    (a diffusers scheduler_config.json dict: the training noise schedule). The sampler is
    picked per call by name (sdlearn.samplers: ddpm, ddim, plms, euler, euler_a, dpmpp_2m);
    the default is the folder's scheduler. Load one with `sdlearn.load_pipeline(folder)`.
    """

    model_names = ("unet", "vae", "text_encoder")  # the networks, as attributes

    def __init__(self, unet: UNet, vae: AutoencoderKL, text_encoder: CLIPTextModel, tokenizer: CLIPTokenizer,
                 scheduler_config: dict | None = None):
        for name, value, cls in (("unet", unet, UNet), ("vae", vae, AutoencoderKL), ("text_encoder", text_encoder, CLIPTextModel),
                                 ("tokenizer", tokenizer, CLIPTokenizer)):
            if not isinstance(value, cls):
                raise TypeError(f"{name} must be an sdlearn {cls.__module__}.{cls.__name__}, got {type(value).__name__}.")
        if unet.config.in_channels != vae.config.latent_channels:
            raise ValueError(
                f"The UNet takes {unet.config.in_channels} input channels but the VAE makes {vae.config.latent_channels}-channel "
                "latents. (9-channel inpainting UNets are not supported; inpaint() works with the ordinary 4-channel UNet.)"
            )
        self._check_text_width(unet, text_encoder)
        if tokenizer.vocab_size > text_encoder.config.vocab_size:
            raise ValueError(
                f"The tokenizer has {tokenizer.vocab_size} tokens but the text encoder only {text_encoder.config.vocab_size} "
                "embeddings; the two come from different models."
            )
        self.unet, self.vae, self.text_encoder, self.tokenizer = unet, vae, text_encoder, tokenizer
        self.scheduler_config = dict(SD_SCHEDULER_CONFIG if scheduler_config is None else scheduler_config)
        self.slicing = False  # see enable_slicing
        self.max_pixels = MAX_PIXELS  # per image; a bigger request is refused before any work (None: no limit)
        self.max_batch_pixels = MAX_BATCH_PIXELS  # outputs x height x width in one call (None: no limit)
        for module in (unet, vae, text_encoder):
            module.eval()

    def _check_text_width(self, unet: UNet, text_encoder: CLIPTextModel) -> None:
        """The UNet must attend to vectors as wide as the text encoder makes (StableDiffusionXL: both encoders')."""
        if unet.config.cross_attention_dim != text_encoder.config.hidden_size:
            raise ValueError(
                f"The UNet attends to {unet.config.cross_attention_dim}-wide text vectors but the text encoder makes "
                f"{text_encoder.config.hidden_size}-wide ones; the two come from different models."
            )

    # -- devices, sizes, samplers -----------------------------------------------------------

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.unet.parameters()).dtype

    def to(self, device=None, dtype=None) -> "StableDiffusion":
        """Move every model to `device` and/or `dtype` (in place); returns the pipeline.

        In float16/bfloat16 the autoencoder stays in float32 when its config asks for it
        (force_upcast, true for SD's VAE): its decoder's activations overflow fp16 and the
        images come out black or NaN. It costs 160 MB more memory and a few ms per image.
        """
        if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise TypeError(f"dtype must be a floating torch.dtype such as torch.float16, got {dtype!r}.")
        vae_dtype = torch.float32 if dtype in (torch.float16, torch.bfloat16) and self.vae.config.force_upcast else dtype
        self.unet.to(device=device, dtype=dtype)
        self.text_encoder.to(device=device, dtype=dtype)
        self.vae.to(device=device, dtype=vae_dtype)
        return self

    def enable_slicing(self, enabled: bool = True) -> "StableDiffusion":
        """Save memory at some cost in speed: one UNet call per guidance half, one VAE decode per image.

        The peak memory of the UNet's attention and of the decoder grows with the batch;
        slicing halves the first and divides the second by the batch size. The numbers are
        the same as without slicing.
        """
        self.slicing = bool(enabled)
        return self

    @property
    def vae_scale_factor(self) -> int:
        """Image side / latent side: 8 for SD."""
        return self.vae.config.downscale_factor

    @property
    def size_multiple(self) -> int:
        """Image sides must be multiples of this: the VAE's factor times the UNet's halvings (64 for SD)."""
        return self.vae_scale_factor * self.unet.config.downscale

    @property
    def default_size(self) -> int:
        """The image side the UNet was trained at (sample_size latent pixels times 8)."""
        sample_size = self.unet.config.sample_size or 64
        return (sample_size[0] if isinstance(sample_size, (list, tuple)) else sample_size) * self.vae_scale_factor

    @property
    def default_sampler(self) -> str | None:
        """The sampler matching the folder's scheduler (None if sdlearn has no equivalent)."""
        return SAMPLER_FOR_SCHEDULER.get(self.scheduler_config.get("_class_name"))

    def make_sampler(self, name: str | None = None, eta: float = 0.0):
        """A fresh sampler `name` (default: the folder's) on this pipeline's noise schedule."""
        if name is None:
            name = self.default_sampler
            if name is None:
                raise ValueError(
                    f"The model's scheduler {self.scheduler_config.get('_class_name')!r} has no sdlearn equivalent; "
                    f"pass sampler= one of {list(SAMPLER_NAMES)}."
                )
        config = {k: v for k, v in self.scheduler_config.items() if not k.startswith("_")}
        if eta:  # DDIM's noise level; the other samplers refuse a non-zero eta with a clear error
            config["eta"] = eta
        return get_sampler(name, **config)

    # -- the parts of the loop, each usable on its own ----------------------------------------

    @torch.no_grad()
    def encode_prompt(self, prompts) -> torch.Tensor:
        """A prompt or a list of prompts -> text embeddings c (B, 77, D) on the pipeline's device."""
        ids = self.tokenizer(prompts)  # (B, 77); warns if a prompt is cut off
        return self.text_encoder(ids.to(next(self.text_encoder.parameters()).device))

    @torch.no_grad()
    def encode_image(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Images (B, 3, H, W) in [-1, 1] -> scaled latents scaling_factor * z, z ~ q(z | x)."""
        posterior = self.vae.encode(images.to(device=self.device, dtype=self.vae_dtype))
        return self.vae.config.scaling_factor * posterior.sample(generator)  # (B, 4, H/8, W/8)

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents (B, 4, h, w) -> images (B, 3, 8h, 8w), clamped to [-1, 1]."""
        z = latents.to(self.vae_dtype) / self.vae.config.scaling_factor  # float32 even for a half-precision UNet
        if self.slicing:  # one image at a time
            images = torch.cat([self.vae.decode(z[i:i + 1]) for i in range(z.shape[0])])
        else:
            images = self.vae.decode(z)
        return images.clamp(-1.0, 1.0)

    @property
    def vae_dtype(self) -> torch.dtype:
        return next(self.vae.parameters()).dtype

    @torch.no_grad()
    def denoise(
        self,
        latents: torch.Tensor,
        cond: torch.Tensor,
        uncond: torch.Tensor | None,
        sampler,
        timesteps,
        guidance_scale: float = 7.5,
        generator: torch.Generator | None = None,
        callback: Callable | None = None,
        progress: bool = False,
        *,
        mask: torch.Tensor | None = None,
        image_latents: torch.Tensor | None = None,
        noise: torch.Tensor | None = None,
        added_cond_kwargs: dict | None = None,
    ) -> torch.Tensor:
        """The sampling loop: z_{t_1} -> ... -> z_0 over `timesteps` (the heart of Stable Diffusion).

        latents        z at the first timestep                                    (B, 4, h, w)
        cond           text embeddings of the prompts                             (B, 77, D)
        uncond         text embeddings of the negative / empty prompts, or None for no guidance
        callback       called after every step with a StepRecord; it may return None, or a
                       tensor that replaces the latents (to intervene in the trajectory)
        Inpainting only (all three or none): keep z where the mask is 0, i.e. after every step
        z <- mask * z + (1 - mask) * add_noise(image_latents, noise, t_next)
        mask           1 = repaint, 0 = keep, at latent resolution                (B, 1, h, w)
        image_latents  the original image's latent z_0                            (B, 4, h, w)
        noise          the eps that noised z_0 to the start                       (B, 4, h, w)
        added_cond_kwargs  SDXL only: {"text_embeds", "time_ids"} for the UNet, stacked like the
                       context, i.e. [uncond; cond] along the batch under guidance (2B rows)
        """
        inpainting = mask is not None
        if inpainting != (image_latents is not None) or inpainting != (noise is not None):
            raise ValueError("Inpainting needs mask=, image_latents= and noise= together (or none of them).")
        guided = uncond is not None
        # Both halves go through the UNet in one call: context [c_neg, c]       (2B, 77, D)
        context = torch.cat([uncond, cond]) if guided else cond
        steps = _progress(timesteps, progress)
        for i, t in enumerate(steps):
            # 1. Duplicate the latents, one copy per half of the guidance         (2B, 4, h, w)
            model_input = torch.cat([latents, latents]) if guided else latents
            # 2. Some samplers want a rescaled input (Euler: z / sqrt(sigma^2 + 1)); the rest pass it through
            model_input = sampler.scale_model_input(model_input, t)
            # 3. Predict the noise (or v) in z_t for every half                    (2B, 4, h, w)
            #    (SDXL also passes the pooled text and size numbers; SD 1.x/2.x calls stay unet(x, t, c))
            added = {} if added_cond_kwargs is None else {"added_cond_kwargs": added_cond_kwargs}
            if self.slicing and guided:  # the same numbers in two calls of half the size
                halves = [{k: {n: v.chunk(2)[i] for n, v in a.items()} for k, a in added.items()} for i in range(2)]
                model_output = torch.cat([
                    self.unet(x, t, c, **a) for x, c, a in zip(model_input.chunk(2), context.chunk(2), halves)
                ])
            else:
                model_output = self.unet(model_input, t, context, **added)
            # 4. Classifier-free guidance: e = e_neg + s (e_cond - e_neg)          (2B -> B, 4, h, w)
            if guided:
                eps_uncond, eps_cond = model_output.chunk(2)
                eps = classifier_free_guidance(eps_uncond, eps_cond, guidance_scale)
            else:
                eps_uncond, eps_cond = None, model_output
                eps = model_output
            # 5. One sampler step: z_t -> z_prev, plus its estimate of the clean latent  (B, 4, h, w)
            latents, x0_pred = sampler.step(eps, t, latents, generator=generator)
            # 6. Inpainting: put back the known region, noised to the next step's level
            #    (so the UNet always sees a picture whose noise level matches t)
            if inpainting:
                known = image_latents  # z_0 itself after the last step
                if i < len(timesteps) - 1:
                    known = sampler.add_noise(image_latents, noise, timesteps[i + 1])
                latents = (1 - mask) * known + mask * latents  # mask (B, 1, h, w) broadcasts over channels
            # 7. Let the caller look (and perhaps intervene)
            if callback is not None:
                t_value = int(t) if float(t).is_integer() else float(t)
                returned = callback(StepRecord(i, t_value, latents, x0_pred, eps_uncond, eps_cond, eps))
                if returned is not None:
                    if not isinstance(returned, torch.Tensor) or returned.shape != latents.shape:
                        raise TypeError(
                            "A step callback must return None or a latents tensor of shape "
                            f"{tuple(latents.shape)} (to replace the latents), got {type(returned).__name__}."
                        )
                    latents = returned
        return latents

    # -- generation: each method adds only its own start to the shared _prepare / _finish ---------

    @torch.no_grad()
    def text_to_image(
        self,
        prompt,
        negative_prompt=None,
        height: int | None = None,
        width: int | None = None,
        steps: int = 50,
        guidance_scale: float = 7.5,
        sampler: str | None = None,
        eta: float = 0.0,
        seed: int | None = None,
        generator: torch.Generator | None = None,
        callback: Callable | None = None,
        output_type: str = "pil",
        num_images_per_prompt: int = 1,
        progress: bool = False,
    ):
        """Images for prompt(s): a list of PIL images (default), a tensor in [-1, 1], or latents.

        height/width default to the model's training size and must be multiples of
        `size_multiple`; steps is the number of sampler steps; sampler a name from
        sdlearn.samplers (default: the model's); seed (or a torch.Generator) makes it
        reproducible, and equal to diffusers' StableDiffusionPipeline for the same seed.
        callback(record) runs after each step (see StepRecord, StepRecorder).
        """
        height, width = self._check_size(height, width)
        run = self._prepare(prompt, negative_prompt, steps, guidance_scale, sampler, eta, seed, generator, callback,
                            output_type, num_images_per_prompt, progress, size=(height, width))

        # Initial noise, drawn as diffusers draws it: z_T = init_noise_sigma * eps  (B, 4, H/8, W/8)
        shape = (run.batch, self.unet.config.in_channels, height // self.vae_scale_factor, width // self.vae_scale_factor)
        latents = self._randn(shape, run) * run.sampler.init_noise_sigma
        return self._finish(run, latents)

    @torch.no_grad()
    def image_to_image(
        self,
        prompt,
        image,
        strength: float = 0.8,
        negative_prompt=None,
        height: int | None = None,
        width: int | None = None,
        steps: int = 50,
        guidance_scale: float = 7.5,
        sampler: str | None = None,
        eta: float = 0.0,
        seed: int | None = None,
        generator: torch.Generator | None = None,
        callback: Callable | None = None,
        output_type: str = "pil",
        num_images_per_prompt: int = 1,
        progress: bool = False,
    ):
        """Redraw `image` (PIL, or a tensor in [-1, 1]) towards the prompt (SDEdit).

        strength in [0, 1]: how much noise is added, i.e. how many of the `steps` run
        (int(steps * strength)); 0 keeps the image, 1 starts (almost) from noise. The
        image's own size is used unless height/width are given (PIL images are resized).
        """
        images = self._check_image(image, height, width)
        run = self._prepare(prompt, negative_prompt, steps, guidance_scale, sampler, eta, seed, generator, callback,
                            output_type, num_images_per_prompt, progress, strength=strength, images=images,
                            size=tuple(images.shape[-2:]))

        image_latents = self._image_latents(images, run)  # z_0                  (B, 4, h, w)
        if len(run.timesteps) > 0:
            # z_{t_1} = sqrt(alpha_bar) z_0 + sqrt(1 - alpha_bar) eps at the first remaining timestep
            noise = self._randn(image_latents.shape, run)
            latents = run.sampler.add_noise(image_latents, noise, run.timesteps[:1].repeat(run.batch))
        else:  # strength too small for a single step: nothing to denoise
            latents = image_latents
        return self._finish(run, latents)

    @torch.no_grad()
    def inpaint(
        self,
        prompt,
        image,
        mask,
        negative_prompt=None,
        height: int | None = None,
        width: int | None = None,
        steps: int = 50,
        strength: float = 1.0,
        guidance_scale: float = 7.5,
        sampler: str | None = None,
        eta: float = 0.0,
        seed: int | None = None,
        generator: torch.Generator | None = None,
        callback: Callable | None = None,
        output_type: str = "pil",
        num_images_per_prompt: int = 1,
        progress: bool = False,
    ):
        """Repaint the white part of `mask` in `image` to match the prompt; keep the black part.

        image: PIL or a tensor in [-1, 1]; mask: PIL (white = repaint) or a tensor in [0, 1]
        of the same size as the image. strength < 1 starts from the noised image instead of
        pure noise (as image_to_image). The same seed gives diffusers'
        StableDiffusionInpaintPipeline result for a 4-channel UNet.
        """
        images = self._check_image(image, height, width)
        masks = self._check_mask(mask, image, height, width)
        run = self._prepare(prompt, negative_prompt, steps, guidance_scale, sampler, eta, seed, generator, callback,
                            output_type, num_images_per_prompt, progress, strength=strength, images=images, masks=masks,
                            size=tuple(images.shape[-2:]))

        # The original latent z_0 and the noise eps, drawn in diffusers' order     (B, 4, h, w)
        image_latents = self._image_latents(images, run)
        noise = self._randn(image_latents.shape, run)
        if strength == 1.0:  # start from pure noise
            latents = noise * run.sampler.init_noise_sigma
        elif len(run.timesteps) > 0:  # start from the noised image
            latents = run.sampler.add_noise(image_latents, noise, run.timesteps[:1].repeat(run.batch))
        else:
            latents = image_latents
        # diffusers also encodes the masked image here (only 9-channel inpainting UNets read it),
        # which draws one more latent-sized sample from the generator. Draw it too, so that
        # samplers that use the generator later (euler_a, ddpm, ddim with eta > 0) stay in step.
        self._randn((images.shape[0], *image_latents.shape[1:]), run)

        # The mask at latent resolution: nearest-neighbour downsampling of the 0/1 mask  (B, 1, h, w)
        latent_mask = F.interpolate(masks, size=image_latents.shape[-2:]).to(device=self.device, dtype=run.cond.dtype)
        latent_mask = latent_mask.repeat(run.batch // latent_mask.shape[0], 1, 1, 1)
        return self._finish(run, latents, mask=latent_mask, image_latents=image_latents, noise=noise)

    # -- the one preparation path and the one way out, shared by the generation methods ----------

    def _prepare(self, prompt, negative_prompt, steps, guidance_scale, sampler, eta, seed, generator, callback,
                 output_type, num_images_per_prompt, progress, strength: float = 1.0,
                 images: torch.Tensor | None = None, masks: torch.Tensor | None = None, size: tuple | None = None) -> _Run:
        """Check the arguments every method shares, then build the sampler, pick the timesteps, encode the prompts.

        strength < 1 keeps only the last int(steps * strength) timesteps (image_to_image,
        inpaint); images / masks, already checked by the caller, must number 1 or B.
        size: (height, width) of the outputs, for the max_batch_pixels guard.
        """
        # 1. Check everything before any work is done
        prompts, negatives = self._check_prompts(prompt, negative_prompt, guidance_scale)
        self._check_strength(strength)
        self._check_common(steps, output_type, num_images_per_prompt, callback)
        batch = len(prompts) * num_images_per_prompt
        for what, given in (("images", images), ("masks", masks)):
            if given is not None:
                self._check_batch(given.shape[0], batch, what)
        self._check_batch_size(batch, size)
        generator = _generator(seed, generator)
        sampler = self.make_sampler(sampler, eta)

        # 2. Timesteps, most noise first (all of them at strength 1); checked before the text encoder runs
        sampler.set_timesteps(steps)
        timesteps = _timesteps_for_strength(sampler, steps, strength)
        if strength > 0 and int(steps * strength) == 0:
            smallest = math.ceil(1e4 / steps) / 1e4  # int(steps * smallest) >= 1, rounded up to 4 decimals
            raise ValueError(
                f"strength={strength} with steps={steps} runs int({steps} * {strength}) = 0 denoising steps, so the image would "
                f"come back unchanged. The smallest strength that runs one step is {smallest:g} (1/steps); use a larger "
                "strength or more steps, or strength=0 to keep the image on purpose."
            )

        # 3. Text embeddings, one row per output image                            (B, 77, D)
        cond, uncond, added = self._text_conditioning(prompts, negatives, negative_prompt is not None, num_images_per_prompt,
                                                      guidance_scale, size)
        return _Run(batch, cond, uncond, sampler, timesteps, generator, guidance_scale, callback, progress, output_type, added)

    def _text_conditioning(self, prompts: list, negatives: list, negative_given: bool, num_images_per_prompt: int,
                           guidance_scale: float, size: tuple | None) -> tuple:
        """(cond, uncond or None, added_cond_kwargs or None), one row per output image.

        SD 1.x/2.x: the text embeddings only. StableDiffusionXL overrides this to add the pooled
        embedding and the size/crop numbers (and zeros for an absent negative prompt).
        """
        cond = self.encode_prompt(prompts).repeat_interleave(num_images_per_prompt, dim=0)
        uncond = None
        if guidance_scale > 1:  # as diffusers: guidance_scale <= 1 has no unconditional branch at all
            uncond = self.encode_prompt(negatives).repeat_interleave(num_images_per_prompt, dim=0)
        return cond, uncond, None

    def _finish(self, run: _Run, latents: torch.Tensor, mask: torch.Tensor | None = None,
                image_latents: torch.Tensor | None = None, noise: torch.Tensor | None = None):
        """The loop from `latents` (B, 4, h, w), then the conversion to run.output_type.

        mask, image_latents, noise: inpaint's state for the loop (see denoise); None otherwise.
        """
        latents = self.denoise(latents, run.cond, run.uncond, run.sampler, run.timesteps, run.guidance_scale,
                               run.generator, run.callback, run.progress,
                               mask=mask, image_latents=image_latents, noise=noise, added_cond_kwargs=run.added_cond_kwargs)
        if run.output_type == "latent":
            return latents
        images = self.decode_latents(latents)  # (B, 3, H, W) in [-1, 1]
        if run.output_type == "tensor":
            return images
        return to_pil(images.float().cpu())

    def _image_latents(self, images: torch.Tensor, run: _Run) -> torch.Tensor:
        """z_0 = scaling_factor * E(x).sample(), one per image, then repeated to one per output  (B, 4, h, w)."""
        image_latents = self.encode_image(images, run.generator).to(run.cond.dtype)
        return image_latents.repeat(run.batch // image_latents.shape[0], 1, 1, 1)

    def _randn(self, shape, run: _Run) -> torch.Tensor:
        """eps ~ N(0, I) of `shape` from the run's generator, on the UNet's device and in the text's dtype."""
        return randn(shape, generator=run.generator, device=self.device, dtype=run.cond.dtype)

    # -- checks ----------------------------------------------------------------------------------

    def _check_prompts(self, prompt, negative_prompt, guidance_scale) -> tuple:
        prompts = [prompt] if isinstance(prompt, str) else prompt
        if not isinstance(prompts, (list, tuple)) or not all(isinstance(p, str) for p in prompts):
            raise TypeError(f"prompt must be a string or a list of strings, got {type(prompt).__name__}.")
        if len(prompts) == 0:
            raise ValueError("The prompt list is empty: give at least one prompt (an empty string \"\" is a valid prompt).")
        if not isinstance(guidance_scale, (int, float)) or isinstance(guidance_scale, bool) or not 0 <= guidance_scale < math.inf:
            raise ValueError(
                f"guidance_scale must be a finite number >= 0 (7.5 is SD's default; <= 1 turns guidance off), got {guidance_scale!r}. "
                "NaN or infinity would turn every pixel into NaN; pass e.g. guidance_scale=7.5."
            )
        if negative_prompt is None:
            negatives = [""] * len(prompts)
        elif isinstance(negative_prompt, str):
            negatives = [negative_prompt] * len(prompts)
        elif isinstance(negative_prompt, (list, tuple)) and all(isinstance(p, str) for p in negative_prompt):
            negatives = list(negative_prompt)
            if len(negatives) != len(prompts):
                raise ValueError(f"Got {len(prompts)} prompts but {len(negatives)} negative prompts; give one per prompt, or one string for all.")
        else:
            raise TypeError(f"negative_prompt must be None, a string or a list of strings, got {type(negative_prompt).__name__}.")
        if negative_prompt is not None and guidance_scale <= 1:
            warnings.warn(
                f"guidance_scale={guidance_scale} <= 1 turns classifier-free guidance off, so the negative prompt is ignored. "
                "Use guidance_scale > 1 (e.g. 7.5) for it to have an effect.",
                stacklevel=5,  # the caller of text_to_image (past _prepare and torch.no_grad's wrapper)
            )
        return list(prompts), negatives

    def _check_size(self, height, width) -> tuple:
        height = self.default_size if height is None else height
        width = self.default_size if width is None else width
        m = self.size_multiple
        for name, value in (("height", height), ("width", width)):
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0 or value % m:
                raise ValueError(
                    f"{name}={value!r}: image sides must be positive multiples of {m} for this model (the VAE shrinks "
                    f"them {self.vae_scale_factor}x and the UNet halves the latent {self.unet.config.num_levels - 1} more "
                    f"times), e.g. {max(m, (value // m) * m) if isinstance(value, int) else self.default_size}."
                )
        if self.max_pixels is not None and height * width > self.max_pixels:
            raise ValueError(
                f"{width}x{height} (WxH) is {height * width / 1e6:.1f} million pixels per image, over this pipeline's limit of "
                f"max_pixels={self.max_pixels} ({self.max_pixels / 1e6:.1f} million, e.g. 4096x4096): the UNet's activations would "
                f"not fit in memory. Ask for a smaller size (the model was trained at {self.default_size}x{self.default_size}), "
                f"or, on purpose, raise the limit: pipe.max_pixels = {height * width} (None: no limit)."
            )
        return height, width

    def _check_batch_size(self, batch: int, size: tuple | None) -> None:
        """Refuse a batch whose pixels (outputs x height x width) exceed max_batch_pixels, before any work."""
        if size is None or self.max_batch_pixels is None:
            return
        height, width = size
        if batch * height * width > self.max_batch_pixels:
            fits = max(1, self.max_batch_pixels // (height * width))
            raise ValueError(
                f"{batch} images of {width}x{height} (WxH) are {batch * height * width / 1e6:.1f} million pixels in one batch, over "
                f"this pipeline's limit of max_batch_pixels={self.max_batch_pixels} ({self.max_batch_pixels / 1e6:.1f} million): the "
                f"UNet's activations would not fit in memory. Ask for at most {fits} at this size (fewer prompts or a smaller "
                f"num_images_per_prompt, in several calls), or, on purpose, raise the limit: pipe.max_batch_pixels = "
                f"{batch * height * width} (None: no limit)."
            )

    def _check_image(self, image, height, width) -> torch.Tensor:
        if height is not None or width is not None:
            self._check_size(self.default_size if height is None else height, self.default_size if width is None else width)
        images = image_to_tensor(image, height, width)
        H, W = images.shape[-2:]
        m = self.size_multiple
        if H % m or W % m:
            raise ValueError(
                f"The image is {W}x{H} (WxH) but image sides must be multiples of {m} for this model. Crop or resize it "
                f"(e.g. to {max(m, W // m * m)}x{max(m, H // m * m)}), or pass height= and width= to resize it."
            )
        self._check_size(H, W)  # within max_pixels
        return images

    def _check_mask(self, mask, image, height, width) -> torch.Tensor:
        # The mask must match the image as given, pixel for pixel; both are resized together if asked.
        given = image_to_tensor(image)  # (B, 3, H, W), not resized
        masks = mask_to_tensor(mask)  # (B, 1, H, W), not resized
        if masks.shape[-2:] != given.shape[-2:]:
            (mh, mw), (gh, gw) = masks.shape[-2:], given.shape[-2:]
            raise ValueError(
                f"The mask is {mw}x{mh} (WxH) but the image is {gw}x{gh}; the mask must match the image pixel for pixel "
                "(white = repaint, black = keep)."
            )
        if height is not None or width is not None:
            masks = mask_to_tensor(mask, height, width)
        if masks.sum() == 0:
            warnings.warn("The mask is all black (keep everything): inpaint will return the image unchanged.", stacklevel=4)
        return masks

    def _check_strength(self, strength) -> None:
        if not isinstance(strength, (int, float)) or isinstance(strength, bool) or not 0 <= strength <= 1:
            raise ValueError(f"strength must be a number in [0, 1] (0 keeps the image, 1 redraws it from noise), got {strength!r}.")

    def _check_common(self, steps, output_type, num_images_per_prompt, callback) -> None:
        if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
            raise ValueError(f"steps must be a positive integer (e.g. 25 or 50), got {steps!r}.")
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {OUTPUT_TYPES}, got {output_type!r}.")
        if not isinstance(num_images_per_prompt, int) or num_images_per_prompt < 1:
            raise ValueError(f"num_images_per_prompt must be a positive integer, got {num_images_per_prompt!r}.")
        if callback is not None and not callable(callback):
            raise TypeError(f"callback must be callable (it receives a StepRecord after each step), got {type(callback).__name__}.")

    @staticmethod
    def _check_batch(n: int, batch: int, what: str) -> None:
        if n != 1 and n != batch:
            raise ValueError(f"Got {n} {what} for {batch} outputs (prompts x num_images_per_prompt); give one, or one per output.")

    # -- saving ---------------------------------------------------------------------------------

    def save_pretrained(self, folder, overwrite: bool = False) -> Path:
        """Write a diffusers pipeline folder that diffusers' StableDiffusionPipeline.from_pretrained loads.

        model_index.json, unet/, vae/, text_encoder/, tokenizer/ (vocab.json, merges.txt) and
        scheduler/scheduler_config.json. An existing pipeline is replaced only with overwrite=True.

        The new pipeline is written into a temporary folder next to `folder` and its files are then
        swapped in (sdlearn.models.files.save_folder): if anything fails, the old pipeline is left
        exactly as it was; files of yours in the folder (unet/my_lora.safetensors, notes) are kept.
        """
        folder = Path(folder)
        parts = ("model_index.json", "unet", "vae", "text_encoder", "tokenizer", "scheduler")
        existing = [p for p in parts if (folder / p).exists()]
        if existing and not overwrite:
            raise FileExistsError(f"{folder} already holds {existing}. Choose another folder or pass overwrite=True.")
        if folder.exists() and not folder.is_dir():
            raise FileExistsError(f"{folder} is a file, not a folder.")
        scheduler_class = self.scheduler_config.get("_class_name")
        if scheduler_class is None:
            raise ValueError("scheduler_config has no _class_name, so diffusers could not load it; add e.g. 'DDIMScheduler'.")
        model_index = {
            "_class_name": "StableDiffusionPipeline",
            "feature_extractor": [None, None],
            "image_encoder": [None, None],
            "requires_safety_checker": False,
            "safety_checker": [None, None],
            "scheduler": ["diffusers", scheduler_class],
            "text_encoder": ["transformers", "CLIPTextModel"],
            "tokenizer": ["transformers", "CLIPTokenizer"],
            "unet": ["diffusers", "UNet2DConditionModel"],
            "vae": ["diffusers", "AutoencoderKL"],
        }

        parts = {"unet": self.unet, "vae": self.vae, "text_encoder": self.text_encoder, "tokenizer": self.tokenizer}
        superseded = [f"tokenizer/{name}" for name in self.tokenizer.superseded_names]
        return save_pipeline_folder(folder, parts, self.scheduler_config, model_index, superseded)

    def save_single_file(self, path, overwrite: bool = False, dtype: torch.dtype | None = None) -> Path:
        """Write one .safetensors file in the original CompVis layout (see sdlearn.pipeline.single_file.save_single_file)."""
        from sdlearn.pipeline.single_file import save_single_file  # imported here: only this method writes single files

        return save_single_file(self, path, overwrite=overwrite, dtype=dtype)

    def __repr__(self) -> str:
        millions = {name: sum(p.numel() for p in getattr(self, name).parameters()) / 1e6 for name in self.model_names}
        parts = ", ".join(f"{name} {m:.1f}M" for name, m in millions.items())
        return (
            f"{type(self).__name__}({parts}, vocabulary {self.tokenizer.vocab_size}, {self.default_size}x{self.default_size} px, "
            f"sampler {self.default_sampler}, {self.device}, {self.dtype})"
        )


# ------------------------------------------------------------------------------------------
# Small helpers
# ------------------------------------------------------------------------------------------


def _generator(seed: int | None, generator: torch.Generator | None) -> torch.Generator | None:
    """A CPU generator seeded with `seed` (as diffusers users write it), or the one given."""
    if seed is not None and generator is not None:
        raise ValueError("Pass either seed= or generator=, not both.")
    if seed is not None:
        if not isinstance(seed, int) or isinstance(seed, bool):
            raise TypeError(f"seed must be an integer, got {type(seed).__name__}.")
        if not 0 <= seed < 2**64:
            raise ValueError(
                f"seed must be in [0, 2**64) (a 64-bit unsigned integer, as torch.Generator.manual_seed takes), got {seed}. "
                "Pass e.g. seed % 2**64, or any number from 0 to 18446744073709551615."
            )
        return torch.Generator("cpu").manual_seed(seed)
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}.")
    return generator


def _timesteps_for_strength(sampler, steps: int, strength: float) -> torch.Tensor:
    """The last int(steps * strength) timesteps of the schedule (diffusers' get_timesteps)."""
    n = min(int(steps * strength), steps)
    start = (steps - n) * sampler.order
    # No bookkeeping needed: sdlearn's samplers find their place in the schedule from the
    # first timestep they are given (diffusers' set_begin_index does this by hand).
    return sampler.timesteps[start:]


def _progress(timesteps, show: bool):
    if not show:
        return timesteps
    from tqdm.auto import tqdm  # imported here: only progress bars need it

    return tqdm(timesteps, desc="sampling", unit="step", leave=False)


__all__ = ["StableDiffusion", "StepRecord", "StepRecorder", "image_to_tensor", "mask_to_tensor", "SD_SCHEDULER_CONFIG"]
