"""CLIP's text side: the BPE tokenizer, the causal text transformer, and a tiny CLIP.

Stable Diffusion never sees a prompt as text. The prompt becomes 77 integer ids
(`CLIPTokenizer`), the ids become 77 vectors (`CLIPTextModel`), and the UNet reads those
vectors through cross-attention. Both halves come from CLIP (Radford et al. 2021): SD 1.x
uses OpenAI's ViT-L/14 text encoder, SD 2.x OpenCLIP's ViT-H/14 one.

1. Tokenizer: byte-level byte-pair encoding (Sennrich et al. 2016, with GPT-2's byte table)

    text -> clean (Unicode normalisation, whitespace, lower case)
         -> pieces   CLIP's regex: contractions, runs of letters, single digits, punctuation runs
         -> bytes    each UTF-8 byte shown as one printable character, so no text is ever unknown
         -> BPE      the last character of a piece carries "</w>" (end of word); apply the learned
                     merges, lowest rank first, until no learned pair is left
         -> ids      [<|startoftext|>] ids[:75] [<|endoftext|>] [pad] ... (exactly 77)

   SD 1.x pads with <|endoftext|>; SD 2.x's tokenizer pads with id 0, the token "!".

2. Text transformer (pre-LayerNorm, causal, like GPT-2). For ids x_1..x_L:

    h_0 = E_tok[x] + E_pos[0..L-1]                                         (B, L, D)
    h'_l = h_{l-1} + W_o softmax(Q K^T / sqrt(d) + M) V,  Q,K,V from LN1(h_{l-1})
    h_l  = h'_l + W_2 act(W_1 LN2(h'_l))
    out  = LN_final(h_N)                                                   (B, L, D)

   with the causal mask M_ij = -inf for j > i (token i sees only tokens 1..i) and
   act = quick_gelu(x) = x * sigmoid(1.702 x) for SD 1.x, exact gelu for SD 2.x.
   "CLIP skip" k uses LN_final(h_{N-k}) instead, as diffusers' `clip_skip` does.
   SDXL uses two encoders, CLIP ViT-L and OpenCLIP ViT-bigG, and takes from each the
   penultimate h_{N-1} *without* LN_final; their concatenation (768 + 1280 = 2048 wide) is the
   UNet's context, and the second one's projected end-of-text vector W_proj LN_final(h_N)[eos]
   (`CLIPTextModelWithProjection`) is the pooled prompt embedding (`sdxl_prompt_embeds`).

3. Contrastive training (CLIP's objective, symmetric InfoNCE). For a batch of N pairs with
   L2-normalised image embeddings u_i and text embeddings v_j and a learned temperature t:

    logits_ij = exp(t) * <u_i, v_j>
    L = 1/2 [ CE(logits, labels) + CE(logits^T, labels) ],   labels = (0, 1, ..., N-1)

   i.e. each image must pick out its own caption among N, and each caption its own image.
   `TinyCLIP` pairs a tiny CLIPTextModel with a small conv image encoder; lesson 08 trains it
   on the shapes captions on a CPU (`sdlearn.recipes.clip.train_tiny_clip`, which also
   learns our own BPE vocabulary with the tokenizers library).

Parameter names equal transformers' on-disk names (text_model.embeddings.token_embedding, ...
text_model.final_layer_norm), the names of every Stable Diffusion text_encoder folder.

References: Radford et al. 2021, "Learning Transferable Visual Models From Natural Language
Supervision" (CLIP); Sennrich et al. 2016, "Neural Machine Translation of Rare Words with
Subword Units" (BPE); openai/CLIP `simple_tokenizer.py`; transformers `modeling_clip.py`;
diffusers `StableDiffusionPipeline.encode_prompt` (clip_skip).
"""

import html
import json
import math
import unicodedata
import warnings
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import regex
import torch
import torch.nn.functional as F
from torch import nn

from sdlearn.models.checkpoint import CheckpointError, ModelConfig, Pretrained, read_weights
from sdlearn.models.files import save_folder

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
CONTEXT_LENGTH = 77  # CLIP's text transformer has 77 positions; SD always pads to all of them
END_OF_WORD = "</w>"


# ----------------------------------------------------------------------------------------
# 1. The tokenizer
# ----------------------------------------------------------------------------------------


