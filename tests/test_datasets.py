"""The shapes dataset: deterministic, truthful captions, held-out pairs honoured, clear errors."""

import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from sdlearn import datasets
from sdlearn.datasets import (
    ALL_COLOURS, ALL_SHAPES, COLOUR_NAMES, COLOURS, EXTRA_COLOURS, HELD_OUT, POSITIONS, SHAPES, SIZES, Scenes, Shapes,
    data_path, make_caption,
    parse_caption, photograph, render,
)


def test_design_vocabulary():
    assert COLOURS["red"] == (220, 40, 40) and COLOURS["pink"] == (240, 120, 170) and len(COLOURS) == 8
    assert SHAPES == ("circle", "square", "triangle", "cross")
    assert SIZES == ("small", "large") and len(POSITIONS) == 9
    assert set(HELD_OUT) == {("red", "triangle"), ("blue", "cross"), ("yellow", "square"), ("purple", "circle")}


def test_items_are_tensors_in_range_with_labels():
    ds = Shapes(16, seed=3, size=32)
    item = ds[5]
    assert item["image"].shape == (3, 32, 32) and item["image"].dtype == torch.float32
    assert item["image"].min() >= -1 and item["image"].max() <= 1
    assert item["image"].max() == 1.0  # white background
    assert ds.tensors().shape == (16, 3, 32, 32)
    assert ds.pil(5).size == (32, 32)
    assert ds.attributes(5)["shape"] == SHAPES[item["shape"]]


def test_bit_identical_for_the_same_seed_and_different_for_another():
    a, b, c = Shapes(64, seed=7), Shapes(64, seed=7), Shapes(64, seed=8)
    assert torch.equal(a.tensors(), b.tensors()) and a.captions == b.captions
    assert not torch.equal(a.tensors(), c.tensors())
    # item i does not depend on how many items were asked for
    assert torch.equal(Shapes(10, seed=7)[3]["image"], a[3]["image"])


def test_bit_identical_across_processes():
    code = "from sdlearn.datasets import Shapes; import hashlib; ds = Shapes(32, seed=11, size=32); " \
           "print(hashlib.sha256(ds.tensors().numpy().tobytes() + '|'.join(ds.captions).encode()).hexdigest())"
    here = Shapes(32, seed=11, size=32)
    import hashlib

    expected = hashlib.sha256(here.tensors().numpy().tobytes() + "|".join(here.captions).encode()).hexdigest()
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == expected


@pytest.mark.parametrize("captions", ["partial", "full"])
def test_every_caption_agrees_with_the_labels(captions):
    ds = Shapes(2000, seed=1, size=32, captions=captions, split="all")
    dropped = 0
    for i in range(len(ds)):
        mentioned = parse_caption(ds.captions[i])
        truth = ds.attributes(i)
        assert mentioned["shape"] == truth["shape"]
        for key, value in mentioned.items():
            assert value == truth[key], (ds.captions[i], truth)
        dropped += len(mentioned) < 4
    if captions == "full":
        assert dropped == 0
    else:
        assert 0.2 * len(ds) < dropped < 0.9 * len(ds)  # partial prompts are common, not universal


def test_rendered_colour_is_the_labelled_colour():
    ds = Shapes(200, seed=2, size=64, split="all")
    for i in range(0, 200, 7):
        pixels = ds.pixels(i).reshape(-1, 3).astype(int)
        shape_pixels = pixels[(pixels != 255).any(axis=1)]
        values, counts = np.unique(shape_pixels, axis=0, return_counts=True)
        assert tuple(values[counts.argmax()]) == COLOURS[ds.attributes(i)["colour"]]


def test_held_out_pairs_never_in_train_and_only_in_test():
    train = Shapes(5000, seed=0, size=24, split="train", cache=False)
    pairs = {(COLOUR_NAMES[c], SHAPES[s]) for c, s in train.labels[:, :2].tolist()}
    assert not pairs & set(HELD_OUT)
    assert len(pairs) == 28  # every other pair is there
    test = Shapes(500, seed=0, size=24, split="test", cache=False)
    assert {(COLOUR_NAMES[c], SHAPES[s]) for c, s in test.labels[:, :2].tolist()} == set(HELD_OUT)


def test_small_and_large_are_distinguishable_at_32px():
    small = render("red", "square", "small", "center", size_px=32)
    large = render("red", "square", "large", "center", size_px=32)
    area = lambda img: int((np.asarray(img) != 255).any(axis=2).sum())  # noqa: E731
    assert area(large) > 2.5 * area(small) > 0


