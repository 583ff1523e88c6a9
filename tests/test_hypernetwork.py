"""sdlearn.hypernetwork against diffusers on identical weights (the shipped mini-SD UNet).

diffusers has no hypernetworks, so the reference is diffusers' UNet2DConditionModel with an
attention processor written here from AttnProcessor2_0 and A1111's attention_CrossAttention_forward:
it reads the MLPs from the saved A1111 .pt dict (so the file layout is checked too) and applies
them as a plain function of the state dict, not through sdlearn's modules. The MLP weights are
random and large (A1111's N(0, 0.01^2) start would hide mistakes). mini-SD's text width (64)
equals its first block width, so the width-64 pair serves cross- and self-attention, as in A1111.
"""

import pytest
import torch
import torch.nn.functional as F
from diffusers import UNet2DConditionModel
from diffusers.models.attention_processor import AttnProcessor2_0

from sdlearn.hypernetwork import (
    Hypernetwork,
    HypernetworkError,
    HypernetworkModule,
    add_hypernetwork,
    context_widths,
    hypernetwork_of,
    load_hypernetwork,
    remove_hypernetwork,
    save_hypernetwork,
    set_strength,
)

TOL = 1e-5
CONFIG = {"layer_structure": (1, 2, 1), "activation": "relu", "layer_norm": True}  # keys linear.0, .2, .3, .4


from tests.test_lora import folder, inputs, sd_unet  # noqa: E402,F401 (the shipped mini-SD UNet and its inputs, shared fixtures)


def randomise(unet, seed=1, std=0.2):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in hypernetwork_of(unet).parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)


@torch.no_grad()
def run(unet, inputs):
    x, t, context = inputs
    if isinstance(unet, UNet2DConditionModel):
        return unet(x, t, context).sample
    return unet(x, t, context)


def max_err(a, b):
    return (a - b).abs().max().item()


# The reference: A1111's MLP as a function of its state dict, in diffusers' attention ---------


def a1111_mlp(state, c, strength):
    """[1, 2, 1], relu, layer norm: Linear(0), ReLU(1), LayerNorm(2), Linear(3), LayerNorm(4)."""
    h = F.linear(c, state["linear.0.weight"], state["linear.0.bias"]).relu()
    h = F.layer_norm(h, h.shape[-1:], state["linear.2.weight"], state["linear.2.bias"])
    h = F.linear(h, state["linear.3.weight"], state["linear.3.bias"])
    h = F.layer_norm(h, h.shape[-1:], state["linear.4.weight"], state["linear.4.bias"])
    return c + strength * h


class HypernetworkProcessor(AttnProcessor2_0):
    """AttnProcessor2_0 with k = to_k(f_k(c)), v = to_v(f_v(c)), c = encoder_hidden_states or hidden_states.

    apply: which of k / v get their MLP ("kv", or "k" for a known-wrong variant); cross_only
    skips self-attention (another known-wrong variant).
    """

    def __init__(self, data, strength, apply="kv", cross_only=False):
        super().__init__()
        self.data, self.strength, self.apply, self.cross_only = data, strength, apply, cross_only

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *args, **kwargs):
        assert attention_mask is None and attn.norm_cross is None and attn.group_norm is None and attn.spatial_norm is None
        assert not attn.residual_connection and attn.rescale_output_factor == 1.0 and hidden_states.ndim == 3
        c = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        pair = self.data.get(c.shape[-1])
        c_k = c_v = c
        if pair is not None and not (self.cross_only and encoder_hidden_states is None):
            c_k = a1111_mlp(pair[0], c, self.strength) if "k" in self.apply else c
            c_v = a1111_mlp(pair[1], c, self.strength) if "v" in self.apply else c
        B = hidden_states.shape[0]
        q, k, v = attn.to_q(hidden_states), attn.to_k(c_k), attn.to_v(c_v)
        head_dim = k.shape[-1] // attn.heads
        q, k, v = (t.view(B, -1, attn.heads, head_dim).transpose(1, 2) for t in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=0.0, is_causal=False)
        out = out.transpose(1, 2).reshape(B, -1, attn.heads * head_dim)
        return attn.to_out[1](attn.to_out[0](out))


