"""The referee: read colour, shape, size and position back from an image, and score generators.

A generator is only as good as our way of measuring it. This module holds an evaluator
that is independent of every generator in the course: a small CNN trained on real renders
of the shapes dataset (sdlearn.datasets) to name the four attributes of the one shape in
an image. It is the referee, not a player, so it is trained on ALL 32 (colour, shape)
pairs, the HELD_OUT ones included: when a text-to-image model is asked for a red triangle
(a pair it never saw), the referee must know what a red triangle looks like.

    logits_head = ShapesClassifier(resize(x, 32))        heads: colour (8), shape (4), size (2), position (9)
    p_head      = softmax(logits_head)

Input sizes. The network sees 32x32 images: other sizes are resized to 32 before the first
layer (bilinear, antialiased when shrinking, so a 64 px image is averaged down rather than
subsampled). Training shows it both kinds of input, 64 px renders (resized by the model)
and 32 px renders, so it reads the 64 px images of the latent models and the 32 px images
of the pixel-space DDPM equally well (`python -m sdlearn.evaluate classifier` measures
both). 32 px is enough: a small shape is about 5 px across there, and the classifier is
4x cheaper than at 64 px. (The clean-shape check below compares at the image's own size.)
Augmentation is mild on purpose, so the referee stays truthful: the dataset's own position
jitter and a little Gaussian pixel noise (std up to 0.06 on the [-1, 1] scale).

"Recognised as a clean shape" (`is_clean_shape`). An unconditional sample counts as a clean
shape when ALL THREE hold:

  1. confident:  every head's largest probability is at least CONFIDENCE (0.9);
  2. faithful:   the image looks like a clean render R of the attributes the classifier
                 read, drawn where the image's shape actually is:

                     D_p = mean over channels |x_p - R_p|              (pixels in [0, 1])
                     E   = sum_p max(0, D_p - DEAD_ZONE) / sum_p ink(R)_p
                     ink(R)_p = mean over channels |1 - R_p|           (how far from white)
                     E <= MAX_RENDER_ERROR (0.2)

                 E is the visible pixel error (deviations under DEAD_ZONE = 0.05, 13 of 255
                 levels, are ignored) relative to the ink of the shape itself, so it is
                 comparable between a small yellow and a large blue shape. A smear, a wrong
                 colour or outline, a blurred blob or leftover noise add to it;
  3. nothing else: at most MAX_STRAY (0.2%) of the pixels, 2 at 32x32, differ clearly from
                 the render (D_p > STRAY_LEVEL = 0.25) more than one pixel away from its
                 shape. A second shape elsewhere would hardly move E when it is small next
                 to a large one; this condition catches it.

Condition 1 alone is not enough: a classifier trained on clean shapes can be confidently
wrong about garbage. Conditions 2 and 3 alone would need the attributes from somewhere.
Together they say "this image is a shape the dataset could have drawn, and we know which".
The render is placed where the image's shape is: its coverage-weighted centroid inside
the predicted grid cell equals the image's (found in two shift-and-compare corrections), and
its centre stays within the jitter the dataset allows. The thresholds leave a wide margin
over real renders (E is 0 for half of them and under 0.08 for 99%); measured on 500
fresh renders per size, >= 98% pass, while pure noise, images half-way through noising,
strongly blurred blobs and pairs of shapes fail (tests/test_evaluate.py).

Faithfulness (`faithfulness`): given the attributes a prompt asked for (None, or absent,
for the ones it did not name), the fraction of images whose read attribute matches, per
attribute and for all named attributes at once.

Command line:

    python -m sdlearn.evaluate classifier            accuracy per head on fresh renders (64 and 32 px)
    python -m sdlearn.evaluate ddpm [--model data/ddpm-shapes] [--samples 200]
                                                     clean-shape rate per sampler at 10/25/50 steps
                                                     (a conditional model is asked for the colour,
                                                     shape and size of attribute_set(); the JSON
                                                     adds its unconditional DDIM-50 rate)

References: the evaluator plays the role that the Inception network plays in FID
(Heusel et al. 2017) and the object detector in GenEval (Ghosh et al. 2023), for a
dataset small enough that a tiny CNN reads it perfectly.
"""

import argparse
import functools
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from sdlearn.checkpoint import ModelConfig, Pretrained
from sdlearn.datasets import (
    COLOUR_NAMES,
    COLOURS,
    POSITIONS,
    SHAPES,
    SIZES,
    Shapes,
    _draw,
    data_path,
    max_jitter,
)
from sdlearn.doctor import cpu_name