def test_shapes_stay_inside_their_cell():
    for position in POSITIONS:
        img = np.asarray(render("blue", "cross", "large", position, size_px=48, jitter_rng=np.random.default_rng(0)))
        ys, xs = np.nonzero((img != 255).any(axis=2))
        row, col = POSITIONS.index(position) // 3, POSITIONS.index(position) % 3
        assert ys.min() >= row * 16 and ys.max() < (row + 1) * 16
        assert xs.min() >= col * 16 and xs.max() < (col + 1) * 16


def test_generation_is_fast():
    start = time.perf_counter()
    Shapes(10_000, seed=0, size=32).tensors()
    assert time.perf_counter() - start < 60  # a few seconds on a laptop; generous for a loaded CI box


def test_make_caption_full_form():
    assert make_caption(dict(colour="red", shape="circle", size="large", position="top left")) == "a large red circle in the top left"
    assert parse_caption("an orange cross at the top") == {"colour": "orange", "shape": "cross", "position": "top"}


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: render("violet", "circle", "small", "center"), "Valid colours"),
        (lambda: render("red", "heart", "small", "center"), "'star'"),
        (lambda: Shapes(4, shapes=("circle", "circle")), "repeated"),
        (lambda: Shapes(4, colours="red"), "non-empty sequence"),
        (lambda: Scenes(4, max_objects=10), "1..9"),
        (lambda: Shapes(4, split="train", colours=("red",), shapes=("triangle",)), "pair to draw"),
        (lambda: Shapes(4, split="test", shapes=("star",)), "pair to draw"),
        (lambda: render("red", "circle", "medium", "center"), "'small'"),
        (lambda: render("red", "circle", "small", "middle"), "'top left'"),
        (lambda: Shapes(4, size=16), "at least 24"),
        (lambda: Shapes(4, split="validation"), "'train'"),
        (lambda: Shapes(0), "positive integer"),
        (lambda: make_caption({"colour": "red"}), "names the shape"),
        (lambda: parse_caption("two red circles"), "Cannot read the caption"),
        (lambda: photograph("mona lisa"), "astronaut"),
    ],
)
def test_bad_input_gets_a_clear_message(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_photographs_load_offline():
    image = photograph("astronaut", size=64)
    assert image.size == (64, 64) and image.mode == "RGB"
    assert photograph("coffee").size == (600, 400)


def test_missing_data_file_names_the_make_target(tmp_path, monkeypatch):
    monkeypatch.setenv("SDLEARN_DATA", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="make train-tiny-vae"):
        data_path("tiny-vae", make_target="train-tiny-vae")
    (tmp_path / "tiny-vae").mkdir()
    assert data_path("tiny-vae") == tmp_path / "tiny-vae"
    assert datasets.data_dir() == tmp_path


# ---------------------------------------------------------------------------------------
# The wider world: more shapes (the star), more colours, scenes of several shapes
# ---------------------------------------------------------------------------------------


def test_the_default_dataset_is_exactly_what_it_was_before_the_world_widened():
    """Pixels and captions of the default dataset, pinned: mini-SD's captions and images must not move."""
    import hashlib

    h = hashlib.sha256()
    for split in ("train", "test"):
        ds = Shapes(64, seed=0, split=split)
        h.update(np.stack([ds.pixels(i) for i in range(64)]).tobytes())
        h.update("|".join(ds.captions).encode())
    assert h.hexdigest() == "1dcdc2d294b8f2bc14c783f7ac1960b91e47f94e36ba71d08aa94040f9e195fc"
    assert Shapes(500, seed=3).labels[:, 1].max() < len(SHAPES)  # never a star unless asked


def test_the_extra_names_continue_the_default_labels():
    assert ALL_SHAPES[:4] == SHAPES and ALL_SHAPES[4] == "star"
    assert list(ALL_COLOURS)[:8] == list(COLOURS) and set(EXTRA_COLOURS).isdisjoint(COLOURS)
    assert len(set(ALL_COLOURS.values())) == len(ALL_COLOURS)  # every colour its own RGB


@pytest.mark.parametrize("shape", ["star", "diamond", "hexagon", "ring"])
def test_extra_shapes_are_drawn_in_their_cell_and_differ_from_every_other_shape(shape):
    img = np.asarray(render("blue", shape, "large", "center", size_px=64))
    ink = (img != 255).any(axis=2)
    ys, xs = np.nonzero(ink)
    cell = 64 / 3
    assert cell <= xs.min() and xs.max() < 2 * cell and cell <= ys.min() and ys.max() < 2 * cell
    assert abs((xs.min() + xs.max()) / 2 - 31.5) <= 1 and abs((ys.min() + ys.max()) / 2 - 31.5) <= 1  # centred
    amount = (255.0 - img).mean(axis=2)  # symmetric about the vertical axis, up to rasterising:
    assert np.abs(amount - amount[:, ::-1]).sum() <= 0.1 * amount.sum()
    others = [s for s in ALL_SHAPES if s != shape]
    for other in others:
        other_ink = (np.asarray(render("blue", other, "large", "center", size_px=64)) != 255).any(axis=2)
        assert (ink != other_ink).sum() > 20, (shape, other)


def test_the_star_has_five_points():
    """Walk a circle between the star's inner and outer radius: it crosses ink five times."""
    img = np.asarray(render("red", "star", "large", "center", size_px=256, antialias=False))
    ink = (img != 255).any(axis=2)
    ys, xs = np.nonzero(ink)
    cy, cx = (ys.min() + ys.max()) / 2 + 0.05 * (ys.max() - ys.min()), (xs.min() + xs.max()) / 2
    radius = 0.75 * (ys.max() - ys.min()) / 2
    angles = np.linspace(0, 2 * np.pi, 720, endpoint=False)
    on = ink[(cy + radius * np.sin(angles)).astype(int), (cx + radius * np.cos(angles)).astype(int)]
    assert int((on & ~np.roll(on, 1)).sum()) == 5
    star, circle = ink.sum(), (np.asarray(render("red", "circle", "large", "center", size_px=256, antialias=False)) != 255).any(axis=2).sum()
    assert 0.3 < star / circle < 0.6  # a star covers much less than its circumscribed disc


def test_wider_shapes_datasets_draw_only_the_names_asked_for():
    stars = Shapes(40, seed=1, split="all", shapes=("star",))
    assert {stars.attributes(i)["shape"] for i in range(40)} == {"star"}
    assert all("star" in caption for caption in stars.captions)
    extra = Shapes(60, seed=1, split="all", colours=tuple(EXTRA_COLOURS))
    assert {extra.attributes(i)["colour"] for i in range(60)} == set(EXTRA_COLOURS)
    item = extra[0]
    rgb = ALL_COLOURS[extra.attributes(0)["colour"]]
    assert (extra.pixels(0).reshape(-1, 3) == rgb).all(axis=1).any() and item["image"].shape == (3, 64, 64)
    held = Shapes(40, seed=1, split="test", shapes=("triangle", "star"))  # only the HELD_OUT pairs among those asked
    assert {(held.attributes(i)["colour"], held.attributes(i)["shape"]) for i in range(40)} == {("red", "triangle")}
    train = Shapes(400, seed=2, split="train", shapes=ALL_SHAPES)
    pairs = {(train.attributes(i)["colour"], train.attributes(i)["shape"]) for i in range(400)}
    assert not pairs & set(HELD_OUT)
    assert parse_caption("a large navy star in the top left") == {"colour": "navy", "shape": "star", "size": "large", "position": "top left"}


def test_scenes_are_deterministic_distinct_cells_and_captioned_truthfully():
    a, b = Scenes(50, seed=4), Scenes(200, seed=4)
    assert np.array_equal(a.pixels(7), b.pixels(7)) and a.caption(7) == b.caption(7)
    counts = set()
    for i in range(50):
        objects = a.objects(i)
        counts.add(len(objects))
        assert len({o["position"] for o in objects}) == len(objects)  # one shape per cell
        assert not {(o["colour"], o["shape"]) for o in objects} & set(HELD_OUT)
        assert [parse_caption(part) for part in a.caption(i).split(" and ")] == objects
        ink = (a.pixels(i) != 255).any(axis=2)
        for o in objects:  # every named shape has ink in its cell
            row, col = divmod(POSITIONS.index(o["position"]), 3)
            assert ink[round(row * 64 / 3):round((row + 1) * 64 / 3), round(col * 64 / 3):round((col + 1) * 64 / 3)].any()
    assert counts == {1, 2, 3}
    shapes_seen = {o["shape"] for i in range(50) for o in a.objects(i)}
    assert "star" in shapes_seen and len(shapes_seen) >= 7
    assert a[0]["image"].shape == (3, 64, 64) and a.tensors().shape == (50, 3, 64, 64)