def reference(folder, data, strength, **variant) -> UNet2DConditionModel:
    ref = UNet2DConditionModel.from_pretrained(folder / "unet").eval()
    ref.set_attn_processor(HypernetworkProcessor(data, strength, **variant))
    return ref


@pytest.fixture(scope="module")
def trained(folder, tmp_path_factory):
    """A mini-SD UNet with a random hypernetwork, its .pt file and the dict torch.load gives back."""
    unet = sd_unet(folder)
    add_hypernetwork(unet, **CONFIG)
    randomise(unet)
    path = save_hypernetwork(unet, tmp_path_factory.mktemp("hn") / "shapes.pt")
    return unet, path, torch.load(path, weights_only=True)


# 1. The forward pass -----------------------------------------------------------------------


def test_forward_matches_diffusers_with_a1111_attention_at_two_strengths(folder, inputs, trained):
    unet, _, data = trained
    assert context_widths(unet) == [64, 128] and sorted(k for k in data if isinstance(k, int)) == [64, 128]
    base = run(sd_unet(folder), inputs)
    for strength in (0.6, 1.0):
        set_strength(unet, strength)
        ours = run(unet, inputs)
        err = max_err(ours, run(reference(folder, data, strength), inputs))
        print(f"strength {strength}: max abs difference to diffusers {err:.2e}")
        assert err <= TOL, f"strength {strength}"
        assert max_err(ours, base) > 1e-2  # the hypernetwork does change the output


def test_known_wrong_variants_are_clearly_further_off(folder, inputs, trained):
    unet, _, data = trained
    set_strength(unet, 1.0)
    ours = run(unet, inputs)
    for variant in ({"apply": "k"}, {"cross_only": True}):
        err = max_err(ours, run(reference(folder, data, 1.0, **variant), inputs))
        assert err > 1e-2, f"{variant} should differ, got {err:.2e}"


def test_file_holds_a1111_layout_and_round_trips(folder, inputs, trained):
    unet, path, data = trained
    assert set(data[64][0]) == {f"linear.{i}.{p}" for i in (0, 2, 3, 4) for p in ("weight", "bias")}
    assert data[128][1]["linear.0.weight"].shape == (256, 128)
    assert data["layer_structure"] == [1, 2, 1] and data["activation_func"] == "relu" and data["is_layer_norm"] is True
    assert data["name"] == "shapes" and data["dropout_structure"] == [0.0, 0.0, 0.0] and data["last_layer_dropout"] is False
    assert {"weight_initialization", "use_dropout", "activate_output", "optional_info", "step", "sd_checkpoint",
            "sd_checkpoint_name"} <= set(data)
    set_strength(unet, 0.6)
    fresh = sd_unet(folder)
    load_hypernetwork(fresh, path, strength=0.6)
    assert torch.equal(run(fresh, inputs), run(unet, inputs))
    # A1111's own loader rebuilds the modules from these fields; so do we, through the same layout
    assert "hypernetwork.layers.64.0.linear.4.weight" in fresh.state_dict()


def test_strength_zero_is_the_base_model_exactly(folder, inputs, trained):
    unet, _, _ = trained
    set_strength(unet, 0.0)
    try:
        assert torch.equal(run(unet, inputs), run(sd_unet(folder), inputs))
    finally:
        set_strength(unet, 1.0)


def test_remove_gives_the_base_model_back_and_keeps_names(folder, inputs):
    unet = sd_unet(folder)
    names = set(unet.state_dict())
    base = run(unet, inputs)
    add_hypernetwork(unet)
    randomise(unet)
    assert max_err(run(unet, inputs), base) > 1e-2
    assert names <= set(unet.state_dict())  # the UNet's own names are untouched
    remove_hypernetwork(unet)
    assert torch.equal(run(unet, inputs), base) and set(unet.state_dict()) == names


