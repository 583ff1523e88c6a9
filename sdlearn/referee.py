"""The referee: a small CNN that reads colour, shape, size and position back from an image.

    p_head(x) = softmax(ShapesClassifier(resize(x, 32))_head)     heads: colour (8), shape (5), size (2), position (9)
    read(x)   = argmax p_head(x), for each head                   (`classify`)

A clean shape (`is_clean_shape`): with R the clean render of read(x), placed where x's shape
is, and pixels in [0, 1],

    D_p      = mean over channels |x_p - R_p|,        ink(R)_p = mean over channels |1 - R_p|
    E        = sum_p max(0, D_p - DEAD_ZONE) / sum_p ink(R)_p                     (`render_errors`)
    stray    = fraction of pixels with D_p > STRAY_LEVEL more than one pixel away from R's shape
    clean(x) = min_head max p_head(x) >= CONFIDENCE  and  E <= MAX_RENDER_ERROR  and  stray <= MAX_STRAY

with CONFIDENCE = 0.9, DEAD_ZONE = 0.05 (13 of 255 levels), MAX_RENDER_ERROR = 0.2,
STRAY_LEVEL = 0.25 and MAX_STRAY = 0.2% (2 pixels at 32x32). Faithfulness (`faithfulness`):
the fraction of images with read(x)_head equal to the asked attribute, per head and for all
asked heads at once.

Why three conditions. A classifier trained on clean shapes can be confidently wrong about
garbage, so confidence alone is not enough; E measures the visible error relative to the
shape's own ink (comparable between a small yellow and a large blue shape), so a smear, a
wrong colour or outline, a blurred blob or leftover noise raise it; stray catches a second,
small shape that would hardly move E next to a large one. R is placed so that its
coverage-weighted centroid inside the read grid cell equals the image's (two shift-and-compare
corrections), within the jitter the dataset allows. The thresholds leave a wide margin
between real renders, which pass (the rate is measured in data/shapes-classifier/evaluation.json,
`clean_rate`, and quoted in its README), and pure noise, half-noised images, blurred blobs,
smears, hollow outlines and pairs of shapes, which fail (tests/test_referee.py).

Its own error is measured twice. tests/test_referee.py requires that garbage does not pass
(and does not score as "clean and as asked", `clean_and_asked`). And on generated images,
where no ground truth exists, a second judge that reads by rendering instead of with the
classifier (`match_render`) reads the same four attributes; sdlearn.evaluate records how
often the two agree (`judges_agreement`) beside every figure it reports.

The referee is not a player: it is trained on real renders (sdlearn.datasets) of ALL 40
(colour, shape) pairs of the eight colours and REFEREE_SHAPES, the HELD_OUT ones included, so
it knows a red triangle when a text-to-image model is asked for one it never saw, and a star,
the shape no model is taught until lesson 12 (a model asked for a star that draws a circle is
read as a circle, not given the benefit of the doubt). It sees 32x32 inputs; other sizes are
resized first (bilinear, antialiased when shrinking), and training shows it both 64 px and
32 px renders, so it reads the latent models' 64 px images and the pixel DDPM's 32 px ones
equally well (`python -m sdlearn.evaluate classifier` measures both; the clean-shape check
compares at the image's own size). Augmentation is mild so the referee stays truthful: the
dataset's own position jitter and Gaussian pixel noise (std up to 0.06 on [-1, 1]).
sdlearn.evaluate scores the course's generators with it.

References: it plays the role of the Inception network in FID (Heusel et al. 2017) and of the
object detector in GenEval (Ghosh et al. 2023), for a dataset small enough that a tiny CNN
reads it perfectly.
"""

import functools
import math
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from sdlearn.datasets import (
    ALL_COLOUR_NAMES, ALL_SHAPES, COLOUR_NAMES, COLOURS, POSITIONS, SHAPES, SIZES, Shapes, _draw, data_path, max_jitter,
)
from sdlearn.models.checkpoint import ModelConfig, Pretrained

# The shapes the referee reads: mini-SD's four and the star (the concept lesson 12 teaches).
REFEREE_SHAPES = SHAPES + ("star",)
# The four heads and their class names; the index of a name is its label, as in sdlearn.datasets.
HEADS = {"colour": COLOUR_NAMES, "shape": REFEREE_SHAPES, "size": SIZES, "position": POSITIONS}
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
    try:
        return ShapesClassifier.from_pretrained(folder, device=device).eval()
    except ValueError as exc:
        if "heads.shape" in str(exc):  # a referee trained before it knew the star: 4 shape classes
            raise ValueError(
                f"The classifier in {folder} reads {len(SHAPES)} shapes; this referee reads {len(REFEREE_SHAPES)} "
                f"({', '.join(REFEREE_SHAPES)}). It was trained before the referee learnt the star: retrain it with "
                f"`make {MAKE_TARGET}` (python -m sdlearn.recipes.classifier --out {folder} --overwrite)."
            ) from exc
        raise


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
    labels = (ALL_COLOUR_NAMES.index(attrs["colour"]), ALL_SHAPES.index(attrs["shape"]), SIZES.index(attrs["size"]), position)
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
# Accuracy on fresh renders (the classifier recipe and `python -m sdlearn.evaluate classifier`)
# ---------------------------------------------------------------------------------------


