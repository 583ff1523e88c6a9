"""Samplers: turn a noise-predicting network into a generator, one reverse step at a time.

A sampler walks a short subsequence of the T = 1000 training timesteps from pure noise x_T
down to an image x_0. At each step the network predicts the noise eps (or v) in the current
sample, the sampler converts that into a prediction of the clean image x0_pred, and moves
to a less noisy sample. The samplers differ only in how they move. Notation as in
`sdlearn.diffusion.schedules`: alpha_bar_t (diffusers' `alphas_cumprod[t]`), sigma_t (k-diffusion's
noise level, sqrt((1 - alpha_bar_t) / alpha_bar_t)); t_prev is the next (smaller) timestep.

1. DDPM (Ho et al. 2020, Algorithm 2 and eqs. 6-7): sample the posterior q(x_prev | x_t, x0_pred).

       x_prev = mu_tilde(x_t, x0_pred) + sigma z,  sigma^2 = beta_tilde_t ("fixed_small") or beta_t ("fixed_large")

   With fewer than T steps, beta_t becomes the noise added between t_prev and t,
   1 - alpha_bar_t / alpha_bar_prev.

2. DDIM (Song et al. 2021, eqs. 12 and 16): a non-Markovian process with the same marginals.

       x_prev = sqrt(alpha_bar_prev) x0_pred + sqrt(1 - alpha_bar_prev - sigma^2) eps + sigma z
       sigma  = eta * sqrt((1 - alpha_bar_prev) / (1 - alpha_bar_t)) * sqrt(1 - alpha_bar_t / alpha_bar_prev)

   eta = 0 is deterministic (an ODE solver); eta = 1 is DDPM's posterior sample (same variance,
   and the mean rewritten with eps), so with DDIM's last step to alpha_bar = 1
   (set_alpha_to_one) and the same generator it reproduces DDPM's run.
   Inversion (`ddim_invert`) runs the eta = 0 update upwards, from an image to its x_T.

3. PLMS (Liu et al. 2022, "Pseudo Numerical Methods for Diffusion Models", eqs. 9 and 12):
   the deterministic DDIM step (the paper's "transfer" phi, eq. 9) driven by a linear
   multistep (Adams-Bashforth) combination of the last four noise predictions,

       eps' = (55 eps_t - 59 eps_{t+d} + 37 eps_{t+2d} - 9 eps_{t+3d}) / 24

   with lower orders while the history fills up; the very first step is a two-stage
   improved-Euler step that needs a second model call at the same timestep (which is why
   `.timesteps` holds one timestep twice). This is Stable Diffusion's original PLMS sampler
   (CompVis ldm/models/diffusion/plms.py) and diffusers' PNDMScheduler(skip_prk_steps=True).

4. Euler (Karras et al. 2022, Algorithm 1 without churn; k-diffusion `sample_euler`). In the
   variance-exploding view x = x0 + sigma eps (x_t / sqrt(alpha_bar_t)), denoising is the ODE
   dx/dsigma = (x - x0_pred) / sigma, stepped with Euler's method:

       d = (x - x0_pred) / sigma,     x_next = x + d (sigma_next - sigma)

   The network was trained on x_t = x / sqrt(1 + sigma^2), hence `scale_model_input`, and the
   initial noise is scaled up by `init_noise_sigma` (about 14.6 for SD).

5. Euler ancestral (k-diffusion `sample_euler_ancestral`): step down further than sigma_next,
   to sigma_down, then add fresh noise of std sigma_up so that the noise level is sigma_next:

       sigma_up   = sqrt(sigma_next^2 (sigma^2 - sigma_next^2) / sigma^2)
       sigma_down = sqrt(sigma_next^2 - sigma_up^2)
       x_next     = x + d (sigma_down - sigma) + sigma_up z

6. DPM-Solver++(2M) (Lu et al. 2022b, "DPM-Solver++", Algorithm 2 / eq. 13): an exponential
   integrator in lambda = log(alpha / sigma), here with alpha = sqrt(alpha_bar), sigma = sqrt(1 - alpha_bar):

       h = lambda_next - lambda
       first order (= DDIM):  x_next = (sigma_next / sigma) x - alpha_next (e^{-h} - 1) x0_pred
       second order (2M):     D = x0_pred + (x0_pred - x0_pred_prev) / (2 r),  r = h_prev / h
                              x_next = (sigma_next / sigma) x - alpha_next (e^{-h} - 1) D

   The first step (no history yet) and the last (to sigma = 0) are first order.

7. Flow Euler (rectified flow / flow matching, as SD3 and Flux; Esser et al. 2024, sec. 2-3).
   No alpha_bar: the sample moves on the straight line between the image and the noise, at
   noise level s in [0, 1] (diffusers' sigma), and the network predicts its velocity
   (`sdlearn.diffusion.flow_matching`):

       x_s = (1 - s) x0 + s noise                                          (7.1)
       v   = noise - x0,        x0_pred = x - s v                          (7.2)
       x_next = x + (s_next - s) v                                         (7.3)

   Euler's method on dx/ds = v from s = 1 (x = noise, init_noise_sigma = 1) to s = 0. The
   levels are n evenly spaced ones, moved towards noise by the static shift
   s' = shift s / (1 + (shift - 1) s), and the network is called with t = 1000 s.
   It serves velocity models only: `get_sampler("flow_euler", shift=3.0)`.

All six alpha_bar samplers turn the network output into (x0_pred, eps_pred) in one function, `x0_eps_from_output`
(also behind `Sampler.predict`); they differ only in the x = alpha x0 + sigma eps they pass: the
model input with alpha = sqrt(alpha_bar_t), or, for Euler, x = x0 + sigma eps (alpha = 1).

Every sampler has the interface of diffusers' schedulers:

    sampler = get_sampler("ddim")                        # SD 1.5's schedule by default
    sampler.set_timesteps(50)
    x = noise * sampler.init_noise_sigma                 # x_T
    for t in sampler.timesteps:
        model_output = unet(sampler.scale_model_input(x, t), t, context)
        x, x0_pred = sampler.step(model_output, t, x, generator=generator)

`get_sampler(name, **config)` (in `sdlearn.diffusion.scheduler_configs`) takes the keys of a diffusers scheduler config (its
scheduler_config.json); `sampler_from_config(dict_or_path)` reads one. Each sampler
reproduces the matching diffusers scheduler step for step (tests/test_samplers.py).
Where diffusers departs from the paper, sdlearn follows diffusers and says so.

References: Ho et al. 2020 (arXiv:2006.11239); Song et al. 2021 (arXiv:2010.02502);
Liu et al. 2022 (arXiv:2202.09778); Karras et al. 2022 (arXiv:2206.00364); Lu et al. 2022
(arXiv:2206.00927, arXiv:2211.01095); k-diffusion (github.com/crowsonkb/k-diffusion);
diffusers schedulers/scheduling_{ddpm,ddim,pndm,euler_discrete,euler_ancestral_discrete,
dpmsolver_multistep,flow_match_euler_discrete}.py; Esser et al. 2024 (SD3, arXiv:2403.03206).
"""

