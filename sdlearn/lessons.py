"""Helpers that pick what a lesson runs on this machine, and say why.

`lesson_pipeline` (lesson 11): real Stable Diffusion weights where they are given and a
GPU is there, the course's mini-SD otherwise.
"""

import os
from dataclasses import dataclass

import torch

from sdlearn.datasets import data_path
from sdlearn.pipeline.loading import load_pipeline
from sdlearn.pipeline.stable_diffusion import StableDiffusion


@dataclass
class LessonModel:
    """The model lesson 11 runs, and what to tell the learner about it."""

    pipe: StableDiffusion
    description: str  # which model ran, where, and why
    real: bool  # True: real Stable Diffusion weights; False: the course's mini-SD
    size: int  # the image side to generate at
    steps: int  # sampler steps that suit the model and the device


MODEL_ENV = "SDLEARN_SD_MODEL"  # a diffusers folder, a single file or a hub id of real SD weights


def lesson_pipeline(source=None, device=None, dtype: torch.dtype | None = None) -> LessonModel:
    """Real Stable Diffusion when weights are given (`source`, else $SDLEARN_SD_MODEL) and a GPU is there;
    otherwise the course's mini-SD (data/mini-sd) on the CPU. The description says which, and why.

    On a CPU real weights would cost about 12 s per guided step at 512x512; they are used there
    only when `device="cpu"` is asked for explicitly.
    """
    source = source if source is not None else os.environ.get(MODEL_ENV) or None
    gpu = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else None
    device = torch.device(device) if device is not None else None
    if source is not None and (gpu is not None or (device is not None and device.type == "cpu")):
        target = device or torch.device(gpu)
        half = dtype or (torch.float16 if target.type != "cpu" else torch.float32)
        pipe = load_pipeline(source, device=target, dtype=half)
        size = pipe.default_size
        return LessonModel(pipe, f"real Stable Diffusion from {source} on {target.type} ({str(half).replace('torch.', '')}), "
                                 f"{size}x{size}", True, size, 30)
    if source is not None:
        why = f"{MODEL_ENV} / source is {source!r}, but there is no GPU; real weights on this CPU would take minutes per image"
    else:
        why = f"no real weights given (set {MODEL_ENV} to a Stable Diffusion folder, single file or hub id)"
    pipe = load_pipeline(data_path("mini-sd", "train-mini-sd"))
    return LessonModel(pipe, f"the course's mini-SD (data/mini-sd) on the CPU: {why}", False, pipe.default_size, 25)
