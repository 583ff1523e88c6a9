"""sdlearn's UNet against diffusers' UNet2DConditionModel on identical random weights.

Fast tier: SD 1.x-style and SD 2.x-style tiny configs, folders both ways, configs, bad inputs.
Slow tier: the full SD 1.5 and SD 2.x configs (860M parameters each).
"""

import gc
import json

import pytest
import torch
from diffusers import UNet2DConditionModel

from sdlearn.models.attention import record_attention, use_fused_attention
from sdlearn.models.checkpoint import CheckpointError, check_state_dict
from sdlearn.unet import UNet, UNetConfig, config_dict_for_diffusers, skip_connections, trace_shapes

TOL = 1e-4  # fp32 max abs error allowed against diffusers

# unet/config.json of runwayml/stable-diffusion-v1-5 and stabilityai/stable-diffusion-2-1, as published.
SD15_CONFIG_JSON = {
    "_class_name": "UNet2DConditionModel", "_diffusers_version": "0.17.0.dev0", "act_fn": "silu",
    "addition_embed_type": None, "addition_embed_type_num_heads": 64, "attention_head_dim": 8,
    "block_out_channels": [320, 640, 1280, 1280], "center_input_sample": False, "class_embed_type": None,
    "class_embeddings_concat": False, "conv_in_kernel": 3, "conv_out_kernel": 3, "cross_attention_dim": 768,
    "cross_attention_norm": None,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "downsample_padding": 1, "dual_cross_attention": False, "encoder_hid_dim": None, "flip_sin_to_cos": True,
    "freq_shift": 0, "in_channels": 4, "layers_per_block": 2, "mid_block_only_cross_attention": None,
    "mid_block_scale_factor": 1, "mid_block_type": "UNetMidBlock2DCrossAttn", "norm_eps": 1e-05,
    "norm_num_groups": 32, "num_class_embeds": None, "only_cross_attention": False, "out_channels": 4,
    "projection_class_embeddings_input_dim": None, "resnet_out_scale_factor": 1.0, "resnet_skip_time_act": False,
    "resnet_time_scale_shift": "default", "sample_size": 64, "time_cond_proj_dim": None,
    "time_embedding_act_fn": None, "time_embedding_dim": None, "time_embedding_type": "positional",
    "timestep_post_act": None,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "upcast_attention": None, "use_linear_projection": False,
}
SD21_CONFIG_JSON = {
    "_class_name": "UNet2DConditionModel", "_diffusers_version": "0.10.0.dev0", "act_fn": "silu",
    "attention_head_dim": [5, 10, 20, 20], "block_out_channels": [320, 640, 1280, 1280],
    "center_input_sample": False, "cross_attention_dim": 1024,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "downsample_padding": 1, "dual_cross_attention": False, "flip_sin_to_cos": True, "freq_shift": 0,
    "in_channels": 4, "layers_per_block": 2, "mid_block_scale_factor": 1, "norm_eps": 1e-05, "norm_num_groups": 32,
    "num_class_embeds": None, "only_cross_attention": False, "out_channels": 4, "sample_size": 96,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "use_linear_projection": True, "upcast_attention": True,
}


def rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def diffusers_unet(config: UNetConfig, seed: int = 0) -> UNet2DConditionModel:
    torch.manual_seed(seed)
    return UNet2DConditionModel(**config_dict_for_diffusers(config)).eval()


def pair(config: UNetConfig, seed: int = 0):
    """diffusers' UNet with seeded random weights and ours with a strict copy of them."""
    theirs = diffusers_unet(config, seed)
    ours = UNet.from_config(dict(theirs.config)).eval()  # from diffusers' own config dict
    ours.load_checked_state_dict(theirs.state_dict())
    return ours, theirs


def inputs(config: UNetConfig, batch=2, size=16, tokens=7, seed=1):
    x = rand(batch, config.in_channels, size, size, seed=seed)
    context = rand(batch, tokens, config.cross_attention_dim, seed=seed + 1)
    return x, context


def max_error(ours, theirs, x, t, context) -> float:
    with torch.no_grad():
        return (ours(x, t, context) - theirs(x, t, context).sample).abs().max().item()


TINY = {"tiny (SD 1.x layout)": UNetConfig.tiny, "tiny (SD 2.x layout)": UNetConfig.tiny_sd2}


# Oracle: tiny configs ----------------------------------------------------------------------------


@pytest.fixture(scope="module", params=list(TINY), ids=list(TINY))
def tiny_pair(request):
    return pair(TINY[request.param]())


