"""Derive CLIP's tokenizer files (SD 1.x) from OpenAI's BPE merges list.

OpenAI's CLIP ships its byte-pair merges as `bpe_simple_vocab_16e6.txt.gz`; the same file is
inside the open-clip-torch wheel. This script rebuilds, exactly as openai/CLIP's
`simple_tokenizer.py` and transformers' conversion do:

    merges = lines[1 : 49152 - 256 - 2 + 1]                       48,894 merges
    vocab  = 256 byte characters, the same 256 + "</w>",
             each merge joined, <|startoftext|>, <|endoftext|>    49,408 tokens

and writes vocab.json, merges.txt, tokenizer_config.json and special_tokens_map.json (SD 1.x
pads with <|endoftext|>), readable by sdlearn.clip.CLIPTokenizer and transformers' CLIPTokenizer.

Usage (the wheel is only downloaded, never installed: it would replace torch):

    pip download --no-deps open-clip-torch==3.3.0 -d /tmp/oc
    python tools/make_clip_vocab.py /tmp/oc/open_clip_torch-3.3.0-py3-none-any.whl data/tokenizers/clip-vit-l14
"""

import argparse
import gzip
import sys
import zipfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sdlearn.clip import BOS_TOKEN, END_OF_WORD, EOS_TOKEN, CLIPTokenizer, bytes_to_unicode  # noqa: E402

MERGES_FILE = "open_clip/bpe_simple_vocab_16e6.txt.gz"
NUM_MERGES = 49152 - 256 - 2  # CLIP's vocabulary is 49,408 = 512 byte tokens + 48,894 merges + 2 specials


def read_merges_file(source: Path) -> str:
    """The text of bpe_simple_vocab_16e6.txt, from the .gz itself or from the wheel holding it."""
    if source.suffix == ".whl":
        with zipfile.ZipFile(source) as wheel:
            data = wheel.read(MERGES_FILE)
    else:
        data = source.read_bytes()
    return gzip.decompress(data).decode("utf-8")


def build_vocab(text: str) -> tuple[dict, list]:
    lines = text.split("\n")
    merges = [tuple(line.split()) for line in lines[1 : NUM_MERGES + 1]]
    assert len(merges) == NUM_MERGES and all(len(m) == 2 for m in merges), "unexpected merges file"
    byte_chars = list(bytes_to_unicode().values())
    tokens = byte_chars + [c + END_OF_WORD for c in byte_chars] + ["".join(m) for m in merges] + [BOS_TOKEN, EOS_TOKEN]
    vocab = {token: i for i, token in enumerate(tokens)}
    assert len(vocab) == 49408, f"expected 49,408 distinct tokens, got {len(vocab)}"
    return vocab, merges


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", type=Path, help="open_clip_torch-*.whl or bpe_simple_vocab_16e6.txt.gz")
    parser.add_argument("out", type=Path, help="output folder, e.g. data/tokenizers/clip-vit-l14")
    args = parser.parse_args(argv)
    vocab, merges = build_vocab(read_merges_file(args.source))
    CLIPTokenizer(vocab, merges, pad_token=EOS_TOKEN).save_pretrained(args.out)
    print(f"wrote {len(vocab)} tokens and {len(merges)} merges to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