import inspect
from typing import Callable, ClassVar, NamedTuple

import numpy as np
import torch
from tqdm.auto import tqdm

from sdlearn.diffusion.flow_matching import check_shift, flow_interpolate, flow_predict, shift_levels
from sdlearn.diffusion.schedules import PREDICTION_TYPES, NoiseSchedule, Prediction, x0_eps_from_output
from sdlearn.models.noise import randn

SPACINGS = ("leading", "trailing", "linspace")


class StepOutput(NamedTuple):
    """What one reverse step produces: x_prev, and the clean image predicted on the way."""

    prev_sample: torch.Tensor
    pred_original_sample: torch.Tensor


def alpha_sigma_from_sigma(sigma):
    """k-diffusion's sigma -> (alpha, sigma_vp) = (1 / sqrt(sigma^2 + 1), sigma alpha), the model-input
    scale's (sqrt(alpha_bar), sqrt(1 - alpha_bar)). Euler and DPM-Solver index their steps by sigma."""
    alpha = 1 / ((sigma**2 + 1) ** 0.5)
    return alpha, sigma * alpha


def _spaced_timesteps(n: int, T: int, spacing: str, steps_offset: int) -> np.ndarray:
    """n of the T training timesteps, largest first (Lin et al. 2023, "Common Diffusion Noise
    Schedules and Sample Steps are Flawed", Table 2).

    leading:  0, T//n, 2T//n, ... (+ steps_offset)  SD's choice; never reaches t = T-1
    trailing: T-1, T-1 - T/n, ...                    starts at the noisiest timestep
    linspace: n evenly spaced points from 0 to T-1, rounded
    """
    if spacing == "leading":
        timesteps = (np.arange(0, n) * (T // n)).round()[::-1].copy().astype(np.int64)
        return timesteps + steps_offset
    if spacing == "trailing":
        return np.round(np.arange(T, 0, -T / n)).astype(np.int64) - 1
    return np.linspace(0, T - 1, n).round()[::-1].copy().astype(np.int64)


class Sampler:
    """What every sampler shares: the noise schedule, the timesteps, checks and bookkeeping.

    Constructor arguments are diffusers scheduler config keys; the defaults are Stable
    Diffusion 1.5's scheduler config, and `timestep_spacing=None` means the default of the
    matching diffusers scheduler (as when SD's config, which has no such key, is loaded).
    """

    name: ClassVar[str] = ""
    diffusers_class: ClassVar[str] = ""
    default_spacing: ClassVar[str] = "leading"
    # Model evaluations per entry of .timesteps (diffusers' `order`; 1 for all six).
    order: ClassVar[int] = 1
    # True for samplers of flow-matching (velocity) models, which have no alpha_bar schedule.
    is_flow: ClassVar[bool] = False
    # Options of the matching diffusers scheduler that sdlearn does not implement, with the
    # value at which they change nothing. Any other value raises an error.
    unsupported: ClassVar[dict] = {
        "thresholding": False,
        "rescale_betas_zero_snr": False,
        "eta": 0.0,
    }
    # Options that change nothing here (used only together with an unsupported option).
    inert: ClassVar[frozenset] = frozenset({"dynamic_thresholding_ratio", "sample_max_value"})

    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.00085,
        beta_end: float = 0.012,
        beta_schedule: str = "scaled_linear",
        trained_betas=None,
        prediction_type: str = "epsilon",
        timestep_spacing: str | None = None,
        steps_offset: int = 1,
    ):
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"prediction_type must be one of {list(PREDICTION_TYPES)}, got {prediction_type!r}.")
        timestep_spacing = timestep_spacing or self.default_spacing
        if timestep_spacing not in SPACINGS:
            raise ValueError(f"timestep_spacing must be one of {list(SPACINGS)}, got {timestep_spacing!r}.")
        if isinstance(steps_offset, bool) or not isinstance(steps_offset, int) or steps_offset < 0:
            raise ValueError(f"steps_offset must be a non-negative integer (SD uses 1), got {steps_offset!r}.")
        self.num_train_timesteps = num_train_timesteps
        self.beta_start, self.beta_end = beta_start, beta_end
        self.beta_schedule = "squaredcos_cap_v2" if beta_schedule == "cosine" else beta_schedule
        self.trained_betas = None if trained_betas is None else [float(b) for b in trained_betas]
        self.prediction_type = prediction_type
        self.timestep_spacing = timestep_spacing
        self.steps_offset = steps_offset

        self.schedule = NoiseSchedule(num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas)
        self.alpha_bar = self.schedule.alpha_bar  # (T,) float32, diffusers' alphas_cumprod
        self.num_inference_steps = None
        self.timesteps = None
        self.reset()

    # Configuration ---------------------------------------------------------------------

    @property
    def T(self) -> int:
        return self.num_train_timesteps

    @property
    def config(self) -> dict:
        """The constructor arguments (diffusers config keys) that built this sampler."""
        return {name: getattr(self, name) for name in config_keys(type(self))}

    def to_diffusers_config(self) -> dict:
        """A scheduler_config.json dict that the matching diffusers scheduler loads."""
        config = {"_class_name": self.diffusers_class, **self.config}
        config.pop("eta", None)  # an argument of DDIM's step() in diffusers, not a config key
        return config

    def __repr__(self) -> str:
        steps = f", steps={self.num_inference_steps}" if self.num_inference_steps else ""
        return (
            f"{type(self).__name__}(prediction_type={self.prediction_type!r}, "
            f"timestep_spacing={self.timestep_spacing!r}, beta_schedule={self.schedule.beta_schedule!r}{steps})"
        )

    # Timesteps -------------------------------------------------------------------------

    def set_timesteps(self, num_inference_steps: int, device=None) -> None:
        """Choose num_inference_steps timesteps (largest first) and start a new sampling run."""
        n = self._check_num_steps(num_inference_steps)
        timesteps = self._make_timesteps(int(n))
        if timesteps.max() > self.T - 1 or timesteps.min() < 0:
            fits = next((m for m in range(int(n) - 1, 0, -1) if self._timesteps_fit(m)), None)
            raise ValueError(
                f"{n} steps with timestep_spacing={self.timestep_spacing!r} and steps_offset={self.steps_offset} reach timestep "
                f"{int(timesteps.max()) if timesteps.max() > self.T - 1 else int(timesteps.min())}, outside the schedule's "
                f"0..{self.T - 1}. Use at most {fits} steps"
                + (" (the most this schedule allows)." if fits else ".")
            )
        repeats_allowed = 1 if self.name == "plms" and n > 1 else 0  # PLMS repeats its second timestep
        if len(np.unique(timesteps)) != len(timesteps) - repeats_allowed:
            raise ValueError(
                f"{n} steps with timestep_spacing={self.timestep_spacing!r} repeat timesteps. Use fewer steps "
                "or another spacing."
            )
        self.timesteps = torch.from_numpy(timesteps).to(device)
        self.num_inference_steps = int(n)
        self.reset()

    def _check_num_steps(self, n) -> int:
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)):
            raise TypeError(f"num_inference_steps must be an integer, got {type(n).__name__}.")
        if not 1 <= n <= self.T:
            raise ValueError(
                f"num_inference_steps must be between 1 and num_train_timesteps={self.T}, got {n}. "
                "(The model was trained on T timesteps; a sampler visits a subsequence of them.)"
            )
        return int(n)

    def _make_timesteps(self, n: int) -> np.ndarray:
        return _spaced_timesteps(n, self.T, self.timestep_spacing, self.steps_offset)

    def _timesteps_fit(self, n: int) -> bool:
        timesteps = self._make_timesteps(n)
        repeats_allowed = 1 if self.name == "plms" and n > 1 else 0
        in_range = timesteps.min() >= 0 and timesteps.max() <= self.T - 1
        return bool(in_range and len(np.unique(timesteps)) == len(timesteps) - repeats_allowed)

    def reset(self) -> None:
        """Forget the history of the current run (set_timesteps calls this)."""
        self._step_index = None

    def _check_ready(self) -> None:
        if self.timesteps is None:
            raise RuntimeError(f"Call {type(self).__name__}.set_timesteps(num_inference_steps) before sampling.")

    def _index_of(self, t) -> int:
        """The position of timestep t in .timesteps (its first occurrence)."""
        self._check_ready()
        if isinstance(t, torch.Tensor):
            if t.numel() != 1:
                raise ValueError(
                    "step() takes one timestep for the whole batch (an element of sampler.timesteps), "
                    f"got shape {tuple(t.shape)}."
                )
            t = t.item()
        matches = (self.timesteps.double().cpu() == float(t)).nonzero()
        if len(matches) == 0:
            shown = self.timesteps.tolist()
            shown = shown if len(shown) <= 8 else [*shown[:4], "...", *shown[-2:]]
            raise ValueError(
                f"Timestep {t} is not in this sampler's schedule: set_timesteps({self.num_inference_steps}) gave "
                f"{shown}. Pass the elements of sampler.timesteps, in order."
            )
        return int(matches[0])

    def _next_index(self, t) -> int:
        """For samplers with a history: the index of this step; steps must follow .timesteps."""
        if self._step_index is None:  # the first step may start mid-schedule (image-to-image)
            return self._index_of(t)
        if self._step_index >= len(self.timesteps):
            raise RuntimeError(
                f"This sampling run is finished ({len(self.timesteps)} steps done). Call set_timesteps(n) to start another."
            )
        expected = self.timesteps[self._step_index]
        try:
            same = float(t) == float(expected)
        except (TypeError, ValueError, RuntimeError):
            same = False
        if not same:
            raise ValueError(
                f"{type(self).__name__} keeps a history between steps, so steps must follow sampler.timesteps in order: "
                f"expected timestep {expected.item():g} (step {self._step_index + 1} of {len(self.timesteps)}), got {t}. "
                "Call set_timesteps(n) to start again."
            )
        return self._step_index

    @staticmethod
    def _check_step_inputs(model_output: torch.Tensor, x: torch.Tensor) -> None:
        if not isinstance(model_output, torch.Tensor) or not isinstance(x, torch.Tensor):
            raise TypeError("step(model_output, t, x) takes tensors for model_output and x.")
        if model_output.shape != x.shape:
            raise ValueError(
                f"model_output {tuple(model_output.shape)} and x {tuple(x.shape)} must have the same shape. "
                "(With classifier-free guidance, combine the two halves of the model output first.)"
            )

    # Model input, initial noise, forward noising ----------------------------------------

    @property
    def init_noise_sigma(self) -> float:
        """The standard deviation of x_T: multiply unit Gaussian noise by it."""
        return 1.0

    def scale_model_input(self, x: torch.Tensor, t) -> torch.Tensor:
        """What the network sees at timestep t (unchanged for samplers that work on x_t itself)."""
        self._index_of(t)
        return x

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t) -> torch.Tensor:
        """x_t from a clean x0 (image-to-image, training): sqrt(alpha_bar_t) x0 + sqrt(1 - alpha_bar_t) noise."""
        return self.schedule.q_sample(x0, t, noise)

    def _alpha_sigma(self, i: int) -> tuple:
        """(alpha, sigma) at index i of .timesteps, 0-dim float32 tensors: x_in = alpha x0 + sigma eps.

        alpha = sqrt(alpha_bar_t), sigma = sqrt(1 - alpha_bar_t) on the model-input scale.
        """
        alpha_bar_t = self.alpha_bar[int(self.timesteps[i])]
        return alpha_bar_t**0.5, (1 - alpha_bar_t) ** 0.5

    def alpha_sigma(self, t) -> tuple:
        """(alpha_t, sigma_t) with x_t = alpha_t x0 + sigma_t eps on the model-input scale, as floats."""
        alpha, sigma = self._alpha_sigma(self._index_of(t))
        return float(alpha), float(sigma)

    def _predict(self, model_output: torch.Tensor, x_in: torch.Tensor, i: int) -> Prediction:
        """(x0_pred, eps_pred) from the model output for the model input x_in at index i of .timesteps."""
        alpha, sigma = self._alpha_sigma(i)
        return x0_eps_from_output(model_output, x_in, alpha, sigma, self.prediction_type)

    def predict(self, model_output: torch.Tensor, t, x_in: torch.Tensor) -> Prediction:
        """Read a model output as (x0_pred, eps_pred), given the model input x_in at timestep t.

        The conversion that step() uses (`x0_eps_from_output`), for display and analysis.
        """
        return self._predict(model_output, x_in, self._index_of(t))

    def step(self, model_output: torch.Tensor, t, x: torch.Tensor, generator=None) -> StepOutput:
        """One reverse step from x at timestep t (an element of .timesteps) to the next timestep.

        model_output is the network's eps or v for scale_model_input(x, t); the generator
        draws the fresh noise of stochastic samplers. Returns StepOutput(prev_sample,
        pred_original_sample), which also unpacks: `x, x0_pred = sampler.step(...)`.
        """
        raise NotImplementedError(f"{type(self).__name__} does not define step(); use one of {list(SAMPLER_NAMES)}.")


