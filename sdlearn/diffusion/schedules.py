"""The forward (noising) process of a diffusion model: betas, alphas, alpha_bar, q(x_t | x_0).

Notation (Ho et al. 2020, "Denoising Diffusion Probabilistic Models", DDPM). A schedule of
T small variances beta_1 .. beta_T defines a Markov chain that slowly drowns an image x_0 in
Gaussian noise:

    q(x_t | x_{t-1}) = N( sqrt(1 - beta_t) x_{t-1},  beta_t I )                      (DDPM eq. 2)

    alpha_t     = 1 - beta_t
    alpha_bar_t = alpha_1 * alpha_2 * ... * alpha_t                       (cumulative product)

Because a sum of independent Gaussians is Gaussian, t steps collapse into one jump:

    q(x_t | x_0) = N( sqrt(alpha_bar_t) x_0,  (1 - alpha_bar_t) I )                  (DDPM eq. 4)
    x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps,     eps ~ N(0, I)       q_sample

and given x_0, the step back is Gaussian too (the "posterior", what a sampler imitates):

    q(x_{t-1} | x_t, x_0) = N( mu_tilde_t, beta_tilde_t I )                          (DDPM eq. 6)
    mu_tilde_t   = sqrt(alpha_bar_{t-1}) beta_t / (1 - alpha_bar_t) * x_0
                 + sqrt(alpha_t) (1 - alpha_bar_{t-1}) / (1 - alpha_bar_t) * x_t         (eq. 7)
    beta_tilde_t = (1 - alpha_bar_{t-1}) / (1 - alpha_bar_t) * beta_t                   (eq. 7)

More quantities used by training and samplers:

    SNR(t)  = alpha_bar_t / (1 - alpha_bar_t)              signal-to-noise ratio (Kingma et al. 2021)
    v       = sqrt(alpha_bar_t) eps - sqrt(1 - alpha_bar_t) x_0      "v-prediction" target
              (Salimans & Ho 2022, "Progressive Distillation", section 4; SD 2.x predicts v)
    w(t)    = min(SNR(t), gamma) / SNR(t) (eps) or / (SNR(t) + 1) (v)  Min-SNR-gamma loss
              weights (Hang et al. 2023), min_snr_weight
    sigma_t = sqrt((1 - alpha_bar_t) / alpha_bar_t) = 1 / sqrt(SNR)  noise level of the
              "variance exploding" view used by k-diffusion (Karras et al. 2022):
              x_t / sqrt(alpha_bar_t) = x_0 + sigma_t eps.

and the conversions between what a network may predict (eps, x_0 or v), given x_t:

    x_0 = (x_t - sqrt(1 - alpha_bar_t) eps) / sqrt(alpha_bar_t)
    eps = (x_t - sqrt(alpha_bar_t) x_0) / sqrt(1 - alpha_bar_t)
    x_0 = sqrt(alpha_bar_t) x_t - sqrt(1 - alpha_bar_t) v
    eps = sqrt(alpha_bar_t) v + sqrt(1 - alpha_bar_t) x_t

Notation crosswalk. Papers and libraries reuse the same letters for different things; the
one to watch is alpha: the DDIM paper's alpha_t is the DDPM paper's alpha_bar_t.

| quantity                   | DDPM (Ho 2020)     | DDIM (Song 2021)   | DPM-Solver (Lu 2022)    | diffusers                 | k-diffusion (Karras 2022) | sdlearn             |
|----------------------------|--------------------|--------------------|-------------------------|---------------------------|---------------------------|---------------------|
| per-step noise variance    | beta_t             | 1 - a_t / a_{t-1}  | -                       | `betas[t]`                | -                         | `beta[t]`           |
| per-step signal factor^2   | alpha_t = 1-beta_t | a_t / a_{t-1}      | -                       | `alphas[t]`               | -                         | `alpha[t]`          |
| cumulative signal^2        | alpha_bar_t        | alpha_t (!)        | alpha_t^2               | `alphas_cumprod[t]`       | 1 / (1 + sigma^2)         | `alpha_bar[t]`      |
| std of the noise in x_t    | sqrt(1-alpha_bar_t)| sqrt(1 - alpha_t)  | sigma_t                 | `(1-alphas_cumprod)**0.5` | sigma / sqrt(1 + sigma^2) | -                   |
| noise / signal             | -                  | -                  | exp(-lambda_t)          | `sigmas` (Euler, DPM)     | sigma                     | `sigma[t]`          |
| signal-to-noise ratio      | alpha_bar/(1-a_bar)| alpha_t/(1-alpha_t)| exp(2 lambda_t)         | -                         | 1 / sigma^2               | `snr(t)`            |
| timestep                   | t = 1 .. T         | tau_i (subsequence)| t in [0, 1] (continuous)| 0 .. T-1 (= DDPM t - 1)   | sigma (continuous)        | t = 0 .. T-1        |

Timesteps are 0-based, as in diffusers and SD checkpoints: sdlearn's t = 0 is the DDPM
paper's t = 1 (the first, smallest amount of noise) and t = T-1 its t = T. "alpha_bar_{-1}"
is 1: before the first step there is no noise.

Beta schedules (diffusers' `beta_schedule` names):

- "linear": beta_t evenly spaced from beta_start to beta_end (DDPM: 1e-4 .. 0.02, T=1000).
- "scaled_linear": sqrt(beta_t) evenly spaced, then squared; Stable Diffusion 1.x/2.x use it
  with 0.00085 .. 0.012 (CompVis latent-diffusion's `make_beta_schedule("linear", ...)`).
- "squaredcos_cap_v2" (alias "cosine"): Nichol & Dhariwal 2021, "Improved DDPM", eq. 17:
  alpha_bar(t) = cos^2(((t/T + s) / (1 + s)) * pi/2), s = 0.008, and
  beta_t = min(1 - alpha_bar(t+1) / alpha_bar(t), 0.999).

Precision: diffusers builds betas with `torch.linspace(..., dtype=float32)` and takes the
cumulative product in float32; CompVis' original code does both in float64 and casts to
float32 afterwards. The two alpha_bar differ by about 1e-6 (relative). sdlearn follows
diffusers bit for bit, so its samplers reproduce diffusers' trajectories exactly.

References: Ho et al. 2020 (arXiv:2006.11239); Song et al. 2021, DDIM (arXiv:2010.02502);
Nichol & Dhariwal 2021 (arXiv:2102.09672); Kingma et al. 2021, VDM (arXiv:2107.00630);
Salimans & Ho 2022 (arXiv:2202.00512); Karras et al. 2022, EDM (arXiv:2206.00364);
Lu et al. 2022, DPM-Solver (arXiv:2206.00927); diffusers schedulers/scheduling_ddpm.py.
"""

