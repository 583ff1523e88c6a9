"""The shapes dataset, a few real photographs, and where the course keeps its data.

The shapes dataset is the course's stand-in for LAION: small enough to train a
text-to-image model on a laptop CPU, rich enough to ask real questions of it. Each image
is one coloured shape on a white background, with a caption that names some or all of
its attributes:

    colour    red, green, blue, yellow, purple, orange, cyan, pink  (RGB values in COLOURS)
    shape     circle, square, triangle, cross
    size      small, large
    position  a cell of a 3x3 grid: top left, top, top right, left, center, right,
              bottom left, bottom, bottom right (with a small jitter inside the cell)

    "a large red circle in the top left"    every attribute named
    "a red circle", "a circle in the center", "an image of a small blue square"
                                            attributes dropped, so the model also
                                            learns partial prompts

Compositional generalisation. Four (colour, shape) pairs never appear in the training
split (HELD_OUT): a model that has seen red squares and blue triangles but never a red
triangle can still be asked for one. The test split holds exactly these pairs, so
"does the model compose attributes it learnt separately?" becomes a number.

Geometry, for an image of S pixels: the grid cell has side c = S / 3; a shape's half
extent is r = 0.22 c (small) or 0.40 c (large), so its bounding box is 2r wide; the jitter
moves its centre by at most c/2 - r - 0.5 px, which keeps the whole shape inside its cell.
Shapes are drawn at 4x resolution and box-filtered down (antialiasing).

Determinism. Item i of `Shapes(n, seed, split=...)` is drawn from its own random generator
seeded with (seed, split, i), never from global state, so it is bit-identical across runs
and processes, and the same whatever n is: Shapes(100)[i] == Shapes(10_000)[i].
The attributes do not depend on the image size either: size=32 shows the same scenes.
"""

import math
import os
import re
from pathlib import Path
from typing import Mapping

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch.utils.data import Dataset

# ---------------------------------------------------------------------------------------
# Vocabulary. The index of a name in these tuples is its integer label.
# ---------------------------------------------------------------------------------------

COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 200, 30),
    "purple": (140, 60, 190),
    "orange": (245, 140, 30),
    "cyan": (40, 190, 210),
    "pink": (240, 120, 170),
}
COLOUR_NAMES = tuple(COLOURS)
SHAPES = ("circle", "square", "triangle", "cross")
SIZES = ("small", "large")
POSITIONS = (
    "top left", "top", "top right",
    "left", "center", "right",
    "bottom left", "bottom", "bottom right",
)
# How a caption says where the shape is ("in the top left", "at the top", "on the left").
POSITION_PHRASES = {
    "top left": "in the top left", "top": "at the top", "top right": "in the top right",
    "left": "on the left", "center": "in the center", "right": "on the right",
    "bottom left": "in the bottom left", "bottom": "at the bottom", "bottom right": "in the bottom right",
}
# (colour, shape) pairs never shown in training: the test of compositional generalisation.
HELD_OUT = (("red", "triangle"), ("blue", "cross"), ("yellow", "square"), ("purple", "circle"))

SPLITS = ("train", "test", "all")
CAPTION_MODES = ("full", "partial")
# Caption templates; {article} is "a" or "an" to agree with the first word of {description}.
TEMPLATES = (
    "{article} {description}{where}",
    "a picture of {article} {description}{where}",
    "an image of {article} {description}{where}",
)

MIN_SIZE = 24  # below this a small shape is under 4 px across and the grid stops being legible
BACKGROUND = (255, 255, 255)
HALF_EXTENT = {"small": 0.22, "large": 0.40}  # r / c: half the shape's bounding box, per cell side
EDGE_MARGIN_PX = 0.5  # room left for antialiasing between a shape and its cell border
SUPERSAMPLE = 4  # draw at 4x and average 4x4 blocks: deterministic antialiasing

PHOTOGRAPHS = ("astronaut", "coffee", "chelsea", "rocket")


# ---------------------------------------------------------------------------------------
# Checking names
# ---------------------------------------------------------------------------------------


def _index(kind: str, value, options: tuple) -> int:
    """The integer label of `value` (a name or an index) among `options`; clear error otherwise."""
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        if 0 <= value < len(options):
            return int(value)
        raise ValueError(f"{kind} index {value} is out of range: expected 0..{len(options) - 1} ({', '.join(options)}).")
    if isinstance(value, str) and value in options:
        return options.index(value)
    raise ValueError(f"Unknown {kind} {value!r}. Valid {kind}s: {', '.join(repr(o) for o in options)}.")