def config_keys(cls) -> list:
    """The constructor's keyword arguments, base class first: the config keys a sampler honours.

    A constructor passes the rest (**schedule) to its base class's; one without ** stops there
    (the flow sampler has no alpha_bar schedule, so none of Sampler's keys).
    """
    chain = []
    for klass in cls.__mro__:
        if "__init__" in vars(klass) and issubclass(klass, Sampler):
            chain.append(klass)
            params = inspect.signature(klass.__init__).parameters.values()
            if not any(p.kind == p.VAR_KEYWORD for p in params):
                break
    names = []
    for klass in reversed(chain):
        params = inspect.signature(klass.__init__).parameters.values()
        names += [p.name for p in params if p.name != "self" and p.kind != p.VAR_KEYWORD and p.name not in names]
    return names


# 1. DDPM -------------------------------------------------------------------------------


class DDPMSampler(Sampler):
    """Ancestral sampling of the DDPM posterior (Ho et al. 2020, Algorithm 2)."""

    name = "ddpm"
    diffusers_class = "DDPMScheduler"
    default_spacing = "leading"

    def __init__(
        self,
        *,
        variance_type: str = "fixed_small",
        clip_sample: bool = False,
        clip_sample_range: float = 1.0,
        **schedule,
    ):
        super().__init__(**schedule)
        if variance_type not in ("fixed_small", "fixed_large"):
            raise ValueError(
                f"variance_type must be 'fixed_small' (beta_tilde, the posterior variance) or 'fixed_large' (beta), "
                f"got {variance_type!r}. Learned variances are not implemented."
            )
        self.variance_type = variance_type
        self.clip_sample, self.clip_sample_range = clip_sample, clip_sample_range

    def step(self, model_output, t, x, generator=None) -> StepOutput:
        self._check_step_inputs(model_output, x)
        # 1. previous timestep: the next entry of .timesteps (-1 after the last: x_0 itself)
        i = self._index_of(t)
        t = int(self.timesteps[i])
        t_prev = int(self.timesteps[i + 1]) if i + 1 < len(self.timesteps) else -1

        # 2. alpha_bar_t and alpha_bar_prev (= 1 before the first training step)
        alpha_bar_t = self.alpha_bar[t]
        alpha_bar_prev = self.alpha_bar[t_prev] if t_prev >= 0 else torch.tensor(1.0)
        beta_step = 1 - alpha_bar_t / alpha_bar_prev  # beta_t when t_prev = t - 1

        # 3. predicted x_0 from the model output (DDPM eq. 15 solved for x_0; or from v)
        x0_pred = self._predict(model_output, x, i).x0
        if self.clip_sample:  # pixel models: x_0 lies in [-1, 1]. SD's latents do not.
            x0_pred = x0_pred.clamp(-self.clip_sample_range, self.clip_sample_range)

        # 4. posterior mean mu_tilde(x_t, x0_pred)   (DDPM eq. 7)
        coef_x0, coef_xt = self.schedule.posterior_coefficients(t, t_prev)
        x_prev = coef_x0 * x0_pred + coef_xt * x

        # 5. add noise sigma z   (Algorithm 2, line 4); none on the very last step
        if t > 0:
            z = randn(model_output.shape, generator=generator, device=model_output.device, dtype=model_output.dtype)
            if self.variance_type == "fixed_small":  # sigma^2 = beta_tilde_t   (eq. 7)
                variance = torch.clamp(self.schedule.posterior_variance(t, t_prev), min=1e-20)
            else:  # sigma^2 = beta_t: the DDPM paper found both about as good
                variance = beta_step
            x_prev = x_prev + (variance**0.5) * z
        return StepOutput(x_prev, x0_pred)