import math
from typing import NamedTuple

import torch

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
PREDICTION_TYPES = ("epsilon", "v_prediction")  # what a network outputs: the noise eps, or v (section 4)
_ALIASES = {"cosine": "squaredcos_cap_v2"}


# 0. Reading a network output: eps or v -> x0 (used by NoiseSchedule below and every sampler) --


class Prediction(NamedTuple):
    """A model output read both ways: x0_pred and eps_pred, each shaped like the sample (B, C, H, W)."""

    x0: torch.Tensor
    eps: torch.Tensor


def x0_eps_from_output(model_output, x, alpha, sigma, prediction_type: str, norm2=1) -> Prediction:
    """Read a network output both ways, (x0_pred, eps_pred), given the sample x = alpha x0 + sigma eps.

    The one place where eps or v becomes a clean-image prediction: the samplers call it, and so do
    NoiseSchedule's x0_from_eps, x0_from_v and eps_from_v below. On the model-input
    scale, alpha = sqrt(alpha_bar_t), sigma = sqrt(1 - alpha_bar_t):

        epsilon:       eps_pred = model_output,  x0_pred = (x - sigma eps_pred) / alpha
        v_prediction:  x0_pred  = alpha x - sigma v,  eps_pred = alpha v + sigma x
                       (v = alpha eps - sigma x0, Salimans & Ho 2022, section 4)

    The epsilon formulas hold on any scale, e.g. Euler's x = x0 + sigma eps (alpha = 1). v lives
    on the scale the network saw, x_in = x / sqrt(norm2) with norm2 = alpha^2 + sigma^2 (given,
    not computed: in float32 it is 1 only up to rounding), where x0_pred = alpha x / norm2 -
    sigma / sqrt(norm2) v. Shapes: model_output, x (B, C, H, W); alpha, sigma, norm2 numbers or
    tensors that broadcast. The arithmetic is diffusers', so the samplers match it bit for bit.
    """
    if prediction_type == "epsilon":
        return Prediction((x - sigma * model_output) / alpha, model_output)
    if prediction_type == "v_prediction":
        norm = norm2**0.5
        x0_pred = alpha * x / norm2 - sigma / norm * model_output  # alpha x - sigma v when norm2 = 1
        eps_pred = alpha / norm * model_output + sigma * x / norm2  # alpha v + sigma x when norm2 = 1
        return Prediction(x0_pred, eps_pred)
    raise ValueError(f"prediction_type must be one of {list(PREDICTION_TYPES)}, got {prediction_type!r}.")


