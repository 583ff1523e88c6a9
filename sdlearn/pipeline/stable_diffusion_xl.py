"""Stable Diffusion XL's text-to-image: the same loop, richer conditioning.

SDXL (Podell et al. 2023) runs exactly StableDiffusion's sampling loop; what changes is
what the UNet is told at every step. With s the guidance scale and (H, W) the image size:

    1. text      c      = concat(CLIP-L(tok_1(prompt)).h_{N-1}, bigG(tok_2(prompt)).h_{N-1})   (B, 77, 768 + 1280)
                 pooled = bigG's projected end-of-text vector                                     (B, 1280)
                 c_neg, pooled_neg: the same for the negative prompt, or zeros when none is
                 given (force_zeros_for_empty_prompt, SDXL base's setting)
    2. sizes     time_ids = (orig_h, orig_w, crop_top, crop_left, target_h, target_w)
                          = (H, W, 0, 0, H, W) by default: "a full, uncropped H x W image"       (B, 6)
    3. loop      [e_neg, e_cond] = UNet([z_t, z_t], t, [c_neg, c],
                                        text_embeds=[pooled_neg, pooled], time_ids=[ids, ids])
                 e = e_neg + s (e_cond - e_neg);  z_prev = sampler.step(e, t, z_t)
    4. decode    x = VAE.decode(z_0 / scaling_factor)

Why the size numbers: SDXL was trained on images of every size, many of them upscaled
small ones or random crops. Telling the model the original size and the crop during
training lets a user ask, at sampling time, for what was rare in the data: a large,
uncropped, centred picture (paper section 2.2, "micro-conditioning").

The same seed and sampler give diffusers' StableDiffusionXLPipeline result (prompt_2 =
prompt, no watermark, guidance_rescale 0); tests/test_sdxl_pipeline.py proves it on a tiny
random model. Text-to-image only: image_to_image, inpaint and the single-file format are
not implemented for SDXL here.

References: Podell et al. 2023, "SDXL: Improving Latent Diffusion Models for High-Resolution
Image Synthesis" (arXiv:2307.01952); diffusers' pipeline_stable_diffusion_xl.py.
"""

import json
from pathlib import Path

import torch

from sdlearn.models.checkpoint import CheckpointError
from sdlearn.models.clip import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer, sdxl_prompt_embeds
from sdlearn.models.files import save_pipeline_folder
from sdlearn.models.unet import UNet
from sdlearn.models.vae import AutoencoderKL
from sdlearn.pipeline.stable_diffusion import StableDiffusion

PIPELINE_CLASS = "StableDiffusionXLPipeline"


