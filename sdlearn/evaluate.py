"""Scoring the course's generators with the referee (sdlearn.referee), and the command line.

A pixel-space DDPM, asked for the colour, shape and size of scene i (`attribute_set`):

    clean rate = mean_i clean(x_i)                                       (referee.is_clean_shape)
    asked rate = mean_i [clean(x_i) and read(x_i)_h = asked_i,h for h in colour, shape, size]

A text-to-image pipeline, given prompts that name all four attributes (`prompt_set`):

    accuracy_h = mean_i [read(x_i)_h = asked_i,h]    per head h, and for all four at once  (referee.faithfulness)

on prompts of the 28 training (colour, shape) pairs and, separately, of the four HELD_OUT
pairs (compositional generalisation: were colour and shape both right?), and beside them

    clean and as asked = mean_i [clean(x_i) and read(x_i)_h = asked_i,h for every h]   (referee.clean_and_asked)

The referee's own error on generated images: every report also gives how often the
classifier and a second judge that reads by rendering (referee.match_render) read the same
attributes (referee.judges_agreement); `classifier_report` gives the same on real renders.

Command line:

    python -m sdlearn.evaluate classifier            accuracy per head on fresh renders (64 and 32 px)
    python -m sdlearn.evaluate ddpm [--model data/ddpm-shapes] [--samples 200]
                                                     clean-shape rate per sampler at 10/25/50 steps
                                                     (a conditional model is asked for the colour,
                                                     shape and size of attribute_set(); the JSON
                                                     adds its unconditional DDIM-50 rate)
    python -m sdlearn.evaluate text-to-image [--model data/mini-sd] [--n 200] [--heldout 100]
                                                     faithfulness per sampler, training and held-out pairs;
                                                     and what it draws when asked for a star, a word
                                                     it was never taught (`unknown_word`)

    python -m sdlearn.evaluate dit --model data/dit-shapes [--n 200] [--steps 2 4 8 25]
                                                     a class-conditional DiT (lesson 14) asked for each of
                                                     its 32 classes in turn: colour, shape and both right,
                                                     per step count of the folder's sampler

Without --guidance, ddpm and text-to-image use the scale the model's training.json records
(`recommended_guidance`), else 1 (DDPM) or TEXT_TO_IMAGE_GUIDANCE (4).

The referee's names (is_clean_shape, classify, faithfulness, ...) were defined here before
sdlearn.referee existed; they are re-exported, so `from sdlearn.evaluate import ...` still works.
"""

import json
import sys
import time
from pathlib import Path
from typing import Mapping, Sequence

import torch

from sdlearn import ddpm
from sdlearn.datasets import Shapes, data_path
from sdlearn.ddpm import recommended_guidance
from sdlearn.doctor import cpu_name
from sdlearn.referee import (  # noqa: F401 (re-exported)
    CONFIDENCE,
    DEAD_ZONE,
    DEFAULT_FOLDER,
    EVAL_SEED,
    HEADS,
    MAKE_TARGET,
    MAX_RENDER_ERROR,
    MAX_STRAY,
    REFEREE_SHAPES,
    STRAY_LEVEL,
    ClassifierConfig,
    CleanShapeScores,
    Predictions,
    ShapesClassifier,
    as_batch,
    classify,
    clean_and_asked,
    clean_shape_scores,
    faithfulness,
    format_faithfulness,
    is_clean_shape,
    judges_agreement,
    load_classifier,
    match_render,
    render_accuracy,
    render_errors,
)

TEXT_TO_IMAGE_GUIDANCE = 4.0  # for a text-to-image model whose folder records no guidance scale


# ---------------------------------------------------------------------------------------
# The referee itself, on fresh renders
# ---------------------------------------------------------------------------------------


