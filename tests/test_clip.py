"""CLIPTokenizer and CLIPTextModel against transformers; contrastive loss and the tiny CLIP."""

import json
import random
import warnings

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from sdlearn.models.checkpoint import CheckpointError
from sdlearn.clip import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTokenizer,
    TinyCLIP,
    bpe,
    bytes_to_unicode,
    causal_mask,
    contrastive_loss,
    train_shapes_tokenizer,
    train_tiny_clip,
)
from sdlearn.datasets import COLOUR_NAMES, POSITIONS, SHAPES, SIZES, Shapes, data_dir

SD1_TOKENIZER = data_dir() / "tokenizers" / "clip-vit-l14"
SHAPES_TOKENIZER = data_dir() / "tokenizers" / "shapes"
TOL = 1e-5

transformers.logging.set_verbosity_error()  # tiny configs make it warn about token ids


# ------------------------------------------------------------------------------------------
# Prompts: deterministic, and as awkward as real prompts get
# ------------------------------------------------------------------------------------------

WORDS = (
    "a photo of an astronaut riding horse on mars highly detailed painting by greg rutkowski trending "
    "artstation 8k octane render cinematic lighting portrait landscape sunset over the ocean cyberpunk "
    "city at night oil canvas watercolor sketch dog cat castle mountains forest river ultra realistic"
).split()
UNICODE = ["café", "naïve", "Zürich", "façade", "São Paulo", "mañana", "crème brûlée", "Ångström",
           "東京", "日本語のテキスト", "中文提示词", "한국어", "Москва", "ΟΔΟΣ", "straße", "İstanbul",
           "🐱", "🚀✨", "👍🏽", "🐱‍👤", "❤️", "e\u0301", "ﬁne", "“quoted”", "‘single’", "—", "…", "ＦＵＬＬ", "\u00a0"]
PUNCT = [",", ".", "!", "?", "!!!", "...", "(", ")", "[", "]", "{", "}", ":", ";", "-", "--", "/", "'", '"',
         "#", "@", "&", "*", "+", "=", "<", ">", "|", "~", "^", "%", "$", "it's", "don't", "we'll", "I'M",
         "you're", "they've", "she'd", "o'clock"]
HTML = ["&amp;", "&lt;b&gt;", "&quot;", "&#39;", "&nbsp;", "&amp;amp;", "&copy;"]
SPACES = [" ", "  ", "\t", "\n", " \n\t ", "   "]


def make_prompts(n: int, seed: int = 0) -> list:
    rng = random.Random(seed)
    shapes = Shapes(200, seed=seed, split="all", captions="partial", drop_prob=0.4, cache=False).captions
    prompts = []
    for i in range(n):
        kind = i % 6
        if kind == 0:
            prompts.append(shapes[i % len(shapes)])
            continue
        length = rng.randint(1, 12) if kind != 5 else rng.randint(60, 120)  # kind 5: over 77 tokens
        parts = []
        for _ in range(length):
            r = rng.random()
            if r < 0.55:
                word = rng.choice(WORDS)
            elif r < 0.7:
                word = rng.choice(UNICODE)
            elif r < 0.82:
                word = rng.choice(PUNCT)
            elif r < 0.9:
                word = str(rng.choice([rng.randint(0, 9), rng.randint(10, 99999), round(rng.uniform(0, 100), 2)]))
            else:
                word = rng.choice(HTML)
            if rng.random() < 0.2:
                word = word.upper() if rng.random() < 0.5 else word.capitalize()
            parts.append(word)
            parts.append(rng.choice(SPACES) if rng.random() < 0.2 else " ")
        prompts.append(("  " if kind == 3 else "") + "".join(parts))
    return prompts


PROMPTS = make_prompts(1200)