# The four heads and their class names; the index of a name is its label, as in sdlearn.datasets.
HEADS = {"colour": COLOUR_NAMES, "shape": SHAPES, "size": SIZES, "position": POSITIONS}
CONFIDENCE = 0.9  # every head's largest probability must reach this
DEAD_ZONE = 0.05  # per-pixel deviations below this (on [0, 1]) are invisible and ignored
MAX_RENDER_ERROR = 0.2  # visible error relative to the shape's own ink
STRAY_LEVEL = 0.25  # a pixel this far from the clean render (on [0, 1]) is clearly visible
MAX_STRAY = 0.002  # at most this fraction of pixels with visible ink away from the shape (2 px at 32x32)
DEFAULT_FOLDER = "shapes-classifier"  # under data/
MAKE_TARGET = "train-classifier"
EVAL_SEED = 1000  # fresh renders: the recipe trains on seeds 1 and 2


# ---------------------------------------------------------------------------------------
# The classifier
# ---------------------------------------------------------------------------------------


@dataclass
class ClassifierConfig(ModelConfig):
    """A small CNN: stride-2 convolutions down to 4x4, one hidden layer, four linear heads."""

    input_size: int = 32  # every image is resized to input_size x input_size
    channels: tuple = (16, 32, 64, 64)  # the first conv keeps the size, each next one halves it
    hidden: int = 128
    norm_num_groups: int = 8

    def __post_init__(self):
        if self.input_size % 2 ** (len(self.channels) - 1):
            raise ValueError(f"input_size={self.input_size} must be divisible by 2^{len(self.channels) - 1}.")


def _conv(c_in: int, c_out: int, stride: int, groups: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1), nn.GroupNorm(groups, c_out), nn.SiLU())


class ShapesClassifier(Pretrained, nn.Module):
    """(B, 3, H, W) in [-1, 1] -> {head: logits (B, classes)} for colour, shape, size, position.

    The feature map is flattened (not pooled) before the heads, so where the shape sits
    (position) is kept.
    """

    config_class = ClassifierConfig
    weights_name = "model.safetensors"
    legacy_weights_names: ClassVar[tuple] = ()

    def __init__(self, config: ClassifierConfig):
        super().__init__()
        self.config = c = config
        layers, c_in = [], 3
        for i, c_out in enumerate(c.channels):
            layers.append(_conv(c_in, c_out, 1 if i == 0 else 2, c.norm_num_groups))
            c_in = c_out
        self.features = nn.Sequential(*layers)
        side = c.input_size // 2 ** (len(c.channels) - 1)
        self.hidden = nn.Sequential(nn.Flatten(), nn.Linear(c_in * side * side, c.hidden), nn.SiLU())
        self.heads = nn.ModuleDict({name: nn.Linear(c.hidden, len(classes)) for name, classes in HEADS.items()})

    def resize(self, x: torch.Tensor) -> torch.Tensor:
        size = self.config.input_size
        if x.shape[-2:] == (size, size):
            return x
        shrink = x.shape[-1] > size
        return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=shrink)

    def forward(self, x: torch.Tensor) -> dict:
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"ShapesClassifier expects RGB images (B, 3, H, W) in [-1, 1], got shape {tuple(x.shape)}.")
        h = self.hidden(self.features(self.resize(x)))  # (B, hidden)
        return {name: head(h) for name, head in self.heads.items()}

    def loss(self, x: torch.Tensor, labels: Mapping) -> torch.Tensor:
        """Sum over the heads of the cross-entropy; labels maps head -> (B,) integer labels."""
        logits = self(x)
        return sum(F.cross_entropy(logits[name], labels[name]) for name in HEADS)


def load_classifier(folder=None, device=None) -> ShapesClassifier:
    """The trained referee: data/shapes-classifier by default (make train-classifier remakes it)."""
    if folder is None:
        folder = data_path(DEFAULT_FOLDER, MAKE_TARGET)
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(
            f"No trained shapes classifier in {folder}. Train it with `make {MAKE_TARGET}` "
            f"(python -m sdlearn.recipes.classifier --out {folder})."
        )
    return ShapesClassifier.from_pretrained(folder, device=device).eval()


@functools.lru_cache(maxsize=1)
def _shipped_classifier() -> ShapesClassifier:
    return load_classifier()


def _classifier(classifier) -> ShapesClassifier:
    if classifier is None:
        return _shipped_classifier()
    if isinstance(classifier, (str, Path)):
        return load_classifier(classifier)
    return classifier


# ---------------------------------------------------------------------------------------
# Reading images
# ---------------------------------------------------------------------------------------


