"""SDXL's conditioning in sdlearn's UNet and CLIP, against diffusers and transformers.

The UNet with addition_embed_type="text_time" (pooled text + six size/crop numbers added to
the timestep embedding) on identical random weights; the sdxl() preset against the published
config and its 2.57B parameters on the meta device; the second text encoder with its
projection and SDXL's two-encoder prompt embedding.
"""

import json

import pytest
import torch
import transformers
from diffusers import UNet2DConditionModel

from sdlearn.clip import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTextWithProjectionConfig, sdxl_prompt_embeds
from sdlearn.models.checkpoint import CheckpointError
from sdlearn.unet import UNet, UNetConfig, config_dict_for_diffusers, trace_shapes
from tests.test_clip import hf_config, random_ids

TOL = 1e-4  # fp32 max abs error allowed against diffusers (UNet)
CLIP_TOL = 1e-5  # and against transformers (text encoders)

# unet/config.json of stabilityai/stable-diffusion-xl-base-1.0, as published.
SDXL_CONFIG_JSON = {
    "_class_name": "UNet2DConditionModel", "_diffusers_version": "0.19.0.dev0", "act_fn": "silu",
    "addition_embed_type": "text_time", "addition_embed_type_num_heads": 64, "addition_time_embed_dim": 256,
    "attention_head_dim": [5, 10, 20], "block_out_channels": [320, 640, 1280], "center_input_sample": False,
    "class_embed_type": None, "class_embeddings_concat": False, "conv_in_kernel": 3, "conv_out_kernel": 3,
    "cross_attention_dim": 2048, "cross_attention_norm": None,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "downsample_padding": 1, "dual_cross_attention": False, "encoder_hid_dim": None, "encoder_hid_dim_type": None,
    "flip_sin_to_cos": True, "freq_shift": 0, "in_channels": 4, "layers_per_block": 2,
    "mid_block_only_cross_attention": None, "mid_block_scale_factor": 1, "mid_block_type": "UNetMidBlock2DCrossAttn",
    "norm_eps": 1e-05, "norm_num_groups": 32, "num_attention_heads": None, "num_class_embeds": None,
    "only_cross_attention": False, "out_channels": 4, "projection_class_embeddings_input_dim": 2816,
    "resnet_out_scale_factor": 1.0, "resnet_skip_time_act": False, "resnet_time_scale_shift": "default",
    "sample_size": 128, "time_cond_proj_dim": None, "time_embedding_act_fn": None, "time_embedding_dim": None,
    "time_embedding_type": "positional", "timestep_post_act": None, "transformer_layers_per_block": [1, 2, 10],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"], "upcast_attention": None,
    "use_linear_projection": True,
}
SDXL_UNET_PARAMETERS = 2_567_463_684


def rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def diffusers_unet(config: UNetConfig, seed: int = 0) -> UNet2DConditionModel:
    torch.manual_seed(seed)
    theirs = UNet2DConditionModel(**config_dict_for_diffusers(config)).eval()
    with torch.no_grad():  # any layer initialised to zero (none in diffusers 0.42, but a test must not rely on it)
        for p in theirs.parameters():
            if p.ndim > 1 and not p.any():
                p.normal_(0, 0.02)
    return theirs


def pair(config: UNetConfig, seed: int = 0):
    theirs = diffusers_unet(config, seed)
    ours = UNet.from_config(dict(theirs.config)).eval()
    ours.load_checked_state_dict(theirs.state_dict())
    return ours, theirs


def inputs(config: UNetConfig, batch=2, size=16, tokens=7, seed=1):
    x = rand(batch, config.in_channels, size, size, seed=seed)
    context = rand(batch, tokens, config.cross_attention_dim, seed=seed + 1)
    pooled = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
    time_ids = torch.tensor([[1024.0, 1024, 0, 0, 1024, 1024], [512, 768, 16, 32, 1024, 1024]])[:batch]
    return x, context, {"text_embeds": rand(batch, pooled, seed=seed + 2), "time_ids": time_ids}


def max_error(ours, theirs, x, t, context, added) -> float:
    with torch.no_grad():
        return (ours(x, t, context, added_cond_kwargs=added) - theirs(x, t, context, added_cond_kwargs=added).sample).abs().max().item()


@pytest.fixture(scope="module")
def sdxl_pair():
    return pair(UNetConfig.tiny_sdxl())


# The UNet with text_time -------------------------------------------------------------------------