def hf_ids(tokenizer, prompts):
    return tokenizer(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids


def first_mismatch(want, got, prompts):
    bad = (want != got).any(dim=1).nonzero().flatten().tolist()
    return None if not bad else (len(bad), prompts[bad[0]], want[bad[0]].tolist(), got[bad[0]].tolist())


# ------------------------------------------------------------------------------------------
# Tokenizer
# ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sd1_tokenizers():
    return CLIPTokenizer.from_pretrained(SD1_TOKENIZER), transformers.CLIPTokenizer.from_pretrained(SD1_TOKENIZER)


def test_prompt_set_covers_the_hard_cases():
    text = "".join(PROMPTS)
    assert len(PROMPTS) >= 1000
    for needle in ("&amp;", "東京", "🐱", "  ", "\t", "it's", "a large", "0", "İ"):
        assert needle in text
    assert sum(len(p.split()) > 77 for p in PROMPTS) >= 100


def test_sd1_vocabulary_is_clips():
    tok = CLIPTokenizer.from_pretrained(SD1_TOKENIZER)
    assert len(tok) == 49408 and len(tok.merges) == 48894
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (49406, 49407, 49407)
    assert tok.decoder[0] == "!" and tok.decoder[256] == "!</w>"
    # ids published for openai/clip-vit-large-patch14
    assert tok("a photo of a cat")[0, :8].tolist() == [49406, 320, 1125, 539, 320, 2368, 49407, 49407]


def test_ids_equal_transformers_sd1(sd1_tokenizers):
    ours, theirs = sd1_tokenizers
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # long prompts warn about truncation
        got = ours(PROMPTS)
    want = hf_ids(theirs, PROMPTS)
    assert got.shape == (len(PROMPTS), 77) and got.dtype == torch.long
    assert first_mismatch(want, got, PROMPTS) is None


def test_ids_equal_transformers_shapes_vocab():
    ours = CLIPTokenizer.from_pretrained(SHAPES_TOKENIZER)
    theirs = transformers.CLIPTokenizer.from_pretrained(SHAPES_TOKENIZER)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        got = ours(PROMPTS)
    assert first_mismatch(hf_ids(theirs, PROMPTS), got, PROMPTS) is None


def test_bpe_pieces_start_end_and_padding(sd1_tokenizers):
    ours, _ = sd1_tokenizers
    assert ours.tokenize("A  Photo of an astronaut!") == ["a</w>", "photo</w>", "of</w>", "an</w>", "astronaut</w>", "!</w>"]
    ids = ours("a cat")[0]
    assert ids[0] == ours.bos_token_id and ids[1:3].tolist() == ours.encode("a cat") and (ids[3:] == ours.eos_token_id).all()
    assert ours.decode(ours.encode("Hello,   WORLD  café!")) == "hello , world café !"


def test_bpe_merges_lowest_rank_first():
    ranks = {("a", "b"): 0, ("b", "c</w>"): 1, ("ab", "c</w>"): 2}
    assert bpe("abc", ranks) == ["abc</w>"]  # a+b first (rank 0), then ab + c</w>
    assert bpe("bc", ranks) == ["bc</w>"]
    assert bpe("x", ranks) == ["x</w>"]
    assert len(bytes_to_unicode()) == 256 and len(set(bytes_to_unicode().values())) == 256


def test_truncation_warning_names_the_dropped_words(sd1_tokenizers):
    ours, theirs = sd1_tokenizers
    prompt = "first " + "cat " * 80 + "and the very last words"  # 85 tokens: 10 are cut
    with pytest.warns(UserWarning, match="the very last words") as record:
        ids = ours(prompt)
    message = str(record[0].message)
    dropped = theirs.decode(theirs(prompt).input_ids[1:-1][75:])  # the words transformers would cut
    assert "at most 75 tokens" in message and repr(dropped) in message and "first" not in message
    assert torch.equal(ids, hf_ids(theirs, [prompt]))
    assert ids[0, -1] == ours.eos_token_id
    with pytest.raises(ValueError, match="truncation=True"):
        ours(prompt, truncation=False)


def test_no_warning_when_the_prompt_fits(sd1_tokenizers):
    ours, _ = sd1_tokenizers
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ours("a " * 75)


def test_sd2_pad_token_is_id_0(tmp_path, sd1_tokenizers):
    """SD 2.x's tokenizer folder pads with "!" (id 0), set in special_tokens_map.json."""
    ours_sd1, _ = sd1_tokenizers
    ours_sd1.save_pretrained(tmp_path)
    special = json.loads((tmp_path / "special_tokens_map.json").read_text())
    special["pad_token"] = "!"
    (tmp_path / "special_tokens_map.json").write_text(json.dumps(special))
    ours = CLIPTokenizer.from_pretrained(tmp_path)
    theirs = transformers.CLIPTokenizer.from_pretrained(tmp_path)
    assert ours.pad_token_id == theirs.pad_token_id == 0
    ids = ours("a cat")[0]
    assert ids[:4].tolist() == [49406, 320, 2368, 49407] and (ids[4:] == 0).all()
    prompts = PROMPTS[:300] + ["hello! world!!", "wow!"]  # a typed "!" is the pad token too, as in transformers
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert first_mismatch(hf_ids(theirs, prompts), ours(prompts), prompts) is None


def test_save_pretrained_loads_in_transformers_and_back(tmp_path):
    ours = CLIPTokenizer.from_pretrained(SHAPES_TOKENIZER)
    ours.save_pretrained(tmp_path / "ours")
    for name in ("vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json"):
        assert (tmp_path / "ours" / name).is_file()
    theirs = transformers.CLIPTokenizer.from_pretrained(tmp_path / "ours")
    assert theirs.model_max_length == 77
    prompts = PROMPTS[:200]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert first_mismatch(hf_ids(theirs, prompts), ours(prompts), prompts) is None
        # transformers >= 5 writes only tokenizer.json: we read that too
        theirs.save_pretrained(tmp_path / "theirs")
        again = CLIPTokenizer.from_pretrained(tmp_path / "theirs")
        assert torch.equal(again(prompts), ours(prompts))


def test_ftfy_cleaning_matches_openai_clip():
    """Ids from openai/CLIP's own tokenizer (simple_tokenizer.py, via open_clip 3.3.0), which cleans with ftfy."""
    ftfy_tok = CLIPTokenizer.from_pretrained(SD1_TOKENIZER, text_cleaning="ftfy")
    nfc_tok = CLIPTokenizer.from_pretrained(SD1_TOKENIZER)
    openai_ids = {
        "fish &amp; chips": [2759, 261, 8855],
        "“smart quotes” and ‘single’": [257, 4115, 5808, 257, 537, 568, 17005, 262],
        "ﬁne ligature": [3797, 19915, 4490],
        "ＦＵＬＬ\u3000ｗｉｄｔｈ": [1476, 23571],
        "cafÃ© mojibake": [15304, 617, 3252, 11878],
        "&lt;3 &#39;html&#39;": [283, 274, 262, 18231, 262],
        "ΟΔΟΣ": [138, 123, 138, 112, 138, 123, 139, 480],
        "a photo of a cat": [320, 1125, 539, 320, 2368],
    }
    for prompt, ids in openai_ids.items():
        assert ftfy_tok.encode(prompt) == ids, prompt
    # transformers' cleaning (NFC only) keeps the entity and the curly quotes
    assert nfc_tok.encode("fish &amp; chips") != openai_ids["fish &amp; chips"]
    assert nfc_tok.encode("a photo of a cat") == openai_ids["a photo of a cat"]


def test_shapes_tokenizer_is_reproducible_and_one_token_per_word(tmp_path):
    trained = train_shapes_tokenizer(tmp_path)
    shipped = CLIPTokenizer.from_pretrained(SHAPES_TOKENIZER)
    assert trained.encoder == shipped.encoder and trained.merges == shipped.merges
    assert len(shipped) < 1000 and shipped.decoder[len(shipped) - 1] == "<|endoftext|>"
    words = set(COLOUR_NAMES) | set(SHAPES) | set(SIZES) | {w for p in POSITIONS for w in p.split()}
    words |= {"a", "an", "picture", "image", "of", "in", "the", "at", "on"}
    for word in sorted(words):
        assert shipped.tokenize(word) == [word + "</w>"], word
    # words outside the vocabulary still tokenise: byte-level BPE never meets an unknown
    assert shipped.tokenize("zebra") == ["z", "e", "b", "r", "a</w>"]


def test_tokenizer_bad_inputs(tmp_path, sd1_tokenizers):
    ours, _ = sd1_tokenizers
    with pytest.raises(TypeError, match="prompt string"):
        ours(["ok", 3])
    with pytest.raises(TypeError, match="prompt string"):
        ours.tokenize(None)
    with pytest.raises(FileNotFoundError, match="vocab.json"):
        CLIPTokenizer.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="text_cleaning"):
        CLIPTokenizer({"<|startoftext|>": 0, "<|endoftext|>": 1}, [], text_cleaning="lower")
    with pytest.raises(ValueError, match="not in the vocabulary"):
        CLIPTokenizer({"a": 0}, [])
    with pytest.raises(ValueError, match="not in this vocabulary"):
        ours.decode([10**6])


