"""Layer 3, the pipeline: the denoising loop and its generation methods, image and mask
conversion, and loading and saving whole models (diffusers folders, single files).

    stable_diffusion   StableDiffusion: encode the prompt, denoise, decode (text_to_image, image_to_image, inpaint)
    stable_diffusion_xl  StableDiffusionXL: the same loop with SDXL's two encoders, pooled text and size/crop numbers
    dit                DiTPipeline: class labels -> latents -> image with a DiT (diffusers' DiTPipeline folders)
    images             PIL images and masks <-> tensors
    loading            load_pipeline(source): a diffusers folder, a single file or a hub id
    single_file        the CompVis single-file layout: rule tables, safe reading, writing

It imports the models and the diffusion layer, never the course (datasets, widgets, recipes).
"""

from sdlearn.pipeline.dit import DiTPipeline
from sdlearn.pipeline.images import image_to_tensor, mask_to_tensor, to_pil, to_tensor
from sdlearn.pipeline.loading import load_pipeline, sd_tokenizer
from sdlearn.pipeline.single_file import infer_family, read_single_file, save_single_file
from sdlearn.pipeline.stable_diffusion import SD_SCHEDULER_CONFIG, StableDiffusion, StepRecord, StepRecorder
from sdlearn.pipeline.stable_diffusion_xl import StableDiffusionXL

__all__ = ["DiTPipeline", "SD_SCHEDULER_CONFIG", "StableDiffusion", "StableDiffusionXL", "StepRecord", "StepRecorder", "image_to_tensor", "infer_family",
           "load_pipeline", "mask_to_tensor", "read_single_file", "save_single_file", "sd_tokenizer", "to_pil", "to_tensor"]
