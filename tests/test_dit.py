"""sdlearn's DiT against diffusers' DiTTransformer2DModel on identical random weights.

The layers that a DiT initialises to zero (every block's adaLN linear `norm1.linear` and the
final `proj_out_1`, `proj_out_2`) are randomised before any comparison: with them at zero
every block is the identity and the output is 0, and a parity test would prove nothing.
"""

import json

import pytest
import torch
from diffusers import DiTTransformer2DModel, Transformer2DModel
from diffusers.models.attention import FeedForward as DiffusersFeedForward
from diffusers.models.embeddings import get_2d_sincos_pos_embed

from sdlearn.models.attention import FeedForward
from sdlearn.models.checkpoint import CheckpointError
from sdlearn.models.dit import (
    DiT,
    DiTBlock,
    DiTConfig,
    drop_class_labels,
    modulate,
    patchify,
    sincos_position_embedding,
    split_learned_sigma,
    unpatchify,
)
from sdlearn.unet import UNet, UNetConfig

TOL = 1e-5  # fp32 max abs error allowed against diffusers
ZERO_INIT = ("norm1.linear", "proj_out_1", "proj_out_2")

# DiT-XL/2 256's transformer/config.json in the form diffusers' conversion wrote it (class Transformer2DModel,
# which diffusers maps to DiTTransformer2DModel because norm_type is "ada_norm_zero").
DIT_XL_2_LEGACY_JSON = {
    "_class_name": "Transformer2DModel", "_diffusers_version": "0.12.0.dev0", "activation_fn": "gelu-approximate",
    "attention_bias": True, "attention_head_dim": 72, "cross_attention_dim": None, "dropout": 0.0, "in_channels": 4,
    "norm_elementwise_affine": False, "norm_num_groups": 32, "norm_type": "ada_norm_zero", "num_attention_heads": 16,
    "num_embeds_ada_norm": 1000, "num_layers": 28, "num_vector_embeds": None, "only_cross_attention": False,
    "out_channels": 8, "patch_size": 2, "sample_size": 32, "upcast_attention": False, "use_linear_projection": False,
}


def diffusers_kwargs(config: DiTConfig) -> dict:
    return {k: v for k, v in config.to_dict().items() if not k.startswith("_")}


def randomise(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Every parameter random, the zero-initialised ones included (scaled to keep activations moderate)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return model


@pytest.fixture(scope="module")
def tiny_pair():
    torch.manual_seed(0)
    config = DiTConfig.tiny()
    ours = randomise(DiT(config)).eval()
    theirs = DiTTransformer2DModel(**diffusers_kwargs(config)).eval()
    theirs.load_state_dict(ours.state_dict(), strict=True)
    return ours, theirs


def max_error(ours, theirs, x, t, labels) -> float:
    with torch.no_grad():
        a = ours(x, t, labels)
        b = theirs(x, t, labels).sample
    assert a.shape == b.shape
    return (a - b).abs().max().item()


# Parity -------------------------------------------------------------------------------------------


def test_the_zero_initialised_layers_are_randomised_for_the_comparison(tiny_pair):
    ours, _ = tiny_pair
    for name, p in ours.named_parameters():
        if any(part in name for part in ZERO_INIT):
            assert p.abs().min() > 0 or p.abs().mean() > 0.05, name


@pytest.mark.parametrize("size", [16, 8])
def test_tiny_equals_diffusers(tiny_pair, size):
    ours, theirs = tiny_pair
    g = torch.Generator().manual_seed(1)
    null = ours.config.null_class
    x = torch.randn(4, 4, size, size, generator=g)
    labels = torch.tensor([0, 5, 31, null])  # the null class (classifier-free guidance) included
    errors = []
    for t in (torch.tensor([0, 1, 500, 999]), torch.tensor([999, 250, 37, 0]), torch.tensor([10.5, 0.0, 999.0, 3.25])):
        errors.append(max_error(ours, theirs, x, t, labels))
    print(f"DiT tiny {size}x{size}: max abs error against diffusers {max(errors):.3g}")
    assert max(errors) <= TOL


def test_the_output_depends_on_timestep_label_and_input(tiny_pair):
    ours, _ = tiny_pair
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 4, 16, 16, generator=g)
    t, y = torch.tensor([10, 10]), torch.tensor([3, 3])
    with torch.no_grad():
        base = ours(x, t, y)
        assert (ours(x, t + 400, y) - base).abs().max() > 1e-2
        assert (ours(x, t, torch.full_like(y, ours.config.null_class)) - base).abs().max() > 1e-2
        assert (ours(x.flip(-1), t, y) - base).abs().max() > 1e-2