def classifier_report(n: int = 500, seed: int = EVAL_SEED, classifier=None, sizes=(64, 32)) -> dict:
    """{"64px": {"accuracy": {head: rate}, "clean_rate": rate, "judges_agree": {...}, "seconds": s}, "32px": ...}:
    the referee on n fresh renders of all 40 (colour, shape) pairs it knows (the star among them)
    per image size: the classifier's accuracy per head, the fraction is_clean_shape passes, and
    its agreement with match_render."""
    report = {}
    for size in sizes:
        began = time.perf_counter()
        renders = Shapes(n, seed=seed, size=size, split="all", shapes=REFEREE_SHAPES).tensors()
        scores = clean_shape_scores(renders, classifier)
        report[f"{size}px"] = {
            "accuracy": render_accuracy(n, seed, size, classifier),
            "clean_rate": scores.rate,
            "judges_agree": judges_agreement(renders, predictions=scores.predictions),
            "seconds": round(time.perf_counter() - began, 1),
        }
    return report


def format_classifier_report(report: Mapping, n: int, seed: int) -> str:
    lines = []
    for size, row in report.items():
        cells = "  ".join(f"{name} {100 * value:.1f}%" for name, value in row["accuracy"].items())
        lines.append(f"{size[:-2]} px, {n} fresh renders (seed {seed}): {cells}  | clean-shape rate "
                     f"{100 * row['clean_rate']:.1f}%  | judges agree {100 * row['judges_agree']['all']:.1f}%  ({row['seconds']:.1f} s)")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------
# The pixel-space DDPM: clean shapes, and the attributes it was asked for
# ---------------------------------------------------------------------------------------


def ddpm_clean_rates(model=None, samplers=None, steps=(10, 25, 50), n: int = 200, seed: int = 0, classifier=None,
                     progress: bool = True, guidance_scale: float | None = None, unconditional: bool = False) -> dict:
    """{(sampler, steps): {"clean_rate", "asked_rate", "seconds_per_image", "judges_agree"}} for the pixel-space DDPM in `model`.

    An attribute-conditional model (the shipped one) is asked for the colour, shape and size
    of `attribute_set(n)`, with `guidance_scale` (default: the one its training.json
    recommends); asked_rate is the fraction of images that are clean AND show all three asked
    attributes. For an unconditional model, or with unconditional=True (a conditional model
    asked for nothing), asked_rate is None.
    """
    folder = data_path(ddpm.DEFAULT_FOLDER, ddpm.MAKE_TARGET) if model is None else Path(model)
    unet, schedule_config = ddpm.load_ddpm(folder)
    conditional = ddpm.is_conditional(unet) and not unconditional
    asked = attribute_set(n) if conditional else None
    if guidance_scale is None:
        guidance_scale = recommended_guidance(folder) if conditional else 1.0
    samplers = ddpm.SAMPLER_NAMES if samplers is None else samplers
    results = {}
    for name in samplers:
        for k in steps:
            began = time.perf_counter()
            images = ddpm.sample(unet, name, n, seed=seed, steps=k, schedule_config=schedule_config, progress=progress,
                                 attributes=asked, guidance_scale=guidance_scale)
            seconds = (time.perf_counter() - began) / n
            scores = clean_shape_scores(images, classifier)
            asked_rate = None
            if conditional:
                right = [all(read[h] == want[h] for h in want) for read, want in zip(scores.predictions.names(), asked)]
                asked_rate = (scores.clean & torch.tensor(right)).float().mean().item()
            results[(name, k)] = {"clean_rate": scores.rate, "asked_rate": asked_rate, "seconds_per_image": seconds,
                                  "judges_agree": judges_agreement(images, predictions=scores.predictions)}
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
    if all("judges_agree" in row for row in results.values()):
        lines.append(f"images (of {n}) on which the classifier and the render-matching judge read the same four attributes")
        for name in samplers:
            counts = [f"{round(n * results[name, k]['judges_agree']['all'])}/{n}" for k in steps]
            lines.append(f"{name:<10}" + "".join(f"{count:>26}" for count in counts))
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------
# Text-to-image: faithfulness to the prompt
# ---------------------------------------------------------------------------------------


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
def generate(pipe, prompts: Sequence[str], sampler: str = "ddim", steps: int = 25,
             guidance_scale: float = TEXT_TO_IMAGE_GUIDANCE, negative_prompt=None, seed: int = 0, batch_size: int = 50,
             progress: bool = False) -> torch.Tensor:
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
                         guidance_scale: float = TEXT_TO_IMAGE_GUIDANCE, seed: int = 0, classifier=None,
                         progress: bool = False) -> dict:
    """Faithfulness of a text-to-image pipeline, per sampler: the table on n training-pair prompts
    naming all four attributes, and on n_heldout prompts of the HELD_OUT pairs (with the rate at
    which colour and shape are both right), plus seconds per image.

    Beside the per-attribute figures: the "clean and as asked" rate (referee.clean_and_asked: a
    clean shape with all four attributes right), on both prompt sets, and how often the
    classifier and the render-matching judge agree on the training-pair images
    (referee.judges_agreement, per head and "all")."""
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
            "train_pairs_clean_and_asked": clean_and_asked(images, requested, classifier),
            "held_out": faithfulness(held, held_requested, classifier),
            "held_out_pair_accuracy": pair_accuracy(held, held_requested, classifier),
            "held_out_clean_and_asked": clean_and_asked(held, held_requested, classifier),
            "judges_agree": judges_agreement(images, classifier),
            "seconds_per_image": seconds,
        }
    return report


