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

The wider world. The renderer also draws EXTRA_SHAPES (star, diamond, hexagon, ring) and
EXTRA_COLOURS (six more); `Shapes(..., colours=, shapes=)` draws from any of them and
`Scenes` puts one to three shapes of the whole world in one image. The default dataset, and
so every caption mini-SD is trained on, uses only the names above. The tiny autoencoder is
trained on the wider world (as SD's VAE saw far more than any model built on it), and the
referee knows the star, the concept lesson 12 teaches.

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

# The wider world. The renderer draws more than the default dataset and mini-SD's captions
# use: the widened autoencoder (data/tiny-vae) is trained on all of it, as SD's VAE was trained
# on far more than any diffusion model built on it; the referee also knows the star, the
# concept lesson 12 teaches a model that has never seen it. An extra name's integer label
# continues the default tuple's (star is shape 4, brown is colour 8).
EXTRA_COLOURS = {
    "brown": (130, 80, 40),
    "grey": (128, 128, 128),
    "black": (30, 30, 30),
    "teal": (20, 120, 120),
    "lime": (160, 210, 40),
    "navy": (30, 40, 110),
}
EXTRA_SHAPES = ("star", "diamond", "hexagon", "ring")
ALL_COLOURS = {**COLOURS, **EXTRA_COLOURS}
ALL_COLOUR_NAMES = tuple(ALL_COLOURS)
ALL_SHAPES = SHAPES + EXTRA_SHAPES
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


def _regular_points(n: int, cx: float, cy: float, radius: float, start: float) -> list:
    """n points on a circle, the first at angle `start` (radians; 0 points right, -pi/2 up)."""
    return [(cx + radius * math.cos(start + 2 * math.pi * k / n), cy + radius * math.sin(start + 2 * math.pi * k / n)) for k in range(n)]


def _outline(shape: str, cx: float, cy: float, r: float) -> list:
    """Polygons (lists of (x, y)) for a shape centred at (cx, cy) inside the box of half side r.

    The circle and the ring are drawn as ellipses by _draw_objects, not here.
    """
    polygon_shapes = [name for name in ALL_SHAPES if name not in ("circle", "ring")]
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
    if shape == "star":
        # Five points up; outer radius R, inner radius 0.4 R. Its top is R above the centre and
        # its lowest points cos(36 deg) R below, so the centre moves down to centre it in the box.
        R = 1.05 * r
        dy = R * (1 - math.cos(math.pi / 5)) / 2
        outer = _regular_points(5, cx, cy + dy, R, -math.pi / 2)
        inner = _regular_points(5, cx, cy + dy, 0.4 * R, -math.pi / 2 + math.pi / 5)
        return [[p for pair in zip(outer, inner) for p in pair]]
    if shape == "diamond":
        w = 0.7 * r  # taller than wide, so it is not a square turned by 45 degrees
        return [[(cx, cy - r), (cx + w, cy), (cx, cy + r), (cx - w, cy)]]
    if shape == "hexagon":
        return [_regular_points(6, cx, cy, r, 0.0)]  # flat top and bottom
    raise ValueError(f"No polygon for shape {shape!r}; polygons exist for {', '.join(polygon_shapes)}.")


def _draw_objects(objects, size_px: int, antialias: bool) -> np.ndarray:
    """Render shapes onto one white image: a (size_px, size_px, 3) uint8 array.

    objects: (colour, shape, size, position, jitter) tuples, integer labels into
    ALL_COLOUR_NAMES, ALL_SHAPES, SIZES and POSITIONS, jitter in [-1, 1]^2; later ones on top.
    """
    k = SUPERSAMPLE if antialias else 1
    cell = size_px / 3
    image = Image.new("RGB", (size_px * k, size_px * k), BACKGROUND)
    draw = ImageDraw.Draw(image)

    # Continuous coordinates (pixel edges at integers) -> PIL's (pixel centres at integers).
    def pil_xy(x, y):
        return (x * k - 0.5, y * k - 0.5)

    for colour, shape, size, position, jitter in objects:
        row, col = divmod(position, 3)
        size_name = SIZES[size]
        r = HALF_EXTENT[size_name] * cell
        reach = max_jitter(size_name, size_px)
        cx = (col + 0.5) * cell + float(jitter[0]) * reach
        cy = (row + 0.5) * cell + float(jitter[1]) * reach
        fill = ALL_COLOURS[ALL_COLOUR_NAMES[colour]]
        shape_name = ALL_SHAPES[shape]
        if shape_name in ("circle", "ring"):
            (x0, y0), (x1, y1) = pil_xy(cx - r, cy - r), pil_xy(cx + r, cy + r)
            draw.ellipse([x0, y0, x1, y1], fill=fill)
            if shape_name == "ring":  # a disc with a hole of 0.55 r: background shows through
                h = 0.55 * r
                (x0, y0), (x1, y1) = pil_xy(cx - h, cy - h), pil_xy(cx + h, cy + h)
                draw.ellipse([x0, y0, x1, y1], fill=BACKGROUND)
        else:
            for polygon in _outline(shape_name, cx, cy, r):
                draw.polygon([pil_xy(x, y) for x, y in polygon], fill=fill)
    if k > 1:
        image = image.reduce(k)  # mean of each k x k block
    return np.asarray(image)


def _draw(colour: int, shape: int, size: int, position: int, size_px: int, jitter, antialias: bool) -> np.ndarray:
    """Render one image as a (size_px, size_px, 3) uint8 array. `jitter` is in [-1, 1]^2."""
    return _draw_objects([(colour, shape, size, position, jitter)], size_px, antialias)


def render(colour, shape, size, position, size_px: int = 64, jitter_rng=None, antialias: bool = True) -> Image.Image:
    """Draw one shape with the given attributes (names or integer labels) as a PIL image.

    Any colour of ALL_COLOURS and shape of ALL_SHAPES (the star among them) can be drawn,
    though the default dataset uses only COLOURS and SHAPES. Without `jitter_rng` the shape sits at the centre of its grid cell; with a
    numpy Generator it is moved by a random jitter, as in the dataset.

    >>> render("red", "triangle", "large", "top left", size_px=32)   # a held-out pair
    """
    labels = (
        _index("colour", colour, ALL_COLOUR_NAMES),
        _index("shape", shape, ALL_SHAPES),
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

    Any name of ALL_COLOURS / ALL_SHAPES may be used ("a red star"); integer labels index them.

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
        "colour": ALL_COLOUR_NAMES, "shape": ALL_SHAPES, "size": SIZES, "position": POSITIONS,
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
    rf"(?:(?P<colour>{'|'.join(ALL_COLOUR_NAMES)}) )?"
    rf"(?P<shape>{'|'.join(ALL_SHAPES)})"
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


def split_pairs(split: str, colours: tuple = COLOUR_NAMES, shapes: tuple = SHAPES) -> tuple:
    """The (colour, shape) pairs a split draws from: by default 28 for train, the 4 HELD_OUT for
    test, 32 for all.

    With other `colours` / `shapes` (names from ALL_COLOURS / ALL_SHAPES) the pairs are their
    combinations: train leaves out every HELD_OUT pair, test keeps only the HELD_OUT pairs among
    them. A split with no pair left is an error.
    """
    _index("split", split, SPLITS)
    colours, shapes = _names("colour", colours, ALL_COLOUR_NAMES), _names("shape", shapes, ALL_SHAPES)
    pairs = [(c, s) for c in colours for s in shapes]
    if split == "train":
        chosen = tuple(p for p in pairs if p not in HELD_OUT)
    elif split == "test":
        chosen = tuple(p for p in HELD_OUT if p in pairs)  # HELD_OUT's order: the default test split is unchanged
    else:
        chosen = tuple(pairs)
    if not chosen:
        raise ValueError(
            f"The {split!r} split of colours {colours} and shapes {shapes} has no (colour, shape) pair to draw: "
            f"the test split holds only the HELD_OUT pairs {HELD_OUT}, the train split every other pair. "
            "Choose other colours/shapes or split='all'."
        )
    return chosen


def _names(kind: str, names, options: tuple) -> tuple:
    """`names` as a tuple of known names without repeats; a clear error otherwise."""
    if isinstance(names, str) or not names:
        raise ValueError(f"{kind}s must be a non-empty sequence of names, e.g. {options[:2]}, got {names!r}.")
    names = tuple(names)
    for name in names:
        if not isinstance(name, str):
            raise ValueError(f"Give {kind}s by name, got {name!r}. Valid {kind}s: {', '.join(options)}.")
        _index(kind, name, options)
    if len(set(names)) != len(names):
        raise ValueError(f"{kind}s are repeated in {names!r}; give each once.")
    return names


def _check_count_and_seed(n, seed) -> None:
    """A dataset's n and seed: ValueError unless n >= 1 and seed >= 0 are integers."""
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise ValueError(f"n (the number of images) must be a positive integer, got {n!r}.")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}.")


def _check_item(i, n: int) -> int:
    """Item i of a dataset of n images as an index in [0, n) (negative counts from the end); clear errors otherwise."""
    if isinstance(i, torch.Tensor) and i.numel() == 1:
        i = int(i)
    if isinstance(i, bool) or not isinstance(i, (int, np.integer)):
        raise TypeError(f"Index with an integer, got {type(i).__name__}. Use tensors() for the whole set.")
    if not -n <= i < n:
        raise IndexError(f"Index {i} is out of range for a dataset of {n} images.")
    return int(i) % n


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
    colours, shapes: the names drawn from (default: COLOURS and SHAPES, the world mini-SD is
               taught); e.g. shapes=SHAPES + ("star",) for the referee. The defaults give
               exactly the dataset the course has always used.

    Each item is a dict: image (3, size, size) float in [-1, 1], caption (str), and the
    integer labels colour, shape, size, position (indices into ALL_COLOUR_NAMES, ALL_SHAPES,
    SIZES, POSITIONS, which begin with COLOUR_NAMES and SHAPES; `attributes(i)` gives the names).
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
        colours: tuple = COLOUR_NAMES,
        shapes: tuple = SHAPES,
    ):
        _check_count_and_seed(n, seed)
        self.split_index = _index("split", split, SPLITS)
        _index("captions mode", captions, CAPTION_MODES)
        if not 0.0 <= drop_prob <= 1.0:
            raise ValueError(f"drop_prob must be a probability in [0, 1], got {drop_prob}.")
        self.n, self.seed, self.size = int(n), int(seed), _check_size(size)
        self.split, self.captions_mode, self.drop_prob = split, captions, float(drop_prob)
        self.antialias, self.cache = antialias, cache

        # Draw every item's attributes now (cheap); render pixels on demand.
        self.colours, self.shapes = _names("colour", colours, ALL_COLOUR_NAMES), _names("shape", shapes, ALL_SHAPES)
        pairs = split_pairs(split, self.colours, self.shapes)
        labels = np.empty((self.n, 4), dtype=np.int64)  # colour, shape, size, position
        self.jitter = np.empty((self.n, 2), dtype=np.float64)  # in [-1, 1], times max_jitter
        self.captions = []
        for i in range(self.n):
            rng = np.random.default_rng([self.seed, self.split_index, i])
            colour, shape = pairs[int(rng.integers(len(pairs)))]
            labels[i] = (ALL_COLOUR_NAMES.index(colour), ALL_SHAPES.index(shape), rng.integers(len(SIZES)), rng.integers(len(POSITIONS)))
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
        return _check_item(i, self.n)

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
        return {"colour": ALL_COLOUR_NAMES[colour], "shape": ALL_SHAPES[shape], "size": SIZES[size], "position": POSITIONS[position]}

    def tensors(self) -> torch.Tensor:
        """All images as one float tensor (n, 3, size, size) in [-1, 1]."""
        if not self.cache:
            return to_model_range(np.stack([self.pixels(i) for i in range(self.n)]))
        for i in np.flatnonzero(~self._rendered):
            self.pixels(int(i))
        return to_model_range(self._pixels)

    def __repr__(self) -> str:
        wider = ""
        if self.colours != COLOUR_NAMES:
            wider += f", colours={self.colours!r}"
        if self.shapes != SHAPES:
            wider += f", shapes={self.shapes!r}"
        return f"Shapes(n={self.n}, seed={self.seed}, size={self.size}, split={self.split!r}, captions={self.captions_mode!r}{wider})"