def test_a1111_normal_initialisation_starts_near_the_base_model(folder, inputs):
    torch.manual_seed(0)
    module = HypernetworkModule(768)
    module.initialise("Normal")
    first, last = module.linear[0], module.linear[1]
    assert [type(m) for m in module.linear] == [torch.nn.Linear, torch.nn.Linear]
    assert abs(first.weight.std().item() - 0.01) < 1e-3 and abs(last.weight.std().item() - 0.01) < 1e-3
    assert (first.bias == 0).all() and (last.bias == 0).all()
    unet = sd_unet(folder)
    base = run(unet, inputs)
    add_hypernetwork(unet)
    err = max_err(run(unet, inputs), base)
    assert 0 < err < 0.05 * base.abs().max().item()  # close to, not exactly, the base model (A1111 does not zero the last layer)


# 2. Training -------------------------------------------------------------------------------


def test_only_hypernetwork_parameters_get_gradients_and_train_mode_uses_strength_one(folder, inputs):
    unet = sd_unet(folder)
    params = add_hypernetwork(unet, activation="relu")
    randomise(unet, std=0.05)
    assert {id(p) for p in unet.parameters() if p.requires_grad} == {id(p) for p in params}
    assert len(params) == 2 * 2 * 4  # 2 widths x (f_k, f_v) x (2 weights + 2 biases)
    set_strength(unet, 0.0)
    unet.train()  # A1111 trains with multiplier 1, whatever the strength
    x, t, context = inputs
    unet(x, t, context).pow(2).mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in params)
    assert all(p.grad is None for p in unet.parameters() if not p.requires_grad)
    unet.eval()
    assert torch.equal(run(unet, inputs), run(sd_unet(folder), inputs))


# 3. Bad input ------------------------------------------------------------------------------


class NotATensor:
    pass


def test_widths_the_unet_lacks_are_refused_and_nothing_changes(folder, inputs, tmp_path, trained):
    _, path, data = trained
    save_hypernetwork(Hypernetwork([64, 96], **CONFIG), tmp_path / "other.pt")  # mini-SD has no width 96
    unet = sd_unet(folder)
    before = run(unet, inputs)
    with pytest.raises(HypernetworkError, match=r"context width 96, but no attention layer.*\[64, 128\]"):
        load_hypernetwork(unet, tmp_path / "other.pt")
    assert hypernetwork_of(unet) is None and not any(m._forward_pre_hooks for m in unet.modules())
    assert all(p.requires_grad for p in unet.parameters())
    assert torch.equal(run(unet, inputs), before)
    with pytest.raises(HypernetworkError, match=r"context width 320.*\[64, 128\]"):
        add_hypernetwork(unet, widths=[64, 320])
    assert hypernetwork_of(unet) is None


def test_unknown_layouts_are_refused(folder, tmp_path, trained):
    _, _, data = trained
    wrong = dict(data, activation_func="linear")  # the tensors say relu + layer norm (indices 0, 2, 3, 4)
    torch.save(wrong, tmp_path / "fields.pt")
    with pytest.raises(HypernetworkError, match=r"width 64, f_k has keys.*A1111's layout"):
        load_hypernetwork(sd_unet(folder), tmp_path / "fields.pt")
    torch.save({"emb_params": torch.zeros(1, 64)}, tmp_path / "embedding.pt")
    with pytest.raises(HypernetworkError, match="not a hypernetwork; the known layout"):
        load_hypernetwork(sd_unet(folder), tmp_path / "embedding.pt")
    torch.save({64: data[64][0]}, tmp_path / "half.pt")
    with pytest.raises(HypernetworkError, match="a pair"):
        load_hypernetwork(sd_unet(folder), tmp_path / "half.pt")
    shapes = dict(data, layer_structure=[1, 4, 1])
    torch.save(shapes, tmp_path / "shapes.pt")
    with pytest.raises(HypernetworkError, match="has shape"):
        load_hypernetwork(sd_unet(folder), tmp_path / "shapes.pt")
    nan = {**data, 64: ({**data[64][0], "linear.0.bias": torch.full((128,), float("nan"))}, data[64][1])}
    torch.save(nan, tmp_path / "nan.pt")
    with pytest.raises(HypernetworkError, match="NaN"):
        load_hypernetwork(sd_unet(folder), tmp_path / "nan.pt")


