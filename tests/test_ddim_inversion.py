"""DDIM inversion (`DDIMSampler.inverse_step`, `ddim_invert`) against diffusers' DDIMInverseScheduler,
and DDIM with eta = 1 against DDPM (the claim of lesson 05's eta sweep).

The fake model is tests/test_samplers.py's: a fixed, smooth, t-dependent function of x.
"""

import diffusers
import pytest
import torch

from sdlearn.samplers import ddim_invert, get_sampler, sample

from tests.test_samplers import MODEL, SD15, noise

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")
TOL = 1e-5


def diffusers_inversion(config, x0, steps):
    """The loop of diffusers' inverting pipelines: model at t on the current sample, then step."""
    scheduler = diffusers.DDIMInverseScheduler.from_config(config)
    scheduler.set_timesteps(steps)
    x, xs = x0, []
    for t in scheduler.timesteps:
        x = scheduler.step(MODEL(x, t), t, x).prev_sample
        xs.append(x)
    return scheduler.timesteps, torch.stack(xs)


@pytest.mark.parametrize("steps", [10, 25])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize(
    "extra",
    [{}, {"timestep_spacing": "trailing", "steps_offset": 0, "set_alpha_to_one": True}],
    ids=["sd15", "trailing-alpha_to_one"],
)
def test_inversion_matches_diffusers_ddim_inverse_scheduler(extra, prediction_type, steps):
    config = {**SD15, **extra, "prediction_type": prediction_type}
    x0 = noise(seed=3).clamp(-1, 1)
    kept = []
    ours = ddim_invert(MODEL, get_sampler("ddim", **config), x0, steps=steps,
                       callback=lambda i, t, x, out, step: kept.append((int(t), step.prev_sample)))
    timesteps, xs = diffusers_inversion(config, x0, steps)
    assert [t for t, _ in kept] == timesteps.tolist()          # smallest timestep first
    assert (torch.stack([x for _, x in kept]) - xs).abs().max().item() <= TOL
    assert torch.equal(ours, kept[-1][1])


def test_inversion_then_sampling_returns_to_the_image_and_more_steps_come_closer():
    # Each inverse step evaluates the network one level early; the error of the round trip
    # shrinks with the step size.
    config = {**SD15, "timestep_spacing": "trailing", "steps_offset": 0, "set_alpha_to_one": True}
    image = noise(seed=4).clamp(-1, 1)
    errors = {}
    for steps in (10, 50):
        x_T = ddim_invert(MODEL, get_sampler("ddim", **config), image, steps=steps)
        back = sample(MODEL, get_sampler("ddim", **config), x_T, steps=steps)
        errors[steps] = (back - image).abs().mean().item()
    assert errors[50] < 0.5 * errors[10]
    assert errors[50] < 0.02 * (image.max() - image.min())


def test_inversion_refuses_stochastic_ddim_and_other_samplers():
    with pytest.raises(ValueError, match="eta = 0"):
        ddim_invert(MODEL, get_sampler("ddim", eta=0.5), noise(), steps=10)
    with pytest.raises(TypeError, match="DDIMSampler"):
        ddim_invert(MODEL, get_sampler("euler"), noise(), steps=10)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_ddim_with_eta_one_is_ddpm_number_for_number(prediction_type):
    # The same posterior variance and, on the same generator, the same noise draws: the same run.
    # (DDIM's last step must go to alpha_bar = 1, as DDPM's does: set_alpha_to_one.)
    config = {**SD15, "timestep_spacing": "trailing", "steps_offset": 0, "set_alpha_to_one": True,
              "prediction_type": prediction_type}
    x_T = noise(seed=7)
    ddpm = sample(MODEL, get_sampler("ddpm", **config), x_T, steps=25, generator=torch.Generator().manual_seed(1))
    ddim_1 = sample(MODEL, get_sampler("ddim", eta=1.0, **config), x_T, steps=25, generator=torch.Generator().manual_seed(1))
    ddim_half = sample(MODEL, get_sampler("ddim", eta=0.5, **config), x_T, steps=25, generator=torch.Generator().manual_seed(1))
    assert (ddim_1 - ddpm).abs().max().item() <= 1e-4
    assert (ddim_half - ddpm).abs().max().item() > 1e-2     # the comparison can fail