# ------------------------------------------------------------------------------------------
# Text model
# ------------------------------------------------------------------------------------------


def hf_config(config: CLIPTextConfig) -> transformers.CLIPTextConfig:
    d = config.to_dict()
    d.pop("architectures"), d.pop("model_type")
    return transformers.CLIPTextConfig(**d)


def build_pair(config: CLIPTextConfig, seed: int = 0):
    torch.manual_seed(seed)
    reference = transformers.CLIPTextModel(hf_config(config)).eval()
    with torch.no_grad():  # LayerNorms start at (1, 0): perturb them so they are tested too
        for name, p in reference.named_parameters():
            if "layer_norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    ours = CLIPTextModel.from_config(config).eval()
    ours.load_checked_state_dict(reference.state_dict())  # keys without "text_model.": mapped
    return reference, ours


def random_ids(config: CLIPTextConfig, batch: int = 3, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, config.vocab_size - 2, (batch, 77), generator=g)
    ids[:, 0] = config.bos_token_id
    for row, end in enumerate((5, 30, 76)[:batch]):
        ids[row, end:] = config.eos_token_id
    return ids


def compare(reference, ours, ids, attention_mask=None):
    with torch.no_grad():
        out = reference(ids, attention_mask=attention_mask, output_hidden_states=True)
        last = ours(ids, attention_mask=attention_mask)
        errors = {"last": (out.last_hidden_state - last).abs().max().item(),
                  "pooled": (out.pooler_output - ours.pooled(last, ids)).abs().max().item()}
        for k in (1, 2):  # diffusers: final_layer_norm(hidden_states[-(clip_skip + 1)])
            want = reference.final_layer_norm(out.hidden_states[-(k + 1)])
            errors[f"clip_skip={k}"] = (want - ours(ids, clip_skip=k, attention_mask=attention_mask)).abs().max().item()
    return errors


