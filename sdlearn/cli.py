"""The `sdlearn` command line.

    sdlearn generate "a large red circle in the top left" --steps 25 --seed 0 --out circle.png
    sdlearn generate "a cat" --model path/to/stable-diffusion-v1-5 --sampler euler --guidance 7.5 \\
        --negative "blurry" --height 512 --width 512 --device cuda --out cat.png
    sdlearn generate "a <star> in the top left" --lora my-lora/ --lora-scale 0.8 \\
        --embedding star.safetensors --hypernetwork shapes.pt --strength 0.5 --out star.png

Adapters (lesson 12) are read before sampling, each checked against the model:
`--lora` a diffusers/peft or kohya .safetensors file, or a folder holding
pytorch_lora_weights.safetensors (sdlearn.lora), scaled by `--lora-scale`; `--embedding` a
textual-inversion file (diffusers learned_embeds.safetensors, A1111 .safetensors or .pt;
repeatable), whose word the prompt can then use (sdlearn.textual_inversion); `--hypernetwork`
an A1111 hypernetwork .pt at `--strength` (sdlearn.hypernetwork).

`--model` takes a diffusers-format pipeline folder, a single-file checkpoint (.safetensors,
or a tensors-only .ckpt) or a hub id (see sdlearn.pipeline.loading), and defaults to
the course's mini-SD in data/mini-sd (made by `make train-mini-sd`). Also runnable as
`python -m sdlearn ...`. Returns exit status 0 on success, 2 for bad input.
"""

import argparse
import math
import re
import sys
import time
from pathlib import Path

from PIL import Image

MAX_SIDE_FACTOR = 8  # --height/--width up to this many times the model's training size, unless --allow-large
DEFAULT_MODEL = "mini-sd"  # under sdlearn.datasets.data_dir()
MAKE_TARGET = "train-mini-sd"


class CLIError(Exception):
    """Bad input: printed as one line, exit status 2."""


# ------------------------------------------------------------------------------------------
# Argument parsing shared by every command of the package (this CLI, python -m sdlearn.evaluate,
# the recipes): a bad argument is refused on one line, before any work.
# ------------------------------------------------------------------------------------------


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but a bad argument prints one line (`prog: error: ... (see prog --help)`), exit status 2.

    argparse's own error output starts with the whole usage, which for long commands is
    a screenful in which the one line that matters is easy to miss.
    """

    def error(self, message: str):
        # "argument --steps: must be at least 1, got 0" reads "--steps must be at least 1, got 0"
        message = re.sub(r"^argument (--[\w-]+(?:/--?[\w-]+)?): (must|expected)", r"\1 \2", one_line(message))
        commands = [a for a in self._actions if isinstance(a, argparse._SubParsersAction)]
        if commands and "required: command" in message:  # no command given: say which there are
            message = f"give a command: {', '.join(commands[0].choices)}"
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def one_line(text) -> str:
    """A message on one line (some library errors span several)."""
    return " ".join(str(text).split())


def int_range(low: int | None = None, high: int | None = None):
    """An argparse type: a whole number in [low, high] (None: unbounded)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if (low is not None and value < low) or (high is not None and value > high):
            where = f"at least {low}" if high is None else f"a whole number <= {high}" if low is None \
                else f"a whole number in [{low}, {high}]"
            raise argparse.ArgumentTypeError(f"must be {where}, got {value}")
        return value

    parse.__name__ = "whole number"
    return parse


def float_range(low: float | None = None, high: float | None = None, low_open: bool = False):
    """An argparse type: a finite number in [low, high] ((low, high] with low_open); NaN and inf are refused."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
        below = low is not None and (value <= low if low_open else value < low)
        if below or (high is not None and value > high):
            left = "(" if low_open else "["
            where = (f"a number > {low:g}" if low_open else f"at least {low:g}") if high is None \
                else f"a number <= {high:g}" if low is None else f"a number in {left}{low:g}, {high:g}]"
            raise argparse.ArgumentTypeError(f"must be {where}, got {text}")
        return value

    parse.__name__ = "number"
    return parse


POSITIVE_INT = int_range(1)
NON_NEGATIVE_INT = int_range(0)
SEED = int_range(0, 2**32 - 1)  # recipes derive per-step seeds from it; torch takes up to 2**64 - 1
POSITIVE_FLOAT = float_range(0.0, low_open=True)
NON_NEGATIVE_FLOAT = float_range(0.0)
FINITE_FLOAT = float_range()
PROBABILITY = float_range(0.0, 1.0)


def writable_folder(folder: Path, what: str) -> None:
    """CLIError unless `folder` can be created or written to (checked before the work, not after it)."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise CLIError(f"{what} {folder} is a file, not a folder; choose another {what}.")
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise CLIError(f"{what} {folder}: {existing} is a file, so the folder cannot be made; choose another {what}.")
    if not can_create_in(existing):
        raise CLIError(f"{what} {folder}: cannot write in {existing} (no permission, or a read-only file system); choose another {what}.")