def as_batch(images) -> torch.Tensor:
    """A tensor (3, H, W) / (B, 3, H, W) in [-1, 1], a PIL image or a list of them -> (B, 3, H, W) float, clamped."""
    if isinstance(images, Image.Image):
        images = [images]
    if isinstance(images, (list, tuple)):
        if not images:
            raise ValueError("No images: the list is empty.")
        if all(isinstance(im, Image.Image) for im in images):
            sizes = {im.size for im in images}
            if len(sizes) > 1:
                raise ValueError(f"All images must have the same size, got {sorted(sizes)}.")
            pixels = np.stack([np.asarray(im.convert("RGB")) for im in images])  # (B, H, W, 3) uint8
            return torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 127.5 - 1.0
        images = torch.stack([as_batch(im)[0] for im in images])
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"Expected image tensors in [-1, 1] or PIL images, got {type(images).__name__}.")
    x = images[None] if images.ndim == 3 else images
    if x.ndim != 4 or x.shape[1] != 3:
        raise ValueError(f"Expected images (B, 3, H, W) or (3, H, W), got shape {tuple(images.shape)}.")
    if not x.is_floating_point():
        raise TypeError(f"Expected float images in [-1, 1], got dtype {x.dtype}. Convert uint8 pixels with x / 127.5 - 1.")
    x = x.detach().float().cpu()
    if not torch.isfinite(x).all():
        raise ValueError("The images contain NaN or infinite values.")
    low, high = x.min().item(), x.max().item()
    if low < -1.5 or high > 1.5:
        raise ValueError(
            f"Expected images in [-1, 1], got values from {low:.3g} to {high:.3g}. Clamp model outputs with "
            "x.clamp(-1, 1); convert [0, 1] images with 2 * x - 1."
        )
    return x.clamp(-1.0, 1.0)


@dataclass
class Predictions:
    """What the classifier read: probabilities per head, and the names they point to."""

    probs: dict  # head -> (B, classes)

    def __len__(self) -> int:
        return len(next(iter(self.probs.values())))

    @property
    def labels(self) -> dict:
        """head -> (B,) integer labels (indices into HEADS[head])."""
        return {name: p.argmax(dim=1) for name, p in self.probs.items()}

    @property
    def confidence(self) -> dict:
        """head -> (B,) largest probability."""
        return {name: p.max(dim=1).values for name, p in self.probs.items()}

    @property
    def min_confidence(self) -> torch.Tensor:
        """(B,) the least confident head of each image."""
        return torch.stack(list(self.confidence.values())).min(dim=0).values

    def names(self) -> list:
        """One dict per image: {"colour": "red", "shape": "circle", "size": "large", "position": "top left"}."""
        labels = {name: value.tolist() for name, value in self.labels.items()}
        return [{name: HEADS[name][labels[name][i]] for name in HEADS} for i in range(len(self))]


@torch.no_grad()
def classify(images, classifier=None, batch_size: int = 256) -> Predictions:
    """Read colour, shape, size and position of each image (tensors in [-1, 1] or PIL images)."""
    model = _classifier(classifier)
    x = as_batch(images)
    device = next(model.parameters()).device
    chunks = [model(x[i : i + batch_size].to(device)) for i in range(0, len(x), batch_size)]
    return Predictions({name: torch.cat([F.softmax(c[name].float(), dim=1).cpu() for c in chunks]) for name in HEADS})


# ---------------------------------------------------------------------------------------
# "A clean shape"
# ---------------------------------------------------------------------------------------


def _coverage(x01: np.ndarray, colour: str) -> np.ndarray:
    """How much of each pixel (H, W) the colour covers, reading x = a * colour + (1 - a) * white."""
    white_minus_colour = 1.0 - np.array(COLOURS[colour], dtype=np.float64) / 255.0
    a = ((1.0 - x01) @ white_minus_colour) / (white_minus_colour @ white_minus_colour)
    return np.clip(a, 0.0, 1.0)


def _centroid(coverage: np.ndarray, position: int) -> np.ndarray | None:
    """Coverage-weighted centroid (x, y) in pixels (edges at integers) inside a grid cell
    (with a 1 px margin); None if the cell holds no ink."""
    size_px = coverage.shape[0]
    cell = size_px / 3
    row, col = divmod(position, 3)
    y0, y1 = max(0, math.floor(row * cell) - 1), min(size_px, math.ceil((row + 1) * cell) + 1)
    x0, x1 = max(0, math.floor(col * cell) - 1), min(size_px, math.ceil((col + 1) * cell) + 1)
    window = coverage[y0:y1, x0:x1]
    total = window.sum()
    if total <= 1e-6:
        return None
    ys, xs = np.mgrid[y0:y1, x0:x1] + 0.5  # pixel centres
    return np.array([(window * xs).sum() / total, (window * ys).sum() / total])


