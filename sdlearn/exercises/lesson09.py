"""Lesson 09 exercises: classifier-free guidance, and one iteration of the sampling loop.

    from sdlearn.exercises import lesson09 as ex
    ex.check_guidance(my_guidance)          # my_guidance(eps_uncond, eps_cond, scale) -> eps
    ex.check_loop_step(my_loop_step)        # my_loop_step(unet, sampler, latents, t, cond, uncond, scale) -> latents

Classifier-free guidance (Ho & Salimans 2022, eq. 6), with s the guidance scale:

    eps = eps_uncond + s * (eps_cond - eps_uncond)

s = 0 is the unconditional model, s = 1 the conditional one, s > 1 goes past it, away from
the unconditional (or negative-prompt) prediction. One iteration of Stable Diffusion's loop
(sdlearn.pipeline.StableDiffusion.denoise, steps 1-5):

    1. model_input = cat([z_t, z_t])                      one copy per half of the guidance (2B, 4, h, w)
    2. model_input = sampler.scale_model_input(model_input, t)
    3. eps_uncond, eps_cond = unet(model_input, t, cat([uncond, cond])).chunk(2)
    4. eps = eps_uncond + s (eps_cond - eps_uncond)
    5. z_prev = sampler.step(eps, t, z_t).prev_sample
"""

import torch

from sdlearn.exercises.core import Case, Mistake, checker


def reference_guidance(eps_uncond, eps_cond, scale):
    return eps_uncond + scale * (eps_cond - eps_uncond)


GUIDANCE_MISTAKES = [
    Mistake(lambda u, c, s: c + s * (u - c),
            "The roles are swapped: start from the unconditional prediction and move towards the conditional one, "
            "eps_uncond + s * (eps_cond - eps_uncond)."),
    Mistake(lambda u, c, s: u + s * c,
            "Guidance scales the *difference* eps_cond - eps_uncond, not eps_cond itself."),
    Mistake(lambda u, c, s: s * (c - u),
            "You dropped the starting point: eps = eps_uncond + s * (eps_cond - eps_uncond)."),
    Mistake(lambda u, c, s: u + (s - 1) * (c - u),
            "Off by one: this is diffusers' old 'w' convention (w = s - 1). With the scale s of SD and the pipeline, "
            "eps = eps_uncond + s * (eps_cond - eps_uncond)."),
    Mistake(lambda u, c, s: c,
            "You returned the conditional prediction alone; with s != 1 guidance changes it."),
]


def _guidance_cases() -> list:
    g = torch.Generator().manual_seed(9)
    return [Case(torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g), s) for s in (7.5, 2.0, 0.0)]


@checker(reference_guidance, _guidance_cases, name="guidance", mistakes=GUIDANCE_MISTAKES)
def check_guidance(fn) -> bool:
    """fn(eps_uncond (B, 4, h, w), eps_cond (B, 4, h, w), scale float) -> the guided prediction (B, 4, h, w)."""


# ------------------------------------------------------------------------------------------
# One iteration of the loop
# ------------------------------------------------------------------------------------------


def reference_loop_step(unet, sampler, latents, t, cond, uncond, scale):
    model_input = sampler.scale_model_input(torch.cat([latents, latents]), t)  # (2B, 4, h, w)
    eps_uncond, eps_cond = unet(model_input, t, torch.cat([uncond, cond])).chunk(2)
    eps = eps_uncond + scale * (eps_cond - eps_uncond)
    return sampler.step(eps, t, latents).prev_sample


def _no_scaling(unet, sampler, latents, t, cond, uncond, scale):
    eps_uncond, eps_cond = unet(torch.cat([latents, latents]), t, torch.cat([uncond, cond])).chunk(2)
    return sampler.step(eps_uncond + scale * (eps_cond - eps_uncond), t, latents).prev_sample


def _swapped_halves(unet, sampler, latents, t, cond, uncond, scale):
    model_input = sampler.scale_model_input(torch.cat([latents, latents]), t)
    eps_cond, eps_uncond = unet(model_input, t, torch.cat([uncond, cond])).chunk(2)
    return sampler.step(eps_uncond + scale * (eps_cond - eps_uncond), t, latents).prev_sample


def _stepped_scaled_input(unet, sampler, latents, t, cond, uncond, scale):
    model_input = sampler.scale_model_input(torch.cat([latents, latents]), t)
    eps_uncond, eps_cond = unet(model_input, t, torch.cat([uncond, cond])).chunk(2)
    return sampler.step(eps_uncond + scale * (eps_cond - eps_uncond), t, model_input.chunk(2)[0]).prev_sample


def _unguided(unet, sampler, latents, t, cond, uncond, scale):
    model_input = sampler.scale_model_input(latents, t)
    return sampler.step(unet(model_input, t, cond), t, latents).prev_sample


LOOP_MISTAKES = [
    Mistake(_no_scaling,
            "You skipped sampler.scale_model_input: samplers that work with sigma (Euler) need the input divided by "
            "sqrt(sigma^2 + 1) before the UNet sees it."),
    Mistake(_swapped_halves,
            "The halves are swapped: the context is cat([uncond, cond]), so the first half of the output is eps_uncond."),
    Mistake(_stepped_scaled_input,
            "sampler.step takes the latents themselves, not the scaled model input: step(eps, t, latents)."),
    Mistake(_unguided, "You ran the conditional half only: guidance needs both halves, eps_uncond + s (eps_cond - eps_uncond)."),
]


def _loop_cases() -> list:
    from sdlearn.diffusion.scheduler_configs import get_sampler
    from sdlearn.models.unet import UNet, UNetConfig

    torch.manual_seed(0)
    unet = UNet(UNetConfig.tiny()).eval()
    g = torch.Generator().manual_seed(3)
    cases = []
    for name, k in (("euler", 0), ("ddim", 3)):
        sampler = get_sampler(name, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
        sampler.set_timesteps(10)
        t = sampler.timesteps[k]
        size = unet.config.sample_size
        latents = torch.randn(2, unet.config.in_channels, size, size, generator=g) * (sampler.init_noise_sigma if k == 0 else 1.0)
        cond = torch.randn(2, 77, unet.config.cross_attention_dim, generator=g)
        uncond = torch.randn(2, 77, unet.config.cross_attention_dim, generator=g)
        cases.append(Case(unet, sampler, latents, t, cond, uncond, 5.0))
    return cases


@checker(reference_loop_step, _loop_cases, name="loop_step", mistakes=LOOP_MISTAKES, atol=1e-5, rtol=1e-5, no_grad=True)
def check_loop_step(fn) -> bool:
    """fn(unet, sampler, latents (B, 4, h, w), t, cond (B, 77, D), uncond (B, 77, D), scale) -> the next latents."""
