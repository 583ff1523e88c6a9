"""Flow matching: sdlearn's flow_euler against diffusers' FlowMatchEulerDiscreteScheduler, and the training loss.

The sampler and diffusers are driven by the same fixed fake velocity model (a random
channel-mixing linear map of x plus a t-dependent term) from the same noise; timesteps and
sigmas must be equal and every intermediate sample agree to 1e-5 (they agree bit for bit at
the time of writing). The loss is checked by hand, and against the wrong variants (swapped
target sign, swapped interpolation) that it must not equal.
"""

import diffusers
import pytest
import torch
import torch.nn.functional as F

from sdlearn.ddpm import SCHEDULE, FlowMatchingLoss, flow_training_batch
from sdlearn.diffusion.flow_matching import flow_interpolate, flow_predict, flow_velocity, sample_flow_levels, shift_levels
from sdlearn.samplers import (
    FLOW_SAMPLER_NAMES,
    SAMPLER_FOR_SCHEDULER,
    SAMPLER_NAMES,
    SAMPLERS,
    FlowEulerSampler,
    get_sampler,
    sample,
    sampler_from_config,
)

SHAPE = (2, 4, 8, 8)
TOL = 1e-5
SHIFTS = [1.0, 3.0]
STEPS = [2, 4, 8, 25]
SD3_SCHEDULER_CONFIG = {"_class_name": "FlowMatchEulerDiscreteScheduler", "_diffusers_version": "0.29.0.dev0",
                        "num_train_timesteps": 1000, "shift": 3.0}


class FakeVelocityModel:
    """model(x, t) = W x (mixing channels) + 0.1 sin(t / 100 + phase_c): fixed, smooth, t-dependent."""

    def __init__(self, channels: int = 4, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.W = 0.5 * torch.eye(channels) + 0.1 * torch.randn(channels, channels, generator=g) / channels**0.5
        self.phase = torch.rand(channels, generator=g) * 6.28

    def __call__(self, x, t):
        return torch.einsum("oc,bchw->bohw", self.W, x) + 0.1 * torch.sin(float(t) / 100 + self.phase)[None, :, None, None]


MODEL = FakeVelocityModel()


def randn(seed, shape=SHAPE):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def trajectory(scheduler, steps, noise, ours):
    """The diffusers loop; returns every sample and (ours only) every x0 prediction."""
    scheduler.set_timesteps(steps)
    x = noise * scheduler.init_noise_sigma if ours else noise  # SD3's pipeline starts from unit noise itself
    xs, x0s = [], []
    for t in scheduler.timesteps:
        x_in = scheduler.scale_model_input(x, t) if ours else x  # diffusers' flow scheduler has no scale_model_input
        assert torch.equal(x_in, x)
        out = scheduler.step(MODEL(x_in, t), t, x)
        x0s.append(out.pred_original_sample if ours else None)
        x = out.prev_sample
        xs.append(x)
    return torch.stack(xs), x0s


# The sampler against diffusers ----------------------------------------------------------------


@pytest.mark.parametrize("steps", STEPS)
@pytest.mark.parametrize("shift", SHIFTS)
def test_flow_euler_trajectory_matches_diffusers(shift, steps):
    ours = get_sampler("flow_euler", shift=shift)
    ref = diffusers.FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)
    noise = randn(1)
    xs, x0s = trajectory(ours, steps, noise, ours=True)
    xs_ref, _ = trajectory(ref, steps, noise, ours=False)
    assert torch.equal(ours.timesteps, ref.timesteps) and ours.timesteps.dtype == ref.timesteps.dtype
    assert torch.equal(ours.sigmas, ref.sigmas)
    assert torch.equal(ours.timesteps, ours.sigmas[:-1] * 1000)
    assert ours.init_noise_sigma == 1.0
    assert (xs - xs_ref).abs().max().item() <= TOL
    # x0_pred = x - s v at every step, from diffusers' own sigmas
    x = noise
    for i, (t, x0) in enumerate(zip(ref.timesteps, x0s)):
        assert (x0 - (x - ref.sigmas[i] * MODEL(x, t))).abs().max().item() <= TOL
        x = xs_ref[i]


@pytest.mark.parametrize("shift", SHIFTS)
def test_sample_loop_equals_diffusers_final_sample(shift):
    ref = diffusers.FlowMatchEulerDiscreteScheduler(shift=shift)
    xs_ref, _ = trajectory(ref, 8, randn(2), ours=False)
    x = sample(MODEL, get_sampler("flow_euler", shift=shift), randn(2), steps=8)
    assert (x - xs_ref[-1]).abs().max().item() <= TOL