def test_old_key_names_load(folder, inputs, tmp_path):
    unet = sd_unet(folder)
    add_hypernetwork(unet)  # [1, 2, 1], linear: linear.0 and linear.1, which the first files called linear1 / linear2
    randomise(unet, seed=4)
    data = torch.load(save_hypernetwork(unet, tmp_path / "new.pt"), weights_only=True)
    old = {d: tuple({k.replace("linear.0", "linear1").replace("linear.1", "linear2"): v for k, v in s.items()} for s in data[d])
           for d in (64, 128)}
    torch.save(old, tmp_path / "old.pt")  # and no other field: A1111's defaults apply
    fresh = sd_unet(folder)
    load_hypernetwork(fresh, tmp_path / "old.pt")
    assert torch.equal(run(fresh, inputs), run(unet, inputs))


def test_pickles_that_run_code_are_refused(folder, tmp_path):
    torch.save({64: NotATensor()}, tmp_path / "evil.pt")
    with pytest.raises(HypernetworkError, match="not loaded for safety"):
        load_hypernetwork(sd_unet(folder), tmp_path / "evil.pt")
    with pytest.raises(HypernetworkError, match="no hypernetwork file"):
        load_hypernetwork(sd_unet(folder), tmp_path / "missing.pt")
    (tmp_path / "lora.safetensors").write_bytes(b"")
    with pytest.raises(HypernetworkError, match="usually a LoRA"):
        load_hypernetwork(sd_unet(folder), tmp_path / "lora.safetensors")
    (tmp_path / "text.pt").write_text("hello")
    with pytest.raises(HypernetworkError, match="not a readable torch file"):
        load_hypernetwork(sd_unet(folder), tmp_path / "text.pt")


def test_calls_in_the_wrong_order(folder, tmp_path, trained):
    _, path, _ = trained
    unet = sd_unet(folder)
    for call in (lambda: set_strength(unet, 1.0), lambda: remove_hypernetwork(unet),
                 lambda: save_hypernetwork(unet, tmp_path / "x.pt")):
        with pytest.raises(HypernetworkError, match="no hypernetwork.*add_hypernetwork"):
            call()
    add_hypernetwork(unet)
    with pytest.raises(HypernetworkError, match="already has a hypernetwork.*remove_hypernetwork"):
        add_hypernetwork(unet)
    with pytest.raises(HypernetworkError, match="already has a hypernetwork.*remove_hypernetwork"):
        load_hypernetwork(unet, path)
    with pytest.raises(HypernetworkError, match="Unknown activation"):
        add_hypernetwork(sd_unet(folder), activation="banana")
    with pytest.raises(HypernetworkError, match="start and end with 1"):
        add_hypernetwork(sd_unet(folder), layer_structure=(2, 1))


def test_saving_never_replaces_a_file_silently(folder, tmp_path, trained):
    _, path, _ = trained
    unet = sd_unet(folder)
    add_hypernetwork(unet)
    target = tmp_path / "keep.pt"
    target.write_bytes(b"precious")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        save_hypernetwork(unet, target)
    assert target.read_bytes() == b"precious"
    save_hypernetwork(remove_hypernetwork(unet), target, overwrite=True)  # a Hypernetwork saves too
    assert torch.load(target, weights_only=True)["name"] == "keep"
    assert [p.name for p in tmp_path.iterdir()] == ["keep.pt"]  # no temporary left behind
