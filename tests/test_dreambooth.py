"""DreamBooth's prior-preservation loss (sdlearn.dreambooth) and the personalise recipe's batches.

The oracle for the loss is diffusers' train_dreambooth.py, written out here: the batch is
instance images then class images, the prediction is split into halves with torch.chunk, and
loss = mse(instance half) + prior_loss_weight * mse(class half).
"""

import pytest
import torch

from sdlearn.ddpm import DiffusionLoss
from sdlearn.diffusion.schedules import NoiseSchedule
from sdlearn.dreambooth import PriorPreservationLoss, interleave, prior_preservation_loss
from sdlearn.models.unet import UNet, UNetConfig


def tiny_unet() -> UNet:
    torch.manual_seed(0)
    return UNet(UNetConfig(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 32), layers_per_block=1,
                           down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
                           cross_attention_dim=16, attention_head_dim=2, norm_num_groups=8)).eval()


def batch(n: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, 4, 8, 8, generator=g), torch.randint(1000, (n,), generator=g), torch.randn(n, 4, 8, 8, generator=g),
            torch.randn(n, 5, 16, generator=g))


@pytest.mark.parametrize("w", [1.0, 0.3])
def test_loss_equals_diffusers_two_halves(w):
    unet, schedule = tiny_unet(), NoiseSchedule()
    instance, prior = batch(3, 1), batch(3, 2)
    # diffusers: instance rows first, class rows second, chunk in two, plain MSE on each half
    x0, t, eps, c = (torch.cat([a, b]) for a, b in zip(instance, prior))
    with torch.no_grad():
        pred = unet(schedule.q_sample(x0, t, eps), t, c)
        pred_instance, pred_prior = torch.chunk(pred, 2)
        eps_instance, eps_prior = torch.chunk(eps, 2)
        want = torch.nn.functional.mse_loss(pred_instance, eps_instance) + w * torch.nn.functional.mse_loss(pred_prior, eps_prior)
        # ours: interleaved rows and the is_prior flags
        ours = PriorPreservationLoss(DiffusionLoss(schedule, "epsilon"), w)
        mixed = tuple(interleave(a, b) for a, b in zip(instance, prior)) + (torch.arange(6) % 2 == 1,)
        got = ours(unet, mixed)
    assert torch.allclose(got, want, rtol=1e-6, atol=1e-7), (got, want)
    # a wrong answer is far off: one mean over the whole batch is half of it when w = 1
    assert not torch.allclose(torch.cat([pred_instance, pred_prior]).sub(eps).pow(2).mean(), want, rtol=1e-2)


def test_loss_is_the_same_on_contiguous_halves_of_the_batch():
    # what each of two processes computes on its half, averaged, is the loss of the whole batch
    errors, is_prior = torch.rand(8), torch.arange(8) % 2 == 1
    whole = prior_preservation_loss(errors, is_prior, 0.7)
    halves = (prior_preservation_loss(errors[:4], is_prior[:4], 0.7) + prior_preservation_loss(errors[4:], is_prior[4:], 0.7)) / 2
    assert torch.allclose(whole, halves)


def test_per_image_is_what_the_mean_loss_averages():
    unet, loss = tiny_unet(), DiffusionLoss(NoiseSchedule(), "v_prediction", min_snr_gamma=5.0)
    b = batch(4, 3)
    with torch.no_grad():
        assert torch.allclose(loss.per_image(unet, b).mean(), loss(unet, b))
        assert loss.per_image(unet, b).shape == (4,)


def test_bad_batches_and_weights_are_refused():
    with pytest.raises(ValueError, match="as many class images as instance images"):
        prior_preservation_loss(torch.rand(4), torch.tensor([False, False, False, True]), 1.0)
    with pytest.raises(ValueError, match="as many class images as instance images"):
        prior_preservation_loss(torch.rand(2), torch.tensor([True, True]), 1.0)
    with pytest.raises(ValueError, match="same shape"):
        interleave(torch.zeros(3, 2), torch.zeros(2, 2))
    with pytest.raises(ValueError, match="0 or more"):
        PriorPreservationLoss(DiffusionLoss(NoiseSchedule()), -1.0)
