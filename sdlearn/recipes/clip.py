"""Recipes for the CLIP artefacts in data/: a BPE vocabulary of our own and a TinyCLIP.

1. `train_shapes_tokenizer` learns BPE merges on the shapes captions with the tokenizers
   library, configured and laid out like CLIP's, so both tokenizers read it (data/tokenizers/shapes).
2. `train_tiny_clip` trains `sdlearn.models.clip.TinyCLIP` contrastively on shapes images and
   their (partial) captions (data/clip-shapes, `make train-clip`).

    python -m sdlearn.recipes.clip shapes-tokenizer OUT
    python -m sdlearn.recipes.clip train-tiny OUT [--steps N --batch-size B --seed S]
"""

import json
import math
import sys
from pathlib import Path

import torch

from sdlearn.cli import POSITIVE_FLOAT, POSITIVE_INT, SEED, ArgumentParser, one_line
from sdlearn.datasets import Shapes, data_dir
from sdlearn.models.clip import (BOS_TOKEN, END_OF_WORD, EOS_TOKEN, PIECE_PATTERN, CLIPTextConfig, CLIPTokenizer, TinyCLIP,
                                 bytes_to_unicode)
from sdlearn.models.files import write_text  # atomic: a failed write keeps the old file
from sdlearn.recipes import check_out_folder
from sdlearn.train import train


def clip_loss_fn(model: TinyCLIP, batch) -> torch.Tensor:
    """train()'s loss_fn: batch = (images (B, 3, S, S), input_ids (B, 77))."""
    images, input_ids = batch
    return model.loss(images, input_ids)


TINY_CLIP_OUTPUTS = ("tiny_clip.safetensors", "text_encoder/config.json", "text_encoder/model.safetensors")
TOKENIZER_OUTPUTS = ("vocab.json", "merges.txt")


def check_tiny_clip_settings(**settings) -> None:
    """ValueError for a setting train_tiny_clip could not train with (checked before any work)."""
    for name in ("steps", "batch_size", "n_images"):
        value = settings[name]
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be a whole number >= 1, got {value!r}.")
    if not isinstance(settings["seed"], int) or not 0 <= settings["seed"] < 2**32:
        raise ValueError(f"seed must be a whole number in [0, 2**32), got {settings['seed']!r}.")
    lr = settings["lr"]
    if not isinstance(lr, (int, float)) or not math.isfinite(lr) or lr <= 0:
        raise ValueError(f"lr must be a finite number > 0, got {lr!r}.")
    size = settings["image_size"]
    if not isinstance(size, int) or size < 8 or size & (size - 1):
        raise ValueError(f"image_size must be a power of two >= 8, got {size!r}.")
    if settings["batch_size"] > settings["n_images"]:
        raise ValueError(f"batch_size {settings['batch_size']} is larger than the {settings['n_images']} images (n_images).")