@lru_cache
def bytes_to_unicode() -> dict:
    """The byte -> character table of GPT-2 and CLIP: all 256 bytes as printable characters.

    Printable Latin-1 bytes stand for themselves; the other 68 bytes (controls, space, ...)
    are shifted to U+0100 and up. BPE then works on strings of these characters, and any
    text at all (emoji, CJK, control characters) is spelled with a 256-symbol alphabet.
    The order matters: CLIP's vocabulary lists the printable bytes first ("!" is id 0).
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in printable}
    for shift, b in enumerate(b for b in range(256) if b not in table):
        table[b] = chr(256 + shift)
    return table


# CLIP's pre-tokenisation: English contractions, runs of letters, single digits (so numbers
# are spelled digit by digit), runs of other non-space characters. Anything else (whitespace)
# is dropped: word boundaries survive only as "</w>". openai/CLIP also lists the special
# tokens first (and matches case-insensitively), so a typed "<|endoftext|>" becomes the end
# token; transformers finds special tokens in the raw text instead, before cleaning.
_PIECE = r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
PIECE_PATTERN = regex.compile(_PIECE)
PIECE_PATTERN_OPENAI = regex.compile(r"<\|startoftext\|>|<\|endoftext\|>|" + _PIECE, regex.IGNORECASE)
_WHITESPACE = regex.compile(r"\s+")
TEXT_CLEANINGS = ("nfc", "ftfy")


def clean_text(text: str, text_cleaning: str = "nfc") -> str:
    """Normalise a prompt before it is cut into pieces.

    "nfc": Unicode NFC, runs of whitespace -> one space, lower case character by character:
        what transformers' CLIPTokenizer does, hence what diffusers pipelines feed SD.
    "ftfy": openai/CLIP's `basic_clean` + `whitespace_clean`: ftfy.fix_text (repairs mojibake,
        curly quotes, full-width letters, ...), HTML entities unescaped twice, whitespace,
        lower case: what CLIP saw during its training.
    """
    if text_cleaning == "nfc":
        text = _WHITESPACE.sub(" ", unicodedata.normalize("NFC", text))
        # Character by character (no final-sigma rule), as the tokenizers library does.
        return "".join(ch.lower() for ch in text)
    if text_cleaning == "ftfy":
        import ftfy  # imported here: only this cleaning needs it

        text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
        return _WHITESPACE.sub(" ", text).strip().lower()
    raise ValueError(f"text_cleaning must be one of {TEXT_CLEANINGS}, got {text_cleaning!r}.")


def bpe(piece: str, merge_ranks: dict, steps: list | None = None) -> list:
    """Byte-pair encode one piece (already mapped to byte characters).

    Start from single characters, the last one marked "</w>", then repeatedly merge the
    adjacent pair with the lowest rank (the earliest learned merge), every occurrence of it
    from left to right, until no adjacent pair is a learned merge. Pass a list as `steps`
    to see the word after each merge.
    """
    word = [*piece[:-1], piece[-1] + END_OF_WORD]
    if steps is not None:
        steps.append(list(word))
    while len(word) > 1:
        pairs = {(a, b) for a, b in zip(word, word[1:])}
        best = min(pairs, key=lambda pair: merge_ranks.get(pair, float("inf")))
        if best not in merge_ranks:
            break
        merged, i = [], 0
        while i < len(word):
            if i < len(word) - 1 and (word[i], word[i + 1]) == best:
                merged.append(word[i] + word[i + 1])
                i += 2
            else:
                merged.append(word[i])
                i += 1
        word = merged
        if steps is not None:
            steps.append(list(word))
    return word


def _read_json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path} is not valid JSON ({exc}); the file is truncated or corrupted. Copy the tokenizer folder again.") from exc


def _read_bpe_files(folder: Path) -> tuple[dict, list, Path]:
    """vocab, merges and the file they came from: vocab.json + merges.txt, or tokenizer.json (transformers >= 5 writes only that)."""
    if (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file():
        vocab = _read_json(folder / "vocab.json")
        lines = (folder / "merges.txt").read_text(encoding="utf-8").split("\n")
        merges = [tuple(line.split()) for line in lines if line and not line.startswith("#version")]
        source = folder / "merges.txt"
    elif (folder / "tokenizer.json").is_file():
        model = _read_json(folder / "tokenizer.json").get("model", {})
        if model.get("type") != "BPE" or model.get("end_of_word_suffix") != END_OF_WORD:
            raise CheckpointError(f"{folder / 'tokenizer.json'} is not a CLIP BPE tokenizer (BPE with the '</w>' suffix).")
        vocab = model["vocab"]
        merges = [tuple(m.split()) if isinstance(m, str) else tuple(m) for m in model["merges"]]
        source = folder / "tokenizer.json"
    else:
        raise FileNotFoundError(
            f"No vocab.json + merges.txt (or tokenizer.json) in {folder}. Expected a CLIP tokenizer folder, "
            "e.g. a Stable Diffusion model's tokenizer/ folder or one written by CLIPTokenizer.save_pretrained()."
        )
    if not isinstance(vocab, dict) or not all(isinstance(i, int) for i in vocab.values()):
        raise CheckpointError(f"The vocabulary of {folder} is not a JSON object of token -> id.")
    bad = [m for m in merges if len(m) != 2]
    if bad:
        raise CheckpointError(f"{source} has merges that are not two tokens, e.g. {bad[0]}; the file is cut short or corrupted.")
    return vocab, merges, source


def check_bpe_complete(vocab: dict, merges: list, specials, source) -> None:
    """Refuse merges and a vocabulary that do not belong together (a file cut short).

    A byte-level BPE vocabulary (CLIP's, and every one the tokenizers library trains) is
    exactly: the 256 byte characters, the same with "</w>", one token per merge (the two
    halves joined), and the special tokens. So, in a complete pair of files,

        every vocabulary token = a byte character (+ "</w>"), a merge's result, or a special token
        every merge's result  = a vocabulary token

    merges.txt cut at a line boundary loses its last merges: their tokens are then in the
    vocabulary but made by no merge (the first check); vocab.json cut short loses tokens that
    merges still make (the second). Either way the tokenizer would split words differently
    from the model's training without a word, so both are refused.
    """
    byte_chars = set(bytes_to_unicode().values())
    made = {a + b for a, b in merges}
    orphans = [t for t in vocab if t not in made and t not in specials
               and not (t in byte_chars or (t.endswith(END_OF_WORD) and t[: -len(END_OF_WORD)] in byte_chars))]
    if orphans:
        raise CheckpointError(
            f"{source}: {len(merges)} merges, but the vocabulary holds {len(orphans)} tokens that no merge makes "
            f"(e.g. {orphans[:3]}): the merges file looks cut short (its last {len(orphans)} merges are missing). "
            "Copy the tokenizer folder again from its source."
        )
    lost = [a + b for a, b in merges if a + b not in vocab]
    if lost:
        raise CheckpointError(
            f"{source}: {len(lost)} merges make tokens that are not in the vocabulary (e.g. {lost[:3]}): vocab.json "
            "looks cut short or belongs to another tokenizer. Copy the tokenizer folder again from its source."
        )


ADDED_TOKENS_NAME = "added_tokens.json"  # transformers' older file for added tokens: {token: id}


def _read_added_tokens(folder: Path, settings: dict, source: Path) -> dict:
    """{id: token} of the added tokens, from every place transformers keeps them.

    tokenizer_config.json "added_tokens_decoder" ({"596": {"content": "<star>", ...}}, special
    tokens included), added_tokens.json ({"<star>": 596}, transformers < 4.34 and the slow
    tokenizer) and tokenizer.json "added_tokens" (transformers >= 5 writes only that file).
    """
    found = []
    for i, value in (settings.get("added_tokens_decoder") or {}).items():
        found.append((i, _token_content(value)))
    # As in transformers >= 5, added_tokens.json is read only when tokenizer_config.json has no list.
    if "added_tokens_decoder" not in settings and (folder / ADDED_TOKENS_NAME).is_file():
        found.extend((i, t) for t, i in _read_json(folder / ADDED_TOKENS_NAME).items())
    if source.name == "tokenizer.json":
        found.extend((entry.get("id"), entry.get("content")) for entry in _read_json(source).get("added_tokens") or [])
    added = {}
    for i, token in found:
        try:
            i = int(i)
        except (TypeError, ValueError):
            i = None
        if i is None or i < 0 or not isinstance(token, str) or not token:
            raise CheckpointError(f"{folder} lists an added token {token!r} with id {i!r}; expected a token string and an id >= 0. "
                                  "The tokenizer files are corrupted; copy the folder again from its source.")
        if added.setdefault(i, token) != token:
            raise CheckpointError(f"{folder} gives id {i} to two added tokens, {added[i]!r} and {token!r}; "
                                  "the files come from different tokenizers. Copy the tokenizer folder again from its source.")
    return added


def _token_content(value) -> str | None:
    """A special token as tokenizer_config.json / special_tokens_map.json store it."""
    if isinstance(value, dict):
        return value.get("content")
    return value


class CLIPTokenizer:
    """CLIP's byte-level BPE tokenizer: `tokenizer(prompts) -> LongTensor (B, 77)`.

    Built from a vocabulary (token -> id, vocab.json) and a ranked list of merges
    (merges.txt). `from_pretrained(folder)` reads a transformers tokenizer folder;
    `save_pretrained(folder)` writes one that transformers' CLIPTokenizer loads.
    """

    def __init__(
        self,
        vocab: dict,
        merges: list,
        *,
        bos_token: str = BOS_TOKEN,
        eos_token: str = EOS_TOKEN,
        pad_token: str = EOS_TOKEN,
        unk_token: str = EOS_TOKEN,
        model_max_length: int = CONTEXT_LENGTH,
        text_cleaning: str = "nfc",
    ):
        if text_cleaning not in TEXT_CLEANINGS:
            raise ValueError(f"text_cleaning must be one of {TEXT_CLEANINGS}, got {text_cleaning!r}.")
        missing = [t for t in (bos_token, eos_token, pad_token, unk_token) if t not in vocab]
        if missing:
            raise ValueError(f"The special tokens {missing} are not in the vocabulary. Check vocab.json and the token names.")
        if model_max_length < 2:
            raise ValueError(f"model_max_length must leave room for the start and end tokens (>= 2), got {model_max_length}.")
        self.encoder = dict(vocab)  # token -> id
        self.decoder = {i: t for t, i in self.encoder.items()}  # id -> token
        self.merges = [tuple(m) for m in merges]
        self.merge_ranks = {pair: rank for rank, pair in enumerate(self.merges)}
        self.bos_token, self.eos_token, self.pad_token, self.unk_token = bos_token, eos_token, pad_token, unk_token
        self.model_max_length = model_max_length
        self.text_cleaning = text_cleaning
        self.byte_encoder = bytes_to_unicode()
        self.byte_decoder = {c: b for b, c in self.byte_encoder.items()}
        self._cache = {}  # piece -> BPE tokens; prompts repeat words a lot
        # Whole words added after training (textual inversion): token -> the tokens it stands
        # for ("<star>" -> ("<star>", "<star>_1") for a 2-vector concept). Matched in the raw
        # text like the special tokens; sdlearn.textual_inversion.add_tokens fills it.
        self.added_tokens = {}

    # -- ids of the special tokens --------------------------------------------------------
    @property
    def bos_token_id(self) -> int:
        return self.encoder[self.bos_token]

    @property
    def eos_token_id(self) -> int:
        return self.encoder[self.eos_token]

    @property
    def pad_token_id(self) -> int:
        return self.encoder[self.pad_token]

    @property
    def vocab_size(self) -> int:
        return len(self.encoder)

    def __len__(self) -> int:
        return len(self.encoder)

    # -- text -> tokens -> ids ------------------------------------------------------------
    @property
    def special_tokens(self) -> tuple:
        return tuple(dict.fromkeys((self.bos_token, self.eos_token, self.pad_token, self.unk_token)))

    @staticmethod
    def _split_at(text: str, words) -> list:
        """Split text at literal words, longest first, as transformers does; the words stay as parts."""
        if not words:
            return [text] if text else []
        words = sorted(words, key=len, reverse=True)
        return [p for p in regex.split("(" + "|".join(regex.escape(w) for w in words) + ")", text) if p]

    def _bpe_tokens(self, cleaned: str, pattern, specials) -> list:
        """BPE tokens of cleaned text: cut into pieces by `pattern`, each piece merged by bpe()."""
        tokens = []
        for piece in pattern.findall(cleaned):
            if piece in specials:
                tokens.append(piece)
                continue
            chars = "".join(self.byte_encoder[b] for b in piece.encode("utf-8"))
            if chars not in self._cache:
                self._cache[chars] = bpe(chars, self.merge_ranks)
            tokens.extend(self._cache[chars])
        return tokens

    def tokenize(self, text: str) -> list:
        """The BPE tokens of `text` (no start/end tokens), e.g. ['a</w>', 'red</w>', 'circle</w>']."""
        if not isinstance(text, str):
            raise TypeError(f"Expected a prompt string, got {type(text).__name__}.")
        if self.text_cleaning != "nfc":  # openai/CLIP: the regex finds start/end tokens after cleaning, in any case
            specials = (self.bos_token, self.eos_token)
            return self._bpe_tokens(clean_text(text, self.text_cleaning), PIECE_PATTERN_OPENAI, specials)
        # transformers finds special tokens in the raw text, before cleaning. With SD 2.x's pad
        # token "!", a typed "!" is therefore the pad token (id 0), not "!</w>". Added tokens
        # (normalized, as transformers' add_tokens makes them) are found in the cleaned text and
        # are cleaned themselves: "<STAR>" is "<star>", and "<star>" stands for its n tokens.
        specials = self.special_tokens
        added = {clean_text(t): t for t in self.added_tokens}  # cleaned -> placeholder
        tokens = []
        for part in self._split_at(text, specials):
            if part in specials:
                tokens.append(part)
                continue
            for sub in self._split_at(clean_text(part), added):
                tokens.extend(self.added_tokens[added[sub]] if sub in added else self._bpe_tokens(sub, PIECE_PATTERN, specials))
        return tokens

    def convert_tokens_to_ids(self, tokens: list) -> list:
        unk = self.encoder[self.unk_token]
        return [self.encoder.get(t, unk) for t in tokens]

    def encode(self, text: str) -> list:
        """Token ids of `text` without start/end tokens and without truncation."""
        return self.convert_tokens_to_ids(self.tokenize(text))

    def __call__(self, prompts, max_length: int | None = None, truncation: bool = True) -> torch.Tensor:
        """Tokenise a prompt or a list of prompts into a LongTensor (B, max_length), padded like SD.

        Each row is [start] tokens [end] [pad]...; prompts longer than max_length - 2 tokens
        are cut, with a warning that names the words the model will not see.
        """
        if isinstance(prompts, str):
            prompts = [prompts]
        if not isinstance(prompts, (list, tuple)) or not all(isinstance(p, str) for p in prompts):
            raise TypeError("Expected a prompt string or a list of prompt strings.")
        max_length = self.model_max_length if max_length is None else max_length
        if max_length < 2:
            raise ValueError(f"max_length must leave room for the start and end tokens (>= 2), got {max_length}.")
        rows = []
        for prompt in prompts:
            ids = self.encode(prompt)
            room = max_length - 2
            if len(ids) > room:
                if not truncation:
                    raise ValueError(
                        f"The prompt has {len(ids)} tokens but only {room} fit in {max_length} positions. "
                        "Shorten it or pass truncation=True."
                    )
                warnings.warn(
                    f"CLIP sees at most {room} tokens of a prompt, so this part was cut off: "
                    f"{self.decode(ids[room:])!r}",
                    stacklevel=2,
                )
                ids = ids[:room]
            row = [self.bos_token_id, *ids, self.eos_token_id]
            rows.append(row + [self.pad_token_id] * (max_length - len(row)))
        return torch.tensor(rows, dtype=torch.long).reshape(len(rows), max_length)  # (B, max_length), also for B = 0

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        """Ids back to text: characters back to bytes, bytes to UTF-8, "</w>" to a space."""
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        unknown = [i for i in ids if i not in self.decoder]
        if unknown:
            raise ValueError(f"Ids {unknown[:5]} are not in this vocabulary of {len(self)} tokens.")
        skip = {self.bos_token_id, self.eos_token_id, self.pad_token_id} if skip_special_tokens else set()
        chars = "".join(self.decoder[i] for i in ids if i not in skip)
        # Every vocabulary entry, special tokens included, is spelled with byte characters.
        data = bytes(self.byte_decoder[c] for c in chars)
        return data.decode("utf-8", errors="replace").replace(END_OF_WORD, " ").strip()

    # -- folders --------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, folder, text_cleaning: str = "nfc") -> "CLIPTokenizer":
        """Read a transformers tokenizer folder: vocab.json, merges.txt and the special tokens."""
        folder = Path(folder)
        if not folder.is_dir():
            raise FileNotFoundError(f"No such folder: {folder}. Expected a CLIP tokenizer folder (vocab.json and merges.txt).")
        vocab, merges, source = _read_bpe_files(folder)
        settings = {}
        for name in ("tokenizer_config.json", "special_tokens_map.json"):  # later files win, as in transformers
            path = folder / name
            if path.is_file():
                settings.update({k: v for k, v in _read_json(path).items() if v is not None})
        kwargs = {k: _token_content(settings[k]) for k in ("bos_token", "eos_token", "pad_token", "unk_token") if k in settings}
        added = _read_added_tokens(folder, settings, source)  # {id: token}, special tokens included
        specials = {BOS_TOKEN, EOS_TOKEN, *kwargs.values(), *added.values()}
        check_bpe_complete(vocab, merges, specials, source)
        if isinstance(settings.get("model_max_length"), int) and settings["model_max_length"] <= 10_000:
            kwargs["model_max_length"] = settings["model_max_length"]
        tokenizer = cls(vocab, merges, text_cleaning=text_cleaning, **kwargs)
        new = {}  # token -> id, the added tokens that are not in vocab.json (textual inversion's)
        for i, token in sorted(added.items()):
            if token in vocab:
                if vocab[token] != i:
                    raise CheckpointError(f"{folder}: the added token {token!r} has id {i}, but the vocabulary gives it id {vocab[token]}; "
                                          "the files come from different tokenizers. Copy the tokenizer folder again from its source.")
                continue
            new[token] = i
        expected = list(range(len(vocab), len(vocab) + len(new)))
        if sorted(new.values()) != expected:
            raise CheckpointError(f"{folder}: the added tokens {list(new)[:3]} have ids {sorted(new.values())[:3]}..., but after a vocabulary "
                                  f"of {len(vocab)} tokens they must be {expected[:3]}...; the files come from different tokenizers.")
        for token, i in new.items():
            tokenizer.encoder[token] = i
            tokenizer.decoder[i] = token
        # diffusers' rule for a placeholder of n vectors (maybe_convert_prompt): "<star>" stands for
        # "<star> <star>_1 ... <star>_{n-1}" as long as the next "<star>_i" is an added token.
        for token in new:
            run = [token]
            while f"{token}_{len(run)}" in new:
                run.append(f"{token}_{len(run)}")
            tokenizer.added_tokens[token] = tuple(run)
        return tokenizer

    # A tokenizer.json (transformers' fast format) that we do not write would shadow the new
    # vocab.json + merges.txt in transformers: a save replaces it too.
    superseded_names = ("tokenizer.json",)

    def added_token_ids(self) -> dict:
        """{token: id} of the tokens added after training (textual inversion's), by id."""
        tokens = {t for run in self.added_tokens.values() for t in run}
        return dict(sorted(((t, self.encoder[t]) for t in tokens), key=lambda item: item[1]))

    def save_pretrained(self, folder) -> Path:
        """Write vocab.json, merges.txt, tokenizer_config.json and special_tokens_map.json.

        Added tokens (textual inversion's) are written as transformers' CLIPTokenizer writes them:
        in tokenizer_config.json under "added_tokens_decoder" and in added_tokens.json.

        Written aside and swapped in (sdlearn.models.files.save_folder): a failed save keeps the
        old tokenizer, and other files in `folder` are kept.
        """
        return save_folder(Path(folder), self.write_files, superseded=self.superseded_names)

    def write_files(self, folder) -> None:
        """Write the tokenizer files into `folder` directly (save_pretrained calls this on a temporary folder)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        added = self.added_token_ids()
        # As transformers' CLIPTokenizer saves: vocab.json holds the trained vocabulary only; added
        # tokens go to tokenizer_config.json ("added_tokens_decoder", with the special tokens)
        # and added_tokens.json (the older place, still read).
        vocab = dict(sorted(((t, i) for t, i in self.encoder.items() if t not in added), key=lambda item: item[1]))
        (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False) + "\n", encoding="utf-8")
        merges = "\n".join(" ".join(m) for m in self.merges)
        (folder / "merges.txt").write_text("#version: 0.2\n" + merges + "\n", encoding="utf-8")
        special = {"bos_token": self.bos_token, "eos_token": self.eos_token, "pad_token": self.pad_token, "unk_token": self.unk_token}
        config = {
            "tokenizer_class": "CLIPTokenizer",
            **special,
            "model_max_length": self.model_max_length,
            "do_lower_case": True,
            "add_prefix_space": False,
            "errors": "replace",
        }
        if added:
            # Special tokens are matched in the raw text (normalized False); added ones, as transformers'
            # add_tokens makes them, in the cleaned text (normalized True: "<STAR>" is "<star>").
            # Written only with added tokens: transformers >= 5 then ignores special_tokens_map.json.
            specials = {self.encoder[t]: t for t in self.special_tokens}
            config["added_tokens_decoder"] = {
                str(i): {"content": t, "lstrip": False, "normalized": i not in specials, "rstrip": False, "single_word": False,
                         "special": i in specials}
                for i, t in sorted({**specials, **{i: t for t, i in added.items()}}.items())
            }
            (folder / ADDED_TOKENS_NAME).write_text(json.dumps(added, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


# ----------------------------------------------------------------------------------------
# 2. The text transformer
# ----------------------------------------------------------------------------------------

# transformers' generic config.json bookkeeping (generation defaults, output flags, ...):
# none of it changes what the text encoder computes.
_GENERIC_CONFIG_KEYS = frozenset(
    """architectures model_type transformers_version torch_dtype dtype dropout initializer_range
    initializer_factor return_dict output_hidden_states output_attentions torchscript use_bfloat16
    tf_legacy_loss pruned_heads tie_word_embeddings chunk_size_feed_forward is_encoder_decoder
    is_decoder cross_attention_hidden_size add_cross_attention tie_encoder_decoder id2label
    label2id problem_type finetuning_task tokenizer_class prefix sep_token_id decoder_start_token_id
    task_specific_params max_length min_length do_sample early_stopping num_beams num_beam_groups
    diversity_penalty temperature top_k top_p typical_p repetition_penalty length_penalty
    no_repeat_ngram_size encoder_no_repeat_ngram_size bad_words_ids num_return_sequences
    output_scores return_dict_in_generate forced_bos_token_id forced_eos_token_id
    remove_invalid_values exponential_decay_length_penalty suppress_tokens begin_suppress_tokens
    use_cache gradient_checkpointing""".split()
)
ACTIVATIONS = ("quick_gelu", "gelu")


@dataclass
class CLIPTextConfig(ModelConfig):
    """transformers' CLIPTextConfig fields (text_encoder/config.json of an SD model)."""

    extra_keys = {"model_type": "clip_text_model", "architectures": ["CLIPTextModel"]}
    ignored_keys = _GENERIC_CONFIG_KEYS

    vocab_size: int = 49408
    hidden_size: int = 512  # D, the width of every token vector
    intermediate_size: int = 2048  # the MLP's hidden width (4 D)
    projection_dim: int = 512  # used by CLIPTextModelWithProjection only
    num_hidden_layers: int = 12
    num_attention_heads: int = 8
    max_position_embeddings: int = 77  # the context length
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    attention_dropout: float = 0.0
    pad_token_id: int = 1
    bos_token_id: int = 49406
    eos_token_id: int = 49407

    @classmethod
    def tiny(cls, vocab_size: int = 49408, **overrides) -> "CLIPTextConfig":
        """A 2-layer, 64-wide text encoder: runs and trains in seconds on a CPU."""
        values = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=256, projection_dim=64,
                      num_hidden_layers=2, num_attention_heads=4, eos_token_id=vocab_size - 1,
                      bos_token_id=vocab_size - 2)
        return cls(**{**values, **overrides})

    @classmethod
    def vit_l14(cls) -> "CLIPTextConfig":
        """SD 1.x: OpenAI CLIP ViT-L/14's text encoder (123 M parameters)."""
        return cls(hidden_size=768, intermediate_size=3072, projection_dim=768, num_hidden_layers=12,
                   num_attention_heads=12, hidden_act="quick_gelu", bos_token_id=0, eos_token_id=2)

    @classmethod
    def vit_h14(cls) -> "CLIPTextConfig":
        """SD 2.x: OpenCLIP ViT-H/14's text encoder with its last layer removed.

        OpenCLIP's text tower has 24 layers; SD 2 conditions on the penultimate one, so
        diffusers' conversion keeps 23 and the final LayerNorm (exact gelu, 1024 wide).
        """
        return cls(hidden_size=1024, intermediate_size=4096, projection_dim=512, num_hidden_layers=23,
                   num_attention_heads=16, hidden_act="gelu", bos_token_id=0, eos_token_id=2)

    def __post_init__(self):
        if self.hidden_act not in ACTIVATIONS:
            raise ValueError(f"hidden_act must be one of {ACTIVATIONS} (SD 1.x: quick_gelu, SD 2.x: gelu), got {self.hidden_act!r}.")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size {self.hidden_size} must be divisible by num_attention_heads {self.num_attention_heads}.")


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    """OpenAI CLIP's cheap GELU: x * sigmoid(1.702 x) (SD 1.x's text encoder was trained with it)."""
    return x * torch.sigmoid(1.702 * x)


def causal_mask(length: int, device=None) -> torch.Tensor:
    """(L, L) boolean mask, True where token i may look at token j, i.e. j <= i."""
    return torch.ones(length, length, dtype=torch.bool, device=device).tril()


class CLIPTextEmbeddings(nn.Module):
    """h_0 = E_tok[ids] + E_pos[0..L-1]: what each token is, plus where it is."""

    def __init__(self, config: CLIPTextConfig):
        super().__init__()
        self.token_embedding = nn.Embedding(config.vocab_size, config.hidden_size)
        self.position_embedding = nn.Embedding(config.max_position_embeddings, config.hidden_size)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        return self.token_embedding(input_ids) + self.position_embedding(positions)  # (B, L, D)


class CLIPAttention(nn.Module):
    """Multi-head self-attention with CLIP's causal mask."""

    def __init__(self, config: CLIPTextConfig):
        super().__init__()
        self.heads = config.num_attention_heads
        self.dropout = config.attention_dropout
        D = config.hidden_size
        self.k_proj = nn.Linear(D, D)
        self.v_proj = nn.Linear(D, D)
        self.q_proj = nn.Linear(D, D)
        self.out_proj = nn.Linear(D, D)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        B, L, D = x.shape
        # (B, L, D) -> (B, heads, L, d) with d = D / heads
        q, k, v = (proj(x).view(B, L, self.heads, D // self.heads).transpose(1, 2) for proj in (self.q_proj, self.k_proj, self.v_proj))
        # softmax(Q K^T / sqrt(d) + M) V, M = -inf where mask is False
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0)
        return self.out_proj(out.transpose(1, 2).reshape(B, L, D))  # (B, L, D)


class CLIPMLP(nn.Module):
    """Position-wise feed-forward: W_2 act(W_1 x)."""

    def __init__(self, config: CLIPTextConfig):
        super().__init__()
        self.hidden_act = config.hidden_act
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc1(x)
        h = quick_gelu(h) if self.hidden_act == "quick_gelu" else F.gelu(h)
        return self.fc2(h)


class CLIPEncoderLayer(nn.Module):
    """One pre-LayerNorm transformer block: h + Attn(LN1(h)), then h + MLP(LN2(h))."""

    def __init__(self, config: CLIPTextConfig):
        super().__init__()
        self.self_attn = CLIPAttention(config)
        self.layer_norm1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = CLIPMLP(config)
        self.layer_norm2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        h = h + self.self_attn(self.layer_norm1(h), mask)
        return h + self.mlp(self.layer_norm2(h))


class CLIPEncoder(nn.Module):
    def __init__(self, config: CLIPTextConfig):
        super().__init__()
        self.layers = nn.ModuleList(CLIPEncoderLayer(config) for _ in range(config.num_hidden_layers))


class CLIPTextTransformer(nn.Module):
    """Embeddings, the stack of layers, and the final LayerNorm (transformers' `text_model`)."""

    def __init__(self, config: CLIPTextConfig):
        super().__init__()
        self.embeddings = CLIPTextEmbeddings(config)
        self.encoder = CLIPEncoder(config)
        self.final_layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)


# How other writers name the same weights (a rule table, applied when loading).
_KEY_RULES = (
    # transformers >= 5 writes CLIPTextModel weights without the "text_model." prefix.
    (regex.compile(r"^(embeddings|encoder|final_layer_norm)\."), r"text_model.\1."),
)
# The position ids 0..76, a buffer older transformers versions saved with the weights.
_DROPPED_KEYS = frozenset({"text_model.embeddings.position_ids"})


class CLIPTextModel(Pretrained, nn.Module):
    """CLIP's causal text transformer: `model(input_ids) -> (B, L, D)` last hidden state.

    `model(input_ids, clip_skip=k)` returns LN_final(h_{N-k}), the output k layers before
    the last, with the final LayerNorm applied, exactly as diffusers' `clip_skip=k` does.
    """

    config_class = CLIPTextConfig
    weights_name = "model.safetensors"
    legacy_weights_names = ("pytorch_model.bin",)

    def __init__(self, config: CLIPTextConfig):
        super().__init__()
        self.config = config
        self.text_model = CLIPTextTransformer(config)

    def _check_input(self, input_ids: torch.Tensor) -> None:
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.dtype not in (torch.long, torch.int):
            got = f"{tuple(input_ids.shape)} {input_ids.dtype}" if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__
            raise ValueError(f"Expected input_ids as an integer tensor (B, L), e.g. from CLIPTokenizer; got {got}.")
        L = input_ids.shape[1]
        if L > self.config.max_position_embeddings:
            raise ValueError(f"{L} tokens do not fit the {self.config.max_position_embeddings} positions of this text encoder. Truncate the prompt.")
        if input_ids.numel() and (input_ids.min() < 0 or input_ids.max() >= self.config.vocab_size):
            raise ValueError(f"Token ids must lie in [0, {self.config.vocab_size}); got {input_ids.min().item()}..{input_ids.max().item()}. Was the prompt tokenised with this model's tokenizer?")

    def hidden_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, num_layers: int | None = None) -> list:
        """[h_0, h_1, ..., h_n]: the embeddings and the output of each of the first n layers (no final norm)."""
        self._check_input(input_ids)
        B, L = input_ids.shape
        mask = causal_mask(L, input_ids.device)  # (L, L)
        if attention_mask is not None:  # also hide padding: (B, 1, L, L)
            mask = mask & attention_mask.bool()[:, None, None, :]
        h = self.text_model.embeddings(input_ids)  # (B, L, D)
        states = [h]
        for layer in self.text_model.encoder.layers[:num_layers]:
            h = layer(h, mask)
            states.append(h)
        return states

    def forward(
        self, input_ids: torch.Tensor, clip_skip: int | None = None, attention_mask: torch.Tensor | None = None, final_norm: bool = True
    ) -> torch.Tensor:
        """LN_final(h_{N - clip_skip}) as (B, L, D); clip_skip None or 0 is the last layer.

        final_norm=False returns h_{N - clip_skip} itself: SDXL conditions on the penultimate
        layer *without* the final LayerNorm, `model(ids, clip_skip=1, final_norm=False)`, which is
        transformers' `hidden_states[-2]` (SD 1.x's "CLIP skip" applies the norm; SDXL does not).
        """
        n = self.config.num_hidden_layers
        skip = clip_skip or 0
        if not 0 <= skip < n:
            raise ValueError(f"clip_skip must be between 0 and {n - 1} for this {n}-layer text encoder, got {clip_skip}.")
        h = self.hidden_states(input_ids, attention_mask, num_layers=n - skip)[-1]
        return self.text_model.final_layer_norm(h) if final_norm else h

    def pooled(self, last_hidden_state: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        """The hidden state at each prompt's end token, (B, D): CLIP's sentence embedding.

        The causal mask makes it the only position that has read the whole prompt. Old
        configs with eos_token_id == 2 find it as the largest id, as transformers does.
        """
        rows = torch.arange(input_ids.shape[0], device=input_ids.device)
        if self.config.eos_token_id == 2:
            index = input_ids.to(torch.int).argmax(dim=-1)
        else:
            index = (input_ids == self.config.eos_token_id).int().argmax(dim=-1)
        return last_hidden_state[rows, index]

    def load_checked_state_dict(self, state_dict: dict, source: str = "the state dict") -> None:
        renamed = {}
        for key, value in state_dict.items():
            for pattern, replacement in _KEY_RULES:
                key = pattern.sub(replacement, key)
            if key not in _DROPPED_KEYS:
                renamed[key] = value
        super().load_checked_state_dict(renamed, source)


@dataclass
class CLIPTextWithProjectionConfig(CLIPTextConfig):
    """The same fields, written as transformers' CLIPTextModelWithProjection (SDXL's text_encoder_2/config.json)."""

    extra_keys = {"model_type": "clip_text_model", "architectures": ["CLIPTextModelWithProjection"]}

    @classmethod
    def vit_bigg14(cls) -> "CLIPTextWithProjectionConfig":
        """SDXL's second text encoder: OpenCLIP ViT-bigG/14's text tower (text_encoder_2/config.json of
        stabilityai/stable-diffusion-xl-base-1.0): 32 layers, 1280 wide, 20 heads, exact gelu, projection 1280."""
        return cls(hidden_size=1280, intermediate_size=5120, projection_dim=1280, num_hidden_layers=32,
                   num_attention_heads=20, hidden_act="gelu", bos_token_id=0, eos_token_id=2)


class CLIPTextModelWithProjection(CLIPTextModel):
    """CLIPTextModel plus CLIP's text projection (transformers' CLIPTextModelWithProjection):

        text_embeds = W_proj pooled(LN_final(h_N))            (B, projection_dim), no bias

    In CLIP this is the text side of the shared image-text space; SDXL uses encoder 2's
    text_embeds as the pooled prompt embedding that the UNet adds to its timestep embedding
    (UNet added_cond_kwargs["text_embeds"]). `model(ids)` still returns the last hidden state.
    """

    config_class = CLIPTextWithProjectionConfig

    def __init__(self, config: CLIPTextConfig):
        if type(config) is CLIPTextConfig:  # a plain text config is fine: same fields
            config = CLIPTextWithProjectionConfig(**{f: getattr(config, f) for f in config.__dataclass_fields__})
        super().__init__(config)
        self.text_projection = nn.Linear(config.hidden_size, config.projection_dim, bias=False)

    @classmethod
    def from_config(cls, config):
        if type(config) is CLIPTextConfig:
            return cls(config)
        return super().from_config(config)

    def encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> tuple[list, torch.Tensor]:
        """One pass: ([h_0, ..., h_N], text_embeds (B, projection_dim)), i.e. transformers'
        `hidden_states` (output_hidden_states=True; no final norm on them) and `text_embeds`."""
        states = self.hidden_states(input_ids, attention_mask)
        last = self.text_model.final_layer_norm(states[-1])  # (B, L, D)
        return states, self.text_projection(self.pooled(last, input_ids))  # (B, projection_dim)

    def text_embeds(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """The pooled, projected prompt embedding (B, projection_dim)."""
        return self.encode(input_ids, attention_mask)[1]


def sdxl_prompt_embeds(
    text_encoder: CLIPTextModel, text_encoder_2: CLIPTextModelWithProjection, input_ids: torch.Tensor, input_ids_2: torch.Tensor,
    clip_skip: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """SDXL's text conditioning from its two encoders, as diffusers' StableDiffusionXLPipeline.encode_prompt:

        context = concat(h1_{N1-1-k}, h2_{N2-1-k}) along channels     (B, L, 768 + 1280 = 2048)
        pooled  = text_embeds of encoder 2                              (B, 1280)

    with h_{N-1} the penultimate layer's output without the final LayerNorm (k = clip_skip,
    0 by default). input_ids / input_ids_2 come from each encoder's own tokenizer (SDXL's second
    pads with "!", id 0). Returns (context for cross-attention, pooled for added_cond_kwargs).
    """
    k = clip_skip or 0
    for name, encoder in (("text_encoder", text_encoder), ("text_encoder_2", text_encoder_2)):
        n = encoder.config.num_hidden_layers
        if not 0 <= k < n:
            raise ValueError(f"clip_skip={clip_skip} leaves no layer of the {n}-layer {name}; SDXL uses the penultimate (clip_skip None).")
    if not isinstance(text_encoder_2, CLIPTextModelWithProjection):
        raise TypeError(f"text_encoder_2 must be a CLIPTextModelWithProjection (its text_projection gives the pooled embedding), got {type(text_encoder_2).__name__}.")
    if input_ids.shape != input_ids_2.shape:
        raise ValueError(
            f"input_ids {tuple(input_ids.shape)} and input_ids_2 {tuple(input_ids_2.shape)} must have the same shape (B, 77): "
            "tokenize the same prompts with both tokenizers, padded to 77."
        )
    h1 = text_encoder.hidden_states(input_ids)[-(k + 2)]  # (B, L, D1), penultimate: no final norm
    states_2, pooled = text_encoder_2.encode(input_ids_2)
    context = torch.cat([h1, states_2[-(k + 2)]], dim=-1)  # (B, L, D1 + D2)
    return context, pooled


# ----------------------------------------------------------------------------------------
# 3. Contrastive training: a tiny CLIP
# ----------------------------------------------------------------------------------------

LOGIT_SCALE_INIT = math.log(1 / 0.07)  # CLIP starts at temperature 0.07
LOGIT_SCALE_MAX = math.log(100.0)  # and clamps exp(t) at 100, so the softmax cannot become one-hot


def contrastive_loss(image_emb: torch.Tensor, text_emb: torch.Tensor, logit_scale) -> torch.Tensor:
    """CLIP's symmetric InfoNCE loss for N matching (image, caption) pairs.

    image_emb, text_emb: (N, E), row i of each belongs together (normalised here).
    logit_scale: t, the learned log inverse temperature; the logits are exp(t) * cosine.
    """
    if image_emb.shape != text_emb.shape or image_emb.dim() != 2:
        raise ValueError(f"Expected two (N, E) embeddings of the same shape, got {tuple(image_emb.shape)} and {tuple(text_emb.shape)}.")
    u = F.normalize(image_emb, dim=-1)  # (N, E), unit length
    v = F.normalize(text_emb, dim=-1)
    logits = torch.as_tensor(logit_scale, dtype=u.dtype, device=u.device).exp() * u @ v.T  # (N, N): image i vs caption j
    labels = torch.arange(u.shape[0], device=u.device)  # the match of image i is caption i: the diagonal
    image_to_text = F.cross_entropy(logits, labels)  # each image picks its caption among N
    text_to_image = F.cross_entropy(logits.T, labels)  # each caption picks its image among N
    return (image_to_text + text_to_image) / 2


class ConvImageEncoder(nn.Module):
    """(B, 3, S, S) -> (B, C * 4 * 4): stride-2 convolutions down to 4x4, then flatten.

    Flattening (rather than averaging) the 4x4 map keeps *where* things are, which the
    shapes captions talk about ("in the top left").
    """

    def __init__(self, image_size: int = 32, channels: tuple = (32, 64, 128), groups: int = 8):
        super().__init__()
        if image_size != 4 * 2 ** len(channels):
            raise ValueError(f"{len(channels)} stride-2 convolutions take {4 * 2 ** len(channels)}px images to 4x4, not {image_size}px; give one channel count per halving.")
        layers, c_in = [], 3
        for c in channels:
            layers += [nn.Conv2d(c_in, c, kernel_size=3, stride=2, padding=1), nn.GroupNorm(groups, c), nn.SiLU()]
            c_in = c
        self.layers = nn.Sequential(*layers)
        self.out_features = channels[-1] * 16

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.layers(images).flatten(1)  # (B, C, 4, 4) -> (B, 16 C)


class TinyCLIP(nn.Module):
    """A CLIP small enough to train on a CPU: the tiny CLIPTextModel and a small conv image encoder.

    Both towers end in a linear projection to a shared embed_dim; matching pairs are pulled
    together, others pushed apart (contrastive_loss). The text tower is an ordinary
    CLIPTextModel, so `save_pretrained` writes it as a transformers folder (text_encoder/)
    that a Stable Diffusion pipeline can condition on.
    """

    def __init__(self, text_config: CLIPTextConfig, image_size: int = 32, image_channels: tuple = (32, 64, 128), embed_dim: int = 64):
        super().__init__()
        self.text_encoder = CLIPTextModel(text_config)
        self.image_encoder = ConvImageEncoder(image_size, image_channels)
        self.text_projection = nn.Linear(text_config.hidden_size, embed_dim, bias=False)
        self.visual_projection = nn.Linear(self.image_encoder.out_features, embed_dim, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(LOGIT_SCALE_INIT))
        self.settings = {"image_size": image_size, "image_channels": list(image_channels), "embed_dim": embed_dim}

    def encode_text(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(B, 77) ids -> (B, embed_dim): the end token's state, projected (not normalised).

        Thanks to the causal mask, the end token's state does not depend on the padding
        after it, so only the positions up to the longest prompt's end are computed: the
        same result (up to float rounding), several times faster for short captions.
        """
        ends = (input_ids == self.text_encoder.config.eos_token_id).int().argmax(dim=-1)  # (B,)
        input_ids = input_ids[:, : int(ends.max()) + 1]
        hidden = self.text_encoder(input_ids)  # (B, L, D)
        return self.text_projection(self.text_encoder.pooled(hidden, input_ids))

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) in [-1, 1] -> (B, embed_dim) (not normalised)."""
        return self.visual_projection(self.image_encoder(images))

    def loss(self, images: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        scale = self.logit_scale.clamp(max=LOGIT_SCALE_MAX)
        return contrastive_loss(self.encode_image(images), self.encode_text(input_ids), scale)

    @torch.no_grad()
    def similarity(self, images: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        """Cosine similarities (N_images, N_captions)."""
        u = F.normalize(self.encode_image(images), dim=-1)
        v = F.normalize(self.encode_text(input_ids), dim=-1)
        return u @ v.T

    def save_pretrained(self, folder, tokenizer: "CLIPTokenizer | None" = None, overwrite: bool = False) -> Path:
        """folder/text_encoder (transformers CLIPTextModel), folder/tokenizer, folder/tiny_clip.safetensors (the rest)."""
        from safetensors.torch import save_file

        folder = Path(folder)
        target = folder / "tiny_clip.safetensors"
        if target.exists() and not overwrite:
            raise FileExistsError(f"{folder} already holds a TinyCLIP. Choose another folder or pass overwrite=True.")
        if not overwrite and (folder / "text_encoder" / "config.json").exists():
            raise FileExistsError(f"{folder / 'text_encoder'} already holds a model. Choose another folder or pass overwrite=True.")

        def write(staging: Path) -> None:
            self.text_encoder.write_files(staging / "text_encoder")
            if tokenizer is not None:
                tokenizer.write_files(staging / "tokenizer")
            rest = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items() if not k.startswith("text_encoder.")}
            save_file(rest, staging / target.name, metadata={"format": "pt", "settings": json.dumps(self.settings)})

        superseded = [f"tokenizer/{name}" for name in CLIPTokenizer.superseded_names] if tokenizer is not None else []
        return save_folder(folder, write, superseded=superseded)

    @classmethod
    def from_pretrained(cls, folder, device=None) -> "TinyCLIP":
        from safetensors import safe_open

        folder = Path(folder)
        path = folder / "tiny_clip.safetensors"
        if not path.is_file():
            raise FileNotFoundError(f"No tiny_clip.safetensors in {folder}. Expected a folder written by TinyCLIP.save_pretrained().")
        with safe_open(path, framework="pt") as f:
            settings = json.loads(f.metadata()["settings"])
        text_encoder = CLIPTextModel.from_pretrained(folder / "text_encoder")
        model = cls(text_encoder.config, settings["image_size"], tuple(settings["image_channels"]), settings["embed_dim"])
        model.text_encoder = text_encoder
        state = {f"text_encoder.{k}": v for k, v in text_encoder.state_dict().items()}
        state.update(read_weights(folder, ("tiny_clip.safetensors",)))
        model.load_state_dict(state, strict=True)
        return model.to(device).eval()
