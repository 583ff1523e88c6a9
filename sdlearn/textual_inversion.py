"""Textual inversion: a new word for a concept, learnt as new rows of the text encoder's
token-embedding table while everything else stays frozen (Gal et al. 2022, "An Image is Worth
One Word: Personalizing Text-to-Image Generation using Textual Inversion", eq. 2).

Notation (used everywhere below):
    E      (V, D)     the token-embedding table of the text encoder
                      (`text_model.embeddings.token_embedding.weight`), frozen
    S_*               the placeholder, a new word such as "<star>"
    n                 the number of vectors S_* stands for (diffusers' `num_vectors`)
    v_*    (n, D)     the new rows E[V], ..., E[V + n - 1]: the only numbers that are trained
    c_theta(y)        the text encoder's output for prompt y, (77, D)

The placeholder becomes n tokens, `<star>`, `<star>_1`, ..., `<star>_{n-1}` (the names diffusers'
textual_inversion example and `load_textual_inversion` use); a prompt "a photo of <star>" is
read as "a photo of <star> <star>_1 ... <star>_{n-1}", and token `<star>_i` looks up row V + i.
The rows start as a copy of an initializer word's embedding ("circle"), then follow the
diffusion loss with the UNet, VAE and text encoder all frozen (eq. 2):

    v_* = argmin_v  E_{z ~ E(x), y, eps ~ N(0, I), t} || eps - eps_theta(z_t, t, c_theta(y)) ||^2

Files (what other tools read and write):

- diffusers (`learned_embeds.safetensors`, written by diffusers' textual_inversion example and
  read by `StableDiffusionPipeline.load_textual_inversion`): one key, the placeholder, holding
  v_* as a tensor (n, D).
- A1111 safetensors: one key `emb_params`, holding (n, D); the trigger word is the file name.
- A1111 `.pt` (read only): a pickled dict with `string_to_param` {"*": (n, D)} and `name`. It is
  opened with `torch.load(weights_only=True)`, which refuses anything but tensors and plain
  containers, so a file cannot run code.

References: diffusers `examples/textual_inversion/textual_inversion.py` (placeholder tokens,
initializer, restoring the frozen rows), `loaders/textual_inversion.py` (load_textual_inversion,
maybe_convert_prompt); AUTOMATIC1111 `modules/textual_inversion/textual_inversion.py`.
"""

import pickle
import weakref
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from sdlearn.models.clip import clean_text
from sdlearn.models.files import write_file  # atomic: a failed save keeps an older file whole

WEIGHT_NAME = "learned_embeds.safetensors"  # diffusers' TEXT_INVERSION_NAME_SAFE
A1111_KEY = "emb_params"
A1111_PT_KEY = "string_to_param"
FORMATS = ("diffusers", "a1111")


class TextualInversionError(ValueError):
    """A placeholder, an embedding file or a call does not fit the tokenizer and text encoder."""


# 1. New words, new rows --------------------------------------------------------------------


def _table(text_encoder: nn.Module) -> nn.Embedding:
    """E, the token-embedding table (transformers' `text_model.embeddings.token_embedding`)."""
    return text_encoder.text_model.embeddings.token_embedding


def vector_tokens(placeholder: str, num_vectors: int) -> list[str]:
    """The n token names of a placeholder: ["<star>", "<star>_1", ..., "<star>_{n-1}"] (diffusers' naming)."""
    return [placeholder] + [f"{placeholder}_{i}" for i in range(1, num_vectors)]


def _add_rows(tokenizer, text_encoder: nn.Module, placeholder: str, rows: torch.Tensor) -> list[int]:
    """Add the tokens of `placeholder` to the tokenizer and rows (n, D) to E; return the new ids."""
    if not isinstance(placeholder, str) or not placeholder or placeholder != placeholder.strip() or " " in placeholder:
        raise TextualInversionError(f"The placeholder must be one word without spaces, got {placeholder!r}; use e.g. '<star>'.")
    table = _table(text_encoder)
    V, D = table.weight.shape
    if len(tokenizer) != V:
        raise TextualInversionError(f"The tokenizer has {len(tokenizer)} tokens but the text encoder's table has {V} rows; "
                                    "use the tokenizer and text encoder of the same model.")
    if rows.ndim != 2 or rows.shape[1] != D:
        raise TextualInversionError(f"The embedding has shape {tuple(rows.shape)}, but this text encoder needs (n, {D}) vectors; "
                                    f"use an embedding trained for a text encoder {D} wide (SD 1.x: 768, SD 2.x: 1024).")
    if not torch.isfinite(rows).all():
        raise TextualInversionError(f"The embedding for {placeholder!r} holds NaN or infinite values; retrain it or use another file.")
    tokens = vector_tokens(placeholder, rows.shape[0])
    # Added tokens are matched in the cleaned (lower-case) prompt, so "<Star>" would be "<star>".
    cleaned = {clean_text(t) for t in getattr(tokenizer, "added_tokens", {})}
    taken = [t for t in tokens if t in tokenizer.encoder or clean_text(t) in cleaned]
    if taken:
        raise TextualInversionError(f"{taken[0]!r} is already in the tokenizer's vocabulary; choose another placeholder "
                                    "(e.g. '<my-concept>') or load the model again without it.")
    # E' = [E; v_*]  (V + n, D): a new table, the old rows copied bit for bit.
    grown = nn.Embedding(V + len(tokens), D, device=table.weight.device, dtype=table.weight.dtype)
    with torch.no_grad():
        grown.weight[:V] = table.weight
        grown.weight[V:] = rows.to(grown.weight)
    grown.weight.requires_grad_(table.weight.requires_grad)
    text_encoder.text_model.embeddings.token_embedding = grown
    text_encoder.config.vocab_size = V + len(tokens)  # the model checks ids against it
    ids = list(range(V, V + len(tokens)))  # token <star>_i -> row V + i
    for token, i in zip(tokens, ids):
        tokenizer.encoder[token] = i
        tokenizer.decoder[i] = token
        tokenizer.added_tokens[token] = (token,)
    tokenizer.added_tokens[placeholder] = tuple(tokens)  # "<star>" in a prompt -> all n tokens
    return ids