def test_timestep_and_label_forms(tiny_pair):
    ours, _ = tiny_pair
    x = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = ours(x, torch.tensor([7, 7]), torch.tensor([2, 2]))
        for t in (7, torch.tensor(7), torch.tensor([7])):
            assert torch.equal(ours(x, t, torch.tensor([2, 2])), want)
        assert torch.equal(ours(x, 7, 2), want)
        assert torch.equal(ours(x, 7, [2, 2]), want)


def test_non_square_latent_gives_the_right_shape(tiny_pair):
    ours, _ = tiny_pair
    with torch.no_grad():
        out = ours(torch.randn(1, 4, 8, 16), 5, 1)
    assert out.shape == (1, 8, 8, 16)


@pytest.mark.parametrize("activation_fn", ["gelu", "gelu-approximate", "geglu"])
def test_feed_forward_activations_equal_diffusers(activation_fn):
    ours = FeedForward(16, activation_fn=activation_fn)
    theirs = DiffusersFeedForward(16, activation_fn=activation_fn)
    theirs.load_state_dict(ours.state_dict(), strict=True)
    x = torch.randn(2, 5, 16)
    assert torch.allclose(ours(x), theirs(x), atol=1e-6)


def test_dit_options_equal_diffusers():
    """Options the published model does not use: no attention bias, an affine norm3, exact GELU, no learned sigma."""
    config = DiTConfig.tiny(attention_bias=False, norm_elementwise_affine=True, activation_fn="gelu", out_channels=None,
                            num_layers=2, sample_size=8)
    ours = randomise(DiT(config), seed=4).eval()
    theirs = DiTTransformer2DModel(**diffusers_kwargs(config)).eval()
    theirs.load_state_dict(ours.state_dict(), strict=True)
    x = torch.randn(2, 4, 8, 8)
    assert max_error(ours, theirs, x, torch.tensor([3, 900]), torch.tensor([config.null_class, 0])) <= TOL


def test_bfloat16_equals_diffusers():
    """Low precision: the sinusoids in float32, then cast, as diffusers does; the position buffer follows .to(dtype)."""
    config = DiTConfig.tiny(num_layers=2)
    ours = randomise(DiT(config), seed=10).eval()
    theirs = DiTTransformer2DModel(**diffusers_kwargs(config)).eval()
    theirs.load_state_dict(ours.state_dict(), strict=True)
    ours, theirs = ours.to(torch.bfloat16), theirs.to(torch.bfloat16)
    x = torch.randn(2, 4, 16, 16).to(torch.bfloat16)
    with torch.no_grad():
        out = ours(x, torch.tensor([5, 900]), torch.tensor([1, config.null_class]))
        want = theirs(x, torch.tensor([5, 900]), torch.tensor([1, config.null_class])).sample
    assert out.dtype == torch.bfloat16
    assert (out.float() - want.float()).abs().max() <= 1e-2


# State dicts and folders -------------------------------------------------------------------------


def test_state_dicts_load_strictly_both_ways():
    config = DiTConfig.tiny(num_layers=2)
    torch.manual_seed(5)
    theirs = DiTTransformer2DModel(**diffusers_kwargs(config)).eval()
    ours = DiT(config).eval()
    assert set(ours.state_dict()) == set(theirs.state_dict())
    assert not any("pos_embed.pos_embed" in k for k in ours.state_dict())  # computed, not saved (as in diffusers)
    ours.load_state_dict(theirs.state_dict(), strict=True)  # diffusers' random weights -> ours
    x = torch.randn(2, 4, 16, 16)
    assert max_error(ours, theirs, x, torch.tensor([1, 600]), torch.tensor([4, 32])) <= TOL
    randomise(ours, seed=6)
    theirs.load_state_dict(ours.state_dict(), strict=True)  # ours -> diffusers
    assert max_error(ours, theirs, x, torch.tensor([1, 600]), torch.tensor([4, 32])) <= TOL


