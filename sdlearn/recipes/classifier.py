"""Recipe: the shapes classifier that referees every generator (sdlearn.evaluate).

    python -m sdlearn.recipes.classifier --out data/shapes-classifier [--steps N] [--overwrite]

Training data: real renders of all 40 (colour, shape) pairs of the eight colours and
referee.REFEREE_SHAPES (mini-SD's four shapes and the star; split="all": the held-out pairs
included, because the referee must recognise what the generators are asked for), half at
64 px (seed 1, resized to 32 by the model itself) and half at 32 px (seed 2), so one
network reads both sizes. Augmentation: the dataset's own position jitter, plus Gaussian
pixel noise with a std drawn uniformly from [0, 0.06] per image (on the [-1, 1] scale).

    loss = sum over heads (colour, shape, size, position) of cross-entropy(logits, label)

trained with sdlearn.train.train (AdamW, cosine learning rate). At the end the recipe
measures the accuracy per head on 500 fresh renders (seed 1000, both sizes), and writes
config.json, model.safetensors and training.json (settings, times, accuracies) to --out.
"""

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from sdlearn.cli import POSITIVE_FLOAT, POSITIVE_INT, SEED, ArgumentParser, int_range, one_line
from sdlearn.datasets import Shapes
from sdlearn.models.files import write_text  # atomic: a failed write keeps the old file
from sdlearn.recipes import check_out_folder
from sdlearn.doctor import cpu_name
from sdlearn.referee import EVAL_SEED, HEADS, REFEREE_SHAPES, ClassifierConfig, ShapesClassifier, render_accuracy
from sdlearn.train import train

MAX_NOISE = 0.06  # largest std of the pixel noise added in training ([-1, 1] scale)


def render_pool(n: int, seed: int, size: int) -> tuple:
    """n renders as uint8 pixels (n, size, size, 3) (a quarter of the memory of floats) and labels {head: (n,)}."""
    dataset = Shapes(n, seed=seed, size=size, split="all", cache=False, shapes=REFEREE_SHAPES)
    pixels = torch.from_numpy(np.stack([dataset.pixels(i) for i in range(n)]))
    labels = {name: dataset.labels[:, i].clone() for i, name in enumerate(HEADS)}
    return pixels, labels


class RenderBatches:
    """data(step) -> a batch for train(): half 64 px, half 32 px renders, with light noise.

    Deterministic in (seed, step), so a run is reproducible and resumable.
    """

    def __init__(self, pools: dict, batch_size: int, seed: int = 0):
        self.pools, self.batch_size, self.seed = pools, batch_size, seed

    def __call__(self, step: int) -> dict:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
        batch = {}
        for key, (pixels, labels) in self.pools.items():
            index = torch.randint(len(pixels), (self.batch_size // 2,), generator=g)
            x = pixels[index].permute(0, 3, 1, 2).float() / 127.5 - 1.0  # (B/2, 3, S, S)
            std = MAX_NOISE * torch.rand(len(index), 1, 1, 1, generator=g)
            batch[key] = (x + std * torch.randn(x.shape, generator=g), {name: y[index] for name, y in labels.items()})
        return batch


def classifier_loss(model: ShapesClassifier, batch: dict) -> torch.Tensor:
    return sum(model.loss(x, labels) for x, labels in batch.values())


OUTPUTS = ("config.json", "model.safetensors", "training.json")


def main(argv=None) -> int:
    parser = ArgumentParser(prog="python -m sdlearn.recipes.classifier", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="output folder, e.g. data/shapes-classifier")
    parser.add_argument("--steps", type=POSITIVE_INT, default=3000)
    parser.add_argument("--batch-size", type=int_range(2), default=64, help="images per step, half of each size (at least 2)")
    parser.add_argument("--lr", type=POSITIVE_FLOAT, default=2e-3)
    parser.add_argument("--train-images", type=POSITIVE_INT, default=8000, help="renders per size in the training pool")
    parser.add_argument("--eval-images", type=POSITIVE_INT, default=500, help="fresh renders per size for the final accuracy")
    parser.add_argument("--seed", type=SEED, default=0)
    parser.add_argument("--overwrite", action="store_true", help="replace a classifier already in --out")
    parser.add_argument("--threads", type=POSITIVE_INT, default=None, help="torch CPU threads (default: torch's choice; 1 is fastest on a busy machine)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    try:  # before the minutes of rendering and training
        check_out_folder(args.out, OUTPUTS, "a classifier", args.overwrite)
    except (FileExistsError, OSError) as exc:
        print(f"{parser.prog}: error: {one_line(exc)}", file=sys.stderr)
        return 1

    wall, cpu = time.perf_counter(), time.process_time()
    pools = {"64px": render_pool(args.train_images, 1, 64), "32px": render_pool(args.train_images, 2, 32)}
    print(f"rendered {2 * args.train_images} training images in {time.perf_counter() - wall:.1f} s")

    torch.manual_seed(args.seed)
    model = ShapesClassifier(ClassifierConfig())
    history = train(
        model, classifier_loss, RenderBatches(pools, args.batch_size, args.seed), steps=args.steps, lr=args.lr,
        weight_decay=1e-4, lr_schedule="cosine", seed=args.seed, desc="classifier",
    )
    accuracy = {f"{size}px": render_accuracy(args.eval_images, EVAL_SEED, size, model) for size in (64, 32)}
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu

    model.save_pretrained(args.out, overwrite=args.overwrite)
    report = {
        "command": "python -m sdlearn.recipes.classifier " + " ".join(argv if argv is not None else sys.argv[1:]),
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "parameters": sum(p.numel() for p in model.parameters()),
        "final_loss_mean_of_50": float(np.mean(history.losses[-50:])),
        "train_seconds": round(history.seconds, 1),
        "wall_seconds": round(wall, 1),
        "cpu_seconds": round(cpu, 1),
        "torch_threads": torch.get_num_threads(),
        "cpu": cpu_name(),
        "accuracy_on_fresh_renders": {k: {h: round(a, 4) for h, a in v.items()} for k, v in accuracy.items()},
        "eval_seed": EVAL_SEED,
    }
    write_text(args.out / "training.json", json.dumps(report, indent=2) + "\n")
    for size, heads in accuracy.items():
        print(f"{size}: " + "  ".join(f"{h} {100 * a:.1f}%" for h, a in heads.items()))
    print(f"saved to {args.out}: {wall:.0f} s wall, {cpu:.0f} s CPU ({torch.get_num_threads()} threads)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