def _check_size(size) -> int:
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < MIN_SIZE:
        raise ValueError(
            f"Image size must be an integer of at least {MIN_SIZE} pixels (the 3x3 grid needs room "
            f"for small shapes), got {size!r}. Try size=32 for speed or size=64 (the default)."
        )
    return int(size)


# ---------------------------------------------------------------------------------------
# Drawing one shape
# ---------------------------------------------------------------------------------------


def max_jitter(size: str, size_px: int) -> float:
    """How far (pixels) a shape's centre may move from its cell centre and stay inside the cell."""
    cell = size_px / 3
    return max(0.0, cell / 2 - HALF_EXTENT[size] * cell - EDGE_MARGIN_PX)


def _outline(shape: str, cx: float, cy: float, r: float) -> list:
    """Polygons (lists of (x, y)) for a shape centred at (cx, cy) inside the box of half side r."""
    if shape == "square":
        h = 0.82 * r  # a little inside the box, so a square looks as big as a circle of radius r
        return [[(cx - h, cy - h), (cx + h, cy - h), (cx + h, cy + h), (cx - h, cy + h)]]
    if shape == "triangle":
        # Apex up, base 2r wide and 1.75r high, centred vertically in the box.
        return [[(cx, cy - 0.875 * r), (cx + r, cy + 0.875 * r), (cx - r, cy + 0.875 * r)]]
    if shape == "cross":
        t = 0.3 * r  # half the thickness of each bar
        return [
            [(cx - r, cy - t), (cx + r, cy - t), (cx + r, cy + t), (cx - r, cy + t)],
            [(cx - t, cy - r), (cx + t, cy - r), (cx + t, cy + r), (cx - t, cy + r)],
        ]
    raise ValueError(f"Unknown shape {shape!r}. Valid shapes: {', '.join(SHAPES)}.")


def _draw(colour: int, shape: int, size: int, position: int, size_px: int, jitter, antialias: bool) -> np.ndarray:
    """Render one image as a (size_px, size_px, 3) uint8 array. `jitter` is in [-1, 1]^2."""
    k = SUPERSAMPLE if antialias else 1
    cell = size_px / 3
    row, col = divmod(position, 3)
    size_name = SIZES[size]
    r = HALF_EXTENT[size_name] * cell
    reach = max_jitter(size_name, size_px)
    cx = (col + 0.5) * cell + float(jitter[0]) * reach
    cy = (row + 0.5) * cell + float(jitter[1]) * reach
    image = Image.new("RGB", (size_px * k, size_px * k), BACKGROUND)
    draw = ImageDraw.Draw(image)
    fill = COLOURS[COLOUR_NAMES[colour]]
    # Continuous coordinates (pixel edges at integers) -> PIL's (pixel centres at integers).
    def pil_xy(x, y):
        return (x * k - 0.5, y * k - 0.5)

    if SHAPES[shape] == "circle":
        (x0, y0), (x1, y1) = pil_xy(cx - r, cy - r), pil_xy(cx + r, cy + r)
        draw.ellipse([x0, y0, x1, y1], fill=fill)
    else:
        for polygon in _outline(SHAPES[shape], cx, cy, r):
            draw.polygon([pil_xy(x, y) for x, y in polygon], fill=fill)
    if k > 1:
        image = image.reduce(k)  # mean of each k x k block
    return np.asarray(image)


def render(colour, shape, size, position, size_px: int = 64, jitter_rng=None, antialias: bool = True) -> Image.Image:
    """Draw one shape with the given attributes (names or integer labels) as a PIL image.

    Without `jitter_rng` the shape sits at the centre of its grid cell; with a
    numpy Generator it is moved by a random jitter, as in the dataset.

    >>> render("red", "triangle", "large", "top left", size_px=32)   # a held-out pair
    """
    labels = (
        _index("colour", colour, COLOUR_NAMES),
        _index("shape", shape, SHAPES),
        _index("size", size, SIZES),
        _index("position", position, POSITIONS),
    )
    size_px = _check_size(size_px)
    jitter = (0.0, 0.0) if jitter_rng is None else jitter_rng.uniform(-1.0, 1.0, size=2)
    return Image.fromarray(_draw(*labels, size_px, jitter, antialias))


