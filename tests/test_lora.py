"""sdlearn.lora against diffusers + peft on identical weights (the shipped mini-SD UNet).

The LoRA matrices are random (B too: with B = 0 every LoRA gives the base model, and a parity
test would prove nothing). Files go both ways: sdlearn writes, diffusers' `load_lora_weights`
reads, and the other way round; kohya's format is checked through diffusers' kohya converter.
"""

import json

import pytest
import torch
from diffusers import StableDiffusionPipeline, UNet2DConditionModel
from peft import LoraConfig
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from sdlearn.datasets import data_path
from sdlearn.lora import (
    LoRAError,
    LoRALinear,
    add_lora,
    load_lora,
    lora_layers,
    merge_lora,
    remove_lora,
    save_lora,
    set_lora_scale,
    unmerge_lora,
)
from sdlearn.unet import UNet

TOL = 1e-5  # fp32 forward-pass parity
FILE_TOL = 1e-4  # through a file and diffusers' loader
RANK, ALPHA = 4, 8.0


@pytest.fixture(scope="module")
def folder():
    return data_path("mini-sd", "train-mini-sd")


@pytest.fixture(scope="module")
def inputs():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 8, 8, generator=g)
    t = torch.tensor([10, 500])
    context = torch.randn(2, 8, 64, generator=g)
    return x, t, context


def sd_unet(folder) -> UNet:
    return UNet.from_pretrained(folder / "unet").eval()