def _render_centred(attrs: dict, centre: np.ndarray, size_px: int) -> np.ndarray:
    """A clean render (H, W, 3) in [0, 1] with its box centre at `centre`, within the jitter the dataset allows."""
    position = POSITIONS.index(attrs["position"])
    cell = size_px / 3
    row, col = divmod(position, 3)
    reach = max_jitter(attrs["size"], size_px)
    offset = centre - np.array([(col + 0.5) * cell, (row + 0.5) * cell])
    jitter = np.clip(offset / reach, -1.0, 1.0) if reach > 0 else np.zeros(2)
    labels = (COLOUR_NAMES.index(attrs["colour"]), SHAPES.index(attrs["shape"]), SIZES.index(attrs["size"]), position)
    return _draw(*labels, size_px, jitter, True).astype(np.float64) / 255.0


def _matching_render(x01: np.ndarray, attrs: dict) -> np.ndarray:
    """A clean render (H, W, 3) in [0, 1] of `attrs` whose ink centroid (inside the predicted
    cell) is the image's. Start from the image's centroid as the box centre, then shift by
    the centroid difference: this absorbs the triangle's low centroid and the rasteriser's
    sub-pixel bias. Two corrections converge (a shift moves the centroid by the same amount)."""
    size_px = x01.shape[0]
    position = POSITIONS.index(attrs["position"])
    target = _centroid(_coverage(x01, attrs["colour"]), position)
    if target is None:  # nothing of that colour in that cell: compare with the render at the cell centre
        cell = size_px / 3
        row, col = divmod(position, 3)
        return _render_centred(attrs, np.array([(col + 0.5) * cell, (row + 0.5) * cell]), size_px)
    centre = target.copy()
    for _ in range(2):
        render = _render_centred(attrs, centre, size_px)
        centre = centre + (target - _centroid(_coverage(render, attrs["colour"]), position))
    return _render_centred(attrs, centre, size_px)


def render_errors(image: torch.Tensor, attrs: dict) -> tuple:
    """(E, stray) of the module docstring for one image (3, H, W) in [-1, 1] and the
    attributes `attrs` (names), against a clean render placed where the image's shape is.

    E:     visible pixel error relative to the clean shape's ink.
    stray: the fraction of the image's pixels that carry clearly visible ink (D > STRAY_LEVEL)
           more than a pixel away from the clean shape (another shape, a smudge, a speck).
    """
    if image.ndim != 3 or image.shape[-1] != image.shape[-2]:
        raise ValueError(f"Expected one square image (3, H, W), got shape {tuple(image.shape)}.")
    x01 = ((image.double().permute(1, 2, 0).numpy() + 1.0) / 2.0).clip(0.0, 1.0)  # (H, W, 3)
    render = _matching_render(x01, attrs)
    d = np.abs(x01 - render).mean(axis=2)  # (H, W)
    ink = (1.0 - render).mean(axis=2)
    error = float(np.maximum(d - DEAD_ZONE, 0.0).sum() / max(ink.sum(), 1e-6))
    # The clean shape's footprint grown by one pixel (a 3x3 maximum), so edges never count as stray.
    footprint = torch.from_numpy((ink > 0.0).astype(np.float32))[None, None]
    near = F.max_pool2d(footprint, 3, stride=1, padding=1)[0, 0].numpy() > 0
    stray = float(((d > STRAY_LEVEL) & ~near).mean())
    return error, stray


@dataclass
class CleanShapeScores:
    """The numbers behind is_clean_shape, per image, and the verdict."""

    confidence: torch.Tensor  # (B,) the least confident head's probability
    render_error: torch.Tensor  # (B,) E, the visible error against a matching clean render
    stray: torch.Tensor  # (B,) fraction of pixels with visible ink away from the shape
    clean: torch.Tensor  # (B,) bool
    predictions: Predictions

    @property
    def rate(self) -> float:
        return self.clean.float().mean().item()


def clean_shape_scores(images, classifier=None) -> CleanShapeScores:
    """Confidence, render error and stray ink of each image, and whether it is a clean shape (module docstring)."""
    x = as_batch(images)
    predictions = classify(x, classifier)
    scores = [render_errors(image, attrs) for image, attrs in zip(x, predictions.names())]
    errors, stray = torch.tensor(scores, dtype=torch.float64).reshape(-1, 2).T
    confidence = predictions.min_confidence
    clean = (confidence >= CONFIDENCE) & (errors <= MAX_RENDER_ERROR) & (stray <= MAX_STRAY)
    return CleanShapeScores(confidence, errors, stray, clean, predictions)