def test_tiny_equals_diffusers(tiny_pair):
    ours, theirs = tiny_pair
    x, context = inputs(ours.config)
    t = torch.tensor([10, 900])  # a different timestep per sample
    out = ours(x, t, context)
    assert out.shape == x.shape
    assert max_error(ours, theirs, x, t, context) <= TOL
    # the fused and written-out attention paths agree on the whole model
    with torch.no_grad():
        written = use_fused_attention(ours, False)(x, t, context)
    use_fused_attention(ours, True)
    assert (written - out).abs().max() <= TOL


@pytest.mark.parametrize("t", [7, 7.0, torch.tensor(7), torch.tensor([7]), torch.tensor([7, 7])], ids=["int", "float", "0-d", "(1,)", "(B,)"])
def test_timestep_forms(tiny_pair, t):
    ours, theirs = tiny_pair
    x, context = inputs(ours.config)
    assert max_error(ours, theirs, x, t, context) <= TOL
    with torch.no_grad():
        assert torch.equal(ours(x, t, context), ours(x, torch.tensor([7, 7]), context))


def test_state_dict_loads_into_diffusers_strictly(tiny_pair):
    ours, _ = tiny_pair
    fresh = diffusers_unet(ours.config, seed=5)
    fresh.load_state_dict(ours.state_dict(), strict=True)
    x, context = inputs(ours.config)
    assert max_error(ours, fresh, x, 3, context) <= TOL


def test_timestep_and_text_change_the_output(tiny_pair):
    ours, _ = tiny_pair
    x, context = inputs(ours.config)
    with torch.no_grad():
        base = ours(x, 10, context)
        assert not torch.allclose(base, ours(x, 500, context))
        assert not torch.allclose(base, ours(x, 10, context + 1))


def test_non_square_latent(tiny_pair):
    ours, theirs = tiny_pair
    x = rand(1, 4, 8, 24)
    context = rand(1, 5, ours.config.cross_attention_dim)
    assert max_error(ours, theirs, x, 1, context) <= TOL


def test_half_precision_matches_diffusers():
    ours, theirs = pair(UNetConfig.tiny())
    ours, theirs = ours.to(torch.bfloat16), theirs.to(torch.bfloat16)
    x, context = inputs(ours.config)
    x, context = x.bfloat16(), context.bfloat16()
    with torch.no_grad():
        out = ours(x, 10, context)
        assert out.dtype == torch.bfloat16
        assert (out.float() - theirs(x, 10, context).sample.float()).abs().max() <= 0.05


# Folders both ways ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(TINY))
def test_folder_round_trip_with_diffusers(tmp_path, name):
    theirs = diffusers_unet(TINY[name](), seed=3)
    theirs.save_pretrained(tmp_path / "diffusers")
    ours = UNet.from_pretrained(tmp_path / "diffusers").eval()
    assert ours.config == TINY[name]()
    x, context = inputs(ours.config)
    assert max_error(ours, theirs, x, 42, context) <= TOL

    ours.save_pretrained(tmp_path / "ours")
    back = UNet2DConditionModel.from_pretrained(tmp_path / "ours").eval()
    assert dict(back.config)["attention_head_dim"] == dict(theirs.config)["attention_head_dim"]
    assert max_error(ours, back, x, 42, context) <= TOL
    for key, value in theirs.state_dict().items():
        assert torch.equal(back.state_dict()[key], value)


def test_from_pretrained_device_and_dtype(tmp_path):
    ours = UNet(UNetConfig.tiny())
    ours.save_pretrained(tmp_path)
    loaded = UNet.from_pretrained(tmp_path, dtype=torch.float64)
    assert next(loaded.parameters()).dtype == torch.float64


# Configs ---------------------------------------------------------------------------------------


def test_published_configs_give_the_presets():
    assert UNetConfig.from_dict(SD15_CONFIG_JSON) == UNetConfig.sd15()
    assert UNetConfig.from_dict(SD21_CONFIG_JSON) == UNetConfig.sd2()


def test_config_written_is_accepted_by_diffusers():
    for config in (UNetConfig.sd15(), UNetConfig.sd2(), UNetConfig.tiny(), UNetConfig.tiny_sd2()):
        d = config.to_dict()
        assert d["_class_name"] == "UNet2DConditionModel"
        with torch.device("meta"):
            theirs = UNet2DConditionModel.from_config(d)
            ours = UNet(config)
        assert {k: tuple(v.shape) for k, v in theirs.state_dict().items()} == {k: tuple(v.shape) for k, v in ours.state_dict().items()}
        assert UNetConfig.from_dict(json.loads(json.dumps(d))) == config


