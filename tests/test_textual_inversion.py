"""sdlearn.textual_inversion against diffusers' `load_textual_inversion` on the shipped mini-SD.

The new rows are random (a copy of the initializer's row would hide a wrong row index). Files
go both ways: sdlearn writes, diffusers reads; a diffusers file made by hand (as diffusers'
docs describe it: {placeholder: tensor}) is read by sdlearn; the A1111 formats are read too.
"""

import argparse
import json

import pytest
import torch
from diffusers import StableDiffusionPipeline
from safetensors.torch import load_file, save_file

from sdlearn.clip import CLIPTextModel, CLIPTokenizer
from sdlearn.models.checkpoint import CheckpointError
from sdlearn.pipeline import load_pipeline
from sdlearn.datasets import data_path
from sdlearn.textual_inversion import (
    TextualInversionError,
    add_tokens,
    load_embedding,
    placeholder_ids,
    save_embedding,
    trainable_embeddings,
)

TOL = 1e-5
PROMPT = "a <star> in the top left"


@pytest.fixture(scope="module")
def folder():
    return data_path("mini-sd", "train-mini-sd")


def sd_text(folder):
    return CLIPTokenizer.from_pretrained(folder / "tokenizer"), CLIPTextModel.from_pretrained(folder / "text_encoder").eval()