def render_accuracy(n: int = 500, seed: int = EVAL_SEED, size: int = 64, classifier=None) -> dict:
    """Accuracy per head on n fresh renders of all 40 (colour, shape) pairs the referee knows (a seed the recipe did not train on)."""
    dataset = Shapes(n, seed=seed, size=size, split="all", shapes=REFEREE_SHAPES)
    predictions = classify(dataset.tensors(), classifier)
    labels = {name: dataset.labels[:, i] for i, name in enumerate(HEADS)}
    return {name: (predictions.labels[name] == labels[name]).float().mean().item() for name in HEADS}



# ---------------------------------------------------------------------------------------
# "Clean and as asked", and a second judge that does not use the classifier
# ---------------------------------------------------------------------------------------


def clean_and_asked(images, requested: Sequence[Mapping], classifier=None) -> dict:
    """{"correct", "total", "accuracy"}: the fraction of images that are a clean shape
    (`is_clean_shape`) AND show every attribute their prompt named.

    faithfulness() counts an attribute right whenever the classifier reads it, so a smeared
    blob of the asked colour in the asked cell, or the asked shape beside a second one, scores
    as right there; this rate does not count them. Images whose prompt named nothing are left out.
    """
    x = as_batch(images)
    if len(requested) != len(x):
        raise ValueError(f"Got {len(x)} images but {len(requested)} requested-attribute dicts; give one per image.")
    scores = clean_shape_scores(x, classifier)
    correct = total = 0
    for got, wanted, clean in zip(scores.predictions.names(), requested, scores.clean.tolist()):
        named = {head: _requested_name(head, wanted.get(head)) for head in HEADS if head in wanted}
        named = {head: name for head, name in named.items() if name is not None}
        if not named:
            continue
        total += 1
        correct += int(clean and all(got[head] == name for head, name in named.items()))
    return {"correct": correct, "total": total, "accuracy": correct / total if total else None}


INK_LEVEL = 0.25  # a pixel this far from white (mean over channels, on [0, 1]) is ink, for match_render


def _read_by_rendering(x01: np.ndarray) -> dict | None:
    """match_render for one image (H, W, 3) in [0, 1]; None when the image holds no ink."""
    size_px = x01.shape[0]
    ink = (1.0 - x01).mean(axis=2) > INK_LEVEL
    if not ink.any():
        return None
    # Colour: the palette colour c for which the ink pixels are best explained as a * c + (1 - a) * white.
    pixels = x01[ink]  # (N, 3)
    residuals = {}
    for colour in COLOUR_NAMES:
        c = np.array(COLOURS[colour], dtype=np.float64) / 255.0
        a = _coverage(pixels[None], colour)[0]  # (N,)
        fit = a[:, None] * c + (1.0 - a[:, None])
        residuals[colour] = float(np.abs(pixels - fit).sum())
    colour = min(residuals, key=residuals.get)
    # Position: the grid cell of the coverage-weighted centroid of that colour over the whole image.
    coverage = _coverage(x01, colour)
    ys, xs = np.mgrid[0:size_px, 0:size_px] + 0.5
    total = coverage.sum()
    cx, cy = (coverage * xs).sum() / total, (coverage * ys).sum() / total
    cell = size_px / 3
    col, row = min(int(cx // cell), 2), min(int(cy // cell), 2)
    position = POSITIONS[3 * row + col]
    # Shape and size: the clean render, placed where the image's shape is, that differs least.
    best, best_error = None, math.inf
    for shape in REFEREE_SHAPES:
        for size in SIZES:
            attrs = {"colour": colour, "shape": shape, "size": size, "position": position}
            render = _matching_render(x01, attrs)
            d = np.abs(x01 - render).mean(axis=2)
            error = float(np.maximum(d - DEAD_ZONE, 0.0).sum())
            if error < best_error:
                best, best_error = attrs, error
    return best


def match_render(images) -> list:
    """A second judge, independent of the classifier: read colour, shape, size and position
    by rendering (analysis by synthesis). One dict of names per image (as Predictions.names()),
    or None for an image without ink.

        ink      = pixels whose mean distance from white exceeds INK_LEVEL
        colour   = argmin_c sum over ink pixels |x - (a c + (1 - a) white)|, a the coverage of c
        position = the grid cell of the centroid of colour c's coverage
        shape, size = argmin over the 10 pairs of sum_p max(0, D_p - DEAD_ZONE), D against the
                   clean render placed at the image's centroid (as in render_errors)

    It shares the renderer with the clean-shape check, not the classifier's weights, so where
    the two judges disagree on a generated image at least one of them is wrong: their agreement
    (`judges_agreement`) bounds how far the classifier's figures can be trusted there.
    """
    x = as_batch(images)
    return [_read_by_rendering(((image.double().permute(1, 2, 0).numpy() + 1.0) / 2.0).clip(0.0, 1.0)) for image in x]


def judges_agreement(images, classifier=None, predictions: Predictions | None = None) -> dict:
    """How often the classifier and match_render read the same thing: {head: rate, "all": rate}
    over all images (an image match_render finds empty counts as a disagreement)."""
    x = as_batch(images)
    read = (predictions if predictions is not None else classify(x, classifier)).names()
    rendered = match_render(x)
    agree = {head: 0 for head in (*HEADS, "all")}
    for a, b in zip(read, rendered):
        same = {head: b is not None and a[head] == b[head] for head in HEADS}
        for head, value in same.items():
            agree[head] += int(value)
        agree["all"] += int(all(same.values()))
    return {head: count / len(read) for head, count in agree.items()}