@pytest.fixture(scope="module")
def tiny_pair():
    return build_pair(CLIPTextConfig.tiny(vocab_size=1000, num_hidden_layers=3))


def test_tiny_matches_transformers(tiny_pair):
    reference, ours = tiny_pair
    errors = compare(reference, ours, random_ids(ours.config))
    assert max(errors.values()) <= TOL, errors


def test_tiny_gelu_variant_and_attention_mask():
    reference, ours = build_pair(CLIPTextConfig.tiny(vocab_size=500, hidden_act="gelu", num_hidden_layers=3), seed=4)
    ids = random_ids(ours.config)
    mask = (torch.arange(77)[None, :] < torch.tensor([6, 31, 77])[:, None]).long()
    for m in (None, mask):
        errors = compare(reference, ours, ids, m)
        assert max(errors.values()) <= TOL, errors


def test_state_dict_names_are_transformers_checkpoint_names(tiny_pair):
    reference, ours = tiny_pair
    keys = set(ours.state_dict())
    assert keys == {"text_model." + k for k in reference.state_dict()}
    for key in ("text_model.embeddings.token_embedding.weight", "text_model.encoder.layers.0.self_attn.q_proj.weight",
                "text_model.encoder.layers.0.mlp.fc1.bias", "text_model.final_layer_norm.weight"):
        assert key in keys


def test_causal_mask_future_tokens_do_not_matter(tiny_pair):
    _, ours = tiny_pair
    assert torch.equal(causal_mask(3), torch.tensor([[1, 0, 0], [1, 1, 0], [1, 1, 1]], dtype=torch.bool))
    ids = random_ids(ours.config, batch=1)
    changed = ids.clone()
    changed[0, 40:] = 7  # change only the tail
    with torch.no_grad():
        a, b = ours(ids), ours(changed)
    assert torch.allclose(a[0, :40], b[0, :40], atol=1e-6) and not torch.allclose(a[0, 40:], b[0, 40:])


