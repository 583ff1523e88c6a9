"""Every sdlearn sampler against the matching diffusers scheduler, trajectory by trajectory.

Both are driven by the same fixed fake model (a deterministic function of x and t: a random
channel-mixing linear map plus a t-dependent term) from the same initial noise and the same
torch.Generator seed; every intermediate sample must agree to 1e-5 in float32 (they agree
bit for bit at the time of writing).
"""

import json

import diffusers
import pytest
import torch

from sdlearn.samplers import (
    SAMPLER_NAMES,
    StepOutput,
    get_sampler,
    randn,
    sample,
    sampler_from_config,
)

DIFFUSERS = {
    "ddpm": diffusers.DDPMScheduler,
    "ddim": diffusers.DDIMScheduler,
    "plms": diffusers.PNDMScheduler,
    "euler": diffusers.EulerDiscreteScheduler,
    "euler_a": diffusers.EulerAncestralDiscreteScheduler,
    "dpmpp_2m": diffusers.DPMSolverMultistepScheduler,
}
# Stable Diffusion 1.5's scheduler_config.json
SD15 = {
    "_class_name": "PNDMScheduler",
    "_diffusers_version": "0.6.0",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
    "clip_sample": False,
}
LINEAR = {"beta_schedule": "linear", "beta_start": 0.0001, "beta_end": 0.02}
SHAPE = (2, 4, 8, 8)
TOL = 1e-5
# diffusers' own schedulers call np.array() on tensors; numpy 2 warns about it
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")