def is_clean_shape(images, classifier=None) -> torch.Tensor:
    """(B,) bool: each image is recognised as a clean shape (confident, matching a clean render, nothing else)."""
    return clean_shape_scores(images, classifier).clean


# ---------------------------------------------------------------------------------------
# Faithfulness to a prompt
# ---------------------------------------------------------------------------------------


def _requested_name(head: str, value):
    if value is None:
        return None
    options = HEADS[head]
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool) and 0 <= value < len(options):
        return options[int(value)]
    if isinstance(value, str) and value in options:
        return value
    raise ValueError(f"Unknown {head} {value!r} in the requested attributes. Valid: {', '.join(options)}.")


def faithfulness(images, requested: Sequence[Mapping], classifier=None) -> dict:
    """Per-attribute accuracy of images against what was asked for.

    requested: one dict per image with some of colour, shape, size, position (names or
    integer labels); None or a missing key means the prompt did not name that attribute.
    Returns {head: {"correct", "total", "accuracy"}} for the four heads plus "all" (every
    named attribute of the image right). accuracy is None where nothing was asked.
    """
    x = as_batch(images)
    if len(requested) != len(x):
        raise ValueError(f"Got {len(x)} images but {len(requested)} requested-attribute dicts; give one per image.")
    for wanted in requested:
        unknown = sorted(set(wanted) - set(HEADS))
        if unknown:
            raise ValueError(f"Unknown attribute keys {unknown}; expected some of {list(HEADS)}.")
    read = classify(x, classifier).names()
    table = {head: {"correct": 0, "total": 0} for head in (*HEADS, "all")}
    for got, wanted in zip(read, requested):
        named = {head: _requested_name(head, wanted.get(head)) for head in HEADS}
        named = {head: name for head, name in named.items() if name is not None}
        for head, name in named.items():
            table[head]["total"] += 1
            table[head]["correct"] += int(got[head] == name)
        if named:
            table["all"]["total"] += 1
            table["all"]["correct"] += int(all(got[head] == name for head, name in named.items()))
    for row in table.values():
        row["accuracy"] = row["correct"] / row["total"] if row["total"] else None
    return table