def unknown_word_report(pipe, word: str = "star", n: int = 100, sampler: str = "ddim", steps: int = 25,
                        guidance_scale: float = TEXT_TO_IMAGE_GUIDANCE, seed: int = 0, classifier=None,
                        progress: bool = False) -> dict:
    """What a model draws when asked for a shape it was never taught: n prompts naming all four
    attributes with `word` as the shape ("a large red star in the top left"; the eight colours,
    every size and place), read by the referee, which knows the star.

    {"word", "n", "sampler", "read_as": {shape: fraction}, "drawn_rate": the fraction read as
    `word`, "clean_drawn_rate": the fraction that is a clean shape read as `word`}. A model that
    never saw the word should draw it about never (mini-SD draws one of the shapes it knows).
    """
    if word not in REFEREE_SHAPES:
        raise ValueError(f"The referee cannot read {word!r}; it knows {', '.join(REFEREE_SHAPES)}.")
    dataset = Shapes(n, seed=EVAL_PROMPT_SEED, split="all", shapes=(word,), captions="full")
    images = generate(pipe, list(dataset.captions), sampler, steps, guidance_scale, seed=seed + 2000, progress=progress)
    scores = clean_shape_scores(images, classifier)
    read = [r["shape"] for r in scores.predictions.names()]
    return {
        "word": word, "n": n, "sampler": sampler,
        "read_as": {shape: read.count(shape) / n for shape in REFEREE_SHAPES},
        "drawn_rate": read.count(word) / n,
        "clean_drawn_rate": sum(r == word and bool(c) for r, c in zip(read, scores.clean.tolist())) / n,
    }


def concept_prompts(concept, n: int, sizes=None, placeholder: bool = False, seed: int = EVAL_PROMPT_SEED) -> tuple:
    """n prompts naming all four attributes of scenes of `concept` (a sdlearn.concepts.Concept),
    in the given sizes (default: the concept's own), and what each asks for: (prompts, requested).
    With placeholder=True the concept's words are its textual-inversion placeholder ("a large red <star> ...")."""
    dataset, keep = concept.images(n, seed) if sizes is None else _sized(concept, n, sizes, seed)
    requested = [dataset.attributes(i) for i in keep]
    return [concept.caption(r, placeholder=placeholder) for r in requested], requested


def _sized(concept, n, sizes, seed):
    from dataclasses import replace

    return replace(concept, sizes=tuple(sizes)).images(n, seed)


def concept_report(pipe, concept, n: int = 100, n_small: int = 0, placeholder: bool = False, steps: int = 25,
                   guidance_scale: float = TEXT_TO_IMAGE_GUIDANCE, seed: int = 0, classifier=None) -> dict:
    """How well a pipeline draws `concept`: faithfulness on n prompts of it at its largest size
    (for the star: "a large <colour> star <position>", every colour and place), on n_small
    prompts of small ones (if the concept has small ones); {"large": ..., "small": ...}, each
    with the faithfulness table (its "shape" row: how often the concept's shape was drawn)
    and the clean-and-as-asked rate."""
    large = "large" if "large" in concept.sizes else concept.sizes[-1]
    report = {}
    for label, sizes, count, offset in (("large", (large,), n, 3000), ("small", ("small",), n_small, 4000)):
        if count == 0 or sizes[0] not in concept.sizes:
            continue
        prompts, requested = concept_prompts(concept, count, sizes, placeholder)
        images = generate(pipe, prompts, "ddim", steps, guidance_scale, seed=seed + offset)
        table = faithfulness(images, requested, classifier)
        report[label] = {"prompts": prompts[:3], "faithfulness": table,
                         "clean_and_asked": clean_and_asked(images, requested, classifier)}
    return report


