"""sdlearn.diffusion.schedules against diffusers' DDPMScheduler and against the DDPM equations."""

import math

import pytest
import torch
from diffusers import DDPMScheduler

from sdlearn.diffusion.schedules import NoiseSchedule, cosine_betas, make_betas

SCHEDULES = {
    "linear": dict(beta_start=1e-4, beta_end=0.02, beta_schedule="linear"),
    "scaled_linear": dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear"),
    "squaredcos_cap_v2": dict(beta_start=0.0001, beta_end=0.02, beta_schedule="squaredcos_cap_v2"),
}


def pair(kind):
    config = SCHEDULES[kind]
    return NoiseSchedule(1000, **config), DDPMScheduler(num_train_timesteps=1000, clip_sample=False, **config)


@pytest.mark.parametrize("kind", list(SCHEDULES))
def test_betas_alphas_alpha_bar_equal_diffusers(kind):
    ours, ref = pair(kind)
    assert torch.equal(ours.beta, ref.betas)
    assert torch.equal(ours.alpha, ref.alphas)
    assert torch.equal(ours.alpha_bar, ref.alphas_cumprod)
    assert ours.beta.dtype == torch.float32


def test_cosine_alias_and_schedule_shape():
    assert torch.equal(make_betas("cosine", 1000, 0, 0), cosine_betas(1000))
    s = NoiseSchedule.cosine()
    # Nichol & Dhariwal: alpha_bar(t) = f(t) / f(0), f(t) = cos^2((t/T + s)/(1 + s) pi/2), here at t + 1
    f = lambda u: math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    for t in (0, 100, 500, 900):
        assert s.alpha_bar[t].item() == pytest.approx(f((t + 1) / 1000) / f(0), rel=1e-5)
    assert s.beta.max().item() == pytest.approx(0.999)  # the cap


def test_presets():
    sd, ddpm = NoiseSchedule.sd(), NoiseSchedule.ddpm()
    assert sd.beta[0].item() == pytest.approx(0.00085) and sd.beta[-1].item() == pytest.approx(0.012)
    assert ddpm.beta[0].item() == pytest.approx(1e-4) and ddpm.beta[-1].item() == pytest.approx(0.02)
    # SD never reaches pure noise: alpha_bar_T is about 0.0047 (sqrt = 0.068 of the signal remains)
    assert 0.004 < sd.alpha_bar[-1].item() < 0.0055
    assert ddpm.alpha_bar[-1].item() < 1e-4
    assert torch.allclose(sd.sigma, (1 / sd.snr()) ** 0.5)


@pytest.mark.parametrize("kind", ["linear", "scaled_linear"])
def test_q_sample_equals_diffusers_add_noise(kind):
    ours, ref = pair(kind)
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(4, 3, 8, 8, generator=g), torch.randn(4, 3, 8, 8, generator=g)
    t = torch.tensor([0, 10, 500, 999])
    assert torch.equal(ours.q_sample(x0, t, eps), ref.add_noise(x0, eps, t))
    assert torch.equal(ours.q_sample(x0, 321, eps), ref.add_noise(x0, eps, torch.tensor([321] * 4)))
    assert torch.equal(ours.v_target(x0, eps, t), ref.get_velocity(x0, eps, t))


@pytest.mark.parametrize("t", [49, 249])
def test_closed_form_has_the_distribution_of_step_by_step_noising(t):
    """t+1 single noising steps (eq. 2) give the distribution of one jump (eq. 4)."""
    s = NoiseSchedule.ddpm()
    n = 10000
    x0 = torch.linspace(-1, 1, 8, dtype=torch.float64)  # 8 pixels, each with its own mean
    g = torch.Generator().manual_seed(0)
    x = x0.expand(n, 8)
    for step in range(t + 1):
        x = s.q_step(x, step, torch.randn(n, 8, generator=g, dtype=torch.float64))
    mean_want, std_want = s.q_mean_std(x0, t)
    mean_got, std_got = x.mean(0), x.std(0)
    # 5 standard errors: the mean's is std/sqrt(n), the sample std's about std/sqrt(2n)
    assert (mean_got - mean_want).abs().max() < 5 * std_want / n**0.5
    assert (std_got - std_want).abs().max() < 5 * std_want / (2 * n) ** 0.5
    # The test can tell right from wrong: alpha_t instead of alpha_bar_t fails the same tolerance
    wrong_mean = s.alpha[t].double() ** 0.5 * x0
    assert (mean_got - wrong_mean).abs().max() > 5 * std_want / n**0.5