# 2. DDIM -------------------------------------------------------------------------------


class DDIMSampler(Sampler):
    """DDIM (Song et al. 2021): deterministic with eta = 0, DDPM-like noise with eta = 1."""

    name = "ddim"
    diffusers_class = "DDIMScheduler"
    default_spacing = "leading"
    unsupported = {key: value for key, value in Sampler.unsupported.items() if key != "eta"}

    def __init__(
        self,
        *,
        eta: float = 0.0,
        set_alpha_to_one: bool = False,
        clip_sample: bool = False,
        clip_sample_range: float = 1.0,
        **schedule,
    ):
        super().__init__(**schedule)
        if not 0.0 <= float(eta) <= 1.0:
            raise ValueError(f"eta must be between 0 (deterministic DDIM) and 1 (DDPM-like noise), got {eta}.")
        self.eta = float(eta)
        self.set_alpha_to_one = set_alpha_to_one
        self.clip_sample, self.clip_sample_range = clip_sample, clip_sample_range
        # alpha_bar "before" the last step: 1 (a clean image) or, as SD's config chooses, alpha_bar_0
        self.final_alpha_bar = torch.tensor(1.0) if set_alpha_to_one else self.alpha_bar[0]

    def step(self, model_output, t, x, generator=None) -> StepOutput:
        self._check_step_inputs(model_output, x)
        i = self._index_of(t)
        t = int(self.timesteps[i])
        # 1. previous timestep. diffusers (like the DDIM code) subtracts T // n, which is the
        #    next entry of .timesteps for "leading" spacing.
        t_prev = t - self.T // self.num_inference_steps

        # 2. alpha_bar_t, alpha_bar_prev
        alpha_bar_t = self.alpha_bar[t]
        alpha_bar_prev = self.alpha_bar[t_prev] if t_prev >= 0 else self.final_alpha_bar
        beta_prod_t = 1 - alpha_bar_t

        # 3. predicted x_0 and eps   ("predicted x_0" of DDIM eq. 12)
        x0_pred, eps_pred = self._predict(model_output, x, i)

        # 4. clip x0_pred (pixel models only)
        if self.clip_sample:
            x0_pred = x0_pred.clamp(-self.clip_sample_range, self.clip_sample_range)

        # 5. sigma_t(eta)   (DDIM eq. 16)
        variance = ((1 - alpha_bar_prev) / beta_prod_t) * (1 - alpha_bar_t / alpha_bar_prev)
        sigma_t = self.eta * variance ** (0.5)

        # 6. "direction pointing to x_t"   (DDIM eq. 12)
        direction = (1 - alpha_bar_prev - sigma_t**2) ** (0.5) * eps_pred

        # 7. x_prev without the random noise, then sigma_t z   (DDIM eq. 12)
        x_prev = alpha_bar_prev ** (0.5) * x0_pred + direction
        if self.eta > 0:
            z = randn(model_output.shape, generator=generator, device=model_output.device, dtype=model_output.dtype)
            x_prev = x_prev + sigma_t * z
        return StepOutput(x_prev, x0_pred)

    def inverse_step(self, model_output, t, x) -> StepOutput:
        """One step of DDIM inversion: the eta = 0 update run upwards, from the level below t to t.

        x lies at the level t_cur = t - T // n (alpha_bar = final_alpha_bar below the first
        timestep, x is then the image itself); model_output is the network's output for x at
        timestep t, the usual approximation eps(x_t_cur, t) ~ eps(x_t, t) that makes the step
        explicit (Song et al. 2021, sec. 4.3; Dhariwal & Nichol 2021, eq. 13):

            x0_pred, eps = read model_output with alpha_bar_t_cur
            x_t = sqrt(alpha_bar_t) x0_pred + sqrt(1 - alpha_bar_t) eps

        This is diffusers' DDIMInverseScheduler.step with the same config; t runs through
        reversed(.timesteps), smallest first (`ddim_invert`).
        """
        self._check_step_inputs(model_output, x)
        t = int(self.timesteps[self._index_of(t)])
        t_cur = t - self.T // self.num_inference_steps
        alpha_bar_t = self.alpha_bar[t]
        alpha_bar_cur = self.alpha_bar[t_cur] if t_cur >= 0 else self.final_alpha_bar
        x0_pred, eps_pred = x0_eps_from_output(
            model_output, x, alpha_bar_cur**0.5, (1 - alpha_bar_cur) ** 0.5, self.prediction_type
        )
        if self.clip_sample:
            x0_pred = x0_pred.clamp(-self.clip_sample_range, self.clip_sample_range)
        return StepOutput(alpha_bar_t**0.5 * x0_pred + (1 - alpha_bar_t) ** 0.5 * eps_pred, x0_pred)