def cell_mask(position, size_px: int = 64, align: int = 8) -> torch.Tensor:
    """A (1, size_px, size_px) float mask, 1 on the grid cell of `position` and 0 elsewhere.

    The cell is grown outwards to multiples of `align` pixels (8: the autoencoder's latent
    pixels), so the mask is exact at latent resolution: an inpainting mask for one shape.
    """
    row, col = divmod(_index("position", position, POSITIONS), 3)
    cell = _check_size(size_px) / 3
    y0, y1 = math.floor(row * cell / align) * align, math.ceil((row + 1) * cell / align) * align
    x0, x1 = math.floor(col * cell / align) * align, math.ceil((col + 1) * cell / align) * align
    mask = torch.zeros(1, size_px, size_px)
    mask[:, y0:min(y1, size_px), x0:min(x1, size_px)] = 1.0
    return mask


# ---------------------------------------------------------------------------------------
# Captions
# ---------------------------------------------------------------------------------------


def make_caption(attrs: Mapping, rng=None, drop_prob: float = 0.0) -> str:
    """A caption for `attrs` (a mapping with names for "shape" and any of "colour", "size", "position").

    With an rng, a template is drawn at random and each of colour, size and position is left
    out with probability drop_prob (the shape is always named). Without one, the first
    template names every attribute given: make_caption(dict(colour="red", shape="circle",
    size="large", position="top left")) == "a large red circle in the top left".
    """
    if "shape" not in attrs:
        raise ValueError(f"A caption always names the shape: attrs needs a 'shape' key, got keys {sorted(attrs)}.")
    unknown = sorted(set(attrs) - {"colour", "shape", "size", "position"})
    if unknown:
        raise ValueError(f"Unknown attribute keys {unknown}; expected some of colour, shape, size, position.")
    if not 0.0 <= drop_prob <= 1.0:
        raise ValueError(f"drop_prob must be a probability in [0, 1], got {drop_prob}.")
    if drop_prob > 0 and rng is None:
        raise ValueError("Dropping attributes is random: pass rng=np.random.default_rng(seed) with drop_prob > 0.")
    names = {
        "colour": COLOUR_NAMES, "shape": SHAPES, "size": SIZES, "position": POSITIONS,
    }
    attrs = {key: names[key][_index(key, value, names[key])] for key, value in attrs.items()}
    template = TEMPLATES[0]
    keep = {"colour": True, "size": True, "position": True}
    if rng is not None:
        # Always draw the same numbers in the same order, so captions stay reproducible.
        template = TEMPLATES[int(rng.integers(len(TEMPLATES)))]
        for key, u in zip(("size", "colour", "position"), rng.random(3)):
            keep[key] = bool(u >= drop_prob)
    words = [attrs[key] for key in ("size", "colour") if key in attrs and keep[key]] + [attrs["shape"]]
    description = " ".join(words)
    where = " " + POSITION_PHRASES[attrs["position"]] if "position" in attrs and keep["position"] else ""
    article = "an" if description[0] in "aeiou" else "a"
    return template.format(article=article, description=description, where=where)


_PHRASE_TO_POSITION = {phrase: name for name, phrase in POSITION_PHRASES.items()}
_CAPTION_RE = re.compile(
    r"^(?:a picture of |an image of )?(?P<article>a|an) "
    rf"(?:(?P<size>{'|'.join(SIZES)}) )?"
    rf"(?:(?P<colour>{'|'.join(COLOUR_NAMES)}) )?"
    rf"(?P<shape>{'|'.join(SHAPES)})"
    rf"(?: (?P<where>{'|'.join(POSITION_PHRASES.values())}))?$"
)


def parse_caption(caption: str) -> dict:
    """The attributes a caption mentions, by name: the inverse of make_caption.

    parse_caption("an orange cross at the top") == {"colour": "orange", "shape": "cross", "position": "top"}
    """
    match = _CAPTION_RE.match(caption)
    if match is None:
        raise ValueError(
            f"Cannot read the caption {caption!r}: expected the form "
            "'[a picture of | an image of] a/an [size] [colour] shape [position phrase]', "
            "e.g. 'a large red circle in the top left'."
        )
    found = {key: match.group(key) for key in ("colour", "shape", "size") if match.group(key)}
    if match.group("where"):
        found["position"] = _PHRASE_TO_POSITION[match.group("where")]
    first = (found.get("size") or found.get("colour") or found["shape"])[0]
    if match.group("article") != ("an" if first in "aeiou" else "a"):
        raise ValueError(f"Cannot read the caption {caption!r}: the article should be {'an' if first in 'aeiou' else 'a'!r} before a word starting with {first!r}.")
    return found