@pytest.mark.parametrize("num_train_timesteps", [1000, 100])
def test_num_train_timesteps_and_the_levels_by_hand(num_train_timesteps):
    """shift 1: n levels evenly from 1 to 1/T, then 0; timesteps = T s. shift 3: eq. 5 moves them towards noise."""
    ours = get_sampler("flow_euler", num_train_timesteps=num_train_timesteps)
    ref = diffusers.FlowMatchEulerDiscreteScheduler(num_train_timesteps=num_train_timesteps)
    ours.set_timesteps(5)
    ref.set_timesteps(5)
    assert torch.equal(ours.timesteps, ref.timesteps) and torch.equal(ours.sigmas, ref.sigmas)
    want = torch.cat([torch.linspace(1, 1 / num_train_timesteps, 5, dtype=torch.float64), torch.zeros(1, dtype=torch.float64)])
    assert torch.allclose(ours.sigmas.double(), want, atol=1e-6)
    assert torch.allclose(ours.timesteps, ours.sigmas[:-1] * num_train_timesteps)
    shifted = get_sampler("flow_euler", num_train_timesteps=num_train_timesteps, shift=3.0)
    shifted.set_timesteps(5)
    assert shifted.sigmas[0] == 1 and (shifted.sigmas[1:-1] > ours.sigmas[1:-1]).all()
    # diffusers spaces the levels evenly from 1 to the *shifted* smallest training level, then shifts them (eq. 5)
    smallest = shift_levels(1 / num_train_timesteps, 3.0)
    want = shift_levels(torch.linspace(1, smallest, 5, dtype=torch.float64), 3.0)  # s' = 3 s / (1 + 2 s)
    assert torch.allclose(shifted.sigmas[:-1].double(), want, atol=1e-6)


def test_add_noise_is_the_interpolation_and_equals_diffusers_scale_noise():
    ours = get_sampler("flow_euler", shift=3.0)
    ref = diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0)
    ours.set_timesteps(10)
    ref.set_timesteps(10)
    x0, noise = randn(3), randn(4)
    t = ours.timesteps[[2, 7]]
    got = ours.add_noise(x0, noise, t)
    s = ours.sigmas[[2, 7]].reshape(2, 1, 1, 1)
    assert torch.allclose(got, (1 - s) * x0 + s * noise, atol=1e-6)
    assert (got - ref.scale_noise(x0, t, noise)).abs().max().item() <= TOL


@pytest.mark.parametrize("shift", SHIFTS)
@pytest.mark.parametrize("steps", [1, 4])
def test_a_perfect_velocity_reaches_x0_on_the_straight_path(shift, steps):
    """v = noise - x0 is the same at every level, so Euler is exact: one step (or any number) lands on x0."""
    x0, noise = randn(5), randn(6)
    sampler = get_sampler("flow_euler", shift=shift)
    sampler.set_timesteps(steps)
    out = sampler.step(noise - x0, sampler.timesteps[0], noise)
    assert torch.allclose(out.pred_original_sample, x0, atol=1e-6)  # x0_pred = x - s v with s = 1
    assert torch.allclose(sample(lambda x, t: noise - x0, sampler, noise, steps=steps), x0, atol=1e-5)
    prediction = sampler.predict(noise - x0, sampler.timesteps[0], noise)
    assert torch.allclose(prediction.x0, x0, atol=1e-6) and torch.allclose(prediction.eps, noise, atol=1e-6)


def test_steps_must_follow_the_timesteps():
    sampler = get_sampler("flow_euler")
    x = randn(1)
    with pytest.raises(RuntimeError, match="set_timesteps"):
        sampler.step(x, 1000.0, x)
    sampler.set_timesteps(4)
    sampler.step(x, sampler.timesteps[0], x)
    with pytest.raises(ValueError, match="in order"):
        sampler.step(x, sampler.timesteps[2], x)
    fresh = get_sampler("flow_euler")
    fresh.set_timesteps(4)
    with pytest.raises(ValueError, match="not in this sampler's schedule"):
        fresh.step(x, 999.5, x)


@pytest.mark.gpu
@pytest.mark.parametrize("shift", SHIFTS)
def test_flow_euler_matches_diffusers_on_cuda_in_fp32_and_fp16(shift):
    """The same loop on the GPU: float32 and a float16 model (the update runs in float32 in both)."""
    for dtype in (torch.float32, torch.float16):
        results = []
        for scheduler in (get_sampler("flow_euler", shift=shift), diffusers.FlowMatchEulerDiscreteScheduler(shift=shift)):
            scheduler.set_timesteps(20, device="cuda")
            x = randn(1).to("cuda", dtype)
            for t in scheduler.timesteps:
                model_output = MODEL(x.float().cpu(), t.cpu()).to("cuda", dtype)
                x = scheduler.step(model_output, t, x).prev_sample
            assert x.dtype == dtype
            results.append(x.float().cpu())
        assert torch.isfinite(results[0]).all()
        if dtype == torch.float32:
            assert (results[0] - results[1]).abs().max().item() <= TOL
        else:
            assert torch.allclose(results[0], results[1], atol=2e-2, rtol=2e-2)