def train_tiny_clip(
    tokenizer: "CLIPTokenizer | None" = None,
    steps: int = 300,
    batch_size: int = 64,
    lr: float = 2e-3,
    n_images: int = 4000,
    image_size: int = 32,
    seed: int = 0,
    out=None,
    overwrite: bool = False,
    **train_kwargs,
):
    """Train a TinyCLIP on shapes images and their (partial) captions; returns (model, tokenizer, history).

    Batches are drawn without replacement from `n_images` training images (held-out pairs
    excluded), so an image never meets itself as a negative. With `out`, the text encoder and
    tokenizer are saved there in transformers format, next to the rest of the model.
    """
    check_tiny_clip_settings(steps=steps, batch_size=batch_size, lr=lr, n_images=n_images, image_size=image_size, seed=seed)
    if out is not None:
        # Checked before training, so minutes of work are not lost to a refusal at the end.
        check_out_folder(Path(out), TINY_CLIP_OUTPUTS, "a TinyCLIP", overwrite)
    if tokenizer is None:
        tokenizer = CLIPTokenizer.from_pretrained(data_dir() / "tokenizers" / "shapes")
    dataset = Shapes(n_images, seed=seed, size=image_size, split="train", captions="partial", drop_prob=0.3)
    if batch_size > len(dataset):
        raise ValueError(f"batch_size {batch_size} is larger than the {len(dataset)} images.")
    images = dataset.tensors()  # (n, 3, S, S)
    input_ids = tokenizer(dataset.captions)  # (n, 77)
    torch.manual_seed(seed)
    text_config = CLIPTextConfig.tiny(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                                      eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    channels = tuple(min(32 * 2**i, 128) for i in range(int(math.log2(image_size // 4))))
    model = TinyCLIP(text_config, image_size=image_size, image_channels=channels)
    generator = torch.Generator().manual_seed(seed)

    def batch(step: int):
        index = torch.randperm(len(dataset), generator=generator)[:batch_size]
        return images[index], input_ids[index]

    history = train(model, clip_loss_fn, batch, steps=steps, lr=lr, seed=seed, **train_kwargs)
    if out is not None:
        model.save_pretrained(out, tokenizer, overwrite=overwrite)
    return model, tokenizer, history


# ----------------------------------------------------------------------------------------
# 4. A BPE vocabulary of our own, for the shapes captions
# ----------------------------------------------------------------------------------------


def shapes_corpus(n: int = 4000, seed: int = 0) -> list:
    """Captions covering every word the shapes dataset uses (all templates, partial and full)."""
    partial = Shapes(n, seed=seed, split="all", captions="partial", drop_prob=0.5, cache=False).captions
    full = Shapes(n // 4, seed=seed + 1, split="all", captions="full", cache=False).captions
    return partial + full


def train_bpe(texts: list, vocab_size: int = 1000, min_frequency: int = 2) -> tuple[dict, list]:
    """Learn BPE merges on `texts` with the tokenizers library, cleaned and split exactly as CLIP does.

    Returns (vocab, merges) laid out as CLIP's vocabulary: the 256 byte characters, the same
    with "</w>", one token per merge in rank order, then <|startoftext|> and <|endoftext|>.
    Because every byte is in the vocabulary, no text is ever unknown.
    """
    from tokenizers import Regex, Tokenizer, normalizers, pre_tokenizers, trainers
    from tokenizers.models import BPE

    tokenizer = Tokenizer(BPE(end_of_word_suffix=END_OF_WORD, continuing_subword_prefix="", unk_token=EOS_TOKEN))
    tokenizer.normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()])
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(PIECE_PATTERN.pattern), behavior="removed", invert=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=min_frequency, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), end_of_word_suffix=END_OF_WORD,
        continuing_subword_prefix="", special_tokens=[BOS_TOKEN, EOS_TOKEN],
    )
    tokenizer.train_from_iterator(texts, trainer)
    learned = json.loads(tokenizer.to_str())["model"]["merges"]
    merges = [tuple(m.split()) if isinstance(m, str) else tuple(m) for m in learned]
    byte_chars = list(bytes_to_unicode().values())
    tokens = byte_chars + [c + END_OF_WORD for c in byte_chars] + ["".join(m) for m in merges] + [BOS_TOKEN, EOS_TOKEN]
    vocab = {token: i for i, token in enumerate(tokens)}
    if len(vocab) != len(tokens):
        raise RuntimeError("Two merges produced the same token; the vocabulary would not be CLIP-shaped.")
    return vocab, merges


def train_shapes_tokenizer(folder=None, vocab_size: int = 1000) -> CLIPTokenizer:
    """A CLIP-style BPE tokenizer for the shapes captions (about 100 merges: one token per word).

    Saved to `folder` (if given) as vocab.json/merges.txt that transformers' CLIPTokenizer
    reads too. The shipped copy lives in data/tokenizers/shapes.
    """
    vocab, merges = train_bpe(shapes_corpus(), vocab_size=vocab_size)
    tokenizer = CLIPTokenizer(vocab, merges)
    if folder is not None:
        tokenizer.save_pretrained(folder)
    return tokenizer


# ----------------------------------------------------------------------------------------
# Reproducing the shipped artefacts
# ----------------------------------------------------------------------------------------

ACCURACY_IMAGES = 256  # unseen images per split for caption_accuracy
ACCURACY_SEED = 3  # training draws seed 0


@torch.no_grad()
def caption_accuracy(model: TinyCLIP, tokenizer: CLIPTokenizer, n: int = ACCURACY_IMAGES, seed: int = ACCURACY_SEED) -> dict:
    """{"train": a, "test": b}: for n unseen images of each split, the fraction whose most similar
    caption among the 32 "a {colour} {shape}" is the right one (chance 1/32). "test" holds
    only the four HELD_OUT pairs, which training never shows."""
    from sdlearn.datasets import COLOUR_NAMES, SHAPES

    names = [f"a {c} {s}" for c in COLOUR_NAMES for s in SHAPES]
    ids = tokenizer(names)
    model.eval()
    result = {}
    for split in ("train", "test"):
        data = Shapes(n, seed=seed, size=model.settings["image_size"], split=split)
        best = model.similarity(data.tensors(), ids).argmax(dim=1).tolist()
        truth = [f"a {a['colour']} {a['shape']}" for a in map(data.attributes, range(len(data)))]
        result[split] = sum(names[b] == t for b, t in zip(best, truth)) / len(truth)
    return result


def write_record(out, argv, settings: dict, model: TinyCLIP, tokenizer: CLIPTokenizer, history) -> dict:
    """Write <out>/training.json: the command, settings, time, final loss and caption_accuracy."""
    import sys

    from sdlearn.doctor import cpu_name

    losses = history.losses[-100:]
    record = {
        "command": "python -m sdlearn.recipes.clip " + " ".join(sys.argv[1:] if argv is None else argv),
        "settings": settings,
        "train_seconds": round(history.seconds, 1),
        "final_loss_mean_of_100": sum(losses) / len(losses),
        "caption_accuracy": caption_accuracy(model, tokenizer),
        "caption_accuracy_images": {"n": ACCURACY_IMAGES, "seed": ACCURACY_SEED, "size": model.settings["image_size"]},
        "torch_threads": torch.get_num_threads(),
        "cpu": cpu_name(),
    }
    write_text(Path(out) / "training.json", json.dumps(record, indent=2) + "\n")
    return record


def main(argv=None) -> int:
    """python -m sdlearn.recipes.clip shapes-tokenizer OUT | train-tiny OUT [--steps N --batch-size B --seed S]"""
    parser = ArgumentParser(prog="python -m sdlearn.recipes.clip", description="Rebuild the CLIP artefacts shipped in data/.")
    commands = parser.add_subparsers(dest="command", required=True)
    tok = commands.add_parser("shapes-tokenizer", help="train the BPE vocabulary of the shapes captions")
    tok.add_argument("out", type=Path)
    tok.add_argument("--overwrite", action="store_true", help="replace a tokenizer already in OUT")
    tiny = commands.add_parser("train-tiny", help="train TinyCLIP on shapes and save it (text_encoder/, tokenizer/, tiny_clip.safetensors)")
    tiny.add_argument("out", type=Path)
    tiny.add_argument("--steps", type=POSITIVE_INT, default=3000)
    tiny.add_argument("--batch-size", type=POSITIVE_INT, default=128)
    tiny.add_argument("--lr", type=POSITIVE_FLOAT, default=2e-3)
    tiny.add_argument("--n-images", type=POSITIVE_INT, default=4000)
    tiny.add_argument("--seed", type=SEED, default=0)
    tiny.add_argument("--overwrite", action="store_true", help="replace an existing model in OUT")
    args = parser.parse_args(argv)
    try:
        if args.command == "shapes-tokenizer":
            check_out_folder(args.out, TOKENIZER_OUTPUTS, "a tokenizer", args.overwrite)
        else:
            check_tiny_clip_settings(steps=args.steps, batch_size=args.batch_size, lr=args.lr, n_images=args.n_images,
                                     image_size=32, seed=args.seed)
            check_out_folder(args.out, TINY_CLIP_OUTPUTS, "a TinyCLIP", args.overwrite)
    except (FileExistsError, ValueError, OSError) as exc:
        print(f"{parser.prog} {args.command}: error: {one_line(exc)}", file=sys.stderr)
        return 2
    if args.command == "shapes-tokenizer":
        tokenizer = train_shapes_tokenizer(args.out)
        print(f"wrote {len(tokenizer)} tokens ({len(tokenizer.merges)} merges) to {args.out}")
    else:
        model, tokenizer, history = train_tiny_clip(steps=args.steps, batch_size=args.batch_size, lr=args.lr, n_images=args.n_images,
                                        seed=args.seed, out=args.out, overwrite=args.overwrite,
                                        lr_schedule="cosine")
        print(f"trained {args.steps} steps in {history.seconds:.0f} s; final loss (mean of last 100) "
              f"{sum(history.losses[-100:]) / len(history.losses[-100:]):.3f}; saved to {args.out}")
        settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "command"}
        accuracy = write_record(args.out, argv, settings, model, tokenizer, history)["caption_accuracy"]
        print(f"right caption among 32: {accuracy['train']:.1%} of unseen training-pair images, "
              f"{accuracy['test']:.1%} of held-out pairs (chance 1 in 32)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