@pytest.mark.parametrize("kind", ["linear", "scaled_linear"])
def test_posterior_equals_diffusers_ddpm_internals(kind):
    ours, _ = pair(kind)
    ref = DDPMScheduler(num_train_timesteps=1000, clip_sample=False, prediction_type="sample", **SCHEDULES[kind])
    g = torch.Generator().manual_seed(0)
    x0, xt = torch.randn(2, 3, 4, 4, generator=g), torch.randn(2, 3, 4, 4, generator=g)
    for t in (0, 1, 10, 250, 999):
        # diffusers clamps the variance at 1e-20 so that its log exists; it is exactly 0 at t = 0
        assert torch.equal(ours.posterior_variance(t), ref._get_variance(t)) if t else ours.posterior_variance(t) == 0
        # With prediction_type="sample" the model output *is* x0, so the step is mean + std * z.
        out = ref.step(x0, t, xt, generator=torch.Generator().manual_seed(t)).prev_sample
        z = torch.randn(xt.shape, generator=torch.Generator().manual_seed(t)) if t > 0 else torch.zeros_like(xt)
        mean_ref = out - ref._get_variance(t) ** 0.5 * z if t > 0 else out
        assert torch.allclose(ours.posterior_mean(x0, xt, t), mean_ref, atol=1e-6)


def test_posterior_matches_ddpm_equation_7_in_float64():
    s = NoiseSchedule.ddpm()
    beta = s.beta.double()
    alpha_bar = torch.cumprod(1 - beta, 0)
    # (not t = 1: there 1 - alpha_bar_0 = beta_0 = 1e-4 is a float32 difference of nearly equal
    # numbers, good to only ~1e-3 relative in diffusers' float32 arithmetic that we reproduce)
    for t in (20, 600, 999):
        coef_x0, coef_xt = s.posterior_coefficients(t)
        assert coef_x0.item() == pytest.approx((alpha_bar[t - 1].sqrt() * beta[t] / (1 - alpha_bar[t])).item(), rel=1e-4)
        assert coef_xt.item() == pytest.approx(((1 - beta[t]).sqrt() * (1 - alpha_bar[t - 1]) / (1 - alpha_bar[t])).item(), rel=1e-4)
        want = (1 - alpha_bar[t - 1]) / (1 - alpha_bar[t]) * beta[t]
        assert s.posterior_variance(t).item() == pytest.approx(want.item(), rel=1e-4)
    # at t = 0 the step back is to x_0 itself: mean = x_0, no variance
    assert s.posterior_coefficients(0)[0].item() == pytest.approx(1.0)
    assert s.posterior_coefficients(0)[1].item() == pytest.approx(0.0, abs=1e-7)
    assert s.posterior_variance(0).item() == 0.0


def test_posterior_with_batched_timesteps_and_skipped_steps():
    s = NoiseSchedule.sd()
    x0, xt = torch.randn(3, 2, 4, 4), torch.randn(3, 2, 4, 4)
    t = torch.tensor([5, 400, 999])
    batched = s.posterior_mean(x0, xt, t)
    for i in range(3):
        assert torch.allclose(batched[i], s.posterior_mean(x0[i : i + 1], xt[i : i + 1], int(t[i]))[0])
    # skipping from 900 to 800: beta becomes the noise added in between
    coef_x0, _ = s.posterior_coefficients(900, 800)
    beta_step = 1 - s.alpha_bar[900] / s.alpha_bar[800]
    assert coef_x0.item() == pytest.approx((s.alpha_bar[800].sqrt() * beta_step / (1 - s.alpha_bar[900])).item(), rel=1e-5)