def test_full_size_parameter_counts():
    with torch.device("meta"):
        sd15, sd2 = UNet(UNetConfig.sd15()), UNet(UNetConfig.sd2())
    assert sd15.num_parameters() == 859_520_964
    assert sd2.num_parameters() == 865_910_724


@pytest.mark.parametrize(
    "key, value",
    [("class_embed_type", "timestep"), ("addition_embed_type", "text"), ("center_input_sample", True),
     ("mid_block_type", "UNetMidBlock2DSimpleCrossAttn"), ("only_cross_attention", True), ("time_cond_proj_dim", 256),
     ("resnet_time_scale_shift", "scale_shift"), ("conv_in_kernel", 7), ("class_embeddings_concat", True)],
)
def test_unimplemented_features_are_refused(key, value):
    with pytest.raises(CheckpointError, match=key):
        UNet.from_config({**SD15_CONFIG_JSON, key: value})


def test_irrelevant_and_bookkeeping_keys_are_accepted():
    config = {**SD15_CONFIG_JSON, "addition_embed_type_num_heads": 8, "mid_block_only_cross_attention": True, "_name_or_path": "x"}
    assert UNetConfig.from_dict(config) == UNetConfig.sd15()


def test_config_errors():
    with pytest.raises(CheckpointError, match="does not know the config keys"):
        UNetConfig.from_dict({**SD15_CONFIG_JSON, "latent_channels": 4})  # an AutoencoderKL key
    with pytest.raises(CheckpointError, match="implements"):
        UNetConfig.tiny(down_block_types=("CrossAttnDownBlock2D", "SimpleCrossAttnDownBlock2D"))
    with pytest.raises(ValueError, match="one entry per level"):
        UNetConfig.tiny(block_out_channels=(32, 64, 64))
    with pytest.raises(ValueError, match="heads"):
        UNetConfig.tiny(attention_head_dim=3)
    with pytest.raises(CheckpointError, match="act_fn"):
        UNetConfig.tiny(act_fn="gelu")
    with pytest.raises(TypeError, match="UNetConfig"):
        UNet({"in_channels": 4})


# Bad inputs -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_sd2_unet():
    torch.manual_seed(0)
    return UNet(UNetConfig.tiny_sd2()).eval()  # 3 levels: H, W must be multiples of 4


def test_latent_size_must_be_divisible(tiny_sd2_unet):
    context = rand(1, 5, 48)
    with pytest.raises(ValueError, match="multiples of 4"):
        tiny_sd2_unet(rand(1, 4, 16, 18), 1, context)


def test_wrong_input_channels(tiny_sd2_unet):
    with pytest.raises(ValueError, match="expects 4 input channels, got 3"):
        tiny_sd2_unet(rand(1, 3, 16, 16), 1, rand(1, 5, 48))
    with pytest.raises(ValueError, match=r"\(B, 4, H, W\)"):
        tiny_sd2_unet(rand(4, 16, 16), 1, rand(1, 5, 48))


def test_wrong_context(tiny_sd2_unet):
    x = rand(2, 4, 16, 16)
    with pytest.raises(ValueError, match="cross_attention_dim=48"):
        tiny_sd2_unet(x, 1, rand(2, 5, 32))
    with pytest.raises(ValueError, match="batch size"):
        tiny_sd2_unet(x, 1, rand(1, 5, 48))
    with pytest.raises(ValueError, match="text embeddings"):
        tiny_sd2_unet(x, 1, None)


def test_wrong_timestep_shape(tiny_sd2_unet):
    with pytest.raises(ValueError, match="t must be"):
        tiny_sd2_unet(rand(2, 4, 16, 16), torch.tensor([1, 2, 3]), rand(2, 5, 48))


def test_state_dict_of_another_architecture(tiny_sd2_unet, tmp_path):
    sd1 = UNet(UNetConfig.tiny())
    with pytest.raises(CheckpointError, match="does not fit UNet"):
        sd1.load_checked_state_dict(tiny_sd2_unet.state_dict())
    # a folder whose weights do not match its config
    tiny_sd2_unet.save_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(UNetConfig.tiny().to_dict()))
    with pytest.raises(CheckpointError, match="Missing keys|Wrong shapes|Unexpected keys"):
        UNet.from_pretrained(tmp_path)


# Attention maps and shapes -----------------------------------------------------------------------


