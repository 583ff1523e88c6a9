"""Lesson 10 exercises: where image-to-image starts, and the blend that makes inpainting work.

    from sdlearn.exercises import lesson10 as ex
    ex.check_strength_start(my_start)     # my_start(z0, noise, timesteps, strength, schedule) -> (kept timesteps, z_start)
    ex.check_inpaint_blend(my_blend)      # my_blend(latents, known, mask) -> latents

Image-to-image (SDEdit, Meng et al. 2022): of the sampler's n timesteps t_1 > ... > t_n,
keep the last k = int(n * strength) and start from z_0 noised to the first kept one,

    z_{t_first} = sqrt(alpha_bar_{t_first}) z_0 + sqrt(1 - alpha_bar_{t_first}) eps     (DDPM eq. 4)

(no step at all when k = 0: the result is the autoencoder's reconstruction). Inpainting
with an ordinary UNet: after every step, keep the model's latents where the mask is 1
(repaint) and the original latents, noised to the current level, where it is 0 (keep):

    z <- m * z + (1 - m) * known
"""

import torch

from sdlearn.exercises.core import Case, Mistake, checker
from sdlearn.diffusion.schedules import NoiseSchedule


def _noised(z0, noise, t, schedule):
    alpha_bar = schedule.alpha_bar[int(t)]
    return alpha_bar.sqrt() * z0 + (1 - alpha_bar).sqrt() * noise


def reference_strength_start(z0, noise, timesteps, strength, schedule):
    k = min(int(len(timesteps) * strength), len(timesteps))
    kept = timesteps[len(timesteps) - k :]
    if k == 0:
        return kept, z0
    return kept, _noised(z0, noise, kept[0], schedule)


def _first_k(z0, noise, timesteps, strength, schedule):
    k = int(len(timesteps) * strength)
    kept = timesteps[:k]
    return kept, (_noised(z0, noise, kept[0], schedule) if k else z0)


def _noisiest_start(z0, noise, timesteps, strength, schedule):
    kept = timesteps[len(timesteps) - int(len(timesteps) * strength) :]
    return kept, (_noised(z0, noise, timesteps[0], schedule) if len(kept) else z0)


def _strength_as_keep(z0, noise, timesteps, strength, schedule):
    return reference_strength_start(z0, noise, timesteps, 1 - strength, schedule)


def _pure_noise(z0, noise, timesteps, strength, schedule):
    kept = timesteps[len(timesteps) - int(len(timesteps) * strength) :]
    return kept, (noise if len(kept) else z0)


def _alpha_not_alpha_bar(z0, noise, timesteps, strength, schedule):
    kept = timesteps[len(timesteps) - int(len(timesteps) * strength) :]
    if not len(kept):
        return kept, z0
    alpha = schedule.alpha[int(kept[0])]
    return kept, alpha.sqrt() * z0 + (1 - alpha).sqrt() * noise


STRENGTH_MISTAKES = [
    Mistake(_first_k, "You kept the *first* timesteps (the noisiest). Image-to-image skips those and runs the last "
                      "int(n * strength): timesteps[n - k:]."),
    Mistake(_noisiest_start, "The timesteps are right, but you noised z_0 to the level of the very first timestep. "
                             "Noise it to the first timestep you keep."),
    Mistake(_strength_as_keep, "strength is how much is *redrawn*: 1 ignores the image, 0 keeps it. You used 1 - strength."),
    Mistake(_pure_noise, "You started from pure noise: the point of image-to-image is to start from the image's latent, "
                         "noised with sqrt(alpha_bar) z_0 + sqrt(1 - alpha_bar) eps."),
    Mistake(_alpha_not_alpha_bar, "One jump from z_0 to z_t uses alpha_bar_t (the product of the alphas), not alpha_t."),
]


def _strength_cases() -> list:
    schedule = NoiseSchedule.sd()
    timesteps = torch.arange(999, -1, -40)[:25]  # 25 timesteps, most noise first
    g = torch.Generator().manual_seed(11)
    cases = []
    for strength in (0.6, 0.3, 1.0, 0.02):
        cases.append(Case(torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g), timesteps, strength, schedule))
    return cases


@checker(reference_strength_start, _strength_cases, name="strength_start", mistakes=STRENGTH_MISTAKES, atol=1e-5, rtol=1e-5)
def check_strength_start(fn) -> bool:
    """fn(z0, noise (B, 4, h, w), timesteps (n,), strength float, schedule) -> (kept timesteps, z_start)."""


# ------------------------------------------------------------------------------------------
# The inpainting blend
# ------------------------------------------------------------------------------------------


def reference_inpaint_blend(latents, known, mask):
    return mask * latents + (1 - mask) * known


BLEND_MISTAKES = [
    Mistake(lambda z, known, m: (1 - m) * z + m * known,
            "The mask is the other way round: 1 (white) marks what the model repaints, so z is kept where mask = 1."),
    Mistake(lambda z, known, m: m * z,
            "You zeroed the region to keep. Put the original (noised) latents back there: + (1 - mask) * known."),
    Mistake(lambda z, known, m: m * z + known,
            "The known latents go only where the mask is 0: multiply them by (1 - mask)."),
    Mistake(lambda z, known, m: 0.5 * (z + known),
            "An average blurs both regions; use the mask to choose, pixel by pixel of the latent."),
]


def _blend_cases() -> list:
    g = torch.Generator().manual_seed(12)
    cases = []
    for shape in ((2, 4, 8, 8), (1, 4, 6, 10)):
        mask = (torch.rand(shape[0], 1, *shape[2:], generator=g) > 0.5).float()
        cases.append(Case(torch.randn(shape, generator=g), torch.randn(shape, generator=g), mask))
    return cases


@checker(reference_inpaint_blend, _blend_cases, name="inpaint_blend", mistakes=BLEND_MISTAKES)
def check_inpaint_blend(fn) -> bool:
    """fn(latents (B, 4, h, w), known (B, 4, h, w), mask (B, 1, h, w) of 0/1) -> the blended latents."""