def add_tokens(tokenizer, text_encoder: nn.Module, placeholder: str = "<star>", num_vectors: int = 1,
               initializer: str = "circle") -> list[int]:
    """Add `placeholder` (n = num_vectors tokens) to the tokenizer and n rows to E; return their ids.

    Each new row starts as the embedding of `initializer`, a word the tokenizer keeps as one
    token (the diffusers example's `initializer_token`). After this, the tokenizer reads
    "<star>" in a prompt as the n tokens <star>, <star>_1, ..., and the text encoder looks them up.
    """
    if not (isinstance(num_vectors, int) and num_vectors >= 1):
        raise TextualInversionError(f"num_vectors must be a positive integer, got {num_vectors!r}; use e.g. num_vectors=1.")
    init_ids = tokenizer.encode(initializer) if isinstance(initializer, str) else []
    if len(init_ids) != 1:
        raise TextualInversionError(f"The initializer {initializer!r} is {len(init_ids)} tokens, but it must be exactly one; "
                                    "choose a single word the tokenizer knows, e.g. 'circle'.")
    row = _table(text_encoder).weight.detach()[init_ids[0]]  # (D,)
    return _add_rows(tokenizer, text_encoder, placeholder, row.expand(num_vectors, -1).clone())


def placeholder_ids(tokenizer, placeholder: str) -> list[int]:
    """The ids of the n tokens a placeholder stands for."""
    if placeholder not in getattr(tokenizer, "added_tokens", {}):
        raise TextualInversionError(f"{placeholder!r} is not a placeholder of this tokenizer; call add_tokens or load_embedding first.")
    return tokenizer.convert_tokens_to_ids(list(tokenizer.added_tokens[placeholder]))


# 2. Training only the new rows -------------------------------------------------------------
#
# Why a gradient mask and not a separate (n, D) Parameter: the table stays the one (V + n, D)
# `token_embedding.weight` that transformers, diffusers and our own save_pretrained know, so
# nothing is renamed or re-assembled for saving. The hook sets the gradient of every old row
# to exactly 0, so SGD and Adam/AdamW with weight_decay=0 leave those rows bit-identical (Adam's
# moments stay 0 there, and 0 / (sqrt(0) + eps) = 0). Weight decay would still shrink them:
# train with weight_decay=0 (diffusers' example copies the frozen rows back after each step instead).


class _KeepOnlyRows:
    """A gradient hook: grad (V, D) -> grad with every row outside `rows` set to 0."""

    def __init__(self, rows: list[int], num_rows: int, device):
        self.frozen = torch.ones(num_rows, 1, dtype=torch.bool, device=device)  # (V, 1)
        self.frozen[rows] = False

    def __call__(self, grad: torch.Tensor) -> torch.Tensor:
        return grad.masked_fill(self.frozen, 0.0)


_HOOKS = weakref.WeakKeyDictionary()  # the table's Parameter -> its hook handle


def trainable_embeddings(text_encoder: nn.Module, token_ids) -> list[nn.Parameter]:
    """Freeze the text encoder except the rows `token_ids` of E; return [E] for the optimiser.

    Use an optimiser without weight decay (e.g. torch.optim.AdamW(..., weight_decay=0)).
    """
    weight = _table(text_encoder).weight
    ids = [int(i) for i in token_ids]
    if not ids or min(ids) < 0 or max(ids) >= weight.shape[0]:
        raise TextualInversionError(f"token_ids must be rows of the {weight.shape[0]}-row table, got {ids}; "
                                    "pass the ids add_tokens or load_embedding returned.")
    text_encoder.requires_grad_(False)
    weight.requires_grad_(True)
    if weight in _HOOKS:
        _HOOKS.pop(weight).remove()  # one hook at a time
    _HOOKS[weight] = weight.register_hook(_KeepOnlyRows(ids, weight.shape[0], weight.device))
    return [weight]


