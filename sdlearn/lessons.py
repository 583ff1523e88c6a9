"""Small helpers the lessons share: what a lesson runs on this machine (and why), and tables
that are derived from the package rather than written out in a notebook.

`lesson_pipeline` (lesson 11): real Stable Diffusion weights where they are given and a
GPU is there, the course's mini-SD otherwise.
`compvis_unet_names` (lesson 07): each UNet stage under its diffusers and its CompVis name,
derived from the single-file conversion tables.
`random_sd15` (lesson 11): SD 1.5 at full size with random weights, for what a CPU can show of it.
`clip_pair_retrieval` (lessons 08, 09): how often a tiny CLIP picks the right "a {colour} {shape}"
caption for an image, on seen or held-out pairs.
`lesson_times` (lesson 00): how long each lesson ran when its saved outputs were made, and where.
"""

import os
import re
from dataclasses import dataclass, field

import torch

from sdlearn.datasets import COLOUR_NAMES, SHAPES, Shapes, data_dir, data_path
from sdlearn.models.clip import CLIPTextConfig, CLIPTextModel, CLIPTokenizer
from sdlearn.models.unet import UNet, UNetConfig
from sdlearn.models.vae import AutoencoderKL, VAEConfig
from sdlearn.pipeline.loading import load_pipeline
from sdlearn.pipeline.single_file import compvis_name
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


# The original code's class for each of sdlearn's (= diffusers') UNet building blocks.
COMPVIS_CLASSES = {"ResnetBlock2D": "ResBlock", "Transformer2DModel": "SpatialTransformer",
                   "Downsample2D": "Downsample", "Upsample2D": "Upsample", "TimestepEmbedding": "Sequential"}
_UNET_STAGE = re.compile(r"^(conv_in|time_embedding|conv_norm_out|conv_out|mid_block\.(resnets|attentions)\.\d+"
                         r"|(down|up)_blocks\.\d+\.(resnets|attentions|downsamplers|upsamplers)\.\d+)$")


def _common_prefix(names: list) -> str:
    prefix = []
    for parts in zip(*(name.split(".") for name in names)):
        if len(set(parts)) > 1:
            break
        prefix.append(parts[0])
    return ".".join(prefix)


def compvis_unet_names(unet) -> list:
    """[(diffusers name, CompVis name, diffusers class, CompVis class)] for every stage of `unet`,
    in the order of the original code's lists (input_blocks, middle_block, output_blocks).

    The CompVis name of a stage is the common prefix of the names that
    `sdlearn.pipeline.single_file.compvis_name` gives its parameters (without the file's
    `model.diffusion_model.` prefix). Works on a meta-device model.
    """
    rows = []
    for name, module in unet.named_modules():
        if _UNET_STAGE.match(name):
            theirs = _common_prefix([compvis_name("unet", f"{name}.{key}", unet.config) for key in module.state_dict()])
            cls = type(module).__name__
            rows.append((name, theirs, cls, COMPVIS_CLASSES.get(cls, cls)))
    order = {"time_embed": 0, "input_blocks": 1, "middle_block": 2, "output_blocks": 3, "out": 4}

    def key(row):
        parts = row[1].split(".")
        return (order.get(parts[0], 5), *[int(p) for p in parts[1:3] if p.isdigit()])

    return sorted(rows, key=key)


@torch.no_grad()
def clip_pair_retrieval(model, tokenizer, split: str, n: int = 64, seed: int = 3) -> float:
    """The fraction of n shapes images (32x32, Shapes(n, seed, split)) for which a TinyCLIP's most similar
    caption among all 32 "a {colour} {shape}" is the right one (colour and shape both). Chance: 1/32.

    split="train" draws the training (colour, shape) pairs, "test" only the HELD_OUT ones.
    """
    names = [f"a {c} {s}" for c in COLOUR_NAMES for s in SHAPES]
    data = Shapes(n, seed=seed, size=32, split=split)
    best = model.similarity(data.tensors(), tokenizer(names)).argmax(dim=1).tolist()
    truth = [f"a {a['colour']} {a['shape']}" for a in map(data.attributes, range(n))]
    return sum(names[b] == t for b, t in zip(best, truth)) / n