def randomise(text_encoder, ids, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        table = text_encoder.text_model.embeddings.token_embedding.weight
        table[ids] = torch.randn(len(ids), table.shape[1], generator=g)


def diffusers_encode(folder, path, prompt, token=None):
    """What a diffusers StableDiffusionPipeline feeds its UNet for `prompt` after load_textual_inversion."""
    pipe = StableDiffusionPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_textual_inversion(str(path), token=token)
    converted = pipe.maybe_convert_prompt(prompt, pipe.tokenizer)  # "<star>" -> "<star> <star>_1 ..."
    ids = pipe.tokenizer(converted, padding="max_length", max_length=pipe.tokenizer.model_max_length,
                         truncation=True, return_tensors="pt").input_ids
    hidden, _ = pipe.encode_prompt(prompt, "cpu", 1, False)
    return ids, hidden


def sdlearn_encode(tokenizer, text_encoder, prompt):
    ids = tokenizer([prompt])
    with torch.no_grad():
        return ids, text_encoder(ids)


def assert_parity(ours, theirs):
    (ids, hidden), (ref_ids, ref_hidden) = ours, theirs
    assert ids.tolist() == ref_ids.tolist()
    err = (hidden - ref_hidden).abs().max().item()
    assert err <= TOL, f"max abs error {err:.2e}"


# 1. Tokens and rows ------------------------------------------------------------------------


def test_add_tokens_grows_table_and_expands_placeholder(folder):
    tok, te = sd_text(folder)
    V = len(tok)
    before = te.text_model.embeddings.token_embedding.weight.detach().clone()
    ids = add_tokens(tok, te, "<star>", num_vectors=3, initializer="circle")
    assert ids == [V, V + 1, V + 2] == placeholder_ids(tok, "<star>")
    assert tok.tokenize("a <star> circle") == ["a</w>", "<star>", "<star>_1", "<star>_2", "circle</w>"]
    table = te.text_model.embeddings.token_embedding.weight
    assert table.shape == (V + 3, before.shape[1]) and te.config.vocab_size == V + 3
    assert torch.equal(table[:V], before)
    circle = before[tok.encode("circle")[0]]
    assert all(torch.equal(table[i], circle) for i in ids)


@pytest.mark.parametrize("n", [1, 3])
def test_sdlearn_file_read_by_diffusers(folder, tmp_path, n):
    tok, te = sd_text(folder)
    ids = add_tokens(tok, te, "<star>", num_vectors=n)
    randomise(te, ids)
    path = save_embedding(tok, te, "<star>", tmp_path)
    assert path.name == "learned_embeds.safetensors"
    state = load_file(path)
    assert list(state) == ["<star>"] and state["<star>"].shape == (n, 64)
    ours = sdlearn_encode(tok, te, PROMPT)
    assert ours[0][0, 2:2 + n].tolist() == ids  # the placeholder really became n new tokens
    assert_parity(ours, diffusers_encode(folder, tmp_path, PROMPT))


def test_a1111_safetensors_read_by_diffusers(folder, tmp_path):
    tok, te = sd_text(folder)
    randomise(te, add_tokens(tok, te, "<star>", num_vectors=2), seed=3)
    path = save_embedding(tok, te, "<star>", tmp_path / "star.safetensors", format="a1111")
    assert list(load_file(path)) == ["emb_params"] and load_file(path)["emb_params"].shape == (2, 64)
    assert_parity(sdlearn_encode(tok, te, PROMPT), diffusers_encode(folder, path, PROMPT, token="<star>"))


def test_hand_made_diffusers_file_read_by_sdlearn(folder, tmp_path):
    g = torch.Generator().manual_seed(5)
    vectors = torch.randn(2, 64, generator=g)
    save_file({"<cat-toy>": vectors}, tmp_path / "learned_embeds.safetensors")
    tok, te = sd_text(folder)
    ids = load_embedding(tmp_path, tok, te)
    assert torch.equal(te.text_model.embeddings.token_embedding.weight[ids].detach(), vectors)
    prompt = "a <cat-toy> on the right"
    assert_parity(sdlearn_encode(tok, te, prompt), diffusers_encode(folder, tmp_path, prompt))


def test_a1111_pt_read_by_sdlearn(folder, tmp_path):
    vectors = torch.randn(2, 64, generator=torch.Generator().manual_seed(7))
    path = tmp_path / "shape-x.pt"
    torch.save({"string_to_token": {"*": 265}, "string_to_param": {"*": vectors}, "name": "shapex",
                "step": 100, "sd_checkpoint": None, "sd_checkpoint_name": None}, path)
    tok, te = sd_text(folder)
    ids = load_embedding(path, tok, te)
    assert tok.tokenize("a shapex")[1:] == ["shapex", "shapex_1"]
    assert torch.equal(te.text_model.embeddings.token_embedding.weight[ids].detach(), vectors)
    prompt = "a shapex on the left"
    assert_parity(sdlearn_encode(tok, te, prompt), diffusers_encode(folder, path, prompt))
    assert load_embedding(path, tok, te, token="<other>") == [ids[-1] + 1, ids[-1] + 2]


def test_a1111_safetensors_round_trip_uses_file_name(folder, tmp_path):
    tok, te = sd_text(folder)
    randomise(te, add_tokens(tok, te, "<star>", num_vectors=2))
    path = save_embedding(tok, te, "<star>", tmp_path, format="a1111")
    assert path.name == "star.safetensors"
    tok2, te2 = sd_text(folder)
    ids = load_embedding(path, tok2, te2)
    assert tok2.tokenize("star") == ["star", "star_1"]
    assert_parity(sdlearn_encode(tok2, te2, "a star"), sdlearn_encode(tok, te, "a <star>"))
    assert ids == placeholder_ids(tok2, "star")


# 2. Training -------------------------------------------------------------------------------


def test_one_step_changes_only_new_rows(folder):
    tok, te = sd_text(folder)
    new = add_tokens(tok, te, "<star>", num_vectors=2)
    before = {k: v.detach().clone() for k, v in te.state_dict().items()}
    params = trainable_embeddings(te, new)
    assert [n for n, p in te.named_parameters() if p.requires_grad] == ["text_model.embeddings.token_embedding.weight"]
    optimiser = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.0)
    ids = tok(["a <star> in the top left", "a red circle"])  # old tokens get gradients too, before the mask
    loss = te(ids).pow(2).mean()
    loss.backward()
    optimiser.step()
    after = te.state_dict()
    key = "text_model.embeddings.token_embedding.weight"
    V = len(tok) - 2
    assert torch.equal(after[key][:V], before[key][:V])
    assert not torch.equal(after[key][new], before[key][new])
    assert all(torch.equal(after[k], before[k]) for k in before if k != key)


# 3. Bad input ------------------------------------------------------------------------------


def test_placeholder_already_in_vocabulary(folder):
    tok, te = sd_text(folder)
    add_tokens(tok, te, "<star>")
    with pytest.raises(TextualInversionError, match="'<star>' is already in the tokenizer's vocabulary; choose another placeholder"):
        add_tokens(tok, te, "<star>")
    with pytest.raises(TextualInversionError, match="'circle</w>' is already in the tokenizer's vocabulary"):
        add_tokens(tok, te, "circle</w>")
    with pytest.raises(TextualInversionError, match="'<STAR>' is already in the tokenizer's vocabulary"):
        add_tokens(tok, te, "<STAR>")  # prompts are matched in lower case: it would be "<star>"