# 3. Files ----------------------------------------------------------------------------------


def save_embedding(tokenizer, text_encoder: nn.Module, placeholder: str, path, format: str = "diffusers",
                   overwrite: bool = False) -> Path:
    """Write v_* (n, D) of `placeholder` in diffusers' or A1111's safetensors format; return the path.

    diffusers: {placeholder: (n, D)}; a folder gets `learned_embeds.safetensors`.
    a1111: {"emb_params": (n, D)}; a folder gets `<placeholder without <>>.safetensors`, since
    A1111 uses the file name as the trigger word.
    The write is atomic, and an existing file is refused unless overwrite=True.
    """
    if format not in FORMATS:
        raise TextualInversionError(f"Unknown embedding file format {format!r}; use 'diffusers' or 'a1111'.")
    ids = placeholder_ids(tokenizer, placeholder)
    rows = _table(text_encoder).weight.detach()[ids].cpu().contiguous()  # (n, D)
    state = {placeholder: rows} if format == "diffusers" else {A1111_KEY: rows}
    path = Path(path)
    if path.is_dir():
        path = path / (WEIGHT_NAME if format == "diffusers" else f"{placeholder.strip('<>') or 'embedding'}.safetensors")
    if path.suffix != ".safetensors":
        raise TextualInversionError(f"{path} does not end in .safetensors; embeddings are saved as safetensors only, name the file e.g. {WEIGHT_NAME}.")
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} already exists; pass overwrite=True to replace it, or choose another path.")
    path.parent.mkdir(parents=True, exist_ok=True)
    write_file(path, lambda tmp: save_file(state, str(tmp), metadata={"format": "pt"}))
    return path


def _read(path: Path):
    """The file's contents: a dict of tensors (safetensors) or what torch.load(weights_only=True) gives."""
    if path.suffix == ".safetensors":
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}
    if path.suffix in (".pt", ".bin"):
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as exc:
            raise TextualInversionError(f"{path} needs more than plain tensors to unpickle ({str(exc).splitlines()[0]}); "
                                        "it is not loaded for safety, get a .safetensors version of this embedding.") from exc
    raise TextualInversionError(f"{path} is not a .safetensors, .pt or .bin file; pass a textual-inversion embedding file.")


def _parse(data, path: Path, token: str | None) -> tuple[str, torch.Tensor]:
    """(placeholder, v_* (n, D)) from any of the three layouts."""
    if isinstance(data, dict) and A1111_PT_KEY in data:  # A1111 .pt
        params = data[A1111_PT_KEY]
        rows = params.get("*") if isinstance(params, dict) else None
        name = token or data.get("name") or path.stem
    elif isinstance(data, dict) and A1111_KEY in data and len(data) == 1:  # A1111 safetensors
        rows, name = data[A1111_KEY], token or path.stem
    elif isinstance(data, dict) and len(data) == 1:  # diffusers
        (key, rows), = data.items()
        name = token or key
    else:
        found = f"keys {sorted(map(str, data))[:4]}" if isinstance(data, dict) and data else "no embedding"
        raise TextualInversionError(f"{path} holds {found}, not one embedding; expected {{placeholder: (n, D)}} (diffusers), "
                                    "{'emb_params': (n, D)} or a string_to_param dict (A1111), check that this is a textual-inversion file.")
    if not isinstance(rows, torch.Tensor) or not rows.is_floating_point():
        raise TextualInversionError(f"{path} holds no embedding tensor for {name!r}; expected a float tensor (n, D), check the file.")
    rows = rows.detach().float() if rows.dtype in (torch.float16, torch.bfloat16) else rows.detach()
    return name, rows[None] if rows.ndim == 1 else rows  # a single vector (D,) -> (1, D)


def load_embedding(path, tokenizer, text_encoder: nn.Module, token: str | None = None) -> list[int]:
    """Read an embedding file (diffusers, A1111 .safetensors or A1111 .pt) and add it; return the new ids.

    The placeholder is `token` if given, else the file's key (diffusers), its `name` (A1111 .pt)
    or the file name (A1111 safetensors). A folder means folder/learned_embeds.safetensors.
    """
    path = Path(path)
    if path.is_dir():
        path = path / WEIGHT_NAME
    if not path.is_file():
        raise TextualInversionError(f"There is no embedding file at {path}; pass a .safetensors/.pt file or a folder holding {WEIGHT_NAME}.")
    name, rows = _parse(_read(path), path, token)
    return _add_rows(tokenizer, text_encoder, name, rows)