def test_tiny_sdxl_unet_equals_diffusers(sdxl_pair):
    ours, theirs = sdxl_pair
    assert ours.down_blocks[0].attentions is None and ours.up_blocks[-1].attentions is None  # level 0: no attention
    assert [len(b.attentions[0].transformer_blocks) for b in ours.down_blocks[1:]] == [1, 2]
    assert len(ours.mid_block.attentions[0].transformer_blocks) == 2
    x, context, added = inputs(ours.config)
    t = torch.tensor([10, 900])
    assert max_error(ours, theirs, x, t, context, added) <= TOL
    assert max_error(ours, theirs, x[:1], 500.0, context[:1], {k: v[:1] for k, v in added.items()}) <= TOL


def test_half_precision_matches_diffusers():
    """bfloat16 weights and inputs; the size numbers stay float32 (their sinusoids are computed in float32, then cast)."""
    ours, theirs = (m.to(torch.bfloat16) for m in pair(UNetConfig.tiny_sdxl()))
    x, context, added = inputs(ours.config)
    added = {"text_embeds": added["text_embeds"].bfloat16(), "time_ids": added["time_ids"]}
    with torch.no_grad():
        out = ours(x.bfloat16(), 10, context.bfloat16(), added_cond_kwargs=added)
        want = theirs(x.bfloat16(), 10, context.bfloat16(), added_cond_kwargs=added).sample
    assert out.dtype == torch.bfloat16
    assert (out.float() - want.float()).abs().max() <= 0.05


def test_pooled_text_and_time_ids_change_the_output(sdxl_pair):
    ours, _ = sdxl_pair
    x, context, added = inputs(ours.config)
    with torch.no_grad():
        base = ours(x, 10, context, added_cond_kwargs=added)
        cropped = {**added, "time_ids": added["time_ids"] + torch.tensor([0.0, 0, 64, 64, 0, 0])}
        assert not torch.allclose(base, ours(x, 10, context, added_cond_kwargs=cropped))
        assert not torch.allclose(base, ours(x, 10, context, added_cond_kwargs={**added, "text_embeds": added["text_embeds"] + 1}))


def test_state_dict_loads_strictly_both_ways(sdxl_pair):
    ours, theirs = sdxl_pair
    assert set(ours.state_dict()) == set(theirs.state_dict())
    assert {"add_embedding.linear_1.weight", "add_embedding.linear_2.bias"} <= set(ours.state_dict())
    fresh = diffusers_unet(ours.config, seed=5)
    fresh.load_state_dict(ours.state_dict(), strict=True)
    mine = UNet(UNetConfig.tiny_sdxl())
    mine.load_state_dict(fresh.state_dict(), strict=True)
    x, context, added = inputs(ours.config)
    assert max_error(mine.eval(), fresh, x, 3, context, added) <= TOL


def test_folder_round_trip_with_diffusers(tmp_path):
    theirs = diffusers_unet(UNetConfig.tiny_sdxl(), seed=3)
    theirs.save_pretrained(tmp_path / "diffusers")
    ours = UNet.from_pretrained(tmp_path / "diffusers").eval()
    assert ours.config == UNetConfig.tiny_sdxl()
    x, context, added = inputs(ours.config)
    assert max_error(ours, theirs, x, 42, context, added) <= TOL

    ours.save_pretrained(tmp_path / "ours")
    back = UNet2DConditionModel.from_pretrained(tmp_path / "ours").eval()
    assert back.config.addition_embed_type == "text_time" and back.config.addition_time_embed_dim == 8
    assert list(back.config.transformer_layers_per_block) == [1, 1, 2]
    assert max_error(ours, back, x, 42, context, added) <= TOL


# The sdxl() preset --------------------------------------------------------------------------------


def test_published_config_gives_the_preset():
    assert UNetConfig.from_dict(SDXL_CONFIG_JSON) == UNetConfig.sdxl()
    d = UNetConfig.sdxl().to_dict()
    assert UNetConfig.from_dict(json.loads(json.dumps(d))) == UNetConfig.sdxl()


def test_sdxl_parameter_count_on_meta_device():
    with torch.device("meta"):
        ours = UNet(UNetConfig.sdxl())
        theirs = UNet2DConditionModel.from_config(UNetConfig.sdxl().to_dict())
    assert {k: tuple(v.shape) for k, v in ours.state_dict().items()} == {k: tuple(v.shape) for k, v in theirs.state_dict().items()}
    assert ours.num_parameters() == sum(p.numel() for p in theirs.parameters()) == SDXL_UNET_PARAMETERS