# The registry and diffusers configs -----------------------------------------------------------


def test_flow_euler_is_registered_apart_from_the_six():
    assert SAMPLER_NAMES == ("ddpm", "ddim", "plms", "euler", "euler_a", "dpmpp_2m")
    assert FLOW_SAMPLER_NAMES == ("flow_euler",)
    assert SAMPLERS["flow_euler"] is FlowEulerSampler
    assert SAMPLER_FOR_SCHEDULER["FlowMatchEulerDiscreteScheduler"] == "flow_euler"
    assert isinstance(get_sampler("flow_euler", shift=3.0), FlowEulerSampler)


def test_config_round_trips_with_diffusers(tmp_path):
    ours = get_sampler("flow_euler", num_train_timesteps=1000, shift=3.0)
    config = ours.to_diffusers_config()
    assert config == {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 3.0}
    ref = diffusers.FlowMatchEulerDiscreteScheduler.from_config(config)
    assert ref.config.shift == 3.0 and ref.config.num_train_timesteps == 1000
    ref.save_config(tmp_path)  # diffusers writes every key of its config, the unused options too
    back = sampler_from_config(tmp_path)
    assert isinstance(back, FlowEulerSampler) and back.config == ours.config
    assert sampler_from_config(SD3_SCHEDULER_CONFIG).shift == 3.0
    for n in (2, 25):
        back.set_timesteps(n)
        ref.set_timesteps(n)
        assert torch.equal(back.timesteps, ref.timesteps)


@pytest.mark.parametrize("shift", [0, -1.0, "3", True, None])
def test_a_bad_shift_is_refused(shift):
    with pytest.raises(ValueError, match="shift must be a positive number"):
        get_sampler("flow_euler", shift=shift)


@pytest.mark.parametrize(
    "config",
    [
        {"prediction_type": "epsilon"},
        {"prediction_type": "v_prediction"},
        {"beta_schedule": "scaled_linear"},
        {k: v for k, v in SCHEDULE.items() if not k.startswith("_")},  # the shipped DDPM's schedule
    ],
)
def test_an_epsilon_or_v_model_config_is_refused_by_flow_euler(config):
    with pytest.raises(ValueError, match="serves flow-matching models, which predict the velocity"):
        get_sampler("flow_euler", **config)
    with pytest.raises(ValueError, match="flow-matching models"):
        sampler_from_config(dict(SCHEDULE), name="flow_euler")
    get_sampler("flow_euler", prediction_type="flow_prediction", trained_betas=None)  # says nothing new: fine


@pytest.mark.parametrize("name", SAMPLER_NAMES)
def test_a_flow_model_config_is_refused_by_the_six(name):
    with pytest.raises(ValueError, match="for a flow-matching model"):
        sampler_from_config(SD3_SCHEDULER_CONFIG, name=name)
    with pytest.raises(ValueError, match="for a flow-matching model"):
        get_sampler(name, shift=3.0)


def test_unsupported_flow_options_and_unknown_names_have_clear_errors():
    with pytest.raises(ValueError, match="does not implement use_dynamic_shifting=True"):
        get_sampler("flow_euler", use_dynamic_shifting=True)
    with pytest.raises(ValueError, match="does not implement stochastic_sampling=True"):
        get_sampler("flow_euler", stochastic_sampling=True)
    get_sampler("flow_euler", base_shift=0.5, max_shift=1.15, use_dynamic_shifting=False)  # Flux's unused keys
    with pytest.raises(ValueError, match=r"or \['flow_euler'\] \(flow-matching models\)"):
        get_sampler("flow_heun")


# The training objective ------------------------------------------------------------------------


class Oracle(torch.nn.Module):
    """Knows x0 and records its inputs; outputs (x - x0) / s, which is noise - x0 only on the path x_s = (1 - s) x0 + s noise."""

    def __init__(self, x0):
        super().__init__()
        self.x0, self.seen = x0, {}

    def forward(self, x, t, context, class_labels=None):
        self.seen = {"x": x, "t": t}
        s = (t / 1000).reshape(-1, 1, 1, 1)
        return (x - self.x0) / s