def test_record_cross_attention_maps_in_unet(tiny_pair):
    ours, _ = tiny_pair
    x, context = inputs(ours.config, batch=2, size=16, tokens=7)
    with torch.no_grad():
        plain = ours(x, 5, context)
        with record_attention(ours) as maps:
            recorded = ours(x, 5, context)
    assert (plain - recorded).abs().max() <= TOL
    assert maps, "no maps recorded"
    heads = ours.config.per_level("attention_head_dim")
    for name, probs in maps.items():
        assert name.endswith("attn2")
        B, h, L_q, L_k = probs.shape
        assert (B, L_k) == (2, 7)
        assert h in heads
        assert L_q in (16 * 16, 8 * 8, 4 * 4)
    n_transformers = sum(1 for name, _ in ours.named_modules() if name.endswith("transformer_blocks.0"))
    assert len(maps) == n_transformers


def test_trace_shapes_of_sd15_on_meta_device():
    with torch.device("meta"):
        unet = UNet(UNetConfig.sd15())
        x, context = torch.empty(2, 4, 64, 64), torch.empty(2, 77, 768)
    trace = {name: out for name, _, out in trace_shapes(unet, x, torch.tensor([1, 1], device="meta"), context)}
    assert trace["conv_in"] == (2, 320, 64, 64)
    assert trace["time_embedding"] == (2, 1280)
    assert trace["down_blocks.0.downsamplers.0"] == (2, 320, 32, 32)
    assert trace["down_blocks.2.attentions.1"] == (2, 1280, 16, 16)
    assert trace["down_blocks.3.resnets.1"] == (2, 1280, 8, 8)
    assert trace["mid_block"] == (2, 1280, 8, 8)
    assert trace["up_blocks.0.upsamplers.0"] == (2, 1280, 16, 16)
    assert trace["up_blocks.3.resnets.2"] == (2, 320, 64, 64)
    assert trace["conv_out"] == (2, 4, 64, 64)


@pytest.mark.parametrize("name", ["sd15", "tiny", "tiny_sd2"])
def test_skip_connections_pair_equal_resolutions(name):
    config = getattr(UNetConfig, name)()
    with torch.device("meta"):
        unet = UNet(config)
        x, context = torch.empty(1, 4, 32, 32), torch.empty(1, 5, config.cross_attention_dim)
    trace = trace_shapes(unet, x, 1, context)
    skips = skip_connections(unet, trace)
    levels, layers = config.num_levels, config.layers_per_block
    assert len(skips) == 1 + levels * layers + levels - 1  # conv_in, every layer, every downsampler
    inputs_of = {name: inp for name, inp, _ in trace}
    outputs_of = {name: out for name, _, out in trace}
    for source, shape, consumer in skips:
        assert shape == outputs_of[source]
        assert inputs_of[consumer][2:] == shape[2:]  # same resolution
        assert inputs_of[consumer][1] > shape[1]  # the skip is concatenated to h


# Oracle: full-size SD configs (slow) --------------------------------------------------------------


def full_pair(config: UNetConfig):
    """diffusers' full-size UNet and ours on the same weights, without a second random init.

    Ours is built on the meta device and takes diffusers' tensors (strict, after the
    explicit key/shape check), so the 860M parameters are held once.
    """
    theirs = diffusers_unet(config)
    with torch.device("meta"):
        ours = UNet.from_config(dict(theirs.config))
    state_dict = theirs.state_dict()
    check_state_dict(ours, state_dict, "diffusers' state dict")
    ours.load_state_dict(state_dict, strict=True, assign=True)
    return ours.eval(), theirs


@pytest.fixture(scope="module", params=["sd15", "sd2"])
def full_size(request):
    ours, theirs = full_pair(getattr(UNetConfig, request.param)())
    yield ours, theirs
    del ours, theirs
    gc.collect()


@pytest.mark.slow
def test_full_size_equals_diffusers(full_size):
    ours, theirs = full_size
    assert not any(p.is_meta for p in ours.parameters())
    x, context = inputs(ours.config, batch=2, size=32, tokens=77)
    t = torch.tensor([999, 1])
    with torch.no_grad():
        ref = theirs(x, t, context).sample
        fused = ours(x, t, context)
        written = use_fused_attention(ours, False)(x, t, context)
    use_fused_attention(ours, True)
    assert fused.shape == (2, 4, 32, 32)
    assert (fused - ref).abs().max().item() <= TOL
    assert (written - ref).abs().max().item() <= TOL