# ---------------------------------------------------------------------------------------
# The dataset
# ---------------------------------------------------------------------------------------


def split_pairs(split: str) -> tuple:
    """The (colour, shape) pairs a split draws from: 28 for train, the 4 HELD_OUT for test, 32 for all."""
    _index("split", split, SPLITS)
    pairs = [(c, s) for c in COLOUR_NAMES for s in SHAPES]
    if split == "train":
        return tuple(p for p in pairs if p not in HELD_OUT)
    if split == "test":
        return HELD_OUT
    return tuple(pairs)


def to_model_range(pixels: np.ndarray) -> torch.Tensor:
    """uint8 pixels (..., H, W, 3) -> float tensor (..., 3, H, W) in [-1, 1], the range the models see."""
    pixels = np.ascontiguousarray(pixels)
    if not pixels.flags.writeable:  # torch warns on read-only arrays; copy those only
        pixels = pixels.copy()
    x = torch.from_numpy(pixels).movedim(-1, -3)  # (..., 3, H, W)
    return x.float() / 127.5 - 1.0


class Shapes(Dataset):
    """n procedurally drawn shapes with captions, deterministic from `seed`.

    split:     "train" (never a HELD_OUT pair), "test" (only HELD_OUT pairs) or "all".
               For unseen images of seen pairs use split="train" with another seed.
    captions:  "partial" (random template, each of size/colour/position dropped with
               probability drop_prob) or "full" (every attribute, first template).
    size:      image side in pixels (>= 24); the scenes do not depend on it.
    cache:     keep rendered pixels (n x size x size x 3 bytes) so each image is drawn once.

    Each item is a dict: image (3, size, size) float in [-1, 1], caption (str), and the
    integer labels colour, shape, size, position (indices into COLOUR_NAMES, SHAPES, SIZES,
    POSITIONS; `attributes(i)` gives the names).
    """

    def __init__(
        self,
        n: int,
        seed: int = 0,
        size: int = 64,
        split: str = "train",
        captions: str = "partial",
        drop_prob: float = 0.3,
        antialias: bool = True,
        cache: bool = True,
    ):
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
            raise ValueError(f"n (the number of images) must be a positive integer, got {n!r}.")
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
            raise ValueError(f"seed must be a non-negative integer, got {seed!r}.")
        self.split_index = _index("split", split, SPLITS)
        _index("captions mode", captions, CAPTION_MODES)
        if not 0.0 <= drop_prob <= 1.0:
            raise ValueError(f"drop_prob must be a probability in [0, 1], got {drop_prob}.")
        self.n, self.seed, self.size = int(n), int(seed), _check_size(size)
        self.split, self.captions_mode, self.drop_prob = split, captions, float(drop_prob)
        self.antialias, self.cache = antialias, cache

        # Draw every item's attributes now (cheap); render pixels on demand.
        pairs = split_pairs(split)
        labels = np.empty((self.n, 4), dtype=np.int64)  # colour, shape, size, position
        self.jitter = np.empty((self.n, 2), dtype=np.float64)  # in [-1, 1], times max_jitter
        self.captions = []
        for i in range(self.n):
            rng = np.random.default_rng([self.seed, self.split_index, i])
            colour, shape = pairs[int(rng.integers(len(pairs)))]
            labels[i] = (COLOUR_NAMES.index(colour), SHAPES.index(shape), rng.integers(len(SIZES)), rng.integers(len(POSITIONS)))
            self.jitter[i] = rng.uniform(-1.0, 1.0, size=2)
            attrs = dict(zip(("colour", "shape", "size", "position"), (colour, shape, SIZES[labels[i, 2]], POSITIONS[labels[i, 3]])))
            if captions == "full":
                self.captions.append(make_caption(attrs))
            else:
                self.captions.append(make_caption(attrs, rng, self.drop_prob))
        self._labels = labels
        self.labels = torch.from_numpy(labels)  # (n, 4), shares memory with _labels
        self._pixels = None  # (n, size, size, 3) uint8, filled as items are rendered
        self._rendered = np.zeros(self.n, dtype=bool)

    def __len__(self) -> int:
        return self.n

    def _check_index(self, i) -> int:
        if isinstance(i, torch.Tensor) and i.numel() == 1:
            i = int(i)
        if isinstance(i, bool) or not isinstance(i, (int, np.integer)):
            raise TypeError(f"Index with an integer, got {type(i).__name__}. Use tensors() for the whole set.")
        if not -self.n <= i < self.n:
            raise IndexError(f"Index {i} is out of range for a dataset of {self.n} images.")
        return int(i) % self.n

    def pixels(self, i: int) -> np.ndarray:
        """Item i as (size, size, 3) uint8 RGB."""
        i = self._check_index(i)
        if self.cache and self._rendered[i]:
            return self._pixels[i]
        colour, shape, size, position = (int(v) for v in self._labels[i])
        out = _draw(colour, shape, size, position, self.size, self.jitter[i], self.antialias)
        if self.cache:
            if self._pixels is None:
                self._pixels = np.empty((self.n, self.size, self.size, 3), dtype=np.uint8)
            self._pixels[i] = out
            self._rendered[i] = True
        return out

    def __getitem__(self, i) -> dict:
        i = self._check_index(i)
        colour, shape, size, position = (int(v) for v in self._labels[i])
        return {
            "image": to_model_range(self.pixels(i)),  # (3, size, size)
            "caption": self.captions[i],
            "colour": colour,
            "shape": shape,
            "size": size,
            "position": position,
        }

    def pil(self, i: int) -> Image.Image:
        return Image.fromarray(self.pixels(i))

    def attributes(self, i: int) -> dict:
        """Item i's attributes by name, e.g. {"colour": "red", "shape": "circle", ...}."""
        colour, shape, size, position = (int(v) for v in self._labels[self._check_index(i)])
        return {"colour": COLOUR_NAMES[colour], "shape": SHAPES[shape], "size": SIZES[size], "position": POSITIONS[position]}

    def tensors(self) -> torch.Tensor:
        """All images as one float tensor (n, 3, size, size) in [-1, 1]."""
        if not self.cache:
            return to_model_range(np.stack([self.pixels(i) for i in range(self.n)]))
        for i in np.flatnonzero(~self._rendered):
            self.pixels(int(i))
        return to_model_range(self._pixels)

    def __repr__(self) -> str:
        return f"Shapes(n={self.n}, seed={self.seed}, size={self.size}, split={self.split!r}, captions={self.captions_mode!r})"