def test_flow_loss_by_hand_and_against_the_wrong_variants(monkeypatch):
    import sdlearn.ddpm as ddpm

    monkeypatch.setattr(ddpm, "null_context", lambda unet, b, device=None, dtype=None: torch.zeros(b, 1, 8))
    x0, noise = randn(7), randn(8)
    s = torch.tensor([0.25, 0.8])
    oracle = Oracle(x0)
    loss = FlowMatchingLoss()(oracle, (x0, s, noise))
    # what the model was fed: x_s = (1 - s) x0 + s noise and t = 1000 s
    b = s.reshape(2, 1, 1, 1)
    assert torch.allclose(oracle.seen["x"], (1 - b) * x0 + b * noise, atol=1e-6)
    assert torch.allclose(oracle.seen["t"], 1000 * s)
    assert loss.item() <= 1e-10  # the oracle's output is the target v = noise - x0

    # wrong variants: the swapped target sign, the swapped interpolation
    out = oracle(flow_interpolate(x0, noise, s), 1000 * s, None)
    assert F.mse_loss(out, x0 - noise).item() > 0.5
    wrong_x = b * x0 + (1 - b) * noise
    assert F.mse_loss(oracle(wrong_x, 1000 * s, None), noise - x0).item() > 0.5
    # a model with an error e costs mean(e^2)
    assert torch.allclose(FlowMatchingLoss()(lambda *a, **k: oracle(*a, **k) + 0.3, (x0, s, noise)), torch.tensor(0.09))


def test_flow_functions_by_hand():
    x0, noise = randn(9), randn(10)
    assert torch.equal(flow_velocity(x0, noise), noise - x0)
    assert torch.allclose(flow_interpolate(x0, noise, 0.3), 0.7 * x0 + 0.3 * noise)
    assert torch.equal(flow_interpolate(x0, noise, 0.0), x0) and torch.equal(flow_interpolate(x0, noise, 1.0), noise)
    x_s = flow_interpolate(x0, noise, torch.tensor([0.2, 0.9]))
    prediction = flow_predict(noise - x0, x_s, torch.tensor([0.2, 0.9]))
    assert torch.allclose(prediction.x0, x0, atol=1e-6) and torch.allclose(prediction.eps, noise, atol=1e-6)


def test_flow_training_batch_draws_uniform_or_logit_normal_levels():
    x0 = torch.zeros(4000, 1, 1, 1)
    _, s_u, noise = flow_training_batch(x0, generator=torch.Generator().manual_seed(0))
    _, s_ln, _ = flow_training_batch(x0, generator=torch.Generator().manual_seed(0), sampling="logit_normal")
    assert s_u.shape == s_ln.shape == (4000,) and noise.shape == x0.shape and s_u.dtype == torch.float32
    assert 0 < s_u.min() and s_u.max() < 1 and 0 < s_ln.min() and s_ln.max() < 1
    middle = lambda s: ((s > 0.25) & (s < 0.75)).float().mean().item()  # noqa: E731
    assert abs(middle(s_u) - 0.5) < 0.03 and middle(s_ln) > 0.6  # logit-normal: about 0.73 in the middle half
    again = flow_training_batch(x0, generator=torch.Generator().manual_seed(0))[1]
    assert torch.equal(again, s_u)


def test_flow_bad_inputs_have_clear_errors():
    with pytest.raises(ValueError, match="sampling must be one of"):
        sample_flow_levels(4, "cosine")
    with pytest.raises(ValueError, match="logit_std must be positive"):
        sample_flow_levels(4, "logit_normal", logit_std=0.0)
    x0 = torch.zeros(2, 3, 4, 4)
    with pytest.raises(ValueError, match="one float level s in"):
        FlowMatchingLoss()(Oracle(x0), (x0, torch.tensor([10, 500]), x0))


# Lesson 14's checkers (the generic checker tests cover references, blanks and named mistakes) -------


def test_lesson14_checkers_accept_equivalent_answers_and_name_the_swaps(capsys):
    from sdlearn.exercises import ExerciseError, lesson14

    assert lesson14.check_flow_target(lambda x0, noise, s: [x0 + s * (noise - x0), noise - x0])  # a list, rearranged
    assert lesson14.check_flow_step(lambda x, v, s, s_next: x - (s - s_next) * v)
    with pytest.raises(ExerciseError, match="the target has the wrong sign"):
        lesson14.check_flow_target(lambda x0, noise, s: ((1 - s) * x0 + s * noise, x0 - noise))
    with pytest.raises(ExerciseError, match="interpolation is swapped"):
        lesson14.check_flow_target(lambda x0, noise, s: (s * x0 + (1 - s) * noise, noise - x0))
    with pytest.raises(ExerciseError, match="goes the wrong way"):
        lesson14.check_flow_step(lambda x, v, s, s_next: x + (s - s_next) * v)
