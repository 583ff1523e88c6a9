"""AutoencoderKL against diffusers' AutoencoderKL on identical random weights."""

import json

import pytest
import torch
from diffusers import AutoencoderKL as DiffusersAutoencoderKL

from sdlearn.models.checkpoint import CheckpointError
from sdlearn.vae import AutoencoderKL, DiagonalGaussian, VAEConfig

TOL = 1e-4


def diffusers_kwargs(config: VAEConfig) -> dict:
    d = config.to_dict()
    assert d.pop("_class_name") == "AutoencoderKL"
    return d


def build_pair(config: VAEConfig, seed: int = 0):
    """diffusers' model with seeded random weights, and ours loaded from its state dict (strict)."""
    torch.manual_seed(seed)
    reference = DiffusersAutoencoderKL(**diffusers_kwargs(config)).eval()
    # Random weights are tiny at init for some layers; perturb every parameter so all paths matter.
    with torch.no_grad():
        for p in reference.parameters():
            p.add_(0.02 * torch.randn_like(p))
    ours = AutoencoderKL.from_config(config).eval()
    ours.load_checked_state_dict(reference.state_dict())
    return reference, ours


def compare(reference, ours, x, z):
    with torch.no_grad():
        want, got = reference.encode(x).latent_dist, ours.encode(x)
        errors = {
            "mean": (want.mean - got.mean).abs().max().item(),
            "std": (want.std - got.std).abs().max().item(),
            "kl": ((want.kl() - got.kl()) / want.kl().abs().clamp(min=1)).abs().max().item(),
            "decode": (reference.decode(z).sample - ours.decode(z)).abs().max().item(),
        }
    return errors


@pytest.fixture(scope="module")
def tiny_pair():
    return build_pair(VAEConfig.tiny())


def test_tiny_matches_diffusers(tiny_pair):
    reference, ours = tiny_pair
    g = torch.Generator().manual_seed(1)
    x = torch.rand(2, 3, 64, 64, generator=g) * 2 - 1
    z = torch.randn(2, 4, 8, 8, generator=g)
    errors = compare(reference, ours, x, z)
    assert max(errors.values()) <= TOL, errors
    assert ours.encode(x).mean.shape == (2, 4, 8, 8)


def test_state_dict_keys_identical_both_ways(tiny_pair):
    reference, ours = tiny_pair
    assert set(ours.state_dict()) == set(reference.state_dict())
    assert "encoder.mid_block.attentions.0.to_q.weight" in ours.state_dict()
    # and ours loads into diffusers with strict=True
    reference.load_state_dict(ours.state_dict(), strict=True)


def test_variants_without_attention_or_quant_convs():
    config = VAEConfig.tiny(mid_block_add_attention=False, use_quant_conv=False, use_post_quant_conv=False,
                            block_out_channels=(16, 32), layers_per_block=2, norm_num_groups=8)
    reference, ours = build_pair(config, seed=3)
    x = torch.rand(1, 3, 16, 24) * 2 - 1
    z = torch.randn(1, 4, 8, 12)
    errors = compare(reference, ours, x, z)
    assert max(errors.values()) <= TOL, errors


def test_forward_with_sampled_posterior_matches_diffusers(tiny_pair):
    reference, ours = tiny_pair
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        want = reference(x, sample_posterior=True, generator=torch.Generator().manual_seed(7)).sample
        got = ours(x, sample_posterior=True, generator=torch.Generator().manual_seed(7))
        assert (want - got).abs().max().item() <= TOL
        # the mode path differs from a sample
        assert (ours(x) - got).abs().max().item() > 1e-3


def test_diagonal_gaussian_sample_is_reproducible_and_correct():
    torch.manual_seed(0)
    params = torch.randn(3, 8, 4, 4)
    q = DiagonalGaussian(params)
    a = q.sample(torch.Generator().manual_seed(5))
    b = q.sample(torch.Generator().manual_seed(5))
    c = q.sample(torch.Generator().manual_seed(6))
    assert torch.equal(a, b) and not torch.equal(a, c)
    eps = torch.randn(3, 4, 4, 4, generator=torch.Generator().manual_seed(5))
    assert torch.allclose(a, q.mean + q.std * eps)
    assert torch.equal(q.mode(), params[:, :4])
    assert torch.allclose(q.var, q.std**2) and torch.allclose(q.logvar, params[:, 4:])
    # KL against N(0, I) in closed form, and against itself is zero
    expected = 0.5 * (q.mean**2 + q.var - 1 - q.logvar).sum(dim=(1, 2, 3))
    assert torch.allclose(q.kl(), expected)
    assert torch.allclose(q.kl(q), torch.zeros(3), atol=1e-5)