def test_save_pretrained_is_read_by_diffusers_and_back(tmp_path):
    config = DiTConfig.tiny(num_layers=2)
    ours = randomise(DiT(config), seed=7).eval()
    ours.save_pretrained(tmp_path / "ours")
    written = json.loads((tmp_path / "ours" / "config.json").read_text())
    assert written["_class_name"] == "DiTTransformer2DModel"
    theirs = DiTTransformer2DModel.from_pretrained(tmp_path / "ours").eval()
    x = torch.randn(2, 4, 16, 16)
    t, y = torch.tensor([0, 999]), torch.tensor([config.null_class, 9])
    with torch.no_grad():
        assert torch.equal(ours(x, t, y), theirs(x, t, y).sample)

    theirs.save_pretrained(tmp_path / "theirs")
    again = DiT.from_pretrained(tmp_path / "theirs").eval()
    assert again.config == config
    with torch.no_grad():
        assert torch.equal(again(x, t, y), ours(x, t, y))


def test_the_published_legacy_config_gives_the_dit_xl_2_preset():
    assert DiT.config_class.from_dict(DIT_XL_2_LEGACY_JSON) == DiTConfig.dit_xl_2()


def test_a_legacy_transformer2d_config_loads_as_diffusers_loads_it():
    legacy = {**DIT_XL_2_LEGACY_JSON, "attention_head_dim": 8, "num_attention_heads": 2, "num_layers": 1, "sample_size": 8,
              "num_embeds_ada_norm": 5}
    theirs = Transformer2DModel.from_config(legacy).eval()
    assert type(theirs).__name__ == "DiTTransformer2DModel"
    ours = DiT.from_config(legacy).eval()
    randomise(ours, seed=8)
    theirs.load_state_dict(ours.state_dict(), strict=True)
    assert max_error(ours, theirs, torch.randn(1, 4, 8, 8), torch.tensor([42]), torch.tensor([5])) <= TOL


def test_dit_xl_2_parameter_count_on_the_meta_device():
    with torch.device("meta"):
        ours = DiT(DiTConfig.dit_xl_2())
        theirs = DiTTransformer2DModel(**diffusers_kwargs(DiTConfig.dit_xl_2()))
    total, distinct = ours.num_parameters(), ours.num_parameters(embedder_once=True)
    print(f"DiT-XL/2: {total:,} parameters in diffusers' layout, {distinct:,} distinct (the paper's 675M)")
    assert total == sum(p.numel() for p in theirs.parameters()) == 749_826_464
    assert abs(distinct - 675e6) < 1e6
    assert DiT(DiTConfig.tiny()).num_parameters() == 401_120  # the tiny preset's docstring says 0.40M