def randomise_lora(unet, seed=1):
    """Random A and B (B = 0 would hide every mistake in the LoRA path)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora_layers(unet).values():
            layer.lora_A.copy_(torch.randn(layer.lora_A.shape, generator=g) * 0.1)
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g) * 0.1)


def peft_unet(folder, sdl_unet) -> UNet2DConditionModel:
    """diffusers' UNet with a peft LoRA holding the same A, B, rank and alpha as sdl_unet's."""
    ref = UNet2DConditionModel.from_pretrained(folder / "unet").eval()
    ref.add_adapter(LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    ours = lora_layers(sdl_unet)
    seen = 0
    with torch.no_grad():
        for name, module in ref.named_modules():
            if name in ours:
                module.lora_A["default"].weight.copy_(ours[name].lora_A)
                module.lora_B["default"].weight.copy_(ours[name].lora_B)
                seen += 1
    assert seen == len(ours) > 0
    return ref


def reference_pipeline(folder) -> StableDiffusionPipeline:
    pipe = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, feature_extractor=None,
                                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@torch.no_grad()
def run(unet, inputs, scale=None):
    x, t, context = inputs
    if isinstance(unet, UNet2DConditionModel):
        kwargs = {} if scale is None else {"cross_attention_kwargs": {"scale": scale}}
        return unet(x, t, context, **kwargs).sample
    return unet(x, t, context)


def max_err(a, b):
    return (a - b).abs().max().item()


# 1. The forward pass -----------------------------------------------------------------------


def test_lora_forward_matches_peft_at_two_scales(folder, inputs):
    unet = sd_unet(folder)
    base = run(unet, inputs)
    add_lora(unet, rank=RANK, alpha=ALPHA)
    randomise_lora(unet)
    ref = peft_unet(folder, unet)
    for scale in (0.5, 1.0):
        set_lora_scale(unet, scale)
        ours = run(unet, inputs)
        assert max_err(ours, run(ref, inputs, scale)) <= TOL, f"scale {scale}"
        assert max_err(ours, base) > 1e-2  # the LoRA does change the output


def test_zero_B_gives_the_base_model_exactly(folder, inputs):
    unet = sd_unet(folder)
    base = run(unet, inputs)
    add_lora(unet, rank=RANK, alpha=ALPHA)
    assert all(bool((layer.lora_B == 0).all()) for layer in lora_layers(unet).values())
    assert not all(bool((layer.lora_A == 0).all()) for layer in lora_layers(unet).values())
    assert torch.equal(run(unet, inputs), base)


def test_A_is_initialised_kaiming_uniform_like_peft():
    torch.manual_seed(0)
    layer = LoRALinear(torch.nn.Linear(64, 32), rank=8)
    bound = 1 / 64 ** 0.5  # kaiming_uniform(a=sqrt(5)) on fan_in = 64
    assert layer.lora_A.abs().max() <= bound and layer.lora_A.abs().max() > 0.8 * bound
    assert layer.alpha == 8 and layer.scaling == 1.0


def test_merge_then_unmerge(folder, inputs):
    unet = sd_unet(folder)
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    add_lora(unet, rank=RANK, alpha=ALPHA)
    randomise_lora(unet)
    set_lora_scale(unet, 0.7)
    unmerged = run(unet, inputs)
    merge_lora(unet)
    assert max_err(run(unet, inputs), unmerged) <= TOL
    # the plain forward of the merged weights, without any LoRA layer in the way
    plain = sd_unet(folder)
    plain.load_state_dict({k: v for k, v in unet.state_dict().items() if "lora_" not in k})
    assert max_err(run(plain, inputs), unmerged) <= TOL
    with pytest.raises(LoRAError, match="unmerge_lora"):
        set_lora_scale(unet, 1.0)
    unmerge_lora(unet)
    after = unet.state_dict()
    assert max(max_err(after[k], v) for k, v in before.items()) <= 1e-6
    remove_lora(unet)
    assert not lora_layers(unet) and set(unet.state_dict()) == set(before)


# 2. Files ----------------------------------------------------------------------------------


def test_sdlearn_file_loads_in_diffusers_pipeline(folder, inputs, tmp_path):
    unet = sd_unet(folder)
    add_lora(unet, rank=RANK, alpha=ALPHA)
    randomise_lora(unet)
    path = save_lora(unet, tmp_path / "lora")
    assert path.name == "pytorch_lora_weights.safetensors"
    with safe_open(str(path), "pt") as f:
        keys, meta = list(f.keys()), f.metadata()
    assert "unet.mid_block.attentions.0.transformer_blocks.0.attn2.to_out.0.lora_B.weight" in keys
    config = json.loads(meta["lora_adapter_metadata"])
    assert config["unet.r"] == RANK and config["unet.lora_alpha"] == ALPHA

    pipe = reference_pipeline(folder)
    pipe.load_lora_weights(tmp_path / "lora")
    for scale in (1.0, 0.5):
        set_lora_scale(unet, scale)
        assert max_err(run(unet, inputs), run(pipe.unet, inputs, scale)) <= FILE_TOL, f"scale {scale}"


def test_diffusers_file_loads_in_sdlearn(folder, inputs, tmp_path):
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    # a peft-wrapped diffusers UNet with random A and B, saved the way diffusers' training scripts save
    template = sd_unet(folder)
    add_lora(template, rank=RANK, alpha=ALPHA)
    randomise_lora(template, seed=5)
    ref = peft_unet(folder, template)
    config = LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=["to_q", "to_k", "to_v", "to_out.0"])
    layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(ref))
    StableDiffusionPipeline.save_lora_weights(tmp_path, unet_lora_layers=layers, unet_lora_adapter_metadata=config.to_dict())

    unet = sd_unet(folder)
    params = load_lora(unet, tmp_path / "pytorch_lora_weights.safetensors")
    assert len(params) == 2 * len(lora_layers(template))
    assert max_err(run(unet, inputs), run(ref, inputs)) <= FILE_TOL
    # and the peft-style keys (lora_A / lora_B) without metadata: diffusers takes alpha = r
    peft_keys = {f"unet.{k}": v for k, v in get_peft_model_state_dict(ref).items()}
    save_file(peft_keys, tmp_path / "no_meta.safetensors")
    unet2 = sd_unet(folder)
    load_lora(unet2, tmp_path / "no_meta.safetensors")
    assert all(layer.alpha == RANK for layer in lora_layers(unet2).values())


def test_kohya_written_by_sdlearn_reads_in_diffusers_and_back(folder, inputs, tmp_path):
    unet = sd_unet(folder)
    add_lora(unet, rank=RANK, alpha=ALPHA)
    randomise_lora(unet, seed=3)
    path = save_lora(unet, tmp_path, format="kohya", weight_name="kohya.safetensors")
    state = load_file(path)
    name = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    assert {f"{name}.lora_down.weight", f"{name}.lora_up.weight", f"{name}.alpha"} <= set(state)
    assert "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn2_to_out_0.alpha" in state
    assert float(state[f"{name}.alpha"]) == ALPHA

    pipe = reference_pipeline(folder)
    pipe.load_lora_weights(tmp_path, weight_name="kohya.safetensors")
    assert max_err(run(unet, inputs), run(pipe.unet, inputs)) <= FILE_TOL

    again = sd_unet(folder)
    load_lora(again, path)
    ours, theirs = lora_layers(unet), lora_layers(again)
    assert set(ours) == set(theirs)
    for module in ours:
        assert torch.equal(ours[module].lora_A, theirs[module].lora_A)
        assert torch.equal(ours[module].lora_B, theirs[module].lora_B)
        assert theirs[module].alpha == ALPHA and theirs[module].rank == RANK


# 3. Training -------------------------------------------------------------------------------


def test_only_lora_parameters_train(folder, inputs):
    unet = sd_unet(folder)
    params = add_lora(unet, rank=RANK)
    trainable = [p for p in unet.parameters() if p.requires_grad]
    assert {id(p) for p in trainable} == {id(p) for p in params}
    assert len(params) == 2 * len(lora_layers(unet)) > 0
    frozen = {k: v.clone() for k, v in unet.state_dict().items() if "lora_" not in k}
    lora_before = [p.detach().clone() for p in params]
    optimiser = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.0)
    x, t, context = inputs
    loss = unet(x, t, context).pow(2).mean()
    loss.backward()
    optimiser.step()
    after = unet.state_dict()
    assert all(torch.equal(after[k], v) for k, v in frozen.items())
    # B starts at zero, so A gets no gradient yet and the first step moves every B (A follows later)
    moved = [not torch.equal(p, q) for p, q in zip(params, lora_before)]
    assert all(moved[1::2]), "every B must move"


# 4. Bad input ------------------------------------------------------------------------------


@pytest.fixture
def good_file(folder, tmp_path):
    unet = sd_unet(folder)
    add_lora(unet, rank=RANK, alpha=ALPHA)
    randomise_lora(unet)
    return save_lora(unet, tmp_path / "good")


def test_file_without_lora_keys(folder, tmp_path):
    save_file({"conv_in.weight": torch.zeros(3)}, tmp_path / "x.safetensors")
    with pytest.raises(LoRAError, match="has no LoRA keys.*expected unet.<module>.lora_A.weight"):
        load_lora(sd_unet(folder), tmp_path / "x.safetensors")
    save_file({}, tmp_path / "empty.safetensors")
    with pytest.raises(LoRAError, match="holds no tensors"):
        load_lora(sd_unet(folder), tmp_path / "empty.safetensors")


def test_key_naming_a_missing_module(folder, tmp_path, good_file):
    state = load_file(good_file)
    state["unet.down_blocks.7.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight"] = torch.zeros(4, 64)
    state["unet.down_blocks.7.attentions.0.transformer_blocks.0.attn1.to_q.lora_B.weight"] = torch.zeros(64, 4)
    save_file(state, tmp_path / "bad.safetensors")
    with pytest.raises(LoRAError, match="down_blocks.7.*a module this UNet lacks"):
        load_lora(sd_unet(folder), tmp_path / "bad.safetensors")
    save_file({"lora_unet_down_blocks_7_attn1_to_q.lora_down.weight": torch.zeros(4, 64)}, tmp_path / "k.safetensors")
    with pytest.raises(LoRAError, match="names a module this UNet lacks"):
        load_lora(sd_unet(folder), tmp_path / "k.safetensors")


def test_rank_mismatch(folder, good_file, tmp_path):
    unet = sd_unet(folder)
    add_lora(unet, rank=2)
    with pytest.raises(LoRAError, match="Rank mismatch.*remove_lora"):
        load_lora(unet, good_file)
    state = load_file(good_file)
    key = next(k for k in state if k.endswith("lora_B.weight"))
    state[key] = state[key][:, :2].contiguous()
    save_file(state, tmp_path / "torn.safetensors")
    with pytest.raises(LoRAError, match="same rank r"):
        load_lora(sd_unet(folder), tmp_path / "torn.safetensors")


def test_non_finite_tensor(folder, good_file, tmp_path):
    state = load_file(good_file)
    key = next(iter(state))
    state[key][0, 0] = float("nan")
    save_file(state, tmp_path / "nan.safetensors")
    with pytest.raises(LoRAError, match="NaN or infinite values"):
        load_lora(sd_unet(folder), tmp_path / "nan.safetensors")


def test_pickle_and_missing_files_are_refused(folder, tmp_path):
    torch.save({}, tmp_path / "lora.bin")
    with pytest.raises(LoRAError, match="safetensors only"):
        load_lora(sd_unet(folder), tmp_path / "lora.bin")
    with pytest.raises(LoRAError, match="no LoRA file"):
        load_lora(sd_unet(folder), tmp_path / "missing")


def test_calls_in_the_wrong_order(folder):
    unet = sd_unet(folder)
    with pytest.raises(LoRAError, match="no LoRA layers.*add_lora"):
        merge_lora(unet)
    add_lora(unet)
    with pytest.raises(LoRAError, match="already has LoRA layers.*remove_lora"):
        add_lora(unet)
    with pytest.raises(LoRAError, match="No linear layer.*targets"):
        add_lora(sd_unet(folder), targets=("to_nothing",))
    with pytest.raises(LoRAError, match="Unknown LoRA file format"):
        save_lora(unet, "/nonexistent-never-written", format="ckpt")


def test_data_folder_is_untouched(folder):
    # the diffusers pipelines above were loaded read-only: no LoRA file was written into data/
    assert not list(folder.rglob("*lora*"))


def test_saving_never_replaces_a_file_silently(folder, tmp_path, good_file):
    before = good_file.read_bytes()
    unet = sd_unet(folder)
    add_lora(unet, rank=RANK, alpha=ALPHA)
    randomise_lora(unet, seed=2)  # other numbers than the file's
    with pytest.raises(FileExistsError, match="overwrite=True"):
        save_lora(unet, good_file.parent)
    assert good_file.read_bytes() == before  # untouched
    save_lora(unet, good_file.parent, overwrite=True)
    assert good_file.read_bytes() != before
    assert [p.name for p in good_file.parent.iterdir()] == [good_file.name]  # no temporary left behind