def test_trace_shapes_of_sdxl_on_meta_device():
    with torch.device("meta"):
        unet = UNet(UNetConfig.sdxl())
        x, context = torch.empty(1, 4, 128, 128), torch.empty(1, 77, 2048)
        added = {"text_embeds": torch.empty(1, 1280), "time_ids": torch.empty(1, 6)}
        trace = trace_shapes(unet, x, 999, context, added_cond_kwargs=added)
    shapes = {name: out for name, _, out in trace}
    assert shapes["down_blocks.0.resnets.1"] == (1, 320, 128, 128)  # no attention at 128x128
    assert shapes["down_blocks.2.attentions.1"] == (1, 1280, 32, 32)
    assert shapes["mid_block"] == (1, 1280, 32, 32)
    assert shapes["conv_out"] == (1, 4, 128, 128)


# Clear errors ---------------------------------------------------------------------------------------


def test_missing_or_wrong_added_conditioning(sdxl_pair):
    ours, _ = sdxl_pair
    x, context, added = inputs(ours.config)
    with pytest.raises(ValueError, match=r"addition_embed_type='text_time'.*missing \['time_ids'\]"):
        ours(x, 10, context, added_cond_kwargs={"text_embeds": added["text_embeds"]})
    with pytest.raises(ValueError, match=r"missing \['text_embeds', 'time_ids'\]"):
        ours(x, 10, context)
    with pytest.raises(ValueError, match=r"time_ids must have shape \(2, 6\)"):
        ours(x, 10, context, added_cond_kwargs={**added, "time_ids": added["time_ids"][:, :4]})
    with pytest.raises(ValueError, match=r"text_embeds must have shape \(2, 32\)"):
        ours(x, 10, context, added_cond_kwargs={**added, "text_embeds": added["text_embeds"][:, :16]})
    sd_unet = UNet(UNetConfig.tiny(cross_attention_dim=64))
    with pytest.raises(ValueError, match="no added embedding"):
        sd_unet(x, 10, context, added_cond_kwargs=added)


def test_unsupported_addition_embed_types_name_the_field():
    for value in ("text", "image", "text_image"):
        with pytest.raises(CheckpointError, match="addition_embed_type"):
            UNet.from_config({**SDXL_CONFIG_JSON, "addition_embed_type": value})
    with pytest.raises(ValueError, match="needs addition_time_embed_dim"):
        UNetConfig.tiny_sdxl(addition_time_embed_dim=None)
    with pytest.raises(ValueError, match="needs projection_class_embeddings_input_dim"):
        UNetConfig.tiny_sdxl(projection_class_embeddings_input_dim=None)
    with pytest.raises(ValueError, match="6 \\* addition_time_embed_dim"):
        UNetConfig.tiny_sdxl(projection_class_embeddings_input_dim=48)


# The second text encoder and SDXL's prompt embedding ---------------------------------------------------


def perturb_layer_norms(model) -> None:
    with torch.no_grad():  # LayerNorms start at (1, 0): perturb them so they are tested too
        for name, p in model.named_parameters():
            if "layer_norm" in name:
                p.add_(0.1 * torch.randn_like(p))


TINY_ENCODER_1 = CLIPTextConfig.tiny(vocab_size=1000, hidden_size=32, intermediate_size=64, num_hidden_layers=3)
TINY_ENCODER_2 = CLIPTextWithProjectionConfig.tiny(
    vocab_size=1000, hidden_size=32, intermediate_size=64, num_hidden_layers=4, projection_dim=32, hidden_act="gelu"
)


@pytest.fixture(scope="module")
def encoders():
    torch.manual_seed(0)
    ref_1 = transformers.CLIPTextModel(hf_config(TINY_ENCODER_1)).eval()
    ref_2 = transformers.CLIPTextModelWithProjection(hf_config(TINY_ENCODER_2)).eval()
    perturb_layer_norms(ref_1), perturb_layer_norms(ref_2)
    ours_1 = CLIPTextModel.from_config(TINY_ENCODER_1).eval()
    ours_1.load_checked_state_dict(ref_1.state_dict())
    ours_2 = CLIPTextModelWithProjection.from_config(TINY_ENCODER_2).eval()
    ours_2.load_checked_state_dict(ref_2.state_dict())
    return (ref_1, ref_2), (ours_1, ours_2)