@torch.no_grad()
def ddim_invert(model_fn: Callable, sampler: "DDIMSampler", x0: torch.Tensor, steps: int | None = None,
                callback: Callable | None = None) -> torch.Tensor:
    """DDIM inversion: the x_T from which deterministic DDIM sampling (eta = 0) redraws about x0.

    Runs `sampler.inverse_step` through the sampler's timesteps in reverse (smallest first),
    calling model_fn(x, t) once per step, and returns x at the largest timestep, on the scale
    of unit Gaussian noise (what `sample` takes). Sampling from it with the same sampler and
    steps retraces the path; the round trip is exact only in the limit of small steps, because
    each inverse step evaluates the network one level early. Editing: sample from the inverted
    noise with another condition (Mokady et al. 2023, "Null-text inversion", sec. 3;
    diffusers' DDIMInverseScheduler). callback(i, t, x, model_output, step_output) runs after every step.
    """
    if not isinstance(sampler, DDIMSampler):
        raise TypeError(f"ddim_invert needs a DDIMSampler (get_sampler('ddim', ...)), got {type(sampler).__name__}.")
    if sampler.eta != 0:
        raise ValueError(f"DDIM inversion runs the deterministic update: use a DDIM sampler with eta = 0, got eta = {sampler.eta}.")
    if steps is not None:
        sampler.set_timesteps(steps, device=x0.device)
    sampler._check_ready()
    x = x0
    for i, t in enumerate(sampler.timesteps.flip(0)):
        model_output = model_fn(x, t)
        out = sampler.inverse_step(model_output, t, x)
        if callback is not None:
            callback(i, t, x, model_output, out)
        x = out.prev_sample
    return x


# 3. PLMS -------------------------------------------------------------------------------


class PLMSSampler(Sampler):
    """Pseudo linear multistep (Liu et al. 2022): SD's original "PLMS" sampler."""

    name = "plms"
    diffusers_class = "PNDMScheduler"
    default_spacing = "leading"
    unsupported = {"skip_prk_steps": True, "eta": 0.0}
    inert = frozenset()

    def __init__(self, *, set_alpha_to_one: bool = False, **schedule):
        super().__init__(**schedule)
        self.set_alpha_to_one = set_alpha_to_one
        self.final_alpha_bar = torch.tensor(1.0) if set_alpha_to_one else self.alpha_bar[0]

    def to_diffusers_config(self) -> dict:
        return {**super().to_diffusers_config(), "skip_prk_steps": True}

    def _make_timesteps(self, n: int) -> np.ndarray:
        # The second timestep appears twice: the first step takes two model calls.
        t = _spaced_timesteps(n, self.T, self.timestep_spacing, self.steps_offset)
        return np.concatenate([t[:1], t[1:2], t[1:]]).astype(np.int64) if n > 1 else t

    def reset(self) -> None:
        super().reset()
        self.eps_history = []  # the last (up to 4) model outputs, newest last
        self.counter = 0  # model calls so far in this run
        self.first_x = None  # x_t of the first step, kept for its second stage

    def _transfer(self, x, t, t_prev, output) -> tuple:
        """phi(x_t, eps, t -> t_prev): the deterministic DDIM step   (PNDM eq. 9).

        `output` is the combined model output (eps, or v: read as v, then as eps). Returns (x_prev, x0_pred).
        """
        alpha_bar_t = self.alpha_bar[t]
        alpha_bar_prev = self.alpha_bar[t_prev] if t_prev >= 0 else self.final_alpha_bar
        beta_prod_t = 1 - alpha_bar_t
        beta_prod_prev = 1 - alpha_bar_prev
        # t is not always an entry of .timesteps here (the first step's second call), so alpha and sigma from t
        x0_pred, eps = x0_eps_from_output(output, x, alpha_bar_t**0.5, beta_prod_t**0.5, self.prediction_type)
        x_coeff = (alpha_bar_prev / alpha_bar_t) ** (0.5)
        eps_denominator = alpha_bar_t * beta_prod_prev ** (0.5) + (alpha_bar_t * beta_prod_t * alpha_bar_prev) ** (0.5)
        x_prev = x_coeff * x - (alpha_bar_prev - alpha_bar_t) * eps / eps_denominator
        return x_prev, x0_pred

    def step(self, model_output, t, x, generator=None) -> StepOutput:
        self._check_step_inputs(model_output, x)
        i = self._next_index(t)
        t = int(self.timesteps[i])
        delta = self.T // self.num_inference_steps
        t_prev = t - delta

        # 1. remember the model output (not on the first step's second call: that one is averaged)
        if self.counter != 1:
            self.eps_history = [*self.eps_history[-3:], model_output]
        else:  # second call of the first step: redo the step t + delta -> t
            t_prev, t = t, t + delta

        # 2. combine the history (Adams-Bashforth of growing order, PNDM eq. 12)
        h = self.eps_history
        if len(h) == 1 and self.counter == 0:  # first call: a plain step, kept as a predictor
            eps = model_output
            self.first_x = x
        elif len(h) == 1 and self.counter == 1:  # improved Euler: average the two slopes
            eps = (model_output + h[-1]) / 2
            x, self.first_x = self.first_x, None
        elif len(h) == 2:
            eps = (3 * h[-1] - h[-2]) / 2
        elif len(h) == 3:
            eps = (23 * h[-1] - 16 * h[-2] + 5 * h[-3]) / 12
        else:
            eps = (1 / 24) * (55 * h[-1] - 59 * h[-2] + 37 * h[-3] - 9 * h[-4])

        # 3. one deterministic DDIM step with the combined output (eps, or v turned into eps)   (PNDM eq. 9)
        x_prev, x0_pred = self._transfer(x, t, t_prev, eps)
        self.counter += 1
        self._step_index = i + 1
        return StepOutput(x_prev, x0_pred)