class FakeModel:
    """model(x, t) = W x (mixing channels) + 0.1 sin(t / 100 + phase_c): fixed, smooth, t-dependent."""

    def __init__(self, channels: int = 4, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.W = torch.eye(channels) * 0.9 + 0.1 * torch.randn(channels, channels, generator=g) / channels**0.5
        self.phase = torch.rand(channels, generator=g) * 6.28

    def __call__(self, x, t):
        return torch.einsum("oc,bchw->bohw", self.W, x) + 0.1 * torch.sin(float(t) / 100 + self.phase)[None, :, None, None]


MODEL = FakeModel()


def noise(seed=1, shape=SHAPE):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def trajectory(scheduler, steps, x_T, seed, ours, eta=0.0):
    """The standard diffusers loop; returns the samples, model inputs and x0 predictions of every step."""
    scheduler.set_timesteps(steps)
    generator = torch.Generator().manual_seed(seed)
    x = x_T * scheduler.init_noise_sigma
    xs, inputs, x0s = [], [], []
    for t in scheduler.timesteps:
        x_in = scheduler.scale_model_input(x, t)
        model_output = MODEL(x_in, t)
        if ours:
            out = scheduler.step(model_output, t, x, generator=generator)
        else:
            kwargs = {}
            if isinstance(scheduler, (diffusers.DDPMScheduler, diffusers.EulerAncestralDiscreteScheduler)):
                kwargs["generator"] = generator
            if isinstance(scheduler, diffusers.DDIMScheduler):
                kwargs.update(eta=eta, generator=generator)
            out = scheduler.step(model_output, t, x, **kwargs)
        x = out.prev_sample
        xs.append(x)
        inputs.append(x_in)
        x0s.append(getattr(out, "pred_original_sample", None))
    return torch.stack(xs), torch.stack(inputs), x0s


def build(name, config, eta=0.0):
    ours = get_sampler(name, **config, **({"eta": eta} if eta else {}))
    ref = DIFFUSERS[name].from_config(config)
    return ours, ref


def assert_same_run(ours, ref, steps, eta=0.0, seed=5):
    x_T = noise()
    xs, ins, x0s = trajectory(ours, steps, x_T, seed, ours=True)
    xs_ref, ins_ref, x0s_ref = trajectory(ref, steps, x_T, seed, ours=False, eta=eta)
    assert torch.equal(ours.timesteps, ref.timesteps) and ours.timesteps.dtype == ref.timesteps.dtype
    assert float(ours.init_noise_sigma) == float(ref.init_noise_sigma)
    assert (ins - ins_ref).abs().max().item() <= TOL  # scale_model_input at every step
    assert (xs - xs_ref).abs().max().item() <= TOL  # the whole trajectory
    for x0, x0_ref in zip(x0s, x0s_ref):
        if x0_ref is not None:  # PNDM and DPM-Solver do not return it
            assert (x0 - x0_ref).abs().max().item() <= TOL
    return xs


@pytest.mark.parametrize("steps", [10, 25, 50])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("schedule", ["scaled_linear", "linear"])
@pytest.mark.parametrize("name", SAMPLER_NAMES)
def test_trajectory_matches_diffusers(name, schedule, prediction_type, steps):
    config = {**SD15, **(LINEAR if schedule == "linear" else {}), "prediction_type": prediction_type}
    ours, ref = build(name, config)
    xs = assert_same_run(ours, ref, steps)
    assert torch.isfinite(xs).all()


@pytest.mark.parametrize("eta", [0.3, 1.0])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_ddim_with_eta_matches_diffusers_with_the_same_generator(eta, prediction_type):
    ours, ref = build("ddim", {**SD15, "prediction_type": prediction_type}, eta=eta)
    assert_same_run(ours, ref, 25, eta=eta)


@pytest.mark.parametrize("name", SAMPLER_NAMES)
@pytest.mark.parametrize(
    "extra",
    [
        {"timestep_spacing": "leading"},
        {"timestep_spacing": "trailing"},
        {"timestep_spacing": "linspace"},
        {"beta_schedule": "squaredcos_cap_v2"},
        {"set_alpha_to_one": True, "steps_offset": 0, "clip_sample": True},
    ],
    ids=["leading", "trailing", "linspace", "cosine", "alpha_to_one-clip"],
)
def test_other_configs_match_diffusers(name, extra):
    ours, ref = build(name, {**SD15, **extra})
    for steps in (1, 7, 20):
        assert_same_run(ours, ref, steps)


def test_ddpm_fixed_large_variance_matches_diffusers():
    ours, ref = build("ddpm", {**SD15, "variance_type": "fixed_large"})
    assert_same_run(ours, ref, 20)


@pytest.mark.parametrize("name", SAMPLER_NAMES)
def test_defaults_are_stable_diffusion_15(name):
    """With no config, each sampler is diffusers' scheduler loaded from SD 1.5's config."""
    ours = get_sampler(name)
    ref = DIFFUSERS[name].from_config(SD15)
    assert ours.timestep_spacing == ref.config.timestep_spacing
    assert_same_run(ours, ref, 30)


@pytest.mark.parametrize("name", SAMPLER_NAMES)
def test_add_noise_matches_diffusers(name):
    ours, ref = build(name, SD15)
    ours.set_timesteps(25)
    ref.set_timesteps(25)
    x0, eps = noise(2), noise(3)
    t = ours.timesteps[[0, 12]]
    assert torch.equal(ours.add_noise(x0, eps, t), ref.add_noise(x0, eps, t))


@pytest.mark.parametrize("name", SAMPLER_NAMES)
def test_diffusers_config_round_trip(name, tmp_path):
    ours = get_sampler(name, **LINEAR, prediction_type="v_prediction", timestep_spacing="trailing")
    config = ours.to_diffusers_config()
    ref = DIFFUSERS[name].from_config(config)
    assert_same_run(ours, ref, 12)
    # ... and back, from a pipeline folder as diffusers writes it
    ref.save_config(tmp_path / "scheduler")
    again = sampler_from_config(tmp_path)
    assert type(again) is type(ours) and again.config == ours.config


def test_sampler_from_sd15_config_picks_plms_and_can_swap():
    plms = sampler_from_config(SD15)
    assert plms.name == "plms" and plms.steps_offset == 1
    euler = sampler_from_config(SD15, name="euler")
    assert euler.name == "euler" and euler.timestep_spacing == "linspace"  # diffusers' Euler default
    sd2_ddim = {**SD15, "_class_name": "DDIMScheduler", "prediction_type": "v_prediction"}
    assert sampler_from_config(sd2_ddim).prediction_type == "v_prediction"
    with pytest.raises(ValueError, match="does not implement"):
        sampler_from_config({**SD15, "_class_name": "LMSDiscreteScheduler"})


def test_sampler_from_json_file(tmp_path):
    path = tmp_path / "scheduler_config.json"
    path.write_text(json.dumps({**SD15, "_class_name": "EulerAncestralDiscreteScheduler"}))
    assert sampler_from_config(path).name == "euler_a"
    with pytest.raises(FileNotFoundError, match="scheduler_config.json"):
        sampler_from_config(tmp_path / "nowhere")


@pytest.mark.parametrize("name", SAMPLER_NAMES)
def test_sample_loop_equals_manual_loop_and_is_repeatable(name):
    sampler = get_sampler(name)
    seen = []

    def callback(i, t, x, model_output, out):
        seen.append(i)

    a = sample(MODEL, sampler, noise(), steps=15, generator=torch.Generator().manual_seed(3), callback=callback)
    xs, _, _ = trajectory(sampler, 15, noise(), 3, ours=True)
    assert torch.equal(a, xs[-1])
    assert seen == list(range(len(sampler.timesteps)))
    # set_timesteps resets the history: running again gives the same result
    b = sample(MODEL, sampler, noise(), steps=15, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)


@pytest.mark.parametrize("name", ["ddpm", "euler_a"])
def test_stochastic_samplers_follow_the_generator(name):
    sampler = get_sampler(name)
    run = lambda seed: sample(MODEL, sampler, noise(), 10, generator=torch.Generator().manual_seed(seed))  # noqa: E731
    assert torch.equal(run(0), run(0))
    assert not torch.allclose(run(0), run(1))
    assert torch.isfinite(sample(MODEL, sampler, noise(), 10)).all()  # no generator: global RNG


def test_deterministic_samplers_ignore_the_generator():
    for name in ("ddim", "plms", "euler", "dpmpp_2m"):
        sampler = get_sampler(name)
        a = sample(MODEL, sampler, noise(), 10, generator=torch.Generator().manual_seed(0))
        b = sample(MODEL, sampler, noise(), 10, generator=torch.Generator().manual_seed(1))
        assert torch.equal(a, b), name


@pytest.mark.parametrize("name", SAMPLER_NAMES)
def test_step_output_unpacks_and_keeps_the_model_dtype(name):
    sampler = get_sampler(name)
    sampler.set_timesteps(5)
    t = sampler.timesteps[0]
    x = noise().to(torch.bfloat16) * sampler.init_noise_sigma
    out = sampler.step(MODEL(sampler.scale_model_input(x, t).float(), t).to(torch.bfloat16), t, x)
    assert isinstance(out, StepOutput)
    x_prev, x0_pred = out
    assert x_prev.dtype == torch.bfloat16 and x0_pred.shape == x.shape


@pytest.mark.parametrize("name", SAMPLER_NAMES)
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_predict_reads_the_model_output_both_ways(name, prediction_type):
    sampler = get_sampler(name, prediction_type=prediction_type)
    sampler.set_timesteps(10)
    t = sampler.timesteps[3]
    x = noise() * sampler.init_noise_sigma
    x_in = sampler.scale_model_input(x, t)
    model_output = MODEL(x_in, t)
    x0, eps = sampler.predict(model_output, t, x_in)
    alpha, sigma = sampler.alpha_sigma(t)
    assert torch.allclose(alpha * x0 + sigma * eps, x_in, atol=1e-5)  # x_t = alpha x0 + sigma eps
    if prediction_type == "epsilon":
        assert torch.equal(eps, model_output)
    if name != "plms":  # PLMS's first step reports its own x0 but from the same model output here
        assert torch.allclose(sampler.step(model_output, t, x).pred_original_sample, x0, atol=1e-4)


def test_randn_draws_as_diffusers():
    from diffusers.utils.torch_utils import randn_tensor

    g1, g2 = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    assert torch.equal(randn((2, 3, 4), generator=g1), randn_tensor((2, 3, 4), generator=g2))
    gens = [torch.Generator().manual_seed(s) for s in (1, 2)]
    gens_ref = [torch.Generator().manual_seed(s) for s in (1, 2)]
    assert torch.equal(randn((2, 3), generator=gens), randn_tensor((2, 3), generator=gens_ref))
    with pytest.raises(ValueError, match="one per item"):
        randn((3, 2), generator=gens)


# Bad input ---------------------------------------------------------------------------


def test_unknown_sampler_lists_the_names():
    with pytest.raises(ValueError, match=r"Choose one of \['ddpm', 'ddim', 'plms', 'euler', 'euler_a', 'dpmpp_2m'\]"):
        get_sampler("heun")


def test_config_keys_are_checked():
    with pytest.raises(ValueError, match="Unknown scheduler config key 'beta_strat'"):
        get_sampler("ddim", beta_strat=0.001)
    with pytest.raises(ValueError, match="use_karras_sigmas=True"):
        get_sampler("euler", use_karras_sigmas=True)
    with pytest.raises(ValueError, match="applies to the 'ddim' sampler only"):
        get_sampler("euler_a", eta=0.5)
    with pytest.raises(ValueError, match="Runge-Kutta"):
        get_sampler("plms", skip_prk_steps=False)
    with pytest.raises(ValueError, match="algorithm_type='sde-dpmsolver\\+\\+'"):
        get_sampler("dpmpp_2m", algorithm_type="sde-dpmsolver++")
    with pytest.raises(ValueError, match="prediction_type"):
        get_sampler("ddim", prediction_type="sample")
    with pytest.raises(ValueError, match="timestep_spacing"):
        get_sampler("ddim", timestep_spacing="uniform")
    with pytest.raises(ValueError, match="variance_type"):
        get_sampler("ddpm", variance_type="learned")
    # neutral values and other schedulers' keys are accepted, as diffusers accepts them
    get_sampler("euler", use_karras_sigmas=False, set_alpha_to_one=False, clip_sample=True, _diffusers_version="0.8.0")
    get_sampler("dpmpp_2m", solver_order=2, algorithm_type="dpmsolver++", lower_order_final=True, thresholding=False)


@pytest.mark.parametrize("name", SAMPLER_NAMES)
def test_bad_steps_and_timesteps_have_clear_errors(name):
    sampler = get_sampler(name)
    x = noise()
    with pytest.raises(RuntimeError, match="set_timesteps"):
        sampler.step(x, 999, x)
    with pytest.raises(ValueError, match="between 1 and num_train_timesteps=1000"):
        sampler.set_timesteps(0)
    with pytest.raises(ValueError, match="between 1 and num_train_timesteps=1000"):
        sampler.set_timesteps(1001)
    with pytest.raises(TypeError, match="integer"):
        sampler.set_timesteps(2.5)
    sampler.set_timesteps(10)
    with pytest.raises(ValueError, match="not in this sampler's schedule"):
        sampler.step(x, 998.5, x)
    with pytest.raises(ValueError, match="same shape"):
        sampler.step(x[:1], sampler.timesteps[0], x)


@pytest.mark.parametrize("name", ["plms", "euler", "euler_a", "dpmpp_2m"])
def test_samplers_with_history_insist_on_the_order(name):
    sampler = get_sampler(name)
    sampler.set_timesteps(5)
    x = noise()
    ts = sampler.timesteps
    sampler.step(MODEL(x, ts[0]), ts[0], x)
    with pytest.raises(ValueError, match="in order"):
        sampler.step(MODEL(x, ts[3]), ts[3], x)
    for t in ts[1:]:
        x = sampler.step(MODEL(x, t), t, x).prev_sample
    with pytest.raises(RuntimeError, match="finished"):
        sampler.step(MODEL(x, ts[-1]), ts[-1], x)


@pytest.mark.gpu
@pytest.mark.parametrize("name", SAMPLER_NAMES)
def test_trajectory_matches_diffusers_on_cuda_in_fp32_and_fp16(name):
    """Same loop on the GPU (CPU generator, as SD pipelines use): float32 and a float16 model."""
    for dtype in (torch.float32, torch.float16):
        results = []
        for ours in (True, False):
            scheduler = get_sampler(name) if ours else DIFFUSERS[name].from_config(SD15)
            scheduler.set_timesteps(20, device="cuda")
            generator = torch.Generator().manual_seed(0)
            x = noise().to("cuda", dtype) * scheduler.init_noise_sigma
            for t in scheduler.timesteps:
                x_in = scheduler.scale_model_input(x, t)
                model_output = MODEL(x_in.float().cpu(), t.cpu()).to("cuda", dtype)
                kwargs = {"generator": generator} if ours or name in ("ddpm", "euler_a", "ddim") else {}
                x = scheduler.step(model_output, t, x, **kwargs).prev_sample
            results.append(x.float().cpu())
        assert results[0].dtype == torch.float32 and torch.isfinite(results[0]).all()
        if dtype == torch.float32:
            assert (results[0] - results[1]).abs().max().item() <= TOL
        else:  # float16 rounding of the scalar coefficients may differ by an ulp between the two
            assert torch.allclose(results[0], results[1], atol=2e-2, rtol=2e-2)