class StableDiffusionXL(StableDiffusion):
    """SDXL text-to-image: `text_to_image` (as StableDiffusion's), `encode_prompt`, `save_pretrained`, `from_pretrained`.

    Attributes: unet, vae, text_encoder (CLIP ViT-L), text_encoder_2 (OpenCLIP ViT-bigG with
    its projection), tokenizer, tokenizer_2, scheduler_config, force_zeros_for_empty_prompt.
    """

    model_names = ("unet", "vae", "text_encoder", "text_encoder_2")

    def __init__(self, unet: UNet, vae: AutoencoderKL, text_encoder: CLIPTextModel, text_encoder_2: CLIPTextModelWithProjection,
                 tokenizer: CLIPTokenizer, tokenizer_2: CLIPTokenizer, scheduler_config: dict | None = None,
                 force_zeros_for_empty_prompt: bool = True):
        for name, value, cls in (("text_encoder_2", text_encoder_2, CLIPTextModelWithProjection), ("tokenizer_2", tokenizer_2, CLIPTokenizer)):
            if not isinstance(value, cls):
                raise TypeError(f"{name} must be an sdlearn {cls.__module__}.{cls.__name__}, got {type(value).__name__}.")
        if isinstance(unet, UNet) and unet.config.addition_embed_type != "text_time":
            raise ValueError(
                "StableDiffusionXL needs an SDXL UNet (addition_embed_type='text_time'); this one has "
                f"addition_embed_type={unet.config.addition_embed_type!r}: use StableDiffusion for SD 1.x/2.x."
            )
        if isinstance(unet, UNet):
            c = unet.config
            pooled = c.projection_class_embeddings_input_dim - 6 * c.addition_time_embed_dim
            if pooled != text_encoder_2.config.projection_dim:
                raise ValueError(
                    f"The UNet's add_embedding expects a {pooled}-wide pooled text embedding (projection_class_embeddings_input_dim "
                    f"{c.projection_class_embeddings_input_dim} - 6 x {c.addition_time_embed_dim}), but text_encoder_2 projects to "
                    f"{text_encoder_2.config.projection_dim}; the parts come from different models."
                )
        if tokenizer_2.vocab_size > text_encoder_2.config.vocab_size:
            raise ValueError(
                f"tokenizer_2 has {tokenizer_2.vocab_size} tokens but text_encoder_2 only {text_encoder_2.config.vocab_size} "
                "embeddings; the two come from different models."
            )
        self.text_encoder_2, self.tokenizer_2 = text_encoder_2, tokenizer_2
        self.force_zeros_for_empty_prompt = bool(force_zeros_for_empty_prompt)
        super().__init__(unet, vae, text_encoder, tokenizer, scheduler_config)
        text_encoder_2.eval()

    def _check_text_width(self, unet: UNet, text_encoder: CLIPTextModel) -> None:
        width = text_encoder.config.hidden_size + self.text_encoder_2.config.hidden_size
        if unet.config.cross_attention_dim != width:
            raise ValueError(
                f"The UNet attends to {unet.config.cross_attention_dim}-wide text vectors but the two text encoders make "
                f"{text_encoder.config.hidden_size} + {self.text_encoder_2.config.hidden_size} = {width}; the parts come "
                "from different models."
            )

    def to(self, device=None, dtype=None) -> "StableDiffusionXL":
        super().to(device, dtype)
        self.text_encoder_2.to(device=device, dtype=dtype)
        return self

    # -- the text conditioning ---------------------------------------------------------------

    @torch.no_grad()
    def encode_prompt(self, prompts) -> tuple[torch.Tensor, torch.Tensor]:
        """A prompt or a list of prompts -> (context (B, 77, D1 + D2), pooled (B, P)) on the pipeline's device."""
        device = next(self.text_encoder.parameters()).device
        ids_1 = self.tokenizer(prompts).to(device)  # (B, 77); warns if a prompt is cut off
        ids_2 = self.tokenizer_2(prompts).to(device)  # (B, 77); SDXL's second tokenizer pads with "!" (id 0)
        return sdxl_prompt_embeds(self.text_encoder, self.text_encoder_2, ids_1, ids_2)

    def time_ids(self, height: int, width: int, original_size: tuple | None = None, crop_top_left: tuple = (0, 0),
                 target_size: tuple | None = None) -> torch.Tensor:
        """SDXL's micro-conditioning (1, 6): original size, crop top-left, target size, in pixels (h, w order).

        The defaults, (H, W, 0, 0, H, W), ask for an uncropped image shown at its full size.
        """
        original_size = original_size or (height, width)
        target_size = target_size or (height, width)
        values = [*original_size, *crop_top_left, *target_size]
        if len(values) != 6:
            raise ValueError(f"original_size, crop_top_left and target_size must be pairs (h, w), (top, left), (h, w); got {values}.")
        return torch.tensor([values], dtype=self.dtype, device=self.device)

    def _text_conditioning(self, prompts, negatives, negative_given, num_images_per_prompt, guidance_scale, size):
        n = num_images_per_prompt
        cond, pooled = (x.repeat_interleave(n, dim=0) for x in self.encode_prompt(prompts))
        ids = self.time_ids(*size).repeat(cond.shape[0], 1)  # (B, 6), the same for both halves
        if guidance_scale <= 1:  # no unconditional branch at all, as diffusers
            return cond, None, {"text_embeds": pooled, "time_ids": ids}
        if not negative_given and self.force_zeros_for_empty_prompt:
            # SDXL base's choice: "no prompt" is all zeros, not the embedding of ""
            uncond, pooled_neg = torch.zeros_like(cond), torch.zeros_like(pooled)
        else:
            uncond, pooled_neg = (x.repeat_interleave(n, dim=0) for x in self.encode_prompt(negatives))
        # Stacked like the context in the loop: [uncond; cond]                    (2B, ...)
        added = {"text_embeds": torch.cat([pooled_neg, pooled]), "time_ids": torch.cat([ids, ids])}
        return cond, uncond, added

    @torch.no_grad()
    def text_to_image(self, prompt, negative_prompt=None, height: int | None = None, width: int | None = None, steps: int = 50,
                      guidance_scale: float = 5.0, sampler: str | None = None, eta: float = 0.0, seed: int | None = None,
                      generator: torch.Generator | None = None, callback=None, output_type: str = "pil",
                      num_images_per_prompt: int = 1, progress: bool = False):
        """StableDiffusion.text_to_image with SDXL's defaults: guidance_scale 5.0 (diffusers'), 1024 px for SDXL base."""
        return super().text_to_image(prompt, negative_prompt, height, width, steps, guidance_scale, sampler, eta, seed, generator,
                                     callback, output_type, num_images_per_prompt, progress)

    # -- what SDXL does not do here ----------------------------------------------------------------

    def image_to_image(self, *args, **kwargs):
        raise NotImplementedError("sdlearn's StableDiffusionXL implements text_to_image only; use diffusers' StableDiffusionXLImg2ImgPipeline.")

    def inpaint(self, *args, **kwargs):
        raise NotImplementedError("sdlearn's StableDiffusionXL implements text_to_image only; use diffusers' StableDiffusionXLInpaintPipeline.")

    def save_single_file(self, *args, **kwargs):
        raise NotImplementedError("Saving SDXL as one CompVis-layout file is not implemented; save_pretrained writes a diffusers folder.")

    # -- folders -----------------------------------------------------------------------------------

    def save_pretrained(self, folder, overwrite: bool = False) -> Path:
        """Write a diffusers folder that StableDiffusionXLPipeline.from_pretrained loads (no watermark component)."""
        folder = Path(folder)
        parts = ("model_index.json", "unet", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler")
        existing = [p for p in parts if (folder / p).exists()]
        if existing and not overwrite:
            raise FileExistsError(f"{folder} already holds {existing}. Choose another folder or pass overwrite=True.")
        scheduler_class = self.scheduler_config.get("_class_name")
        if scheduler_class is None:
            raise ValueError("scheduler_config has no _class_name, so diffusers could not load it; add e.g. 'EulerDiscreteScheduler'.")
        model_index = {
            "_class_name": PIPELINE_CLASS,
            "feature_extractor": [None, None],
            "force_zeros_for_empty_prompt": self.force_zeros_for_empty_prompt,
            "image_encoder": [None, None],
            "scheduler": ["diffusers", scheduler_class],
            "text_encoder": ["transformers", "CLIPTextModel"],
            "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
            "tokenizer": ["transformers", "CLIPTokenizer"],
            "tokenizer_2": ["transformers", "CLIPTokenizer"],
            "unet": ["diffusers", "UNet2DConditionModel"],
            "vae": ["diffusers", "AutoencoderKL"],
        }

        parts = {"unet": self.unet, "vae": self.vae, "text_encoder": self.text_encoder, "text_encoder_2": self.text_encoder_2,
                 "tokenizer": self.tokenizer, "tokenizer_2": self.tokenizer_2}
        superseded = [f"{name}/{file}" for name, tok in (("tokenizer", self.tokenizer), ("tokenizer_2", self.tokenizer_2))
                      for file in tok.superseded_names]
        return save_pipeline_folder(folder, parts, self.scheduler_config, model_index, superseded)

    @classmethod
    def from_pretrained(cls, folder, device=None, dtype=None, check_finite: bool = True) -> "StableDiffusionXL":
        """Load a diffusers StableDiffusionXLPipeline folder (stabilityai/stable-diffusion-xl-base-1.0's layout)."""
        folder = Path(folder)
        path = folder / "model_index.json"
        if not path.is_file():
            raise ValueError(f"{folder} is not a pipeline folder: it has no model_index.json.")
        try:
            index = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise CheckpointError(f"{path} is not valid JSON ({exc}).") from exc
        if index.get("_class_name") != PIPELINE_CLASS:
            raise ValueError(f"{folder} holds a {index.get('_class_name')}, not a {PIPELINE_CLASS}; for SD 1.x/2.x use sdlearn.load_pipeline.")
        for part in ("unet", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler"):
            if not (folder / part).is_dir():
                raise ValueError(f"{folder} has no {part}/ folder; an SDXL base pipeline needs it (a refiner has no text_encoder and is not supported).")
        try:
            scheduler_config = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
        except (json.JSONDecodeError, FileNotFoundError) as exc:
            raise CheckpointError(f"{folder / 'scheduler'}: no valid scheduler_config.json ({exc}).") from exc
        pipe = cls(
            UNet.from_pretrained(folder / "unet", check_finite=check_finite),
            AutoencoderKL.from_pretrained(folder / "vae", check_finite=check_finite),
            CLIPTextModel.from_pretrained(folder / "text_encoder", check_finite=check_finite),
            CLIPTextModelWithProjection.from_pretrained(folder / "text_encoder_2", check_finite=check_finite),
            CLIPTokenizer.from_pretrained(folder / "tokenizer"),
            CLIPTokenizer.from_pretrained(folder / "tokenizer_2"),
            scheduler_config,
            force_zeros_for_empty_prompt=index.get("force_zeros_for_empty_prompt", True),
        )
        return pipe.to(device, dtype) if device is not None or dtype is not None else pipe


__all__ = ["StableDiffusionXL"]
