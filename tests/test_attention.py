"""sdlearn.models.attention against diffusers, the written-out formula against the fused kernel, and attention maps."""

import pytest
import torch
from diffusers.models.attention import BasicTransformerBlock as DiffusersBlock
from diffusers.models.attention_processor import Attention as DiffusersAttention
from diffusers.models.transformers.transformer_2d import Transformer2DModel as DiffusersTransformer2D

from sdlearn.models.attention import (
    Attention,
    BasicTransformerBlock,
    Transformer2DModel,
    attention_fused,
    attention_probabilities,
    attention_written_out,
    merge_heads,
    record_attention,
    split_heads,
    use_fused_attention,
)

TOL = 1e-5


def rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


# The formula -------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape_q, shape_kv", [((2, 4, 10, 8), (2, 4, 7, 8)), ((1, 1, 64, 40), (1, 1, 77, 40)), ((3, 5, 16), (3, 9, 16))])
def test_written_out_equals_fused(shape_q, shape_kv):
    q, k, v = rand(*shape_q, seed=1), rand(*shape_kv, seed=2), rand(*shape_kv, seed=3)
    written, fused = attention_written_out(q, k, v), attention_fused(q, k, v)
    assert written.shape == shape_q
    assert (written - fused).abs().max() <= TOL
    # and both equal the textbook formula in float64
    d = q.shape[-1]
    textbook = torch.softmax(q.double() @ k.double().transpose(-1, -2) / d**0.5, dim=-1) @ v.double()
    assert (written.double() - textbook).abs().max() <= TOL


def test_custom_scale_and_upcast():
    q, k, v = rand(2, 3, 5, 4, seed=1), rand(2, 3, 6, 4, seed=2), rand(2, 3, 6, 4, seed=3)
    assert (attention_written_out(q, k, v, scale=0.1) - attention_fused(q, k, v, scale=0.1)).abs().max() <= TOL
    half = attention_written_out(q.half(), k.half(), v.half(), upcast=True)
    assert half.dtype == torch.float16
    assert (half.float() - attention_written_out(q, k, v)).abs().max() < 1e-2


def test_probabilities_are_a_distribution_over_keys():
    probs = attention_probabilities(rand(2, 3, 5, 4, seed=1), rand(2, 3, 6, 4, seed=2))
    assert probs.shape == (2, 3, 5, 6)
    assert torch.allclose(probs.sum(-1), torch.ones(2, 3, 5))
    assert (probs >= 0).all()


def test_split_and_merge_heads():
    x = rand(2, 7, 12)
    heads = split_heads(x, 3)
    assert heads.shape == (2, 3, 7, 4)
    # head h holds channels h*4 .. h*4+3 of every token
    assert torch.equal(heads[:, 1], x[:, :, 4:8])
    assert torch.equal(merge_heads(heads), x)


# Attention layer ---------------------------------------------------------------------------------


@pytest.mark.parametrize("cross_dim", [None, 24], ids=["self", "cross"])
@pytest.mark.parametrize("fused", [True, False], ids=["fused", "written-out"])
def test_attention_layer_equals_diffusers(cross_dim, fused):
    torch.manual_seed(0)
    theirs = DiffusersAttention(32, cross_attention_dim=cross_dim, heads=4, dim_head=8).eval()
    ours = Attention(32, cross_dim, heads=4, dim_head=8).eval()
    ours.load_state_dict(theirs.state_dict(), strict=True)
    theirs.load_state_dict(ours.state_dict(), strict=True)
    ours.fused = fused
    x = rand(2, 10, 32, seed=1)
    context = rand(2, 6, cross_dim, seed=2) if cross_dim else None
    with torch.no_grad():
        assert (ours(x, context) - theirs(x, context)).abs().max() <= TOL


def test_attention_rejects_context_of_wrong_width():
    layer = Attention(32, 24, heads=4, dim_head=8)
    with pytest.raises(ValueError, match="expects 24"):
        layer(rand(1, 5, 32), rand(1, 3, 16))


def test_cross_attention_output_follows_the_queries():
    """Q from the image, K/V from the text: output has the image's length, values are mixes of V."""
    layer = Attention(32, 24, heads=4, dim_head=8).eval()
    x, context = rand(2, 10, 32, seed=1), rand(2, 6, 24, seed=2)
    assert layer(x, context).shape == (2, 10, 32)
    # Permuting the text tokens permutes K and V alike, which leaves the output unchanged.
    with torch.no_grad():
        assert (layer(x, context) - layer(x, context[:, torch.randperm(6)])).abs().max() <= TOL


@pytest.mark.parametrize("cross_dim", [24, None], ids=["cross", "self-only"])
def test_transformer_block_equals_diffusers(cross_dim):
    torch.manual_seed(0)
    theirs = DiffusersBlock(32, 4, 8, cross_attention_dim=cross_dim).eval()
    ours = BasicTransformerBlock(32, 4, 8, cross_attention_dim=cross_dim).eval()
    ours.load_state_dict(theirs.state_dict(), strict=True)
    theirs.load_state_dict(ours.state_dict(), strict=True)
    x = rand(2, 10, 32, seed=1)
    context = rand(2, 6, 24, seed=2) if cross_dim else None
    with torch.no_grad():
        assert (ours(x, context) - theirs(x, encoder_hidden_states=context)).abs().max() <= TOL