def format_faithfulness(table: Mapping, title: str | None = None) -> str:
    """The faithfulness table as aligned text."""
    lines = [title] if title else []
    lines.append(f"{'attribute':<10} {'correct':>7} / {'asked':<5}  accuracy")
    for head, row in table.items():
        accuracy = "-" if row["accuracy"] is None else f"{100 * row['accuracy']:6.1f}%"
        lines.append(f"{head:<10} {row['correct']:>7} / {row['total']:<5}  {accuracy:>8}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------
# Measurements (the command line and the tests use these)
# ---------------------------------------------------------------------------------------


def render_accuracy(n: int = 500, seed: int = EVAL_SEED, size: int = 64, classifier=None) -> dict:
    """Accuracy per head on n fresh renders of all 32 (colour, shape) pairs (a seed the recipe did not train on)."""
    dataset = Shapes(n, seed=seed, size=size, split="all")
    predictions = classify(dataset.tensors(), classifier)
    labels = {name: dataset.labels[:, i] for i, name in enumerate(HEADS)}
    return {name: (predictions.labels[name] == labels[name]).float().mean().item() for name in HEADS}


def ddpm_clean_rates(model=None, samplers=None, steps=(10, 25, 50), n: int = 200, seed: int = 0, classifier=None,
                     progress: bool = True, guidance_scale: float | None = None, unconditional: bool = False) -> dict:
    """{(sampler, steps): {"clean_rate", "asked_rate", "seconds_per_image"}} for the pixel-space DDPM in `model`.

    An attribute-conditional model (the shipped one) is asked for the colour, shape and size
    of `attribute_set(n)`, with `guidance_scale` (default: the one its training.json
    recommends); asked_rate is the fraction of images that are clean AND show all three asked
    attributes. For an unconditional model, or with unconditional=True (a conditional model
    asked for nothing), asked_rate is None.
    """
    from sdlearn.ddpm import DEFAULT_FOLDER, MAKE_TARGET, SAMPLER_NAMES, is_conditional, load_ddpm, recommended_guidance, sample

    folder = data_path(DEFAULT_FOLDER, MAKE_TARGET) if model is None else Path(model)
    unet, schedule_config = load_ddpm(folder)
    conditional = is_conditional(unet) and not unconditional
    asked = attribute_set(n) if conditional else None
    if guidance_scale is None:
        guidance_scale = recommended_guidance(folder) if conditional else 1.0
    samplers = SAMPLER_NAMES if samplers is None else samplers
    results = {}
    for name in samplers:
        for k in steps:
            began = time.perf_counter()
            images = sample(unet, name, n, seed=seed, steps=k, schedule_config=schedule_config, progress=progress,
                            attributes=asked, guidance_scale=guidance_scale)
            seconds = (time.perf_counter() - began) / n
            scores = clean_shape_scores(images, classifier)
            asked_rate = None
            if conditional:
                right = [all(read[h] == want[h] for h in want) for read, want in zip(scores.predictions.names(), asked)]
                asked_rate = (scores.clean & torch.tensor(right)).float().mean().item()
            results[(name, k)] = {"clean_rate": scores.rate, "asked_rate": asked_rate, "seconds_per_image": seconds}
    return results


def format_clean_rates(results: Mapping, n: int, guidance_scale: float | None = None) -> str:
    samplers = list(dict.fromkeys(name for name, _ in results))
    steps = sorted({k for _, k in results})
    asked = any(row["asked_rate"] is not None for row in results.values())
    title = f"clean-shape rate over {n} samples (seconds per image in brackets)"
    if asked:
        title = (f"clean-shape rate over {n} samples asked for a colour, shape and size (guidance {guidance_scale:g}); "
                 "after the slash: clean AND all three as asked; seconds per image in brackets")
    lines = [title, f"{'sampler':<10}" + "".join(f"{f'{k} steps':>26}" for k in steps)]
    for name in samplers:
        cells = ""
        for k in steps:
            row = results[name, k]
            rate = f"{100 * row['clean_rate']:.1f}%" + (f" / {100 * row['asked_rate']:.1f}%" if asked else "")
            cell = f"{rate} ({row['seconds_per_image']:.3f} s)"
            cells += f"{cell:>26}"
        lines.append(f"{name:<10}{cells}")
    return "\n".join(lines)


EVAL_PROMPT_SEED = 2000  # the evaluation prompts: scenes no training run draws (training uses seeds 0-1)


def prompt_set(n: int = 200, split: str = "train", seed: int = EVAL_PROMPT_SEED) -> tuple:
    """n prompts naming all four attributes, and what each asks for: (prompts, requested).

    The scenes are those of Shapes(n, seed, split, captions="full"): split="train" draws the
    28 training (colour, shape) pairs, split="test" only the four HELD_OUT ones. requested[i]
    maps colour, shape, size and position to names, ready for `faithfulness`.
    """
    dataset = Shapes(n, seed=seed, split=split, captions="full")
    return list(dataset.captions), [dataset.attributes(i) for i in range(n)]


def attribute_set(n: int = 200, seed: int = EVAL_PROMPT_SEED) -> list:
    """What to ask an attribute-conditional DDPM for: colour, shape and size of the scenes of prompt_set(n, "train", seed)."""
    _, requested = prompt_set(n, "train", seed)
    return [{head: wanted[head] for head in ("colour", "shape", "size")} for wanted in requested]


@torch.no_grad()
def generate(pipe, prompts: Sequence[str], sampler: str = "ddim", steps: int = 25, guidance_scale: float = 4.0,
             negative_prompt=None, seed: int = 0, batch_size: int = 50, progress: bool = False) -> torch.Tensor:
    """Images (n, 3, H, W) in [-1, 1] for `prompts`, in batches; batch k uses the seed seed + k."""
    batches = range(0, len(prompts), batch_size)
    if progress:
        from tqdm.auto import tqdm

        batches = tqdm(batches, desc=f"{sampler}, guidance {guidance_scale:g}", leave=False)
    images = []
    for k, start in enumerate(batches):
        chunk = list(prompts[start : start + batch_size])
        negatives = None if negative_prompt is None else [negative_prompt] * len(chunk)
        images.append(pipe.text_to_image(chunk, negative_prompt=negatives, steps=steps, guidance_scale=guidance_scale,
                                         sampler=sampler, seed=seed + k, output_type="tensor"))
    return torch.cat(images).float().cpu()


def pair_accuracy(images, requested: Sequence[Mapping], classifier=None) -> float:
    """The fraction of images whose colour AND shape are both the requested ones."""
    pairs = [{"colour": r["colour"], "shape": r["shape"]} for r in requested]
    return faithfulness(images, pairs, classifier)["all"]["accuracy"]


def text_to_image_report(pipe, samplers=("ddim",), n: int = 200, n_heldout: int = 100, steps: int = 25,
                         guidance_scale: float = 4.0, seed: int = 0, classifier=None, progress: bool = False) -> dict:
    """Faithfulness of a text-to-image pipeline, per sampler: the table on n training-pair prompts
    naming all four attributes, and on n_heldout prompts of the HELD_OUT pairs (with the rate at
    which colour and shape are both right), plus seconds per image."""
    prompts, requested = prompt_set(n, "train")
    held_prompts, held_requested = prompt_set(n_heldout, "test")
    report = {}
    for name in samplers:
        began = time.perf_counter()
        images = generate(pipe, prompts, name, steps, guidance_scale, seed=seed, progress=progress)
        seconds = (time.perf_counter() - began) / len(prompts)
        held = generate(pipe, held_prompts, name, steps, guidance_scale, seed=seed + 1000, progress=progress)
        report[name] = {
            "train_pairs": faithfulness(images, requested, classifier),
            "held_out": faithfulness(held, held_requested, classifier),
            "held_out_pair_accuracy": pair_accuracy(held, held_requested, classifier),
            "seconds_per_image": seconds,
        }
    return report


@torch.no_grad()
def inpainting_report(pipe, images, prompts: Sequence[str], masks, colours: Sequence[str], steps: int = 25,
                      guidance_scale: float = 4.0, sampler: str = "ddim", seed: int = 0, classifier=None) -> dict:
    """Inpaint each image under its mask and prompt; measure what stayed and what changed.

    outside_error:        mean |inpainted - input| over the pixels outside the masks (range 2)
    reconstruction_error: the same for the autoencoder's round trip decode(mean of E(x)) of the input,
                          the floor any latent edit is measured against
    colour_accuracy:      the fraction of results whose shape has the requested colour
    """
    results, recons, inputs, outside = [], [], [], []
    for i, (image, prompt, mask) in enumerate(zip(images, prompts, masks)):
        results.append(pipe.inpaint(prompt, image, mask, steps=steps, guidance_scale=guidance_scale, sampler=sampler,
                                    seed=seed + i, output_type="tensor").float().cpu())
        x = as_batch(image)
        z = pipe.vae.encode(x.to(device=pipe.device, dtype=pipe.vae_dtype)).mean
        recons.append(pipe.vae.decode(z).clamp(-1, 1).float().cpu())
        inputs.append(x)
        outside.append((1 - torch.as_tensor(mask, dtype=torch.float32).reshape(1, 1, *x.shape[-2:])).expand_as(x))
    results, recons, inputs, outside = (torch.cat(v) for v in (results, recons, inputs, outside))
    read = classify(results, classifier).names()
    return {
        "outside_error": ((results - inputs).abs() * outside).sum().item() / outside.sum().item(),
        "reconstruction_error": ((recons - inputs).abs() * outside).sum().item() / outside.sum().item(),
        "colour_accuracy": sum(r["colour"] == c for r, c in zip(read, colours)) / len(read),
        "images": results,
    }


def recommended_guidance(folder, default: float = 4.0) -> float:
    """The guidance scale a trained model's training.json recommends (the recipe measures it), else `default`."""
    record = Path(folder) / "training.json"
    if record.is_file():
        return float(json.loads(record.read_text()).get("guidance_scale", default))
    return default


def format_text_to_image_report(report: Mapping, n: int, n_heldout: int, steps: int, guidance_scale: float) -> str:
    heads = (*HEADS, "all")
    lines = [f"faithfulness: {n} prompts naming all four attributes ({steps} steps, guidance {guidance_scale:g}); "
             f"held out: {n_heldout} prompts of the HELD_OUT pairs"]
    lines.append(f"{'sampler':<10}" + "".join(f"{h:>10}" for h in heads) + f"{'held-out pair':>15}{'s/image':>9}")
    for name, row in report.items():
        cells = "".join(f"{100 * row['train_pairs'][h]['accuracy']:9.1f}%" for h in heads)
        lines.append(f"{name:<10}{cells}{100 * row['held_out_pair_accuracy']:14.1f}%{row['seconds_per_image']:9.3f}")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sdlearn.evaluate", description="Score the shapes classifier and the course's generators.")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice; 1 is fastest on a busy machine)")
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser("classifier", help="accuracy of the classifier per head on fresh renders")
    p.add_argument("--classifier", default=None, help="classifier folder (default data/shapes-classifier)")
    p.add_argument("--n", type=int, default=500, help="renders per image size")
    p.add_argument("--seed", type=int, default=EVAL_SEED)
    p = commands.add_parser("ddpm", help="clean-shape rate of the pixel-space DDPM per sampler and step count")
    p.add_argument("--model", default=None, help="DDPM folder (default data/ddpm-shapes)")
    p.add_argument("--classifier", default=None, help="classifier folder (default data/shapes-classifier)")
    p.add_argument("--samples", type=int, default=200)
    p.add_argument("--steps", type=int, nargs="+", default=[10, 25, 50])
    p.add_argument("--samplers", nargs="+", default=None, help="default: all six")
    p.add_argument("--guidance", type=float, default=None, help="guidance scale of a conditional model (default: its recorded choice)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, default=None, help="also write the table to this JSON file")
    p = commands.add_parser("text-to-image", help="faithfulness of a text-to-image pipeline (default data/mini-sd) per sampler")
    p.add_argument("--model", default=None, help="any source sdlearn.load_pipeline accepts (default data/mini-sd)")
    p.add_argument("--classifier", default=None, help="classifier folder (default data/shapes-classifier)")
    p.add_argument("--samplers", nargs="+", default=["ddim"], help="sampler names (default: ddim)")
    p.add_argument("--n", type=int, default=200, help="prompts of training pairs")
    p.add_argument("--heldout", type=int, default=100, help="prompts of the held-out pairs")
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--guidance", type=float, default=None, help="guidance scale (default: the model's recorded choice, else 4)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, default=None, help="also write the report to this JSON file")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    classifier = _classifier(args.classifier)
    if args.command == "classifier":
        for size in (64, 32):
            began = time.perf_counter()
            accuracy = render_accuracy(args.n, args.seed, size, classifier)
            renders = Shapes(args.n, seed=args.seed, size=size, split="all").tensors()
            clean = is_clean_shape(renders, classifier).float().mean().item()
            cells = "  ".join(f"{name} {100 * value:.1f}%" for name, value in accuracy.items())
            print(f"{size} px, {args.n} fresh renders (seed {args.seed}): {cells}  | clean-shape rate {100 * clean:.1f}%  ({time.perf_counter() - began:.1f} s)")
        return 0
    if args.command == "ddpm":
        from sdlearn.ddpm import DEFAULT_FOLDER, MAKE_TARGET, recommended_guidance

        began = time.perf_counter()
        model = data_path(DEFAULT_FOLDER, MAKE_TARGET) if args.model is None else Path(args.model)
        guidance = args.guidance if args.guidance is not None else recommended_guidance(model)
        results = ddpm_clean_rates(model, args.samplers, tuple(args.steps), args.samples, args.seed, classifier,
                                   guidance_scale=guidance)
        print(format_clean_rates(results, args.samples, guidance))
        if args.json is not None:
            rows = [{"sampler": name, "steps": k, **row} for (name, k), row in results.items()]
            command = "python -m sdlearn.evaluate " + " ".join(sys.argv[1:] if argv is None else argv)
            report = {"command": command, "samples": args.samples, "seed": args.seed, "torch_threads": torch.get_num_threads(), "cpu": cpu_name(),
                      "seconds": round(time.perf_counter() - began, 1), "results": rows}
            if any(row["asked_rate"] is not None for row in rows):
                report["guidance_scale"] = guidance
                report["unconditional"] = ddpm_clean_rates(model, ["ddim"], (50,), args.samples, args.seed, classifier,
                                                           guidance_scale=1.0, unconditional=True)[("ddim", 50)]
            args.json.write_text(json.dumps(report, indent=2) + "\n")
        return 0
    if args.command == "text-to-image":
        from sdlearn.pretrained import load_pipeline  # the pipeline pulls in every model class

        began = time.perf_counter()
        model = args.model if args.model is not None else data_path("mini-sd", "train-mini-sd")
        pipe = load_pipeline(model)
        guidance = args.guidance if args.guidance is not None else recommended_guidance(model)
        report = text_to_image_report(pipe, args.samplers, args.n, args.heldout, args.steps, guidance, args.seed,
                                      classifier, progress=True)
        print(format_text_to_image_report(report, args.n, args.heldout, args.steps, guidance))
        if args.json is not None:
            command = "python -m sdlearn.evaluate " + " ".join(sys.argv[1:] if argv is None else argv)
            out = {"command": command, "n": args.n, "heldout": args.heldout, "steps": args.steps, "guidance_scale": guidance,
                   "seed": args.seed, "torch_threads": torch.get_num_threads(), "cpu": cpu_name(),
                   "seconds": round(time.perf_counter() - began, 1), "samplers": report}
            args.json.write_text(json.dumps(out, indent=2) + "\n")
        return 0
    return 2


if __name__ == "__main__":
    sys.exit(main())