def test_folder_round_trip_ours_to_transformers(tiny_pair, tmp_path):
    _, ours = tiny_pair
    ours.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == "clip_text_model" and config["architectures"] == ["CLIPTextModel"]
    assert next(iter(load_file(tmp_path / "model.safetensors"))).startswith("text_model.")
    loaded = transformers.CLIPTextModel.from_pretrained(tmp_path).eval()
    ids = random_ids(ours.config)
    with torch.no_grad():
        assert (loaded(ids).last_hidden_state - ours(ids)).abs().max().item() <= TOL


def test_folder_round_trip_transformers_to_ours(tiny_pair, tmp_path):
    reference, _ = tiny_pair
    reference.save_pretrained(tmp_path)  # transformers 5 writes keys without "text_model."
    loaded = CLIPTextModel.from_pretrained(tmp_path)
    ids = random_ids(loaded.config)
    with torch.no_grad():
        assert (reference(ids).last_hidden_state - loaded(ids)).abs().max().item() <= TOL


def test_loads_an_sd1_style_folder(tiny_pair, tmp_path):
    """SD 1.x text_encoder folders: old transformers config keys, "text_model." names, position_ids saved."""
    _, ours = tiny_pair
    c = ours.config
    config = {"_name_or_path": "openai/clip-vit-large-patch14", "architectures": ["CLIPTextModel"], "attention_dropout": 0.0,
              "bos_token_id": 0, "dropout": 0.0, "eos_token_id": 2, "hidden_act": "quick_gelu", "hidden_size": c.hidden_size,
              "initializer_factor": 1.0, "initializer_range": 0.02, "intermediate_size": c.intermediate_size,
              "layer_norm_eps": 1e-05, "max_position_embeddings": 77, "model_type": "clip_text_model",
              "num_attention_heads": c.num_attention_heads, "num_hidden_layers": c.num_hidden_layers, "pad_token_id": 1,
              "projection_dim": 768, "torch_dtype": "float32", "transformers_version": "4.22.0.dev0", "vocab_size": c.vocab_size}
    (tmp_path / "config.json").write_text(json.dumps(config))
    state = {k: v.contiguous() for k, v in ours.state_dict().items()}
    state["text_model.embeddings.position_ids"] = torch.arange(77)[None]
    save_file(state, tmp_path / "model.safetensors")
    loaded = CLIPTextModel.from_pretrained(tmp_path)
    assert loaded.config.eos_token_id == 2
    ids = random_ids(c)
    with torch.no_grad():
        assert torch.allclose(loaded(ids), ours(ids))
    theirs = transformers.CLIPTextModel.from_pretrained(tmp_path).eval()
    ids[:, -1] = c.vocab_size - 1  # eos_token_id 2: both pool at the largest id
    with torch.no_grad():
        assert (theirs(ids).pooler_output - loaded.pooled(loaded(ids), ids)).abs().max().item() <= TOL


def test_presets_match_sd_text_encoders():
    l14, h14 = CLIPTextConfig.vit_l14(), CLIPTextConfig.vit_h14()
    assert (l14.hidden_size, l14.num_hidden_layers, l14.hidden_act) == (768, 12, "quick_gelu")
    assert (h14.hidden_size, h14.num_hidden_layers, h14.num_attention_heads, h14.hidden_act) == (1024, 23, 16, "gelu")
    with torch.device("meta"):
        ours = [sum(p.numel() for p in CLIPTextModel(c).parameters()) for c in (l14, h14)]
        theirs = [sum(p.numel() for p in transformers.CLIPTextModel(hf_config(c)).parameters()) for c in (l14, h14)]
    assert ours == theirs and ours[0] == 123_060_480


def test_text_model_bad_inputs(tiny_pair):
    _, ours = tiny_pair
    with pytest.raises(ValueError, match="do not fit the 77 positions"):
        ours(torch.zeros(1, 78, dtype=torch.long))
    with pytest.raises(ValueError, match="integer tensor"):
        ours(torch.zeros(1, 77))
    with pytest.raises(ValueError, match=r"\[0, 1000\)"):
        ours(torch.full((1, 77), 1000))
    with pytest.raises(ValueError, match="clip_skip"):
        ours(torch.zeros(1, 77, dtype=torch.long), clip_skip=3)
    with pytest.raises(ValueError, match="hidden_act"):
        CLIPTextConfig(hidden_act="relu")
    with pytest.raises(CheckpointError, match="does not know the config keys"):
        CLIPTextModel.from_config({"hidden_size": 64, "use_flash": True})
    with pytest.raises(CheckpointError, match="Wrong shapes"):
        ours.load_checked_state_dict(CLIPTextModel(CLIPTextConfig.tiny(vocab_size=999, num_hidden_layers=3)).state_dict())