def original_prompts_report(pipe, n: int = 200, steps: int = 25, guidance_scale: float = TEXT_TO_IMAGE_GUIDANCE,
                            seed: int = 0, classifier=None) -> dict:
    """Faithfulness on the n prompts `python -m sdlearn.evaluate text-to-image` grades (DDIM): what an
    adapter must not break."""
    prompts, requested = prompt_set(n, "train")
    images = generate(pipe, prompts, "ddim", steps, guidance_scale, seed=seed)
    return {"faithfulness": faithfulness(images, requested, classifier),
            "clean_and_asked": clean_and_asked(images, requested, classifier)}


def format_concept_report(report: Mapping, title: str) -> str:
    heads = (*HEADS, "all")
    lines = [title, f"{'':<28}" + "".join(f"{h:>10}" for h in heads) + f"{'clean+asked':>13}"]
    for name, row in report.items():
        cells = "".join(f"{100 * row['faithfulness'][h]['accuracy']:9.1f}%" for h in heads)
        lines.append(f"{name:<28}{cells}{100 * row['clean_and_asked']['accuracy']:12.1f}%")
    return "\n".join(lines)


@torch.no_grad()
def inpainting_report(pipe, images, prompts: Sequence[str], masks, colours: Sequence[str], steps: int = 25,
                      guidance_scale: float = TEXT_TO_IMAGE_GUIDANCE, sampler: str = "ddim", seed: int = 0,
                      classifier=None) -> dict:
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



def format_text_to_image_report(report: Mapping, n: int, n_heldout: int, steps: int, guidance_scale: float) -> str:
    heads = (*HEADS, "all")
    lines = [f"faithfulness: {n} prompts naming all four attributes ({steps} steps, guidance {guidance_scale:g}); "
             f"held out: {n_heldout} prompts of the HELD_OUT pairs"]
    lines.append(f"{'sampler':<10}" + "".join(f"{h:>10}" for h in heads) + f"{'clean+asked':>13}{'held-out pair':>15}"
                 f"{'clean+asked':>13}{'s/image':>9}")
    for name, row in report.items():
        cells = "".join(f"{100 * row['train_pairs'][h]['accuracy']:9.1f}%" for h in heads)
        clean = f"{100 * row['train_pairs_clean_and_asked']['accuracy']:12.1f}%"
        held_clean = f"{100 * row['held_out_clean_and_asked']['accuracy']:12.1f}%"
        lines.append(f"{name:<10}{cells}{clean}{100 * row['held_out_pair_accuracy']:14.1f}%{held_clean}"
                     f"{row['seconds_per_image']:9.3f}")
    lines.append("clean+asked: a clean shape (is_clean_shape) with all four attributes as asked (held out: on its prompts)")
    lines.append("the classifier and the render-matching judge read the same attributes (training-pair images):")
    lines.append(f"{'sampler':<10}" + "".join(f"{h:>10}" for h in heads))
    for name, row in report.items():
        lines.append(f"{name:<10}" + "".join(f"{100 * row['judges_agree'][h]:9.1f}%" for h in heads))
    return "\n".join(lines)


def format_unknown_word_report(row: Mapping) -> str:
    read = ", ".join(f"{shape} {100 * rate:.0f}%" for shape, rate in row["read_as"].items())
    return (f"asked for a {row['word']} ({row['n']} prompts, {row['sampler']}): drawn {100 * row['drawn_rate']:.1f}% "
            f"of the time (a clean {row['word']}: {100 * row['clean_drawn_rate']:.1f}%); read as {read}")


# ---------------------------------------------------------------------------------------
# The command line
# ---------------------------------------------------------------------------------------


DIT_GUIDANCE = 4.0  # diffusers' DiTPipeline's default guidance scale
DIT_STEPS = (2, 4, 8, 25)  # few steps are where flow matching and DDIM differ