def test_bad_arguments(folder, tmp_path):
    tok, te = sd_text(folder)
    with pytest.raises(TextualInversionError, match="initializer 'a red circle' is 3 tokens, but it must be exactly one"):
        add_tokens(tok, te, initializer="a red circle")
    with pytest.raises(TextualInversionError, match="num_vectors must be a positive integer"):
        add_tokens(tok, te, num_vectors=0)
    with pytest.raises(TextualInversionError, match="must be one word without spaces"):
        add_tokens(tok, te, "my star")
    with pytest.raises(TextualInversionError, match="is not a placeholder of this tokenizer; call add_tokens"):
        save_embedding(tok, te, "<star>", tmp_path)
    add_tokens(tok, te, "<star>")
    with pytest.raises(TextualInversionError, match="Unknown embedding file format 'kohya'"):
        save_embedding(tok, te, "<star>", tmp_path, format="kohya")
    path = save_embedding(tok, te, "<star>", tmp_path)
    with pytest.raises(FileExistsError, match="already exists; pass overwrite=True"):
        save_embedding(tok, te, "<star>", tmp_path)
    assert save_embedding(tok, te, "<star>", tmp_path, overwrite=True) == path
    with pytest.raises(TextualInversionError, match="There is no embedding file at"):
        load_embedding(tmp_path / "missing.safetensors", tok, te)
    with pytest.raises(TextualInversionError, match="token_ids must be rows of the"):
        trainable_embeddings(te, [10_000])


def bad_file(tmp_path, state, name="bad.safetensors"):
    path = tmp_path / name
    save_file(state, path)
    return path


@pytest.mark.parametrize("state, message", [
    ({}, r"holds no embedding, not one embedding; expected \{placeholder: \(n, D\)\}"),
    ({"clip_l": torch.zeros(1, 64), "clip_g": torch.zeros(1, 64)}, r"holds keys \['clip_g', 'clip_l'\], not one embedding"),
    ({"<x>": torch.zeros(1, 32)}, r"has shape \(1, 32\), but this text encoder needs \(n, 64\) vectors"),
    ({"<x>": torch.tensor([[float("nan")] * 64])}, "holds NaN or infinite values; retrain it"),
    ({"<x>": torch.zeros(1, 64, dtype=torch.long)}, "holds no embedding tensor for '<x>'; expected a float tensor"),
])
def test_bad_files(folder, tmp_path, state, message):
    tok, te = sd_text(folder)
    V = len(tok)
    with pytest.raises(TextualInversionError, match=message):
        load_embedding(bad_file(tmp_path, state), tok, te)
    assert len(tok) == V == te.text_model.embeddings.token_embedding.weight.shape[0]  # nothing half-added


def test_pickle_needing_more_than_weights_is_refused(folder, tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"string_to_param": {"*": torch.zeros(1, 64)}, "extra": argparse.Namespace(a=1)}, path)
    tok, te = sd_text(folder)
    with pytest.raises(TextualInversionError, match="needs more than plain tensors to unpickle .* get a .safetensors version"):
        load_embedding(path, tok, te)
    other = tmp_path / "embedding.ckpt"
    other.write_bytes(b"")
    with pytest.raises(TextualInversionError, match="is not a .safetensors, .pt or .bin file"):
        load_embedding(other, tok, te)


# 4. Folders with added tokens -------------------------------------------------------------

TOKEN_PROMPTS = ["a <star> in the top left", "a large <star> and shapex", "A SHAPEX on the right", "shapex<star>!"]