def can_create_in(folder: Path) -> bool:
    """Whether a file can be created in `folder`, found by creating (and removing) one: os.access
    says yes to root everywhere and knows nothing of read-only file systems."""
    import tempfile

    try:
        with tempfile.TemporaryFile(dir=folder, prefix=".sdlearn-write-test-"):
            return True
    except OSError:
        return False


def writable_file(path: Path, what: str) -> None:
    """CLIError unless a file can be written at `path`: its folder exists and is writable, and it is not a folder."""
    path = Path(path)
    if path.is_dir():
        raise CLIError(f"{what} {path} is a folder; give a file name.")
    if not path.parent.is_dir():
        raise CLIError(f"{what} {path}: the folder {path.parent} does not exist; create it first or choose another path.")
    if not can_create_in(path.parent):
        raise CLIError(f"{what} {path}: cannot write in {path.parent} (no permission, or a read-only file system); choose another path.")


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="sdlearn", description="sdlearn: Stable Diffusion from the ground up.")
    commands = parser.add_subparsers(dest="command", title="commands")
    commands.required = True

    gen = commands.add_parser("generate", help="make an image from a prompt", description="Make an image from a text prompt.")
    gen.add_argument("prompt", help='what to draw, e.g. "a large red circle in the top left"')
    gen.add_argument("--out", required=True, type=Path, help="where to write the image (.png, .jpg, ...)")
    gen.add_argument("--model", default=None, help="a diffusers pipeline folder, a .safetensors/.ckpt file or a hub id (default: data/mini-sd)")
    gen.add_argument("--steps", type=POSITIVE_INT, default=25, help="sampler steps (default 25)")
    gen.add_argument("--seed", type=int_range(0, 2**64 - 1), default=None, help="random seed (default: a fresh one, printed so you can repeat it)")
    gen.add_argument("--sampler", default=None, help="ddpm, ddim, plms, euler, euler_a or dpmpp_2m (default: the model's own)")
    gen.add_argument("--guidance", type=FINITE_FLOAT, default=7.5, help="classifier-free guidance scale (default 7.5; <= 1 turns it off)")
    gen.add_argument("--negative", default=None, help="negative prompt: what the image should not look like")
    gen.add_argument("--height", type=POSITIVE_INT, default=None, help="image height in pixels (default: the model's size)")
    gen.add_argument("--width", type=POSITIVE_INT, default=None, help="image width in pixels (default: the model's size)")
    gen.add_argument("--eta", type=NON_NEGATIVE_FLOAT, default=0.0, help="DDIM's eta (0 = deterministic; only with --sampler ddim)")
    gen.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available, else cpu)")
    gen.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    gen.add_argument("--allow-large", action="store_true", help=f"allow sides over {MAX_SIDE_FACTOR}x the model's training size")
    gen.add_argument("--quiet", action="store_true", help="no progress bar or summary")
    adapters = gen.add_argument_group("adapters", "personalisation files applied to the model before sampling (lesson 12)")
    adapters.add_argument("--lora", type=Path, default=None, metavar="PATH",
                          help="a LoRA: diffusers/peft or kohya .safetensors, or a folder holding pytorch_lora_weights.safetensors")
    adapters.add_argument("--lora-scale", type=FINITE_FLOAT, default=None, metavar="S",
                          help="the LoRA's scale (default 1; 0 = the plain model)")
    adapters.add_argument("--embedding", type=Path, action="append", default=None, metavar="PATH",
                          help="a textual-inversion embedding (.safetensors or A1111 .pt); repeat for several")
    adapters.add_argument("--hypernetwork", type=Path, default=None, metavar="PATH", help="an A1111 hypernetwork .pt file")
    adapters.add_argument("--strength", type=FINITE_FLOAT, default=None, metavar="S",
                          help="the hypernetwork's strength (default 1; 0 = the plain model)")
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
    """--device as a torch.device: CUDA when available by default; a clear error for a device that cannot run here
    (unknown, "meta", or an accelerator this torch does not see)."""
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    from sdlearn.pipeline.loading import check_device

    try:
        return check_device(name)
    except ValueError as exc:
        raise CLIError(f"--{exc}") from None


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


def check_size(args, trained: int) -> None:
    """Refuse sides far beyond the model's training size: the pipeline's own limit (max_pixels) is set
    for a GPU and SD's 512 px, so a 100000x16 request to a 64 px model passes it and then samples for
    many minutes (attention grows with the square of the pixels); such an image is noise anyway."""
    limit = MAX_SIDE_FACTOR * trained
    for name in ("height", "width"):
        value = getattr(args, name)
        if value is not None and value > limit and not args.allow_large:
            raise CLIError(
                f"--{name} {value} is more than {MAX_SIDE_FACTOR}x this model's training size ({trained} px): it would run "
                f"for very long and draw no recognisable image. Use at most {limit}, or pass --allow-large to try anyway."
            )