@pytest.mark.gpu
def test_half_precision_on_cuda_matches_diffusers():
    ours, theirs = pair(UNetConfig.tiny_sd2())
    ours, theirs = ours.to("cuda", torch.float16), theirs.to("cuda", torch.float16)
    x, context = inputs(ours.config, size=32)
    x, context = x.to("cuda", torch.float16), context.to("cuda", torch.float16)
    with torch.no_grad():
        out = ours(x, torch.tensor([3, 700], device="cuda"), context)
        ref = theirs(x, torch.tensor([3, 700], device="cuda"), context).sample
    assert out.dtype == torch.float16 and torch.isfinite(out).all()
    assert (out.float() - ref.float()).abs().max() <= 1e-2


def test_class_conditional_unet_equals_diffusers(tmp_path):
    """num_class_embeds: a learned vector per class added to the timestep embedding, as diffusers does."""
    ours, theirs = pair(UNetConfig.tiny(num_class_embeds=5))
    x, context = inputs(ours.config)
    labels = torch.tensor([0, 4])
    with torch.no_grad():
        out = ours(x, 10, context, class_labels=labels)
        err = (out - theirs(x, 10, context, class_labels=labels).sample).abs().max().item()
        assert err <= TOL
        assert not torch.allclose(out, ours(x, 10, context, class_labels=torch.tensor([1, 4])))
    ours.save_pretrained(tmp_path / "unet")
    assert UNet2DConditionModel.from_pretrained(tmp_path / "unet").config.num_class_embeds == 5
    with pytest.raises(ValueError, match="pass class_labels"):
        ours(x, 10, context)
    with pytest.raises(ValueError, match="0..4"):
        ours(x, 10, context, class_labels=torch.tensor([0, 5]))
    with pytest.raises(ValueError, match="no class embedding"):
        pair(UNetConfig.tiny())[0](x, 10, context, class_labels=labels)


def test_projection_conditional_unet_equals_diffusers(tmp_path):
    """class_embed_type="projection": a condition vector through an MLP, added to the timestep embedding."""
    config = UNetConfig.tiny(class_embed_type="projection", projection_class_embeddings_input_dim=6)
    ours, theirs = pair(config)
    x, context = inputs(ours.config)
    y = torch.tensor([[1.0, 0, 0, 1, 0, 0], [0, 0, 0, 0, 0, 0]])  # a multi-hot and the empty (unconditional) vector
    with torch.no_grad():
        out = ours(x, 10, context, class_labels=y)
        assert (out - theirs(x, 10, context, class_labels=y).sample).abs().max().item() <= TOL
        assert not torch.allclose(out, ours(x, 10, context, class_labels=y.flip(0)))
    ours.save_pretrained(tmp_path / "unet")
    reloaded = UNet2DConditionModel.from_pretrained(tmp_path / "unet")
    assert reloaded.config.class_embed_type == "projection" and reloaded.config.projection_class_embeddings_input_dim == 6
    assert UNet.from_pretrained(tmp_path / "unet").config == config
    with pytest.raises(ValueError, match=r"pass class_labels, a \(2, 6\) float"):
        ours(x, 10, context)
    with pytest.raises(ValueError, match=r"shape \(2, 6\)"):
        ours(x, 10, context, class_labels=torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="projection_class_embeddings_input_dim"):
        UNetConfig.tiny(class_embed_type="projection")
    with pytest.raises(CheckpointError, match="class_embed_type"):
        UNetConfig.tiny(class_embed_type="timestep")


def test_bench_unet_reports_median_and_fastest_calls(capsys):
    """`python -m sdlearn.bench unet` at tiny size: both ratios printed, every call timed, same outputs."""
    from sdlearn.bench import main, time_interleaved

    assert main(["unet", "--config", "tiny", "--size", "16", "--repeats", "3", "--cpu-only", "--count-ops"]) == 0
    out = capsys.readouterr().out.splitlines()
    (ops,) = [line for line in out if "operator calls" in line]
    ours_ops, theirs_ops = (int(part.split()[-1]) for part in ops.split(":", 1)[1].split("(")[0].split(","))
    assert 0 < ours_ops <= theirs_ops  # sdlearn's UNet runs no more operators than diffusers'
    (line,) = [line for line in out if "ratio" in line]
    assert line.startswith("UNet tiny, batch 2, 4x16x16, fp32") and "3 calls each" in line
    assert float(line.rsplit("max |diff| ", 1)[1]) == 0.0
    calls = []
    times = time_interleaved({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, repeats=4, warmup=1)
    assert calls == ["a", "b", "a", "b", "b", "a", "a", "b", "b", "a"]  # warm-up, then alternating order
    assert len(times["a"]) == 4 and times["a"].best <= times["a"].median