def test_diagonal_gaussian_sample_statistics():
    mean = torch.full((1, 2, 64, 64), 3.0)
    logvar = torch.full((1, 2, 64, 64), 2 * torch.log(torch.tensor(0.5)).item())
    q = DiagonalGaussian(torch.cat([mean, logvar], dim=1))
    z = q.sample(torch.Generator().manual_seed(0))
    assert abs(z.mean().item() - 3.0) < 0.02 and abs(z.std().item() - 0.5) < 0.02


def test_kl_matches_diffusers_distribution():
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

    params = torch.randn(2, 8, 5, 5) * 3
    other = torch.randn(2, 8, 5, 5)
    ours, theirs = DiagonalGaussian(params), DiagonalGaussianDistribution(params)
    assert torch.allclose(ours.kl(), theirs.kl())
    assert torch.allclose(ours.kl(DiagonalGaussian(other)), theirs.kl(DiagonalGaussianDistribution(other)))
    z = torch.randn(2, 4, 5, 5)
    assert torch.allclose(ours.nll(z), theirs.nll(z))


def test_folder_round_trip_diffusers_to_ours(tiny_pair, tmp_path):
    reference, _ = tiny_pair
    reference.save_pretrained(tmp_path / "vae")
    loaded = AutoencoderKL.from_pretrained(tmp_path / "vae")
    assert loaded.config == VAEConfig.tiny()
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        assert (reference(x).sample - loaded(x)).abs().max().item() <= TOL


def test_folder_round_trip_ours_to_diffusers(tiny_pair, tmp_path):
    _, ours = tiny_pair
    ours.save_pretrained(tmp_path / "vae")
    config = json.loads((tmp_path / "vae" / "config.json").read_text())
    assert config["_class_name"] == "AutoencoderKL" and config["scaling_factor"] == 1.0
    loaded = DiffusersAutoencoderKL.from_pretrained(tmp_path / "vae").eval()
    assert loaded.config.scaling_factor == ours.config.scaling_factor
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        assert (loaded(x).sample - ours(x)).abs().max().item() <= TOL


def test_presets():
    sd = VAEConfig.sd()
    assert sd.block_out_channels == (128, 256, 512, 512) and sd.scaling_factor == 0.18215
    assert sd.latent_channels == 4 and sd.downscale_factor == 8 and sd.layers_per_block == 2
    tiny = VAEConfig.tiny()
    assert tiny.downscale_factor == 8 and tiny.latent_channels == 4


def test_sd_parameter_count_on_meta_device():
    with torch.device("meta"):
        model = AutoencoderKL(VAEConfig.sd())
    assert sum(p.numel() for p in model.parameters()) == 83_653_863


@pytest.mark.parametrize(
    "shape, message",
    [
        ((1, 4, 64, 64), "3 channels, got 4"),
        ((1, 3, 60, 64), "divisible by 8"),
        ((3, 64, 64), "tensor \\(B, 3, H, W\\)"),
    ],
)
def test_bad_images(tiny_pair, shape, message):
    _, ours = tiny_pair
    with pytest.raises(ValueError, match=message):
        ours.encode(torch.zeros(shape))


def test_bad_latents(tiny_pair):
    _, ours = tiny_pair
    with pytest.raises(ValueError, match="4 channels, got 3"):
        ours.decode(torch.zeros(1, 3, 8, 8))


def test_bad_configs():
    with pytest.raises(ValueError, match="not implemented"):
        VAEConfig(down_block_types=("AttnDownEncoderBlock2D",) * 4)
    with pytest.raises(ValueError, match="divisible by norm_num_groups"):
        VAEConfig.tiny(block_out_channels=(24, 64, 64, 64))
    with pytest.raises(CheckpointError, match="does not know the config keys"):
        AutoencoderKL.from_config({"in_channels": 3, "not_a_key": 1})


def test_state_dict_from_another_architecture_is_refused(tiny_pair):
    _, ours = tiny_pair
    other = AutoencoderKL(VAEConfig.tiny(block_out_channels=(32, 64, 64, 128)))
    with pytest.raises(CheckpointError, match="Wrong shapes"):
        ours.load_checked_state_dict(other.state_dict())


@pytest.mark.slow
def test_sd_config_matches_diffusers():
    reference, ours = build_pair(VAEConfig.sd())
    g = torch.Generator().manual_seed(2)
    x = torch.rand(1, 3, 64, 64, generator=g) * 2 - 1
    z = torch.randn(1, 4, 8, 8, generator=g)
    errors = compare(reference, ours, x, z)
    del reference, ours
    assert max(errors.values()) <= TOL, errors