def check_adapters(args) -> None:
    """Refuse a scale without its adapter, and adapter paths that do not exist (before loading the model)."""
    if args.lora_scale is not None and args.lora is None:
        raise CLIError("--lora-scale needs --lora PATH (the LoRA it scales).")
    if args.strength is not None and args.hypernetwork is None:
        raise CLIError("--strength needs --hypernetwork PATH (the hypernetwork it scales).")
    for flag, paths in (("--lora", [args.lora]), ("--embedding", args.embedding or []), ("--hypernetwork", [args.hypernetwork])):
        for path in paths:
            if path is not None and not path.exists():
                raise CLIError(f"{flag} {path}: there is no such file or folder; check the path.")


def apply_adapters(pipe, args) -> list[str]:
    """Load --lora, --embedding and --hypernetwork into the pipeline; return lines saying what was loaded.

    An adapter's error (it does not fit this model, its file is damaged) is reported with its flag.
    """
    from safetensors import SafetensorError

    from sdlearn.hypernetwork import load_hypernetwork
    from sdlearn.lora import load_lora
    from sdlearn.textual_inversion import load_embedding

    notes, what = [], {"--lora": "a LoRA", "--embedding": "a textual-inversion embedding", "--hypernetwork": "an A1111 hypernetwork"}
    try:
        flag = "--lora"
        if args.lora is not None:
            scale = 1.0 if args.lora_scale is None else args.lora_scale
            load_lora(pipe.unet, args.lora, scale=scale)
            notes.append(f"LoRA {args.lora} at scale {scale:g}")
        flag = "--embedding"
        for path in args.embedding or []:
            ids = load_embedding(path, pipe.tokenizer, pipe.text_encoder)
            word = pipe.tokenizer.decoder[ids[0]]
            notes.append(f"embedding {path}: the prompt can now use {word}" + (f" ({len(ids)} vectors)" if len(ids) > 1 else ""))
        flag = "--hypernetwork"
        if args.hypernetwork is not None:
            strength = 1.0 if args.strength is None else args.strength
            load_hypernetwork(pipe.unet, args.hypernetwork, strength=strength)
            notes.append(f"hypernetwork {args.hypernetwork} at strength {strength:g}")
    except ValueError as exc:  # LoRAError, TextualInversionError, HypernetworkError
        raise CLIError(f"{flag}: {exc}") from None
    except SafetensorError as exc:  # a damaged or truncated .safetensors file
        raise CLIError(f"{flag}: the file is not a readable .safetensors file ({exc}); check that it downloaded completely.") from None
    except (TypeError, KeyError, AttributeError) as exc:  # a file of another kind that the reader did not expect
        raise CLIError(f"{flag}: the file could not be read as {what[flag]} ({type(exc).__name__}: {exc}); "
                       "check that it is the right kind of file.") from None
    return notes


def generate(args) -> int:
    check_out(args.out, args.overwrite)
    check_adapters(args)
    writable_file(args.out, "--out")
    model = resolve_model(args.model)

    import torch  # imported here: keeps `sdlearn --help` fast

    from sdlearn.pipeline.loading import load_pipeline

    device = resolve_device(args.device, torch)
    seed = args.seed if args.seed is not None else int(torch.randint(0, 2**31 - 1, ()).item())
    start = time.perf_counter()
    pipe = load_pipeline(model, device=device)
    check_size(args, pipe.default_size)
    notes = apply_adapters(pipe, args)
    if not args.quiet:
        for note in notes:
            print(note)
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
    from sdlearn.models.files import write_file

    image_format = Image.registered_extensions()[args.out.suffix.lower()]
    write_file(args.out, lambda tmp: image.save(tmp, format=image_format))  # a failed write leaves no half image
    if not args.quiet:
        sampler = args.sampler or pipe.default_sampler
        print(f"{args.out}: {image.width}x{image.height}, {sampler}, {args.steps} steps, seed {seed}, "
              f"{time.perf_counter() - start:.1f} s")
    return 0


# What a user's input can make a command raise: printed as one line, never a traceback.
# (ValueError covers sdlearn.models.checkpoint.CheckpointError; OSError a file that cannot be
# read or written, e.g. no permission or a full disk.)
USER_ERRORS = (CLIError, ValueError, TypeError, OSError)


def report_error(prog: str, exc: BaseException) -> None:
    print(f"{prog}: error: {one_line(exc)}", file=sys.stderr)


def main(argv=None) -> int:
    """Entry point of the `sdlearn` command (and of `python -m sdlearn`)."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exit_:  # a bad argument (already printed, one line) or --help
        return exit_.code if isinstance(exit_.code, int) else 2
    try:
        if args.command == "generate":
            return generate(args)
    except USER_ERRORS as exc:
        report_error(f"sdlearn {args.command}", exc)
        return 2
    except KeyboardInterrupt:
        print(f"sdlearn {args.command}: interrupted; nothing was written.", file=sys.stderr)
        return 130
    return 2  # unreachable: argparse requires a known command


if __name__ == "__main__":
    raise SystemExit(main())