def transformers_ids(tokenizer, prompts):
    """transformers' ids for prompts as diffusers feeds them ("<star>" -> "<star> <star>_1", maybe_convert_prompt)."""
    from diffusers.loaders import TextualInversionLoaderMixin

    converted = TextualInversionLoaderMixin().maybe_convert_prompt(prompts, tokenizer)
    return tokenizer(converted, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids


def with_added_tokens(folder):
    tok, te = sd_text(folder)
    randomise(te, add_tokens(tok, te, "<star>", num_vectors=2))
    randomise(te, add_tokens(tok, te, "shapex"), seed=1)
    return tok, te


@pytest.mark.parametrize("cls", ["CLIPTokenizer", "CLIPTokenizerFast"])
def test_tokenizer_with_added_tokens_saved_for_transformers(folder, tmp_path, cls):
    import transformers

    tok, _ = with_added_tokens(folder)
    tok.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    V = len(tok) - 3
    assert config["added_tokens_decoder"][str(V)] == {"content": "<star>", "lstrip": False, "normalized": True, "rstrip": False,
                                                      "single_word": False, "special": False}
    assert json.loads((tmp_path / "added_tokens.json").read_text()) == {"<star>": V, "<star>_1": V + 1, "shapex": V + 2}
    assert len(json.loads((tmp_path / "vocab.json").read_text())) == V  # the trained vocabulary only, as transformers writes it
    theirs = getattr(transformers, cls).from_pretrained(tmp_path)
    assert len(theirs) == len(tok)
    assert tok(TOKEN_PROMPTS).tolist() == transformers_ids(theirs, TOKEN_PROMPTS).tolist()
    ours = CLIPTokenizer.from_pretrained(tmp_path)
    assert ours.added_tokens == tok.added_tokens and ours(TOKEN_PROMPTS).tolist() == tok(TOKEN_PROMPTS).tolist()


def test_tokenizer_with_added_tokens_saved_by_transformers(folder, tmp_path):
    """transformers >= 5 writes only tokenizer.json (its "added_tokens"); older versions added_tokens.json + tokenizer_config."""
    import transformers

    theirs = transformers.CLIPTokenizer.from_pretrained(folder / "tokenizer")
    theirs.add_tokens(["<star>", "<star>_1", "shapex"])
    theirs.save_pretrained(tmp_path / "new")
    ours = CLIPTokenizer.from_pretrained(tmp_path / "new")
    assert ours.added_tokens == {"<star>": ("<star>", "<star>_1"), "<star>_1": ("<star>_1",), "shapex": ("shapex",)}
    assert ours(TOKEN_PROMPTS).tolist() == transformers_ids(theirs, TOKEN_PROMPTS).tolist()
    old = tmp_path / "old"  # the slow tokenizer's files (transformers 4.x), written out by hand
    CLIPTokenizer.from_pretrained(folder / "tokenizer").save_pretrained(old)
    V = len(ours) - 3
    (old / "added_tokens.json").write_text(json.dumps({"<star>": V, "<star>_1": V + 1, "shapex": V + 2}))
    assert CLIPTokenizer.from_pretrained(old)(TOKEN_PROMPTS).tolist() == ours(TOKEN_PROMPTS).tolist()


def test_added_tokens_that_do_not_fit_are_refused(folder, tmp_path):
    tok, _ = with_added_tokens(folder)
    tok.save_pretrained(tmp_path)
    V = len(tok) - 3
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    legacy = {k: v for k, v in config.items() if k != "added_tokens_decoder"}  # then added_tokens.json is the list
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(legacy))
    (tmp_path / "added_tokens.json").write_text(json.dumps({"<star>": V, "<star>_1": V + 1, "other": V + 1}))
    with pytest.raises(CheckpointError, match=f"gives id {V + 1} to two added tokens, '<star>_1' and 'other'"):
        CLIPTokenizer.from_pretrained(tmp_path)
    (tmp_path / "added_tokens.json").write_text(json.dumps({"<star>": V, "<star>_1": V + 1, "shapex": V + 5}))
    with pytest.raises(CheckpointError, match=r"must be \[.*\]\.\.\.; the files come from different tokenizers"):
        CLIPTokenizer.from_pretrained(tmp_path)
    # added_tokens_decoder, when there, is the list (as in transformers >= 5): added_tokens.json is not read then
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    assert CLIPTokenizer.from_pretrained(tmp_path).added_tokens == tok.added_tokens


def test_pipeline_with_added_tokens_saves_and_reloads(folder, tmp_path):
    """A whole pipeline: tokens in tokenizer/, the grown table in text_encoder/ (config vocab_size too), in sdlearn and diffusers."""
    pipe = load_pipeline(folder)
    tok, te = pipe.tokenizer, pipe.text_encoder
    randomise(te, add_tokens(tok, te, "<star>", num_vectors=2))
    pipe.save_pretrained(tmp_path)
    V = len(tok)
    assert json.loads((tmp_path / "text_encoder" / "config.json").read_text())["vocab_size"] == V
    again = load_pipeline(tmp_path)
    assert again.text_encoder.text_model.embeddings.token_embedding.weight.shape[0] == V == len(again.tokenizer)
    assert_parity(sdlearn_encode(again.tokenizer, again.text_encoder.eval(), PROMPT), sdlearn_encode(tok, te.eval(), PROMPT))
    theirs = StableDiffusionPipeline.from_pretrained(tmp_path)
    assert theirs.text_encoder.config.vocab_size == V
    ids = transformers_ids(theirs.tokenizer, [PROMPT])
    hidden, _ = theirs.encode_prompt(PROMPT, "cpu", 1, False)
    assert_parity(sdlearn_encode(tok, te, PROMPT), (ids, hidden))
