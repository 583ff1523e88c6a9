"""The `sdlearn` command line.

    sdlearn generate "a large red circle in the top left" --steps 25 --seed 0 --out circle.png
    sdlearn generate "a cat" --model path/to/stable-diffusion-v1-5 --sampler euler --guidance 7.5 \\
        --negative "blurry" --height 512 --width 512 --device cuda --out cat.png

`--model` takes a diffusers-format pipeline folder, a single-file checkpoint (.safetensors,
or a tensors-only .ckpt) or a hub id (see sdlearn.pipeline.loading), and defaults to
the course's mini-SD in data/mini-sd (made by `make train-mini-sd`). Also runnable as
`python -m sdlearn ...`. Returns exit status 0 on success, 2 for bad input.
"""

import argparse
import sys
import time
from pathlib import Path

from PIL import Image

DEFAULT_MODEL = "mini-sd"  # under sdlearn.datasets.data_dir()
MAKE_TARGET = "train-mini-sd"


class CLIError(Exception):
    """Bad input: printed as one line, exit status 2."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sdlearn", description="sdlearn: Stable Diffusion from the ground up.")
    commands = parser.add_subparsers(dest="command", title="commands")
    commands.required = True

    gen = commands.add_parser("generate", help="make an image from a prompt", description="Make an image from a text prompt.")
    gen.add_argument("prompt", help='what to draw, e.g. "a large red circle in the top left"')
    gen.add_argument("--out", required=True, type=Path, help="where to write the image (.png, .jpg, ...)")
    gen.add_argument("--model", default=None, help="a diffusers pipeline folder, a .safetensors/.ckpt file or a hub id (default: data/mini-sd)")
    gen.add_argument("--steps", type=int, default=25, help="sampler steps (default 25)")
    gen.add_argument("--seed", type=int, default=None, help="random seed (default: a fresh one, printed so you can repeat it)")
    gen.add_argument("--sampler", default=None, help="ddpm, ddim, plms, euler, euler_a or dpmpp_2m (default: the model's own)")
    gen.add_argument("--guidance", type=float, default=7.5, help="classifier-free guidance scale (default 7.5; <= 1 turns it off)")
    gen.add_argument("--negative", default=None, help="negative prompt: what the image should not look like")
    gen.add_argument("--height", type=int, default=None, help="image height in pixels (default: the model's size)")
    gen.add_argument("--width", type=int, default=None, help="image width in pixels (default: the model's size)")
    gen.add_argument("--eta", type=float, default=0.0, help="DDIM's eta (0 = deterministic; only with --sampler ddim)")
    gen.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available, else cpu)")
    gen.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    gen.add_argument("--quiet", action="store_true", help="no progress bar or summary")
    return parser


def resolve_model(model: str | None) -> str | Path:
    """The --model source as given; the default mini-SD with a message naming the make target when missing."""
    if model is not None:
        return model  # a path or a hub id: load_pipeline tells them apart
    from sdlearn.datasets import data_dir  # imported here: keeps `sdlearn --help` fast

    path = data_dir() / DEFAULT_MODEL
    if not (path / "model_index.json").is_file():
        raise CLIError(
            f"The default model {path} does not exist yet. Train it with `make {MAKE_TARGET}` from the repository "
            "root, or pass --model FOLDER (a diffusers-format Stable Diffusion folder)."
        )
    return path


def resolve_device(name: str | None, torch):
    """--device as a torch.device: CUDA when available by default; a clear error for a device we lack."""
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise CLIError(f"--device {name!r} is not a device torch knows ({exc}); use cpu or cuda.") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CLIError("--device cuda, but this torch sees no CUDA device. Use --device cpu (see README.md, \"Using a GPU\").")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise CLIError("--device mps, but this torch sees no Apple GPU. Use --device cpu.")
    return device


def check_out(out: Path, overwrite: bool) -> None:
    """Refuse to replace a file, to write into a missing folder, or to guess an unknown image format."""
    if out.is_dir():
        raise CLIError(f"{out} is a folder; --out must be an image file name such as image.png.")
    if out.exists() and not overwrite:
        raise CLIError(f"{out} already exists. Choose another --out or pass --overwrite.")
    if not out.parent.is_dir():
        raise CLIError(f"The folder {out.parent} does not exist; create it first or choose another --out.")
    Image.init()
    if out.suffix.lower() not in Image.EXTENSION:
        raise CLIError(f"{out} has no image extension PIL can write (e.g. .png or .jpg).")


def generate(args) -> int:
    check_out(args.out, args.overwrite)
    if args.steps < 1:
        raise CLIError(f"--steps must be at least 1, got {args.steps}.")
    model = resolve_model(args.model)

    import torch  # imported here: keeps `sdlearn --help` fast

    from sdlearn.pipeline.loading import load_pipeline

    device = resolve_device(args.device, torch)
    seed = args.seed if args.seed is not None else int(torch.randint(0, 2**31 - 1, ()).item())
    start = time.perf_counter()
    pipe = load_pipeline(model, device=device)
    image = pipe.text_to_image(
        args.prompt,
        negative_prompt=args.negative,
        height=args.height,
        width=args.width,
        steps=args.steps,
        guidance_scale=args.guidance,
        sampler=args.sampler,
        eta=args.eta,
        seed=seed,
        progress=not args.quiet,
    )[0]
    check_out(args.out, args.overwrite)  # again: the file may have appeared while sampling
    image.save(args.out)
    if not args.quiet:
        sampler = args.sampler or pipe.default_sampler
        print(f"{args.out}: {image.width}x{image.height}, {sampler}, {args.steps} steps, seed {seed}, "
              f"{time.perf_counter() - start:.1f} s")
    return 0


def main(argv=None) -> int:
    """Entry point of the `sdlearn` command (and of `python -m sdlearn`)."""
    args = build_parser().parse_args(argv)
    try:
        if args.command == "generate":
            return generate(args)
    except (CLIError, ValueError, FileNotFoundError, FileExistsError) as exc:
        print(f"sdlearn {args.command}: error: {exc}", file=sys.stderr)
        return 2
    return 2  # unreachable: argparse requires a known command


if __name__ == "__main__":
    raise SystemExit(main())