# 1. Beta schedules ---------------------------------------------------------------------


def linear_betas(num_train_timesteps: int, beta_start: float, beta_end: float) -> torch.Tensor:
    """beta_t evenly spaced from beta_start to beta_end (DDPM: 1e-4 .. 0.02). (T,) float32."""
    return torch.linspace(beta_start, beta_end, num_train_timesteps, dtype=torch.float32)


def scaled_linear_betas(num_train_timesteps: int, beta_start: float, beta_end: float) -> torch.Tensor:
    """sqrt(beta_t) evenly spaced, then squared: Stable Diffusion's schedule. (T,) float32."""
    return torch.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=torch.float32) ** 2


def cosine_betas(num_train_timesteps: int, max_beta: float = 0.999, s: float = 0.008) -> torch.Tensor:
    """Nichol & Dhariwal's cosine schedule ("squaredcos_cap_v2"). (T,) float32.

    alpha_bar(u) = cos^2((u + s) / (1 + s) * pi / 2) for u in [0, 1]; each beta is the
    fraction of alpha_bar lost in one step, capped at max_beta so the last step is not 1.
    (The paper divides by alpha_bar(0); the ratio below makes that normalisation cancel.)
    """

    def alpha_bar(u: float) -> float:
        return math.cos((u + s) / (1 + s) * math.pi / 2) ** 2

    T = num_train_timesteps
    betas = [min(1 - alpha_bar((i + 1) / T) / alpha_bar(i / T), max_beta) for i in range(T)]
    return torch.tensor(betas, dtype=torch.float32)  # computed in float64, stored as diffusers does


def make_betas(beta_schedule: str, num_train_timesteps: int, beta_start: float, beta_end: float) -> torch.Tensor:
    """The betas of a named schedule (diffusers' `beta_schedule` names, plus "cosine")."""
    name = _ALIASES.get(beta_schedule, beta_schedule)
    if name == "linear":
        return linear_betas(num_train_timesteps, beta_start, beta_end)
    if name == "scaled_linear":
        return scaled_linear_betas(num_train_timesteps, beta_start, beta_end)
    if name == "squaredcos_cap_v2":
        return cosine_betas(num_train_timesteps)  # beta_start and beta_end play no part
    raise ValueError(
        f"Unknown beta_schedule {beta_schedule!r}. Expected one of {list(BETA_SCHEDULES)} "
        "(or 'cosine', an alias of 'squaredcos_cap_v2')."
    )


# 2. The noise schedule -----------------------------------------------------------------


