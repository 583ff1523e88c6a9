"""sdlearn.models.layers against diffusers: timestep sinusoids, TimestepEmbedding, ResnetBlock2D, Down/Upsample2D."""

import pytest
import torch
from diffusers.models.downsampling import Downsample2D as DiffusersDownsample2D
from diffusers.models.embeddings import TimestepEmbedding as DiffusersTimestepEmbedding
from diffusers.models.embeddings import get_timestep_embedding
from diffusers.models.resnet import ResnetBlock2D as DiffusersResnetBlock2D
from diffusers.models.upsampling import Upsample2D as DiffusersUpsample2D

from sdlearn.models.layers import Downsample2D, ResnetBlock2D, SinusoidalEmbedding, TimestepEmbedding, Upsample2D, timestep_embedding

TOL = 1e-5


def load_both_ways(ours, theirs):
    """Copy diffusers' random weights into ours (strict), and check ours load back into diffusers."""
    ours.load_state_dict(theirs.state_dict(), strict=True)
    theirs.load_state_dict(ours.state_dict(), strict=True)


@pytest.mark.parametrize("dim", [320, 32, 7])
@pytest.mark.parametrize("flip_sin_to_cos, freq_shift", [(True, 0), (False, 1), (True, 1)])
def test_timestep_embedding_equals_diffusers(dim, flip_sin_to_cos, freq_shift):
    t = torch.tensor([0, 1, 10, 261, 500, 999])
    ours = timestep_embedding(t, dim, flip_sin_to_cos, freq_shift)
    theirs = get_timestep_embedding(t, dim, flip_sin_to_cos=flip_sin_to_cos, downscale_freq_shift=freq_shift)
    assert ours.shape == (6, dim)
    assert torch.equal(ours, theirs)


def test_timestep_embedding_is_cos_first_for_sd():
    # t = 0: every cosine is 1 and every sine 0, so SD's variant starts with ones.
    emb = timestep_embedding(torch.tensor([0]), 8)
    assert torch.equal(emb, torch.tensor([[1.0, 1, 1, 1, 0, 0, 0, 0]]))
    # The highest frequency is 1 (omega_0 = exp(0)), the lowest 10000^(-3/4) for shift 0.
    emb = timestep_embedding(torch.tensor([1]), 8)
    assert torch.allclose(emb[0, 0], torch.cos(torch.tensor(1.0)))
    assert torch.allclose(emb[0, 3], torch.cos(torch.tensor(10000.0 ** (-3 / 4))))
    assert SinusoidalEmbedding(8)(torch.tensor([1])).equal(emb)


def test_timestep_embedding_rejects_2d_input():
    with pytest.raises(ValueError, match="1-D tensor"):
        timestep_embedding(torch.zeros(2, 1), 8)


def test_timestep_mlp_equals_diffusers():
    torch.manual_seed(0)
    theirs = DiffusersTimestepEmbedding(32, 128)
    ours = TimestepEmbedding(32, 128)
    load_both_ways(ours, theirs)
    x = torch.randn(3, 32)
    assert (ours(x) - theirs(x)).abs().max() <= TOL


@pytest.mark.parametrize(
    "in_ch, out_ch, temb, scale",
    [(32, 32, 64, 1.0), (32, 64, 64, 1.0), (64, 32, None, 1.0), (32, 32, 64, 2.0)],
    ids=["same-width", "wider (1x1 shortcut)", "no timestep (VAE)", "output_scale_factor"],
)
def test_resnet_block_equals_diffusers(in_ch, out_ch, temb, scale):
    torch.manual_seed(0)
    theirs = DiffusersResnetBlock2D(
        in_channels=in_ch, out_channels=out_ch, temb_channels=temb, groups=8, eps=1e-5, output_scale_factor=scale
    ).eval()
    ours = ResnetBlock2D(in_ch, out_ch, temb, groups=8, eps=1e-5, output_scale_factor=scale).eval()
    load_both_ways(ours, theirs)
    assert (ours.conv_shortcut is None) == (in_ch == out_ch)
    x = torch.randn(2, in_ch, 8, 8)
    emb = torch.randn(2, temb) if temb else None
    with torch.no_grad():
        assert (ours(x, emb) - theirs(x, emb)).abs().max() <= TOL


def test_resnet_block_timestep_changes_output_and_is_required():
    torch.manual_seed(0)
    block = ResnetBlock2D(16, 16, 8, groups=4).eval()
    x = torch.randn(1, 16, 4, 4)
    a, b = block(x, torch.zeros(1, 8)), block(x, torch.ones(1, 8))
    assert not torch.allclose(a, b)
    with pytest.raises(ValueError, match="timestep embedding"):
        block(x)


def test_resnet_block_rejects_channels_not_divisible_by_groups():
    with pytest.raises(ValueError, match="multiple of the number of groups"):
        ResnetBlock2D(20, 20, None, groups=8)


@pytest.mark.parametrize("padding", [1, 0])
def test_downsample_equals_diffusers(padding):
    torch.manual_seed(0)
    theirs = DiffusersDownsample2D(16, use_conv=True, out_channels=24, padding=padding, name="op")
    ours = Downsample2D(16, 24, padding=padding)
    load_both_ways(ours, theirs)
    x = torch.randn(2, 16, 8, 8)
    out = ours(x)
    assert out.shape == (2, 24, 4, 4)
    assert (out - theirs(x)).abs().max() <= TOL


def test_upsample_equals_diffusers():
    torch.manual_seed(0)
    theirs = DiffusersUpsample2D(16, use_conv=True, out_channels=16)
    ours = Upsample2D(16)
    load_both_ways(ours, theirs)
    x = torch.randn(2, 16, 5, 7)
    out = ours(x)
    assert out.shape == (2, 16, 10, 14)
    assert (out - theirs(x)).abs().max() <= TOL
    assert (ours(x, output_size=(11, 15)) - theirs(x, output_size=(11, 15))).abs().max() <= TOL