def random_sd15(seed: int = 0) -> StableDiffusion:
    """Stable Diffusion 1.5 at full size with random weights, float32 on the CPU (about 4.3 GB):
    the UNet (860 M parameters), the autoencoder (84 M) and CLIP ViT-L/14's text encoder (123 M),
    with SD 1.x's tokenizer (data/tokenizers/clip-vit-l14) and noise schedule.

    It draws nothing worth looking at; it is for what is true of the real model whatever its
    weights: parameter counts, shapes, the cost of a step, the checkpoint file's layout and size.
    """
    torch.manual_seed(seed)
    tokenizer = CLIPTokenizer.from_pretrained(data_dir() / "tokenizers" / "clip-vit-l14")
    return StableDiffusion(UNet(UNetConfig.sd15()), AutoencoderKL(VAEConfig.sd()), CLIPTextModel(CLIPTextConfig.vit_l14()),
                           tokenizer)


BUDGET_SECONDS = 120  # a lesson's run on a 2-core CPU
LONGER_BUDGETS = {"12_personalisation.ipynb": 180}  # four short training runs: three minutes


CPU_CLASSES = ("native bf16", "no native bf16")  # the two kinds of 2-core CPU the course is timed on


def cpu_class(native_bf16: bool) -> str:
    return CPU_CLASSES[0] if native_bf16 else CPU_CLASSES[1]


@dataclass
class LessonTime:
    """How long one lesson's cells ran when its saved outputs were made (from the notebook's metadata)."""

    name: str  # the notebook's file name
    seconds: float  # the sum of its cells' times (nbclient's per-cell start and end)
    cpu: str | None  # the CPU that ran it, where tools/execute_notebooks.py recorded it
    native_bf16: bool | None
    runs: dict = field(default_factory=dict)  # CPU class -> {"cpu", "seconds", "torch_threads"}: the latest run on each

    def seconds_on(self, cpu_class: str) -> float | None:
        """The lesson's time on that class of CPU (CPU_CLASSES), or None where no run on one is recorded."""
        run = self.runs.get(cpu_class)
        return None if run is None else run["seconds"]

    @property
    def budget(self) -> int:
        """The seconds this lesson is allowed (BUDGET_SECONDS, or its entry in LONGER_BUDGETS)."""
        return LONGER_BUDGETS.get(self.name, BUDGET_SECONDS)


def _cell_seconds(cell: dict) -> float:
    from datetime import datetime

    times = cell.get("metadata", {}).get("execution", {})
    start, end = times.get("iopub.execute_input"), times.get("shell.execute_reply")
    if not (start and end):
        return 0.0
    parse = lambda text: datetime.fromisoformat(text.replace("Z", "+00:00"))  # noqa: E731
    return (parse(end) - parse(start)).total_seconds()


def lesson_times(folder=None, exclude=()) -> list:
    """LessonTime for each notebooks/NN_*.ipynb (default: the repository's notebooks/ folder), in order,
    but those named in `exclude` (lesson 00 leaves itself out: it is being run while it reads).

    The seconds add up each code cell's run as nbclient recorded it; a notebook saved without
    those records (edited by hand, say) raises ValueError rather than report 0 s.
    """
    import json
    from pathlib import Path

    folder = Path(folder) if folder is not None else data_dir().parent / "notebooks"
    paths = [p for p in sorted(folder.glob("[0-9][0-9]_*.ipynb")) if p.name not in exclude]
    if not paths:
        raise FileNotFoundError(f"no lesson notebooks (NN_*.ipynb) in {folder}")
    result = []
    for path in paths:
        nb = json.loads(path.read_text(encoding="utf-8"))
        code = [c for c in nb["cells"] if c["cell_type"] == "code"]
        timed = [c for c in code if c.get("metadata", {}).get("execution")]
        if len(timed) < len(code):
            raise ValueError(f"{path.name}: {len(code) - len(timed)} of {len(code)} code cells have no recorded run time; "
                             f"re-execute it with tools/execute_notebooks.py")
        run = nb.get("metadata", {}).get("sdlearn", {})
        result.append(LessonTime(path.name, round(sum(_cell_seconds(c) for c in code), 1), run.get("cpu"), run.get("native_bf16"),
                                 run.get("runs", {})))
    return result