class NoiseSchedule:
    """beta, alpha, alpha_bar and sigma for t = 0 .. T-1, and the forward-process formulas.

    The arguments are those of a diffusers scheduler config (num_train_timesteps, beta_start,
    beta_end, beta_schedule, trained_betas); the defaults are Stable Diffusion's. Tensors live
    on the CPU in float32; methods move what they need to the device and dtype of their input.
    """

    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.00085,
        beta_end: float = 0.012,
        beta_schedule: str = "scaled_linear",
        trained_betas=None,
    ):
        if isinstance(num_train_timesteps, bool) or not isinstance(num_train_timesteps, int) or num_train_timesteps < 1:
            raise ValueError(f"num_train_timesteps must be a positive integer (SD uses 1000), got {num_train_timesteps!r}.")
        if trained_betas is not None:
            beta = torch.tensor(trained_betas, dtype=torch.float32)
            if beta.dim() != 1 or len(beta) != num_train_timesteps:
                raise ValueError(
                    f"trained_betas must be a list of num_train_timesteps={num_train_timesteps} numbers, "
                    f"got shape {tuple(beta.shape)}."
                )
        else:
            beta = make_betas(beta_schedule, num_train_timesteps, beta_start, beta_end)
        if not bool(((beta > 0) & (beta < 1)).all()):
            raise ValueError("Every beta must lie strictly between 0 and 1 (beta is the variance of one noising step).")
        self.num_train_timesteps = num_train_timesteps
        self.beta_start, self.beta_end = beta_start, beta_end
        self.beta_schedule = "custom" if trained_betas is not None else _ALIASES.get(beta_schedule, beta_schedule)

        self.beta = beta  # (T,)
        self.alpha = 1.0 - beta  # (T,)
        self.alpha_bar = torch.cumprod(self.alpha, dim=0)  # (T,)  float32 cumprod, as diffusers
        # k-diffusion's noise level: x_t / sqrt(alpha_bar_t) = x_0 + sigma_t * eps
        self.sigma = ((1 - self.alpha_bar) / self.alpha_bar) ** 0.5  # (T,)

    # Presets -------------------------------------------------------------------------

    @classmethod
    def sd(cls) -> "NoiseSchedule":
        """Stable Diffusion 1.x / 2.x: scaled_linear, 0.00085 .. 0.012, T = 1000."""
        return cls(1000, 0.00085, 0.012, "scaled_linear")

    @classmethod
    def ddpm(cls) -> "NoiseSchedule":
        """Ho et al. 2020: linear, 1e-4 .. 0.02, T = 1000."""
        return cls(1000, 1e-4, 0.02, "linear")

    @classmethod
    def cosine(cls, num_train_timesteps: int = 1000) -> "NoiseSchedule":
        """Nichol & Dhariwal 2021: cosine alpha_bar ("squaredcos_cap_v2")."""
        return cls(num_train_timesteps, beta_schedule="squaredcos_cap_v2")

    @property
    def T(self) -> int:
        return self.num_train_timesteps

    def __len__(self) -> int:
        return self.num_train_timesteps

    def __repr__(self) -> str:
        return (
            f"NoiseSchedule(T={self.T}, beta_schedule={self.beta_schedule!r}, "
            f"beta {self.beta[0].item():.3g}..{self.beta[-1].item():.3g}, "
            f"alpha_bar {self.alpha_bar[0].item():.4g}..{self.alpha_bar[-1].item():.4g})"
        )

    # Indexing --------------------------------------------------------------------------

    def _check_t(self, t) -> torch.Tensor:
        """t as a LongTensor (0-dim or (B,)), every value in 0 .. T-1."""
        t = torch.as_tensor(t)
        if t.is_floating_point():
            if not bool((t == t.round()).all()):
                raise ValueError(
                    f"t must hold integer timesteps in 0..{self.T - 1}, got non-integer values {t.tolist()}. "
                    "Samplers with fractional timesteps (Euler) use sigmas instead."
                )
            t = t.round()
        if t.dim() > 1:
            raise ValueError(
                f"t must be an integer or a 1-D tensor with one timestep per batch item, got shape {tuple(t.shape)}."
            )
        t = t.long()
        if t.numel() and (int(t.min()) < 0 or int(t.max()) >= self.T):
            raise ValueError(
                f"t must be in 0..{self.T - 1} (0-based, as in diffusers: the DDPM paper's t=1 is t=0 here), "
                f"got {t.tolist()}."
            )
        return t

    def at(self, values: torch.Tensor, t, like: torch.Tensor | None = None) -> torch.Tensor:
        """values[t], shaped to broadcast against `like` (B, C, H, W).

        An integer t gives a 0-dim tensor; a (B,) tensor of timesteps gives (B, 1, 1, 1), one
        value per batch item. The result has `like`'s device and dtype (cast *before*
        indexing, as diffusers' add_noise does, so that results agree to the last bit).
        """
        t = self._check_t(t)
        if like is not None:
            values = values.to(device=like.device, dtype=like.dtype)
            if t.dim() == 1:
                if len(t) != like.shape[0]:
                    raise ValueError(
                        f"Got {len(t)} timesteps for a batch of {like.shape[0]}: give one per item, or a single integer."
                    )
                return values[t.to(like.device)].reshape(-1, *([1] * (like.dim() - 1)))  # (B, 1, 1, 1)
        return values[t.to(values.device)]

    # Forward process -------------------------------------------------------------------

    def q_sample(self, x0: torch.Tensor, t, eps: torch.Tensor) -> torch.Tensor:
        """x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps   (DDPM eq. 4): t steps in one jump."""
        if eps.shape != x0.shape:
            raise ValueError(f"eps must have the shape of x0 {tuple(x0.shape)}, got {tuple(eps.shape)}.")
        alpha_bar_t = self.at(self.alpha_bar, t, x0)  # (B, 1, 1, 1) or ()
        return alpha_bar_t**0.5 * x0 + (1 - alpha_bar_t) ** 0.5 * eps

    def q_step(self, x_prev: torch.Tensor, t, eps: torch.Tensor) -> torch.Tensor:
        """One noising step x_{t-1} -> x_t = sqrt(alpha_t) x_{t-1} + sqrt(beta_t) eps   (DDPM eq. 2)."""
        alpha_t = self.at(self.alpha, t, x_prev)
        beta_t = self.at(self.beta, t, x_prev)
        return alpha_t**0.5 * x_prev + beta_t**0.5 * eps

    def q_mean_std(self, x0: torch.Tensor, t) -> tuple:
        """Mean and standard deviation of q(x_t | x_0): (sqrt(alpha_bar_t) x_0, sqrt(1 - alpha_bar_t))."""
        alpha_bar_t = self.at(self.alpha_bar, t, x0)
        return alpha_bar_t**0.5 * x0, (1 - alpha_bar_t) ** 0.5

    # Posterior q(x_prev | x_t, x_0) ----------------------------------------------------

    def _alpha_bar_prev(self, t, t_prev) -> tuple:
        """alpha_bar_t and alpha_bar at the previous timestep (t - 1 unless given; -1 means 1.0)."""
        t = self._check_t(t)
        t_prev = t - 1 if t_prev is None else torch.as_tensor(t_prev).long()
        if bool((t_prev >= t).any()):
            raise ValueError(f"t_prev must come before t (t_prev < t), got t={t.tolist()}, t_prev={t_prev.tolist()}.")
        alpha_bar_t = self.alpha_bar[t]
        # Before the first step there is no noise: alpha_bar_{-1} = 1.
        alpha_bar_prev = torch.where(t_prev >= 0, self.alpha_bar[self._check_t(t_prev.clamp(min=0))], torch.ones(()))
        return alpha_bar_t, alpha_bar_prev

    def posterior_coefficients(self, t, t_prev=None) -> tuple:
        """(coefficient of x_0, coefficient of x_t) in the posterior mean mu_tilde   (DDPM eq. 7).

        With t_prev = t - 1 (the default) this is eq. 7. A sampler that skips steps
        (DDPM with 50 of the 1000 timesteps) uses the same formula between t and any earlier
        t_prev, with beta replaced by the noise added in between, 1 - alpha_bar_t / alpha_bar_prev.
        Returned as tensors of t's shape, float32; the arithmetic follows diffusers' order.
        """
        alpha_bar_t, alpha_bar_prev = self._alpha_bar_prev(t, t_prev)
        beta_prod_t, beta_prod_prev = 1 - alpha_bar_t, 1 - alpha_bar_prev
        alpha_step = alpha_bar_t / alpha_bar_prev  # alpha_t when t_prev = t - 1
        beta_step = 1 - alpha_step  # beta_t when t_prev = t - 1
        coef_x0 = (alpha_bar_prev**0.5 * beta_step) / beta_prod_t  # sqrt(a_bar_{t-1}) beta_t / (1 - a_bar_t)
        coef_xt = alpha_step**0.5 * beta_prod_prev / beta_prod_t  # sqrt(alpha_t)(1 - a_bar_{t-1}) / (1 - a_bar_t)
        return coef_x0, coef_xt

    def posterior_variance(self, t, t_prev=None) -> torch.Tensor:
        """beta_tilde_t = (1 - alpha_bar_{t-1}) / (1 - alpha_bar_t) * beta_t   (DDPM eq. 7).

        Zero at t = 0 (the last step back is deterministic given x_0).
        """
        alpha_bar_t, alpha_bar_prev = self._alpha_bar_prev(t, t_prev)
        beta_step = 1 - alpha_bar_t / alpha_bar_prev
        return (1 - alpha_bar_prev) / (1 - alpha_bar_t) * beta_step

    def posterior_mean(self, x0: torch.Tensor, xt: torch.Tensor, t, t_prev=None) -> torch.Tensor:
        """mu_tilde(x_t, x_0) = coef_x0 * x_0 + coef_xt * x_t   (DDPM eq. 7)."""
        coef_x0, coef_xt = self.posterior_coefficients(t, t_prev)
        shape = (-1, *([1] * (x0.dim() - 1))) if coef_x0.dim() == 1 else ()
        coef_x0 = coef_x0.to(device=x0.device, dtype=x0.dtype).reshape(shape)
        coef_xt = coef_xt.to(device=x0.device, dtype=x0.dtype).reshape(shape)
        return coef_x0 * x0 + coef_xt * xt

    # Signal-to-noise ratio and v -------------------------------------------------------

    def snr(self, t=None) -> torch.Tensor:
        """SNR(t) = alpha_bar_t / (1 - alpha_bar_t); all T values when t is None."""
        alpha_bar = self.alpha_bar if t is None else self.alpha_bar[self._check_t(t)]
        return alpha_bar / (1 - alpha_bar)

    def min_snr_weight(self, t, prediction_type: str = "epsilon", gamma: float = 5.0) -> torch.Tensor:
        """Min-SNR-gamma loss weights (Hang et al. 2023, eq. 8 and table 1), one per timestep in t.

        The network's error, whatever it predicts, is converted to an error in x_0 and weighted
        by min(SNR, gamma): easy, almost noise-free timesteps stop dominating the gradient.
        Per target: eps  -> min(SNR, gamma) / SNR,   v -> min(SNR, gamma) / (SNR + 1),
                    x_0  -> min(SNR, gamma).
        """
        snr = self.snr(t)
        clipped = torch.clamp(snr, max=gamma)
        if prediction_type == "epsilon":
            return clipped / snr
        if prediction_type == "v_prediction":
            return clipped / (snr + 1)
        if prediction_type == "sample":
            return clipped
        raise ValueError(f"prediction_type must be 'epsilon', 'v_prediction' or 'sample', got {prediction_type!r}.")

    def v_target(self, x0: torch.Tensor, eps: torch.Tensor, t) -> torch.Tensor:
        """v = sqrt(alpha_bar_t) eps - sqrt(1 - alpha_bar_t) x_0   (Salimans & Ho 2022, section 4)."""
        alpha_bar_t = self.at(self.alpha_bar, t, x0)
        return alpha_bar_t**0.5 * eps - (1 - alpha_bar_t) ** 0.5 * x0

    # Conversions between eps, x_0 and v, given x_t --------------------------------------

    def x0_from_eps(self, xt: torch.Tensor, eps: torch.Tensor, t) -> torch.Tensor:
        alpha_bar_t = self.at(self.alpha_bar, t, xt)
        return x0_eps_from_output(eps, xt, alpha_bar_t**0.5, (1 - alpha_bar_t) ** 0.5, "epsilon").x0

    def eps_from_x0(self, xt: torch.Tensor, x0: torch.Tensor, t) -> torch.Tensor:
        alpha_bar_t = self.at(self.alpha_bar, t, xt)
        return (xt - alpha_bar_t**0.5 * x0) / (1 - alpha_bar_t) ** 0.5

    def x0_from_v(self, xt: torch.Tensor, v: torch.Tensor, t) -> torch.Tensor:
        alpha_bar_t = self.at(self.alpha_bar, t, xt)
        return x0_eps_from_output(v, xt, alpha_bar_t**0.5, (1 - alpha_bar_t) ** 0.5, "v_prediction").x0

    def eps_from_v(self, xt: torch.Tensor, v: torch.Tensor, t) -> torch.Tensor:
        alpha_bar_t = self.at(self.alpha_bar, t, xt)
        return x0_eps_from_output(v, xt, alpha_bar_t**0.5, (1 - alpha_bar_t) ** 0.5, "v_prediction").eps

    def v_from_eps(self, xt: torch.Tensor, eps: torch.Tensor, t) -> torch.Tensor:
        return self.v_target(self.x0_from_eps(xt, eps, t), eps, t)