# 4.-5. Euler and Euler ancestral (k-diffusion) -----------------------------------------


class EulerSampler(Sampler):
    """Euler's method on the probability-flow ODE in sigma (Karras et al. 2022)."""

    name = "euler"
    diffusers_class = "EulerDiscreteScheduler"
    default_spacing = "linspace"
    unsupported = {
        "rescale_betas_zero_snr": False,
        "interpolation_type": "linear",
        "use_karras_sigmas": False,
        "use_exponential_sigmas": False,
        "use_beta_sigmas": False,
        "timestep_type": "discrete",
        "final_sigmas_type": "zero",
        "eta": 0.0,
    }
    inert = frozenset({"sigma_min", "sigma_max"})  # used only by the Karras/exponential/beta sigmas

    def _make_timesteps(self, n: int) -> np.ndarray:
        # Float timesteps: with "linspace" they fall between training timesteps (999/24 apart
        # for 25 steps); the network is simply called with fractional t.
        T = self.T
        if self.timestep_spacing == "linspace":
            return np.linspace(0, T - 1, n, dtype=np.float32)[::-1].copy()
        if self.timestep_spacing == "leading":
            return (np.arange(0, n) * (T // n)).round()[::-1].copy().astype(np.float32) + self.steps_offset
        return np.arange(T, 0, -T / n).round().copy().astype(np.float32) - 1

    def set_timesteps(self, num_inference_steps: int, device=None) -> None:
        super().set_timesteps(num_inference_steps, device)
        # sigma at each timestep, interpolated linearly between training timesteps, then 0
        train_sigmas = self.schedule.sigma.numpy()  # float32, as diffusers
        t = self.timesteps.cpu().numpy()
        sigmas = np.interp(t, np.arange(0, len(train_sigmas)), train_sigmas)
        self.sigmas = torch.from_numpy(np.concatenate([sigmas, [0.0]]).astype(np.float32))  # (n + 1,), CPU

    @property
    def init_noise_sigma(self) -> float:
        """x_T = x_0 + sigma_max eps, so unit noise is scaled by sigma_max (~14.6 for SD).

        With "leading" spacing diffusers uses sqrt(sigma_max^2 + 1) instead; we follow it.
        """
        self._check_ready()
        sigma_max = self.sigmas.max()
        if self.timestep_spacing in ("linspace", "trailing"):
            return sigma_max.item()
        return ((sigma_max**2 + 1) ** 0.5).item()

    def scale_model_input(self, x, t) -> torch.Tensor:
        """x / sqrt(sigma^2 + 1): back to the x_t = sqrt(alpha_bar) x0 + sqrt(1 - alpha_bar) eps the network knows."""
        sigma = self.sigmas[self._index_of(t)]
        return x / ((sigma**2 + 1) ** 0.5)

    def add_noise(self, x0, noise, t) -> torch.Tensor:
        """x = x0 + sigma_t noise (the variance-exploding scale); t must be in .timesteps."""
        self._check_ready()
        t = torch.as_tensor(t).reshape(-1)
        sigmas = self.sigmas.to(device=x0.device, dtype=x0.dtype)
        sigma = sigmas[[self._index_of(ti) for ti in t]].flatten()
        sigma = sigma.reshape(-1, *([1] * (x0.dim() - 1)))  # (B, 1, 1, 1)
        return x0 + noise * sigma

    def _alpha_sigma(self, i: int) -> tuple:
        """(alpha, sigma_vp) of the model input x_in = x / sqrt(sigma^2 + 1) = alpha x0 + sigma_vp eps."""
        return alpha_sigma_from_sigma(self.sigmas[i])

    def _predict_ve(self, model_output, x, i: int) -> Prediction:
        """(x0_pred, eps_pred) from Euler's own sample x = x0 + sigma eps (the variance-exploding view).

        alpha = 1, and the network saw x / sqrt(sigma^2 + 1), so norm2 = 1 + sigma^2:
            eps:  x0_pred = x - sigma eps                                 (k-diffusion's Denoiser)
            v:    x0_pred = x / (sigma^2 + 1) - sigma / sqrt(sigma^2 + 1) v   (k-diffusion's VDenoiser)
        """
        sigma = self.sigmas[i]
        return x0_eps_from_output(model_output, x, 1.0, sigma, self.prediction_type, norm2=sigma**2 + 1)

    def step(self, model_output, t, x, generator=None) -> StepOutput:
        self._check_step_inputs(model_output, x)
        i = self._next_index(t)
        x = x.to(torch.float32)  # the update runs in float32 even for a float16 model

        # 1. predicted x_0 at the current noise level sigma
        sigma = self.sigmas[i]
        x0_pred = self._predict_ve(model_output, x, i).x0

        # 2. the ODE's slope d = dx/dsigma = (x - x0_pred) / sigma, and one Euler step to sigma_next
        d = (x - x0_pred) / sigma
        dt = self.sigmas[i + 1] - sigma
        x_prev = x + d * dt

        self._step_index = i + 1
        return StepOutput(x_prev.to(model_output.dtype), x0_pred)


class EulerAncestralSampler(EulerSampler):
    """Euler steps that undershoot, then add fresh noise (k-diffusion's ancestral sampling)."""

    name = "euler_a"
    diffusers_class = "EulerAncestralDiscreteScheduler"
    unsupported = {"rescale_betas_zero_snr": False, "eta": 0.0}
    inert = frozenset()

    def step(self, model_output, t, x, generator=None) -> StepOutput:
        self._check_step_inputs(model_output, x)
        i = self._next_index(t)
        sigma = self.sigmas[i]
        x = x.to(torch.float32)

        # 1. predicted x_0
        x0_pred = self._predict_ve(model_output, x, i).x0

        # 2. split the way down to sigma_next into a deterministic part and fresh noise:
        #    sigma_down^2 + sigma_up^2 = sigma_next^2
        sigma_from, sigma_to = self.sigmas[i], self.sigmas[i + 1]
        sigma_up = (sigma_to**2 * (sigma_from**2 - sigma_to**2) / sigma_from**2) ** 0.5
        sigma_down = (sigma_to**2 - sigma_up**2) ** 0.5

        # 3. Euler step to sigma_down
        d = (x - x0_pred) / sigma
        dt = sigma_down - sigma
        x_prev = x + d * dt

        # 4. add noise of std sigma_up (drawn on every step, also the last where sigma_up = 0,
        #    so that the generator advances as in diffusers)
        z = randn(model_output.shape, generator=generator, device=model_output.device, dtype=model_output.dtype)
        x_prev = x_prev + z * sigma_up

        self._step_index = i + 1
        return StepOutput(x_prev.to(model_output.dtype), x0_pred)


# 6. DPM-Solver++(2M) -------------------------------------------------------------------


class DPMSolverPlusPlus2MSampler(Sampler):
    """DPM-Solver++ (Lu et al. 2022b), multistep, second order, data prediction."""

    name = "dpmpp_2m"
    diffusers_class = "DPMSolverMultistepScheduler"
    default_spacing = "linspace"
    unsupported = {
        **Sampler.unsupported,
        "solver_order": 2,
        "algorithm_type": "dpmsolver++",
        "solver_type": "midpoint",
        "euler_at_final": False,
        "use_karras_sigmas": False,
        "use_exponential_sigmas": False,
        "use_beta_sigmas": False,
        "use_lu_lambdas": False,
        "use_flow_sigmas": False,
        "final_sigmas_type": "zero",
        "lambda_min_clipped": -float("inf"),
        "use_dynamic_shifting": False,
    }
    # lower_order_final only matters for order 3 or a non-zero final sigma; variance_type only
    # for models that also output a variance (twice the channels, refused by the shape check);
    # the rest need an unsupported option to have any effect.
    inert = Sampler.inert | {"lower_order_final", "variance_type", "flow_shift", "time_shift_type", "sigma_min", "sigma_max"}

    def _make_timesteps(self, n: int) -> np.ndarray:
        # n + 1 points from T-1 down to 0; the last (t = 0, sigma -> 0) is where we arrive, not a model call.
        T = self.T
        if self.timestep_spacing == "linspace":
            return np.linspace(0, T - 1, n + 1).round()[::-1][:-1].copy().astype(np.int64)
        if self.timestep_spacing == "leading":
            ratio = T // (n + 1)
            return (np.arange(0, n + 1) * ratio).round()[::-1][:-1].copy().astype(np.int64) + self.steps_offset
        return np.arange(T, 0, -T / n).round().copy().astype(np.int64) - 1

    def set_timesteps(self, num_inference_steps: int, device=None) -> None:
        super().set_timesteps(num_inference_steps, device)
        train_sigmas = self.schedule.sigma.numpy()
        sigmas = np.interp(self.timesteps.cpu().numpy(), np.arange(0, len(train_sigmas)), train_sigmas)
        self.sigmas = torch.from_numpy(np.concatenate([sigmas, [0.0]]).astype(np.float32))  # (n + 1,)
        self.num_inference_steps = len(self.timesteps)

    def reset(self) -> None:
        super().reset()
        self.x0_history = [None, None]  # x0_pred of the previous and the current step
        self.lower_order_nums = 0  # steps taken so far, up to 2

    def _alpha_sigma(self, i: int) -> tuple:
        """(alpha_t, sigma_t) = (sqrt(alpha_bar), sqrt(1 - alpha_bar)) at the noise level sigmas[i]."""
        return alpha_sigma_from_sigma(self.sigmas[i])

    def add_noise(self, x0, noise, t) -> torch.Tensor:
        """alpha_t x0 + sigma_t noise, at the noise level of a timestep in .timesteps."""
        self._check_ready()
        t = torch.as_tensor(t).reshape(-1)
        sigmas = self.sigmas.to(device=x0.device, dtype=x0.dtype)
        sigma = sigmas[[self._index_of(ti) for ti in t]].flatten().reshape(-1, *([1] * (x0.dim() - 1)))
        alpha_t, sigma_t = alpha_sigma_from_sigma(sigma)
        return alpha_t * x0 + sigma_t * noise

    def _lambda(self, i: int) -> tuple:
        """alpha, sigma and lambda = log(alpha / sigma) at index i of the sigmas."""
        alpha, sigma = self._alpha_sigma(i)
        return alpha, sigma, torch.log(alpha) - torch.log(sigma)

    def step(self, model_output, t, x, generator=None) -> StepOutput:
        self._check_step_inputs(model_output, x)
        i = self._next_index(t)
        last = i == len(self.timesteps) - 1

        # 1. data prediction x0_pred (DPM-Solver++ works with x_0, not eps); x is the model input here
        x0_pred = self._predict(model_output, x, i).x0
        self.x0_history = [self.x0_history[-1], x0_pred]
        x = x.to(torch.float32)

        # 2. step size in lambda = log(alpha / sigma); at sigma = 0, lambda = inf and e^{-h} = 0
        alpha_t, sigma_t, lambda_t = self._lambda(i + 1)
        _, sigma_s0, lambda_s0 = self._lambda(i)
        h = lambda_t - lambda_s0

        if self.lower_order_nums < 1 or last:
            # 3a. first order (the first step, and the last one down to sigma = 0)
            x_prev = (sigma_t / sigma_s0) * x - (alpha_t * (torch.exp(-h) - 1.0)) * x0_pred
        else:
            # 3b. second order from the last two x0 predictions ("midpoint" variant)
            _, _, lambda_s1 = self._lambda(i - 1)
            m0, m1 = self.x0_history[-1], self.x0_history[-2]
            r0 = (lambda_s0 - lambda_s1) / h
            D0, D1 = m0, (1.0 / r0) * (m0 - m1)
            x_prev = (
                (sigma_t / sigma_s0) * x
                - (alpha_t * (torch.exp(-h) - 1.0)) * D0
                - 0.5 * (alpha_t * (torch.exp(-h) - 1.0)) * D1
            )

        self.lower_order_nums = min(self.lower_order_nums + 1, 2)
        self._step_index = i + 1
        return StepOutput(x_prev.to(model_output.dtype), x0_pred)


# 7. Flow matching: Euler on the straight path --------------------------------------------


class FlowEulerSampler(Sampler):
    """Euler's method on dx/ds = v for a flow-matching (velocity) model: SD3's and Flux's sampler.

    Not an alpha_bar sampler: no betas, no prediction_type (the model output is always the
    velocity v = noise - x0), so a config with either is refused (`scheduler_configs`).
    """

    name = "flow_euler"
    diffusers_class = "FlowMatchEulerDiscreteScheduler"
    is_flow = True
    unsupported = {
        "use_dynamic_shifting": False,  # Flux's resolution-dependent shift (needs mu at set_timesteps)
        "shift_terminal": None,
        "invert_sigmas": False,
        "use_karras_sigmas": False,
        "use_exponential_sigmas": False,
        "use_beta_sigmas": False,
        "stochastic_sampling": False,
    }
    inert = frozenset({"base_shift", "max_shift", "base_image_seq_len", "max_image_seq_len", "time_shift_type"})

    # No **schedule: none of Sampler's alpha_bar keys are this sampler's (config_keys stops here).
    def __init__(self, num_train_timesteps: int = 1000, shift: float = 1.0):
        if isinstance(num_train_timesteps, bool) or not isinstance(num_train_timesteps, int) or num_train_timesteps < 1:
            raise ValueError(f"num_train_timesteps must be a positive integer (1000 for SD3), got {num_train_timesteps!r}.")
        self.num_train_timesteps = num_train_timesteps
        self.shift = check_shift(shift)
        self.prediction_type = "flow_prediction"  # diffusers' name for a velocity model (not a config key here)
        # The training levels 1/T .. 1, largest first, shifted (eq. 5); float32, as diffusers computes them,
        # because set_timesteps starts from their ends.
        levels = torch.arange(num_train_timesteps, 0, -1, dtype=torch.float32) / num_train_timesteps
        self.train_sigmas = shift_levels(levels, self.shift)  # (T,)
        self.num_inference_steps = None
        self.timesteps = None
        self.reset()

    def __repr__(self) -> str:
        steps = f", steps={self.num_inference_steps}" if self.num_inference_steps else ""
        return f"{type(self).__name__}(shift={self.shift}, num_train_timesteps={self.T}{steps})"

    def set_timesteps(self, num_inference_steps: int, device=None) -> None:
        """n noise levels from 1 down to the smallest training level, shifted (eq. 5); timesteps = 1000 s.

        diffusers spaces the timesteps evenly between the *shifted* training levels' ends, T and
        T s'_min, and then shifts them again, so with shift != 1 the last level is shifted twice
        (about shift^2 / T rather than shift / T). sdlearn follows it.
        """
        n = self._check_num_steps(num_inference_steps)
        T = self.T
        sigma_max, sigma_min = self.train_sigmas[0].item(), self.train_sigmas[-1].item()
        levels = np.linspace(sigma_max * T, sigma_min * T, n) / T  # float64, as diffusers
        sigmas = torch.from_numpy(shift_levels(levels, self.shift)).to(dtype=torch.float32, device=device)
        self.timesteps = sigmas * T  # (n,) float: the model is called with t = 1000 s
        self.sigmas = torch.cat([sigmas, torch.zeros(1, device=sigmas.device)]).cpu()  # (n + 1,): ends at s = 0
        self.num_inference_steps = n
        self.reset()

    def add_noise(self, x0, noise, t) -> torch.Tensor:
        """x_s = (1 - s) x0 + s noise at the level s of each timestep t in .timesteps   (eq. 1)."""
        self._check_ready()
        t = torch.as_tensor(t).reshape(-1)
        s = self.sigmas.to(device=x0.device, dtype=x0.dtype)[[self._index_of(ti) for ti in t]]  # (B,)
        return flow_interpolate(x0, noise, s)

    def _alpha_sigma(self, i: int) -> tuple:
        """x_s = alpha x0 + sigma noise with alpha = 1 - s, sigma = s."""
        s = self.sigmas[i]
        return 1 - s, s

    def _predict(self, model_output, x_in, i: int) -> Prediction:
        """(x0_pred, noise_pred) from the velocity   (eq. 4 of `flow_matching`)."""
        return flow_predict(model_output, x_in, self.sigmas[i])

    def step(self, model_output, t, x, generator=None) -> StepOutput:
        """One Euler step down the path; deterministic (generator is accepted for the common API and unused)."""
        self._check_step_inputs(model_output, x)
        i = self._next_index(t)
        x = x.to(torch.float32)  # as diffusers: the update runs in float32

        # 1. the levels s and s_next (0 after the last step)
        s, s_next = self.sigmas[i], self.sigmas[i + 1]

        # 2. predicted x0 = x - s v   (eq. 4; for display, the step does not need it)
        x0_pred = self._predict(model_output, x, i).x0

        # 3. Euler step along dx/ds = v: x_next = x + (s_next - s) v
        x_prev = x + (s_next - s) * model_output

        self._step_index = i + 1
        return StepOutput(x_prev.to(model_output.dtype), x0_pred)


# Registry and the sampling loop ---------------------------------------------------------


# The six samplers of models that predict eps or v on an alpha_bar schedule (lesson 05, evaluate, the pipeline) ...
ALPHA_BAR_SAMPLERS = (DDPMSampler, DDIMSampler, PLMSSampler, EulerSampler, EulerAncestralSampler, DPMSolverPlusPlus2MSampler)
SAMPLER_NAMES = tuple(cls.name for cls in ALPHA_BAR_SAMPLERS)
# ... and those of flow-matching models, which predict the velocity v = noise - x0 (lesson 14).
FLOW_SAMPLER_NAMES = (FlowEulerSampler.name,)
SAMPLERS = {cls.name: cls for cls in (*ALPHA_BAR_SAMPLERS, FlowEulerSampler)}  # every sampler, by name


@torch.no_grad()
def sample(
    model_fn: Callable,
    sampler: Sampler,
    noise: torch.Tensor,
    steps: int | None = None,
    generator=None,
    callback: Callable | None = None,
    progress: bool = False,
) -> torch.Tensor:
    """Run the reverse process from unit Gaussian `noise` to x_0, and return x_0.

    model_fn(x_in, t) -> the network's output (eps or v). With `steps`, set_timesteps(steps)
    is called first. callback(i, t, x, model_output, step_output) runs after every step.
    """
    if steps is not None:
        sampler.set_timesteps(steps, device=noise.device)
    sampler._check_ready()
    sampler.reset()
    x = noise * sampler.init_noise_sigma  # x_T
    for i, t in enumerate(tqdm(sampler.timesteps, disable=not progress, desc=sampler.name)):
        x_in = sampler.scale_model_input(x, t)
        model_output = model_fn(x_in, t)
        out = sampler.step(model_output, t, x, generator=generator)
        if callback is not None:
            callback(i, t, x, model_output, out)
        x = out.prev_sample
    return x
