"""Flow matching (rectified flow): the straight path from an image to noise, and the velocity along it.

Stable Diffusion 3 and Flux replace the alpha_bar schedule of DDPM with the simplest path
there is. Notation: x0 a clean image (or latent), noise ~ N(0, I), s in [0, 1] the noise
level (diffusers calls it sigma; s = 1 is pure noise, s = 0 the image):

    x_s = (1 - s) x0 + s noise                                                     (1)
    v   = dx_s / ds = noise - x0                                                   (2)
    L   = E_{s, x0, noise} || v - v_theta(x_s, 1000 s) ||^2                        (3)
    x0  = x_s - s v,     noise = x_s + (1 - s) v                                   (4)

(1) is a straight line, so its velocity (2) is the same at every s: the network learns it
(3), fed the timestep t = 1000 s as diffusers does (a float, the same sinusoidal embedding as
SD's UNet). Given v, (4) reads the sample both ways, as `x0_eps_from_output` does for eps
and v models: on the scale x = alpha x0 + sigma eps, alpha = 1 - s and sigma = s.

Sampling integrates dx/ds = v from s = 1 down to s = 0 (`FlowEulerSampler` in
`sdlearn.diffusion.samplers`, one Euler step x_next = x + (s_next - s) v per model call).
A perfect velocity lands on x0 in a single step, since the path is straight; a learnt one
averages over the images a noisy sample could have come from, which bends the paths.

Where the training steps go. Uniform s spends as many samples on almost-clean and almost-
pure-noise levels as on the middle, where the velocity is hardest to predict. SD3 (Esser et
al. 2024, eq. 19) draws s from a logit-normal instead: s = sigmoid(n), n ~ N(m, std^2),
m = 0, std = 1 by default (`sample_flow_levels`). At sampling time a static shift moves the
noise levels towards noise (SD3 sec. 5.3.2, shift = 3 at 1024 px; diffusers' `shift`):

    s' = shift s / (1 + (shift - 1) s)                                             (5)

References: Lipman et al. 2023, "Flow Matching for Generative Modeling" (arXiv:2210.02747);
Liu et al. 2023, "Flow Straight and Fast" (rectified flow, arXiv:2209.03003); Esser et al.
2024, "Scaling Rectified Flow Transformers for High-Resolution Image Synthesis" (SD3,
arXiv:2403.03206); diffusers' FlowMatchEulerDiscreteScheduler and
training_utils.compute_density_for_timestep_sampling.
"""

import torch

from sdlearn.diffusion.schedules import Prediction

LEVEL_SAMPLING = ("uniform", "logit_normal")


def _per_image(s, x: torch.Tensor) -> torch.Tensor:
    """s as a tensor that broadcasts over x: a number stays 0-d, a (B,) tensor becomes (B, 1, 1, 1)."""
    s = torch.as_tensor(s, dtype=x.dtype, device=x.device)
    return s.reshape(-1, *([1] * (x.dim() - 1))) if s.dim() == 1 else s


def flow_interpolate(x0: torch.Tensor, noise: torch.Tensor, s) -> torch.Tensor:
    """x_s = (1 - s) x0 + s noise   (eq. 1). s: a number, or one level per image (B,)."""
    s = _per_image(s, x0)
    return (1 - s) * x0 + s * noise


def flow_velocity(x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """The training target v = noise - x0   (eq. 2), the same at every level s."""
    return noise - x0


def flow_predict(v: torch.Tensor, x: torch.Tensor, s) -> Prediction:
    """A velocity read both ways at level s: (x0_pred, noise_pred) = (x - s v, x + (1 - s) v)   (eq. 4)."""
    s = _per_image(s, x)
    return Prediction(x - s * v, x + (1 - s) * v)


def check_shift(shift) -> float:
    """shift as a float, or a ValueError: it must be a positive number (1 = no shift)."""
    if isinstance(shift, bool) or not isinstance(shift, (int, float)) or not shift > 0:
        raise ValueError(
            f"shift must be a positive number (1.0 leaves the noise levels alone; SD3 uses 3.0), got {shift!r}."
        )
    return float(shift)


def shift_levels(s, shift: float):
    """s' = shift s / (1 + (shift - 1) s)   (eq. 5): shift > 1 spends more steps near noise. Tensor or array."""
    return shift * s / (1 + (shift - 1) * s)


def sample_flow_levels(n: int, sampling: str = "uniform", logit_mean: float = 0.0, logit_std: float = 1.0,
                       generator=None, device=None) -> torch.Tensor:
    """n noise levels s in (0, 1), float32 (n,): uniform, or SD3's logit-normal s = sigmoid(N(mean, std^2))."""
    if sampling not in LEVEL_SAMPLING:
        raise ValueError(f"sampling must be one of {list(LEVEL_SAMPLING)}, got {sampling!r}.")
    if sampling == "uniform":
        return torch.rand(n, generator=generator).to(device)
    if not logit_std > 0:
        raise ValueError(f"logit_std must be positive, got {logit_std!r}.")
    return torch.sigmoid(logit_mean + logit_std * torch.randn(n, generator=generator)).to(device)