def test_snr_and_conversions_round_trip():
    s = NoiseSchedule.sd()
    assert torch.all(s.snr()[1:] < s.snr()[:-1])  # noise only grows
    assert s.snr(500).item() == pytest.approx((s.alpha_bar[500] / (1 - s.alpha_bar[500])).item())
    g = torch.Generator().manual_seed(1)
    x0, eps = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 4, 8, 8, generator=g)
    t = torch.tensor([10, 300, 900])
    xt = s.q_sample(x0, t, eps)
    v = s.v_target(x0, eps, t)
    assert torch.allclose(s.x0_from_eps(xt, eps, t), x0, atol=1e-4)
    assert torch.allclose(s.eps_from_x0(xt, x0, t), eps, atol=1e-4)
    assert torch.allclose(s.x0_from_v(xt, v, t), x0, atol=1e-5)
    assert torch.allclose(s.eps_from_v(xt, v, t), eps, atol=1e-5)
    assert torch.allclose(s.v_from_eps(xt, eps, t), v, atol=1e-4)
    # v = sqrt(alpha_bar) eps - sqrt(1 - alpha_bar) x0 has unit variance (at every t) when x0 and
    # eps are independent with unit variance: the weights' squares sum to 1
    big_x0, big_eps = torch.randn(200000, generator=g), torch.randn(200000, generator=g)
    for t_ in (0, 500, 999):
        assert s.v_target(big_x0, big_eps, t_).std().item() == pytest.approx(1.0, abs=0.01)


def test_bad_inputs_have_clear_errors():
    s = NoiseSchedule.sd()
    x = torch.zeros(2, 3, 4, 4)
    with pytest.raises(ValueError, match=r"0\.\.999"):
        s.q_sample(x, 1000, x)
    with pytest.raises(ValueError, match="0-based"):
        s.q_sample(x, -1, x)
    with pytest.raises(ValueError, match="integer"):
        s.q_sample(x, 2.5, x)
    with pytest.raises(ValueError, match="one per item"):
        s.q_sample(x, torch.tensor([1, 2, 3]), x)
    with pytest.raises(ValueError, match="shape of x0"):
        s.q_sample(x, 1, torch.zeros(2, 3, 4))
    with pytest.raises(ValueError, match="Expected one of"):
        NoiseSchedule(beta_schedule="quadratic")
    with pytest.raises(ValueError, match="trained_betas"):
        NoiseSchedule(10, trained_betas=[0.1] * 9)
    with pytest.raises(ValueError, match="strictly between 0 and 1"):
        NoiseSchedule(3, trained_betas=[0.1, 0.0, 0.2])
    with pytest.raises(ValueError, match="positive integer"):
        NoiseSchedule(0)


def test_min_snr_weights_follow_the_paper():
    """Hang et al. 2023: min(SNR, gamma) / SNR for eps, / (SNR + 1) for v, and min(SNR, gamma) for x_0."""
    schedule = NoiseSchedule.sd()
    t = torch.tensor([0, 100, 400, 999])
    snr = schedule.alpha_bar[t] / (1 - schedule.alpha_bar[t])
    gamma = 5.0
    clipped = torch.minimum(snr, torch.tensor(gamma))
    torch.testing.assert_close(schedule.min_snr_weight(t, "epsilon", gamma), clipped / snr)
    torch.testing.assert_close(schedule.min_snr_weight(t, "v_prediction", gamma), clipped / (snr + 1))
    torch.testing.assert_close(schedule.min_snr_weight(t, "sample", gamma), clipped)
    # Low-noise timesteps (SNR above gamma) are down-weighted, noisy ones keep weight 1 for eps.
    w = schedule.min_snr_weight(t, "epsilon", gamma)
    assert w[0] < 0.1 and w[-1] == 1.0
    with pytest.raises(ValueError, match="prediction_type"):
        schedule.min_snr_weight(t, "x0")