# ---------------------------------------------------------------------------------------
# Photographs and data files
# ---------------------------------------------------------------------------------------


def photograph(name: str = "astronaut", size: int | None = None) -> Image.Image:
    """A real photograph shipped with scikit-image (no download), optionally centre-cropped
    to a square and resized to size x size."""
    _index("photograph", name, PHOTOGRAPHS)
    if size is not None and (isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 1):
        raise ValueError(f"size must be a positive integer (the side of the square) or None, got {size!r}.")
    import skimage.data  # imported here: it is slow to import and only this function needs it

    image = Image.fromarray(getattr(skimage.data, name)()).convert("RGB")
    if size is None:
        return image
    w, h = image.size
    side = min(w, h)
    left, top = (w - side) // 2, (h - side) // 2
    return image.crop((left, top, left + side, top + side)).resize((int(size), int(size)), Image.Resampling.LANCZOS)


def data_dir() -> Path:
    """Where shipped data lives: $SDLEARN_DATA if set, else the repository's data/ folder."""
    override = os.environ.get("SDLEARN_DATA")
    if override:
        return Path(override).expanduser()
    return Path(__file__).resolve().parent.parent / "data"


def data_path(name: str, make_target: str | None = None) -> Path:
    """The path of a shipped data file or folder; a FileNotFoundError that says how to remake it."""
    path = data_dir() / name
    if path.exists():
        return path
    how = f"Recreate it with `make {make_target}` from the repository root" if make_target else "See data/README.md for how it is made"
    raise FileNotFoundError(
        f"{path} is missing. {how}, or set SDLEARN_DATA to a folder that holds {name} "
        "(data/README.md lists every shipped file and the command that reproduces it)."
    )