# Patches -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape, p", [((2, 4, 8, 8), 2), ((1, 3, 6, 4), 2), ((1, 2, 8, 12), 4)])
def test_patchify_and_unpatchify_are_inverse(shape, p):
    x = torch.randn(shape)
    B, C, H, W = shape
    tokens = patchify(x, p)
    assert tokens.shape == (B, (H // p) * (W // p), p * p * C)
    assert torch.equal(unpatchify(tokens, p, C, H // p), x)
    # token n = i * w + j is the patch at row i, column j; features (a, b, c)
    i, j, a, b, c = 1, 1, p - 1, 0, C - 1
    assert tokens[0, i * (W // p) + j, (a * p + b) * C + c] == x[0, c, i * p + a, j * p + b]


def test_unpatchify_is_the_models_final_rearrangement(tiny_pair):
    """The model's output is unpatchify(proj_out_2's tokens), and unpatchify equals diffusers' reshape + einsum."""
    ours, _ = tiny_pair
    seen = {}
    handle = ours.proj_out_2.register_forward_hook(lambda module, inputs, output: seen.update(tokens=output))
    try:
        with torch.no_grad():
            out = ours(torch.randn(2, 4, 16, 16), 3, 1)
    finally:
        handle.remove()
    p, C = ours.config.patch_size, ours.config.output_channels
    assert torch.equal(unpatchify(seen["tokens"], p, C), out)
    tokens = seen["tokens"]
    h = int(tokens.shape[1] ** 0.5)
    theirs = torch.einsum("nhwpqc->nchpwq", tokens.reshape(-1, h, h, p, p, C)).reshape(-1, C, h * p, h * p)
    assert torch.equal(unpatchify(tokens, p, C), theirs)
    assert torch.equal(patchify(out, p), tokens)


def test_the_patch_embedding_is_a_linear_map_of_patchify(tiny_pair):
    ours, _ = tiny_pair
    proj = ours.pos_embed.proj
    x = torch.randn(2, 4, 16, 16)
    D = proj.weight.shape[0]
    weight = proj.weight.permute(0, 2, 3, 1).reshape(D, -1)  # (D, C, p, p) -> (D, p*p*C), features (a, b, c)
    with torch.no_grad():
        via_conv = proj(x).flatten(2).transpose(1, 2)
        via_tokens = patchify(x, 2) @ weight.T + proj.bias
    assert torch.allclose(via_conv, via_tokens, atol=1e-5)


@pytest.mark.parametrize("h, w", [(8, 8), (4, 4), (16, 16), (4, 8)])
def test_position_embedding_equals_diffusers(h, w):
    ours = sincos_position_embedding(64, h, w, base_size=8)
    theirs = get_2d_sincos_pos_embed(64, (h, w), base_size=8).float()
    assert torch.equal(ours, theirs)


def test_modulate():
    x, shift, scale = torch.randn(2, 5, 3), torch.randn(2, 3), torch.randn(2, 3)
    assert torch.allclose(modulate(x, shift, scale), x * (1 + scale[:, None, :]) + shift[:, None, :])
    assert torch.equal(modulate(x, torch.zeros(2, 3), torch.zeros(2, 3)), x)


# adaLN-Zero ---------------------------------------------------------------------------------------


def test_a_fresh_block_is_the_identity_and_a_fresh_model_predicts_zero():
    model = DiT(DiTConfig.tiny()).eval()
    x = torch.randn(3, 64, 64)  # (B, N, D) tokens
    t, y = torch.tensor([0, 500, 999]), torch.tensor([0, 7, 32])
    with torch.no_grad():
        for block in model.transformer_blocks:
            assert torch.equal(block(x, t, y), x)
            assert all(torch.count_nonzero(v) == 0 for v in block.norm1.modulation(t, y))
        assert torch.count_nonzero(model(torch.randn(3, 4, 16, 16), t, y)) == 0
        # the adaLN linear is what makes it so: randomise it and the block does something
        block = DiTBlock(model.config)
        block.load_state_dict(model.transformer_blocks[0].state_dict())
        randomise(block.norm1.linear, seed=9)
        assert (block(x, t, y) - x).abs().max() > 1e-2
    first = model.transformer_blocks[0].norm1.emb.state_dict()
    for block in model.transformer_blocks[1:]:  # one embedder, copied, as in the original DiT
        assert all(torch.equal(first[k], v) for k, v in block.norm1.emb.state_dict().items())


def test_drop_class_labels():
    labels = torch.arange(1000) % 10
    assert torch.equal(drop_class_labels(labels, 10, p=0.0), labels)
    assert torch.equal(drop_class_labels(labels, 10, p=1.0), torch.full_like(labels, 10))
    a = drop_class_labels(labels, 10, p=0.1, generator=torch.Generator().manual_seed(0))
    b = drop_class_labels(labels, 10, p=0.1, generator=torch.Generator().manual_seed(0))
    assert torch.equal(a, b) and 50 < int((a == 10).sum()) < 150


def test_split_learned_sigma():
    out = torch.randn(2, 8, 4, 4)
    eps, v = split_learned_sigma(out, 4)
    assert torch.equal(torch.cat([eps, v], dim=1), out)
    assert DiTConfig.tiny().learns_sigma and not DiTConfig.tiny(out_channels=4).learns_sigma
    with pytest.raises(ValueError, match="2 x 4 channels"):
        split_learned_sigma(torch.randn(2, 4, 4, 4), 4)


# Errors ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides, field",
    [
        ({"norm_type": "ada_norm_single"}, "norm_type"),
        ({"norm_type": "layer_norm"}, "norm_type"),
        ({"num_embeds_ada_norm": None}, "num_embeds_ada_norm"),
        ({"activation_fn": "swiglu"}, "activation_fn"),
        ({"sample_size": 15}, "sample_size"),
        ({"attention_head_dim": 3, "num_attention_heads": 1}, "multiple of 4"),
        ({"patch_size": 0}, "patch_size"),
    ],
)
def test_unsupported_config_values_are_refused_by_name(overrides, field):
    config = {**diffusers_kwargs(DiTConfig.tiny()), **overrides}
    with pytest.raises(ValueError, match=field):  # CheckpointError is a ValueError
        DiT.from_config(config)


def test_config_keys_and_types_are_checked():
    base = diffusers_kwargs(DiTConfig.tiny())
    with pytest.raises(CheckpointError, match="does not know the config keys"):
        DiT.from_config({**base, "caption_channels": 4096})
    with pytest.raises(CheckpointError, match="'num_layers' must be an integer"):
        DiT.from_config({**base, "num_layers": "4"})
    with pytest.raises(CheckpointError, match="cross_attention_dim=768"):
        DiT.from_config({**DIT_XL_2_LEGACY_JSON, "cross_attention_dim": 768})
    with pytest.raises(CheckpointError, match="norm_type='ada_norm_single'"):
        DiT.from_config({**DIT_XL_2_LEGACY_JSON, "norm_type": "ada_norm_single"})


def test_a_unet_folder_or_state_dict_is_named(tmp_path):
    unet = UNet(UNetConfig.tiny())
    unet.save_pretrained(tmp_path / "unet")
    with pytest.raises(CheckpointError, match=r"Stable Diffusion's UNet \(UNet2DConditionModel\), not a DiT"):
        DiT.from_pretrained(tmp_path / "unet")
    with pytest.raises(CheckpointError, match="a UNet or an autoencoder"):
        DiT.from_config({k: v for k, v in unet.config.to_dict().items() if k != "_class_name"})
    model = DiT(DiTConfig.tiny(num_layers=1))
    with pytest.raises(CheckpointError, match=r"holds the weights of a UNet .*not a DiT"):
        model.load_checked_state_dict(unet.state_dict())
    with pytest.raises(CheckpointError, match="holds the weights of a UNet"):
        model.load_state_dict(unet.state_dict())
    original = {"x_embedder.proj.weight": torch.zeros(1), "t_embedder.mlp.0.weight": torch.zeros(1)}
    with pytest.raises(CheckpointError, match="original facebookresearch/DiT layout.*convert"):
        model.load_checked_state_dict(original)
    smaller = DiT(DiTConfig.tiny(num_layers=1, num_attention_heads=2)).state_dict()
    with pytest.raises(CheckpointError, match="Wrong shapes"):  # a DiT of another size: the usual key/shape report
        model.load_checked_state_dict(smaller)


def test_bad_inputs_are_explained(tiny_pair):
    ours, _ = tiny_pair
    x = torch.randn(2, 4, 16, 16)
    with pytest.raises(ValueError, match="class-conditional"):
        ours(x, 1, None)
    with pytest.raises(ValueError, match=r"0\.\.32 \(32 = the null class\)"):
        ours(x, 1, torch.tensor([0, 33]))
    with pytest.raises(ValueError, match="integers"):
        ours(x, 1, torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match=r"\(B, 4, H, W\)"):
        ours(torch.randn(2, 3, 16, 16), 1, torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="multiples of the patch size 2"):
        ours(torch.randn(2, 4, 15, 16), 1, torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="t must be"):
        ours(x, torch.tensor([1, 2, 3]), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="not a square number"):
        unpatchify(torch.randn(1, 12, 16), 2, 4)
    with pytest.raises(ValueError, match="multiples of 2"):
        patchify(torch.randn(1, 4, 5, 4), 2)


# The lesson's exercise checkers (sdlearn.exercises.lesson14) on answers a learner may write -------


def test_checkers_accept_other_correct_answers_and_name_the_unfold_ordering():
    import torch.nn.functional as F

    from sdlearn.exercises import ExerciseError, lesson14

    def patchify_einsum(x, p):
        B, C, H, W = x.shape
        x = torch.einsum("bchpwq->bhwpqc", x.reshape(B, C, H // p, p, W // p, p))
        return x.reshape(B, -1, p * p * C)

    def patchify_unfold(x, p):  # right patches, features (c, a, b): not the final layer's order
        return F.unfold(x, kernel_size=p, stride=p).transpose(1, 2)

    assert lesson14.check_patchify(patchify_einsum)
    with pytest.raises(ExerciseError, match="F.unfold"):
        lesson14.check_patchify(patchify_unfold)
    assert lesson14.check_unpatchify(lambda tokens, p, C: unpatchify(tokens, p, C))
    assert lesson14.check_modulate(lambda x, shift, scale: torch.addcmul(shift[:, None], x, 1 + scale[:, None]))