def test_text_model_with_projection_equals_transformers(encoders):
    (_, reference), (_, ours) = encoders
    ids = random_ids(ours.config)
    with torch.no_grad():
        out = reference(ids, output_hidden_states=True)
        states, text_embeds = ours.encode(ids)
        errors = {
            "text_embeds": (out.text_embeds - text_embeds).abs().max().item(),
            "text_embeds()": (out.text_embeds - ours.text_embeds(ids)).abs().max().item(),
            "last": (out.last_hidden_state - ours(ids)).abs().max().item(),
            "hidden_states[-2]": (out.hidden_states[-2] - ours(ids, clip_skip=1, final_norm=False)).abs().max().item(),
        }
        errors.update({f"hidden_states[{i}]": (a - b).abs().max().item() for i, (a, b) in enumerate(zip(out.hidden_states, states))})
    assert len(states) == len(out.hidden_states) == 5
    assert text_embeds.shape == (3, 32)
    assert max(errors.values()) <= CLIP_TOL, errors


def test_text_model_with_projection_folders_both_ways(encoders, tmp_path):
    (_, reference), (_, ours) = encoders
    assert set(ours.state_dict()) == set(transformers.CLIPTextModelWithProjection(hf_config(TINY_ENCODER_2)).state_dict())
    ours.save_pretrained(tmp_path / "ours")
    config = json.loads((tmp_path / "ours" / "config.json").read_text())
    assert config["architectures"] == ["CLIPTextModelWithProjection"]
    back = transformers.CLIPTextModelWithProjection.from_pretrained(tmp_path / "ours").eval()
    reference.save_pretrained(tmp_path / "theirs")
    loaded = CLIPTextModelWithProjection.from_pretrained(tmp_path / "theirs")
    assert loaded.config == TINY_ENCODER_2
    ids = random_ids(ours.config)
    with torch.no_grad():
        assert (back(ids).text_embeds - ours.text_embeds(ids)).abs().max().item() <= CLIP_TOL
        assert (reference(ids).text_embeds - loaded.text_embeds(ids)).abs().max().item() <= CLIP_TOL
    with pytest.raises(CheckpointError, match="CLIPTextModelWithProjection"):
        CLIPTextModel.from_pretrained(tmp_path / "ours")  # the projection would be dropped silently


def test_vit_bigg14_preset_matches_transformers():
    config = CLIPTextWithProjectionConfig.vit_bigg14()
    with torch.device("meta"):
        ours = sum(p.numel() for p in CLIPTextModelWithProjection(config).parameters())
        theirs = sum(p.numel() for p in transformers.CLIPTextModelWithProjection(hf_config(config)).parameters())
    assert ours == theirs == 694_659_840


def test_sdxl_prompt_embeds_equal_transformers(encoders):
    """context = concat(penultimate of both, no final norm), pooled = encoder 2's text_embeds (diffusers' encode_prompt)."""
    (ref_1, ref_2), (ours_1, ours_2) = encoders
    ids_1, ids_2 = random_ids(TINY_ENCODER_1), random_ids(TINY_ENCODER_2, seed=2)
    context, pooled = sdxl_prompt_embeds(ours_1, ours_2, ids_1, ids_2)
    with torch.no_grad():
        out_1 = ref_1(ids_1, output_hidden_states=True)
        out_2 = ref_2(ids_2, output_hidden_states=True)
        want = torch.cat([out_1.hidden_states[-2], out_2.hidden_states[-2]], dim=-1)
        assert context.shape == (3, 77, 64) and pooled.shape == (3, 32)
        assert (context - want).abs().max().item() <= CLIP_TOL
        assert (pooled - out_2.text_embeds).abs().max().item() <= CLIP_TOL
        skip_1, _ = sdxl_prompt_embeds(ours_1, ours_2, ids_1, ids_2, clip_skip=1)  # diffusers: hidden_states[-(clip_skip + 2)]
        want = torch.cat([out_1.hidden_states[-3], out_2.hidden_states[-3]], dim=-1)
        assert (skip_1 - want).abs().max().item() <= CLIP_TOL
    with pytest.raises(TypeError, match="CLIPTextModelWithProjection"):
        sdxl_prompt_embeds(ours_1, ours_1, ids_1, ids_2)
    with pytest.raises(ValueError, match="same shape"):
        sdxl_prompt_embeds(ours_1, ours_2, ids_1, ids_2[:2])


def test_prompt_embeds_drive_the_unet(encoders, sdxl_pair):
    """The tiny encoders' outputs are exactly what tiny_sdxl() takes: context 64 wide, pooled 32 + 6 * 8 = 80."""
    (_, _), (ours_1, ours_2) = encoders
    ours, theirs = sdxl_pair
    context, pooled = sdxl_prompt_embeds(ours_1, ours_2, random_ids(TINY_ENCODER_1, batch=2), random_ids(TINY_ENCODER_2, batch=2))
    x, _, added = inputs(ours.config)
    added = {**added, "text_embeds": pooled}
    assert max_error(ours, theirs, x, 10, context, added) <= TOL