@pytest.mark.parametrize("linear", [False, True], ids=["conv (SD 1.x)", "linear (SD 2.x)"])
def test_spatial_transformer_equals_diffusers(linear):
    torch.manual_seed(0)
    kwargs = dict(in_channels=32, num_layers=2, cross_attention_dim=24, norm_num_groups=8, use_linear_projection=linear)
    theirs = DiffusersTransformer2D(4, 8, **kwargs).eval()
    ours = Transformer2DModel(4, 8, **kwargs).eval()
    ours.load_state_dict(theirs.state_dict(), strict=True)
    theirs.load_state_dict(ours.state_dict(), strict=True)
    assert ("proj_in.weight" in ours.state_dict()) and ours.state_dict()["proj_in.weight"].ndim == (2 if linear else 4)
    x, context = rand(2, 32, 6, 5, seed=1), rand(2, 7, 24, seed=2)
    with torch.no_grad():
        out = ours(x, context)
        assert out.shape == x.shape
        assert (out - theirs(x, encoder_hidden_states=context, return_dict=False)[0]).abs().max() <= TOL


# Attention maps ----------------------------------------------------------------------------------


def make_transformer():
    torch.manual_seed(0)
    return Transformer2DModel(4, 8, 32, num_layers=2, cross_attention_dim=24, norm_num_groups=8).eval()


def test_record_attention_maps_shapes_and_names():
    model = make_transformer()
    x, context = rand(2, 32, 6, 5, seed=1), rand(2, 7, 24, seed=2)
    with torch.no_grad():
        plain = model(x, context)
        with record_attention(model) as maps:
            recorded = model(x, context)
    assert sorted(maps) == ["transformer_blocks.0.attn2", "transformer_blocks.1.attn2"]
    for name in maps:
        assert maps[name].shape == (2, 4, 6 * 5, 7)  # (B, heads, H*W, tokens)
        assert torch.allclose(maps[name].sum(-1), torch.ones(2, 4, 30), atol=1e-5)
    assert (recorded - plain).abs().max() <= TOL  # recording does not change the result
    assert maps.token_maps("transformer_blocks.0.attn2", height=6).shape == (2, 7, 6, 5)
    # Leaving the block restores the fused path: nothing is recorded any more.
    assert all(m.recorder is None for m in model.modules() if isinstance(m, Attention))
    model(x, context)
    assert maps.calls["transformer_blocks.0.attn2"] == 1


def test_recorded_maps_equal_diffusers_attention_scores():
    torch.manual_seed(0)
    theirs = DiffusersAttention(32, cross_attention_dim=24, heads=4, dim_head=8).eval()
    ours = Attention(32, 24, heads=4, dim_head=8).eval()
    ours.load_state_dict(theirs.state_dict())
    x, context = rand(2, 10, 32, seed=1), rand(2, 6, 24, seed=2)
    with torch.no_grad(), record_attention(ours) as maps:
        ours(x, context)
        q = theirs.head_to_batch_dim(theirs.to_q(x))
        k = theirs.head_to_batch_dim(theirs.to_k(context))
        reference = theirs.get_attention_scores(q, k).reshape(2, 4, 10, 6)  # (B*heads, L_q, L_k) -> (B, heads, ...)
    assert (maps[""] - reference).abs().max() <= TOL


def test_record_self_attention_and_accumulate():
    model = make_transformer()
    x, context = rand(1, 32, 4, 4, seed=1), rand(1, 7, 24, seed=2)
    with torch.no_grad(), record_attention(model, kind="self", accumulate=True) as maps:
        model(x, context)
        model(x, context)
    assert sorted(maps) == ["transformer_blocks.0.attn1", "transformer_blocks.1.attn1"]
    name = "transformer_blocks.0.attn1"
    assert maps.calls[name] == 2
    assert maps[name].shape == (1, 4, 16, 16)
    assert torch.allclose(maps.mean(name).sum(-1), torch.ones(1, 4, 16), atol=1e-5)
    assert maps.average_token_maps(8).shape == (1, 16, 8, 8)


def test_record_attention_errors():
    with pytest.raises(ValueError, match="kind must be"):
        with record_attention(make_transformer(), kind="both"):
            pass
    with pytest.raises(ValueError, match="no cross-attention layers"):
        with record_attention(BasicTransformerBlock(32, 4, 8)):
            pass


def test_use_fused_attention_switch_gives_same_numbers():
    model = make_transformer()
    x, context = rand(2, 32, 4, 4, seed=1), rand(2, 7, 24, seed=2)
    with torch.no_grad():
        fused = model(x, context)
        written = use_fused_attention(model, False)(x, context)
    assert all(not m.fused for m in model.modules() if isinstance(m, Attention))
    assert (fused - written).abs().max() <= TOL