class Scenes(Dataset):
    """The wider world the autoencoder learns: n images of 1 to max_objects shapes each, any
    colour of ALL_COLOURS and shape of ALL_SHAPES (the star among them), in distinct grid cells.

    Deterministic from seed as Shapes is (item i from its own generator). The (colour, shape)
    pairs in HELD_OUT never appear (split "train"), so the autoencoder's held-out PSNR stays
    held out. Each item: image (3, size, size) in [-1, 1] and caption, e.g.
    "a large teal star in the top left and a small red circle at the bottom".
    `objects(i)` gives the attribute names of each shape.
    """

    def __init__(self, n: int, seed: int = 0, size: int = 64, max_objects: int = 3, antialias: bool = True, cache: bool = True):
        _check_count_and_seed(n, seed)
        if isinstance(max_objects, bool) or not isinstance(max_objects, (int, np.integer)) or not 1 <= max_objects <= len(POSITIONS):
            raise ValueError(f"max_objects must be a whole number in 1..{len(POSITIONS)} (one per grid cell), got {max_objects!r}.")
        self.n, self.seed, self.size, self.max_objects = int(n), int(seed), _check_size(size), int(max_objects)
        self.antialias, self.cache = antialias, cache
        pairs = split_pairs("train", ALL_COLOUR_NAMES, ALL_SHAPES)
        self._objects = []  # per item: [(colour, shape, size, position, jitter)] as integer labels
        for i in range(self.n):
            rng = np.random.default_rng([self.seed, 7, i])  # 7: a stream no Shapes split uses
            k = int(rng.integers(1, self.max_objects + 1))
            cells = rng.choice(len(POSITIONS), size=k, replace=False)
            items = []
            for position in cells:
                colour, shape = pairs[int(rng.integers(len(pairs)))]
                items.append((ALL_COLOUR_NAMES.index(colour), ALL_SHAPES.index(shape), int(rng.integers(len(SIZES))),
                              int(position), rng.uniform(-1.0, 1.0, size=2)))
            self._objects.append(items)
        self._pixels = {}

    def __len__(self) -> int:
        return self.n

    def objects(self, i: int) -> list:
        """The shapes of item i by name: [{"colour": ..., "shape": ..., "size": ..., "position": ...}]."""
        return [
            {"colour": ALL_COLOUR_NAMES[c], "shape": ALL_SHAPES[s], "size": SIZES[z], "position": POSITIONS[p]}
            for c, s, z, p, _ in self._objects[_check_item(i, self.n)]
        ]

    def pixels(self, i: int) -> np.ndarray:
        """Item i as (size, size, 3) uint8 RGB."""
        i = _check_item(i, self.n)
        if i in self._pixels:
            return self._pixels[i]
        out = _draw_objects(self._objects[i], self.size, self.antialias)
        if self.cache:
            self._pixels[i] = out
        return out

    def caption(self, i: int) -> str:
        return " and ".join(make_caption(attrs) for attrs in self.objects(i))

    def __getitem__(self, i) -> dict:
        return {"image": to_model_range(self.pixels(i)), "caption": self.caption(i)}

    def pil(self, i: int) -> Image.Image:
        return Image.fromarray(self.pixels(i))

    def tensors(self) -> torch.Tensor:
        """All images as one float tensor (n, 3, size, size) in [-1, 1]."""
        return to_model_range(np.stack([self.pixels(i) for i in range(self.n)]))

    def __repr__(self) -> str:
        return f"Scenes(n={self.n}, seed={self.seed}, size={self.size}, max_objects={self.max_objects})"


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