def dit_report(pipe, n: int = 200, steps=DIT_STEPS, guidance_scale: float = DIT_GUIDANCE, seed: int = 0,
               classifier=None, batch_size: int = 50) -> dict:
    """Colour, shape and both right for n samples of a class-conditional DiT, per step count.

    Sample i asks for class i mod 32 (every class as often as n allows), in batches of
    batch_size drawn with seed + batch index; the referee reads colour and shape
    (`faithfulness`). Returns {steps: {"colour", "shape", "both", "seconds"}}.
    """
    names = [pipe.id2label[i % len(pipe.id2label)] for i in range(n)]
    requested = [dict(zip(("colour", "shape"), name.split())) for name in names]
    report = {}
    for k in steps:
        began = time.perf_counter()
        images = torch.cat([pipe.generate(names[i:i + batch_size], guidance_scale=guidance_scale, steps=k,
                                          seed=seed + i // batch_size, output_type="tensor")
                            for i in range(0, n, batch_size)]) * 2 - 1  # (n, 3, 64, 64) in [-1, 1]
        scores = faithfulness(images, requested, classifier)
        report[k] = {"colour": scores["colour"]["accuracy"], "shape": scores["shape"]["accuracy"],
                     "both": scores["all"]["accuracy"], "seconds": round(time.perf_counter() - began, 1)}
    return report


def format_dit_report(report: Mapping, n: int, sampler: str, guidance_scale: float) -> str:
    lines = [f"DiT, {n} samples over its classes, {sampler}, guidance {guidance_scale:g}: the referee reads",
             f"{'steps':>6} {'colour':>8} {'shape':>8} {'both':>8}"]
    for k, row in report.items():
        lines.append(f"{k:>6} {100 * row['colour']:7.1f}% {100 * row['shape']:7.1f}% {100 * row['both']:7.1f}%")
    return "\n".join(lines)


MAX_COUNT = 100_000  # images per figure the command accepts (200 take minutes; far more would run for days)


def build_parser():
    """The command line; every number is checked by its type (one line and exit status 2 when wrong)."""
    from sdlearn.cli import FINITE_FLOAT, POSITIVE_INT, SEED, ArgumentParser, int_range

    count = int_range(1, MAX_COUNT)
    sampler_names = ddpm.SAMPLER_NAMES
    parser = ArgumentParser(prog="python -m sdlearn.evaluate", description="Score the shapes classifier and the course's generators.")
    parser.add_argument("--threads", type=POSITIVE_INT, default=None, help="torch CPU threads (default: torch's choice; 1 is fastest on a busy machine)")
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser("classifier", help="accuracy of the classifier per head on fresh renders")
    p.add_argument("--classifier", default=None, help="classifier folder (default data/shapes-classifier)")
    p.add_argument("--n", type=count, default=500, help="renders per image size")
    p.add_argument("--seed", type=SEED, default=EVAL_SEED)
    p.add_argument("--json", type=Path, default=None, help="also write the report to this JSON file")
    p = commands.add_parser("ddpm", help="clean-shape rate of the pixel-space DDPM per sampler and step count")
    p.add_argument("--model", default=None, help="DDPM folder (default data/ddpm-shapes)")
    p.add_argument("--classifier", default=None, help="classifier folder (default data/shapes-classifier)")
    p.add_argument("--samples", type=count, default=200)
    p.add_argument("--steps", type=POSITIVE_INT, nargs="+", default=[10, 25, 50])
    p.add_argument("--samplers", nargs="+", default=None, choices=sampler_names, metavar="SAMPLER", help=f"default: all six ({', '.join(sampler_names)})")
    p.add_argument("--guidance", type=FINITE_FLOAT, default=None, help="guidance scale of a conditional model (default: its recorded choice)")
    p.add_argument("--seed", type=SEED, default=0)
    p.add_argument("--json", type=Path, default=None, help="also write the table to this JSON file")
    p = commands.add_parser("text-to-image", help="faithfulness of a text-to-image pipeline (default data/mini-sd) per sampler")
    p.add_argument("--model", default=None, help="any source sdlearn.load_pipeline accepts (default data/mini-sd)")
    p.add_argument("--classifier", default=None, help="classifier folder (default data/shapes-classifier)")
    p.add_argument("--samplers", nargs="+", default=["ddim"], choices=sampler_names, metavar="SAMPLER", help=f"sampler names (default: ddim; {', '.join(sampler_names)})")
    p.add_argument("--n", type=count, default=200, help="prompts of training pairs")
    p.add_argument("--heldout", type=count, default=100, help="prompts of the held-out pairs, and as many asking for a star (a word mini-SD was never taught)")
    p.add_argument("--steps", type=POSITIVE_INT, default=25)
    p.add_argument("--guidance", type=FINITE_FLOAT, default=None, help="guidance scale (default: the model's recorded choice, else 4)")
    p.add_argument("--seed", type=SEED, default=0)
    p.add_argument("--json", type=Path, default=None, help="also write the report to this JSON file")
    p = commands.add_parser("dit", help="colour and shape accuracy of a class-conditional DiT (lesson 14) per step count")
    p.add_argument("--model", required=True, help="a DiTPipeline folder (e.g. data/dit-shapes, data/dit-flow-shapes)")
    p.add_argument("--classifier", default=None, help="classifier folder (default data/shapes-classifier)")
    p.add_argument("--n", type=count, default=200, help="samples, over all classes in turn")
    p.add_argument("--steps", type=POSITIVE_INT, nargs="+", default=list(DIT_STEPS))
    p.add_argument("--guidance", type=FINITE_FLOAT, default=DIT_GUIDANCE, help=f"guidance scale (default {DIT_GUIDANCE:g}, diffusers' DiTPipeline's)")
    p.add_argument("--seed", type=SEED, default=0)
    p.add_argument("--json", type=Path, default=None, help="also write the report to this JSON file")
    p = commands.add_parser("concept", help="what a personalise run (LoRA, embedding, DreamBooth, hypernetwork) taught, and what it broke")
    p.add_argument("--adapter", required=True, help="a folder written by python -m sdlearn.recipes.personalise (e.g. data/lora-star)")
    p.add_argument("--base", default=None, help="the base pipeline (default: the one the run's training.json names)")
    p.add_argument("--classifier", default=None, help="classifier folder (default data/shapes-classifier)")
    p.add_argument("--n", type=count, default=100, help="prompts of the concept at its largest size")
    p.add_argument("--small", type=int_range(0, MAX_COUNT), default=50, help="prompts of small ones (if the concept comes small)")
    p.add_argument("--original", type=count, default=200, help="prompts of mini-SD's own evaluation (the drift)")
    p.add_argument("--steps", type=POSITIVE_INT, default=25)
    p.add_argument("--guidance", type=FINITE_FLOAT, default=None, help="guidance scale (default: the base model's recorded choice, else 4)")
    p.add_argument("--seed", type=SEED, default=0)
    p.add_argument("--json", type=Path, default=None, help="also write the report to this JSON file")
    return parser


def prepare(args) -> dict:
    """Everything the evaluation needs, loaded and checked before it starts (a bad argument costs
    seconds, not the evaluation): the classifier, the model, its schedule against --steps, --json."""
    from sdlearn.cli import writable_file
    from sdlearn.diffusion.scheduler_configs import sampler_from_config

    if getattr(args, "json", None) is not None:
        writable_file(args.json, "--json")
    prepared = {"classifier": load_classifier(args.classifier)}  # None: the shipped data/shapes-classifier
    if args.command == "ddpm":
        model = data_path(ddpm.DEFAULT_FOLDER, ddpm.MAKE_TARGET) if args.model is None else Path(args.model)
        if not model.is_dir():
            raise FileNotFoundError(f"--model {model}: no such folder (expected a DDPM folder with unet/ and scheduler/).")
        _, schedule_config = ddpm.load_ddpm(model)
        for name in args.samplers or ddpm.SAMPLER_NAMES:
            for k in args.steps:
                sampler_from_config(schedule_config, name).set_timesteps(k)  # too many steps for the schedule: a clear error
        prepared["model"] = model
    elif args.command == "text-to-image":
        from sdlearn.pipeline.loading import load_pipeline  # the pipeline pulls in every model class

        model = args.model if args.model is not None else data_path("mini-sd", "train-mini-sd")
        pipe = load_pipeline(model)
        for name in args.samplers:
            sampler_from_config(pipe.scheduler_config, name).set_timesteps(args.steps)
        prepared.update(model=model, pipe=pipe)
    elif args.command == "dit":
        from sdlearn.pipeline.dit import DiTPipeline

        pipe = DiTPipeline.from_pretrained(args.model)
        if not pipe.id2label or not all(len(name.split()) == 2 for name in pipe.id2label.values()):
            raise ValueError(f"--model {args.model}: its class names should read like 'red circle' (colour shape) for "
                             "the referee; this evaluation is for sdlearn.recipes.dit's models.")
        for k in args.steps:
            pipe.make_sampler().set_timesteps(k)
        prepared.update(model=args.model, pipe=pipe)
    elif args.command == "concept":
        from sdlearn.pipeline.loading import load_pipeline
        from sdlearn.concepts import CONCEPTS, read_record

        record = read_record(args.adapter)
        if record.get("images") or record["concept"] not in CONCEPTS:
            raise ValueError(f"{args.adapter} taught {record['concept']!r}, images of your own; the referee grades only "
                             f"the renderer's concepts ({', '.join(CONCEPTS)}).")
        recorded = Path(record["base_model"])  # data/mini-sd, or the --base the run was given
        if args.base is not None:
            model = args.base
        elif recorded.parts[:1] == ("data",):
            model = data_path(recorded.relative_to("data").as_posix(), "train-mini-sd")
        else:
            model = recorded
        prepared.update(model=model, pipe=load_pipeline(model), record=record)
    return prepared


def write_json(path: Path, report: dict) -> None:
    """The report, written atomically (a failed write keeps an older file whole)."""
    from sdlearn.models.files import write_text

    write_text(path, json.dumps(report, indent=2) + "\n")


def main(argv=None) -> int:
    from sdlearn.cli import USER_ERRORS, report_error

    parser = build_parser()
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        prepared = prepare(args)
    except USER_ERRORS as exc:
        report_error(f"{parser.prog} {args.command}", exc)
        return 2
    classifier = prepared["classifier"]
    command = "python -m sdlearn.evaluate " + " ".join(sys.argv[1:] if argv is None else argv)  # what the JSON records
    if args.command == "classifier":
        report = classifier_report(args.n, args.seed, classifier)
        print(format_classifier_report(report, args.n, args.seed))
        if args.json is not None:
            return save_report(parser.prog, args.json, {"command": command, "torch_threads": torch.get_num_threads(), "cpu": cpu_name(),
                                                        "n": args.n, "seed": args.seed, "sizes": report})
        return 0
    if args.command == "ddpm":
        began = time.perf_counter()
        model = prepared["model"]
        guidance = args.guidance if args.guidance is not None else recommended_guidance(model)
        results = ddpm_clean_rates(model, args.samplers, tuple(args.steps), args.samples, args.seed, classifier,
                                   guidance_scale=guidance)
        print(format_clean_rates(results, args.samples, guidance))
        if args.json is not None:
            rows = [{"sampler": name, "steps": k, **row} for (name, k), row in results.items()]
            report = {"command": command, "samples": args.samples, "seed": args.seed, "torch_threads": torch.get_num_threads(), "cpu": cpu_name(),
                      "seconds": round(time.perf_counter() - began, 1), "results": rows}
            if any(row["asked_rate"] is not None for row in rows):
                report["guidance_scale"] = guidance
                report["unconditional"] = ddpm_clean_rates(model, ["ddim"], (50,), args.samples, args.seed, classifier,
                                                           guidance_scale=1.0, unconditional=True)[("ddim", 50)]
            return save_report(parser.prog, args.json, report)
        return 0
    if args.command == "text-to-image":
        began = time.perf_counter()
        model, pipe = prepared["model"], prepared["pipe"]
        guidance = args.guidance if args.guidance is not None else recommended_guidance(model, default=TEXT_TO_IMAGE_GUIDANCE)
        report = text_to_image_report(pipe, args.samplers, args.n, args.heldout, args.steps, guidance, args.seed,
                                      classifier, progress=True)
        print(format_text_to_image_report(report, args.n, args.heldout, args.steps, guidance))
        unknown = unknown_word_report(pipe, "star", args.heldout, args.samplers[0], args.steps, guidance, args.seed,
                                      classifier, progress=True)
        print(format_unknown_word_report(unknown))
        if args.json is not None:
            out = {"command": command, "n": args.n, "heldout": args.heldout, "steps": args.steps, "guidance_scale": guidance,
                   "seed": args.seed, "torch_threads": torch.get_num_threads(), "cpu": cpu_name(),
                   "seconds": round(time.perf_counter() - began, 1), "samplers": report, "unknown_word": unknown}
            return save_report(parser.prog, args.json, out)
        return 0
    if args.command == "dit":
        began = time.perf_counter()
        pipe = prepared["pipe"]
        report = dit_report(pipe, args.n, tuple(args.steps), args.guidance, args.seed, classifier)
        print(format_dit_report(report, args.n, pipe.default_sampler, args.guidance))
        if args.json is not None:
            out = {"command": command, "model": str(args.model), "n": args.n, "sampler": pipe.default_sampler,
                   "guidance_scale": args.guidance, "seed": args.seed, "torch_threads": torch.get_num_threads(),
                   "cpu": cpu_name(), "seconds": round(time.perf_counter() - began, 1),
                   "results": [{"steps": k, **row} for k, row in report.items()]}
            return save_report(parser.prog, args.json, out)
        return 0
    if args.command == "concept":
        return concept_command(args, prepared, command, parser.prog)
    return 2


def concept_command(args, prepared: dict, command: str, prog: str) -> int:
    """`concept`: the base model and the adapted one on the concept's prompts and on the original ones."""
    from sdlearn.concepts import CONCEPTS, load_adapter

    began = time.perf_counter()
    model, pipe, record, classifier = prepared["model"], prepared["pipe"], prepared["record"], prepared["classifier"]
    concept = CONCEPTS[record["concept"]]
    guidance = args.guidance if args.guidance is not None else recommended_guidance(model, default=TEXT_TO_IMAGE_GUIDANCE)
    common = dict(steps=args.steps, guidance_scale=guidance, seed=args.seed, classifier=classifier)
    base = {"concept": concept_report(pipe, concept, args.n, args.small, **common),
            "original": original_prompts_report(pipe, args.original, **common)}
    load_adapter(pipe, args.adapter)
    placeholder = record["method"] == "textual-inversion"
    adapted = {"concept": concept_report(pipe, concept, args.n, args.small, placeholder=placeholder, **common),
               "original": original_prompts_report(pipe, args.original, **common)}
    drift = adapted["original"]["faithfulness"]["all"]["accuracy"] - base["original"]["faithfulness"]["all"]["accuracy"]
    rows = {f"base, {k} {concept.name}": v for k, v in base["concept"].items()}
    rows.update({f"{record['method']}, {k} {concept.name}": v for k, v in adapted["concept"].items()})
    rows.update({"base, original prompts": base["original"], f"{record['method']}, original prompts": adapted["original"]})
    print(format_concept_report(rows, f"{record['method']} on {concept.name} ({args.steps} steps DDIM, guidance {guidance:g}): "
                                      f"{args.n} prompts (+{args.small} small), {args.original} original prompts"))
    print(f"drift on the original prompts (all four right): {100 * drift:+.1f} points")
    if args.json is not None:
        report = {"command": command, "adapter": str(args.adapter), "method": record["method"], "concept": concept.name,
                  "n": args.n, "small": args.small, "original": args.original, "steps": args.steps, "guidance_scale": guidance,
                  "seed": args.seed, "torch_threads": torch.get_num_threads(), "cpu": cpu_name(),
                  "seconds": round(time.perf_counter() - began, 1), "base": base, "adapted": adapted,
                  "drift_points": round(100 * drift, 2)}
        return save_report(prog, args.json, report)
    return 0


def save_report(prog: str, path: Path, report: dict) -> int:
    """Write the JSON report; a write that fails now (the disk filled up during the run) is one line, status 1."""
    try:
        write_json(path, report)
    except OSError as exc:
        print(f"{prog}: error: the results above could not be written to {path}: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