@pytest.mark.slow
@pytest.mark.parametrize("preset", ["vit_l14", "vit_h14"])
def test_sd_text_encoders_match_transformers(preset, sd1_tokenizers):
    config = getattr(CLIPTextConfig, preset)()
    reference, ours = build_pair(config)
    tok, _ = sd1_tokenizers
    ids = tok(["a photo of an astronaut riding a horse on mars", "a red circle", ""])
    errors = compare(reference, ours, ids)
    del reference, ours
    assert max(errors.values()) <= TOL, errors


# ------------------------------------------------------------------------------------------
# Contrastive loss and the tiny CLIP
# ------------------------------------------------------------------------------------------


def test_contrastive_loss_matches_transformers():
    from transformers.models.clip.modeling_clip import image_text_contrastive_loss

    g = torch.Generator().manual_seed(0)
    u, v = torch.randn(8, 16, generator=g), torch.randn(8, 16, generator=g)
    t = torch.tensor(2.3)
    un, vn = u / u.norm(dim=-1, keepdim=True), v / v.norm(dim=-1, keepdim=True)
    logits_per_text = t.exp() * vn @ un.T  # transformers' CLIPModel
    assert torch.allclose(contrastive_loss(u, v, t), image_text_contrastive_loss(logits_per_text), atol=1e-6)


def test_contrastive_loss_properties():
    g = torch.Generator().manual_seed(1)
    u = torch.randn(16, 32, generator=g)
    assert contrastive_loss(u, 3 * u, torch.tensor(4.6)) < 0.05  # aligned pairs, sharp softmax
    loss = contrastive_loss(u, torch.randn(16, 32, generator=g), torch.tensor(0.0))
    assert abs(loss.item() - torch.log(torch.tensor(16.0)).item()) < 0.5  # unrelated: about log N
    v = torch.randn(16, 32, generator=g)
    perm = torch.randperm(16, generator=g)
    assert torch.allclose(contrastive_loss(u, v, 1.0), contrastive_loss(v, u, 1.0))  # symmetric
    assert torch.allclose(contrastive_loss(u[perm], v[perm], 1.0), contrastive_loss(u, v, 1.0))  # order of pairs
    assert not torch.allclose(contrastive_loss(u[perm], v, 1.0), contrastive_loss(u, v, 1.0))  # pairing matters
    with pytest.raises(ValueError, match="same shape"):
        contrastive_loss(u, v[:3], 1.0)


def test_tiny_clip_learns_and_round_trips(tmp_path):
    tok = CLIPTokenizer.from_pretrained(SHAPES_TOKENIZER)
    model, _, history = train_tiny_clip(tok, steps=60, batch_size=32, n_images=600, progress=False, out=tmp_path / "clip")
    first, last = sum(history.losses[:10]) / 10, sum(history.losses[-10:]) / 10
    assert first > 3.0 and last < first - 0.4, (first, last)
    loaded = TinyCLIP.from_pretrained(tmp_path / "clip")
    data = Shapes(8, seed=5, size=32, split="test", captions="full")
    images, ids = data.tensors(), tok(data.captions)
    model.eval()
    assert torch.allclose(loaded.similarity(images, ids), model.similarity(images, ids), atol=1e-6)
    # the text tower is a plain transformers folder, with the tokenizer next to it
    theirs = transformers.CLIPTextModel.from_pretrained(tmp_path / "clip" / "text_encoder").eval()
    hf_tok = transformers.CLIPTokenizer.from_pretrained(tmp_path / "clip" / "tokenizer")
    assert torch.equal(hf_ids(hf_tok, data.captions), ids)
    with torch.no_grad():
        assert (theirs(ids).last_hidden_state - model.text_encoder(ids)).abs().max().item() <= TOL
