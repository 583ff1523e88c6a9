"""A pixel-space DDPM: Stable Diffusion's UNet, without text and without an autoencoder.

Before latent diffusion there was diffusion on pixels (Ho et al. 2020). The network
eps_theta(x_t, t) learns to name the noise in a noisy image; a sampler then turns pure
noise into an image, one reverse step at a time. This module holds what lessons 04-05 and
the recipe `sdlearn.recipes.ddpm` share: the model's configuration, the training loss,
loading the shipped model, and sampling.

Training objective (DDPM eq. 14, "L_simple"): for a clean image x_0 from the data,

    t ~ Uniform{0, ..., T-1},   eps ~ N(0, I)
    x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps                    (eq. 4)
    L   = || eps - eps_theta(x_t, t) ||^2                                      (eq. 14)

One reverse step (eq. 11, Algorithm 2), with z ~ N(0, I) (no noise on the last step):

    x_{t-1} = 1 / sqrt(alpha_t) * (x_t - beta_t / sqrt(1 - alpha_bar_t) * eps_theta(x_t, t)) + sigma_t z

which is what `sdlearn.samplers.DDPMSampler` computes in the equivalent "predict x_0, then
take the posterior mean" form (eqs. 6-7, 15), and what the other samplers replace with
bigger, cleverer steps.

What the shipped model predicts, and how its loss is weighted. eps is not the only target:
a network can as well predict v = sqrt(alpha_bar_t) eps - sqrt(1 - alpha_bar_t) x_0
(Salimans & Ho 2022; SD 2.x 768-v does), from which x_0 = sqrt(alpha_bar_t) x_t -
sqrt(1 - alpha_bar_t) v and eps follow (sdlearn.diffusion.schedules). The two objectives differ in how
much each timestep counts: an eps error e costs e / sqrt(SNR) in x_0, so L_simple spends much
of its effort on almost noise-free timesteps, where there is little left to learn. Min-SNR-
gamma weighting (Hang et al. 2023) caps each timestep's weight in x_0 terms at gamma:

    L = mean over the batch of  w(t) || v - v_theta(x_t, t) ||^2,     w(t) = min(SNR(t), 5) / (SNR(t) + 1)

(`DiffusionLoss`, `NoiseSchedule.min_snr_weight`). With the same network and training time,
v with Min-SNR-5 drew clean shapes about three times as often as L_simple on eps (the
measurements: data/ddpm-shapes/README.md, "Experiments"). The recipe uses v, Min-SNR-5 and a
learning rate of 2e-3; lesson 04 still has the learner write eq. 14 itself (the same model
class, the original objective).

Flow matching (SD3, Flux; lesson 14) trains the same network on another path and target:
x_s = (1 - s) x_0 + s noise with s in [0, 1], target v = noise - x_0, timestep 1000 s
(`FlowMatchingLoss`, `flow_training_batch`; the equations in sdlearn.diffusion.flow_matching),
sampled with `get_sampler("flow_euler")` instead of the six samplers of eps and v models.

The model is `sdlearn.unet.UNet`, the class that runs Stable Diffusion, at toy size
(`unet_config()`): 3 pixel channels in and out, 32x32 images, three levels of plain
ResNet blocks (DownBlock2D / UpBlock2D, no cross-attention). The UNet's middle block always
holds a Transformer2DModel (self-attention, then cross-attention to a text context); here
the context is one token of zeros (`null_context`), so cross-attention adds only a learned
constant, while self-attention at 8x8 lets the whole image agree on where the one shape is.

Telling the model what to draw (`unet_config(conditional=True)`, the shipped model). A
network that must invent colour, shape and size from noise spends its first steps deciding,
and an undertrained one often decides half-way: an orange-red "squircle". The shipped model
is told colour, shape and size as a condition vector y of 14 numbers, one one-hot block per
attribute (`condition_vector`), which a small MLP turns into a vector added to the timestep
embedding, so every ResNet block knows it (diffusers' class_embed_type="projection", the
same mechanism as its class-conditional models):

    emb = TimestepEmbedding(sinusoids(t)) + linear_2(SiLU(linear_1(y)))

During training each attribute is hidden (its block zeroed) with probability 0.1 and all of
them with probability 0.1 (the recipe's defaults), so the same network also draws with
nothing told (y = 0): it is the unconditional model as well, and classifier-free guidance
(lesson 09) can compare the two (`denoiser`). Position is left to the noise
(`condition_vector` says why). Telling helps: a told model draws clean shapes more often than
one told nothing, and more still with guidance (data/ddpm-shapes/README.md, "Experiments").

Schedule (`SCHEDULE`): Stable Diffusion's scaled_linear betas (0.00085 to 0.012, T = 1000)
rather than the DDPM paper's linear 1e-4 .. 0.02. With the linear schedule alpha_bar falls
below 0.01 for a third of the timesteps and reaches 4e-5 at T, so an error d in the predicted
noise becomes d / sqrt(alpha_bar_t), up to 157 d, in x0_pred = (x_t - sqrt(1 - alpha_bar_t)
eps) / sqrt(alpha_bar_t). The paper's 35M-parameter network trained for 800k steps is precise
enough; a 0.7M-parameter one trained for minutes on a CPU is not (we tried: it drew noise).
scaled_linear ends at alpha_bar_T = 0.0047 (at most 15 d) and spends more of its timesteps
at informative noise levels. The price: x_T keeps 7% of the image, which sampling from pure
noise ignores (Lin et al. 2023 analyse this flaw; SD lives with it too). The scheduler config
leaves clip_sample off: clipping DDIM's x0_pred to [-1, 1], where pixels live, sounds safe,
but it breaks the link between x0_pred and the noise the step keeps, and with a v-predicting
model it cost about a third of the clean shapes (data/ddpm-shapes/README.md, "Experiments").

Offset noise (Guttenberg 2023, "Diffusion with offset noise"). Every shapes image is mostly
white, so its mean brightness (the "DC" component) is nearly the same, +0.9, for every image,
and the sampler must create it from pure noise. But in eq. 14 the DC of eps is 1 of 3,072
numbers per image, and the UNet's GroupNorm layers remove means, so the loss barely teaches
it: we measured a model whose predicted noise kept the same mean whatever the mean of its
input, and whose samples stayed grey noise. The recipe therefore draws the training noise as
eps = z + 0.1 * u with z ~ N(0, I) and one u ~ N(0, 1) per image and channel (`offset_noise`),
which gives the DC of eps a real share of the loss. The loss is still eq. 14; only the
noise is not exactly white. Sampling starts from N(0, I) as usual. SD fine-tunes use the same
trick to let the model draw very dark and very bright images.

References: Ho et al. 2020, "Denoising Diffusion Probabilistic Models" (arXiv:2006.11239);
Lin et al. 2023, "Common Diffusion Noise Schedules and Sample Steps are Flawed" (arXiv:2305.08891);
Guttenberg 2023, "Diffusion with offset noise" (crosslabs.org/blog/diffusion-with-offset-noise);
Song et al. 2021, DDIM (arXiv:2010.02502); diffusers' DDPMPipeline and DDIMPipeline.
"""

import json
from collections.abc import Mapping
from numbers import Integral
from pathlib import Path

import torch
import torch.nn.functional as F

from sdlearn.datasets import COLOUR_NAMES, SHAPES, SIZES, data_path
from sdlearn.diffusion.flow_matching import flow_interpolate, flow_velocity, sample_flow_levels
from sdlearn.diffusion.guidance import classifier_free_guidance
from sdlearn.diffusion.samplers import SAMPLER_NAMES, Sampler
from sdlearn.diffusion.scheduler_configs import sampler_from_config
from sdlearn.models.noise import randn
from sdlearn.diffusion.samplers import sample as run_sampler
from sdlearn.diffusion.schedules import PREDICTION_TYPES, NoiseSchedule
from sdlearn.models.unet import UNet, UNetConfig

IMAGE_SIZE = 32
DEFAULT_FOLDER = "ddpm-shapes"  # under data/
MAKE_TARGET = "train-ddpm"
# The beta schedules the recipe offers: (beta_start, beta_end), T = 1000.
BETA_RANGES = {"linear": (0.0001, 0.02), "scaled_linear": (0.00085, 0.012),
               "squaredcos_cap_v2": (0.0001, 0.02)}  # cosine: the range is unused, diffusers' configs carry it anyway
MIN_SNR_GAMMA = 5.0  # the shipped model's loss weights (see the module docstring)
# What a conditional model can be told: colour, shape and size, as one block of one-hot entries each.
CONDITION_ATTRIBUTES = {"colour": COLOUR_NAMES, "shape": SHAPES, "size": SIZES}
CONDITION_DIM = sum(len(names) for names in CONDITION_ATTRIBUTES.values())  # 8 + 4 + 2 = 14


def schedule_config(beta_schedule: str = "scaled_linear", prediction_type: str = "v_prediction") -> dict:
    """A diffusers scheduler config (DDPMScheduler), written to <model>/scheduler/scheduler_config.json."""
    if beta_schedule not in BETA_RANGES:
        raise ValueError(f"beta_schedule must be one of {list(BETA_RANGES)}, got {beta_schedule!r}.")
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"prediction_type must be one of {list(PREDICTION_TYPES)}, got {prediction_type!r}.")
    beta_start, beta_end = BETA_RANGES[beta_schedule]
    return {
        "_class_name": "DDPMScheduler",
        "num_train_timesteps": 1000,
        "beta_start": beta_start,
        "beta_end": beta_end,
        "beta_schedule": beta_schedule,
        "prediction_type": prediction_type,
        "clip_sample": False,
        "clip_sample_range": 1.0,
        "variance_type": "fixed_small",
        "timestep_spacing": "trailing",  # the first step starts at t = T - 1, the noisiest (Lin et al. 2023)
        "steps_offset": 0,
        "set_alpha_to_one": True,  # DDIM's and PLMS's last step lands on a clean image
    }


SCHEDULE = schedule_config("scaled_linear")  # the shipped model's (see the module docstring)

__all__ = [
    "IMAGE_SIZE", "SCHEDULE", "BETA_RANGES", "PREDICTION_TYPES", "MIN_SNR_GAMMA", "CONDITION_ATTRIBUTES", "CONDITION_DIM",
    "schedule_config", "SAMPLER_NAMES", "unet_config", "is_conditional", "schedule", "null_context", "attribute_labels",
    "condition_vector", "timestep_probabilities", "ddpm_loss", "DiffusionLoss", "training_batch",
    "flow_training_batch", "FlowMatchingLoss", "load_ddpm",
    "recommended_guidance", "make_sampler", "denoiser", "sample",
]


def unet_config(conditional: bool = False, **overrides) -> UNetConfig:
    """The small pixel-space UNet: 3 channels, 32x32, block_out_channels (16, 32, 64), no cross-attention blocks.

    conditional=True adds the attribute embedding of the shipped model: a condition vector of
    CONDITION_DIM numbers (`condition_vector`) through a small MLP, added to the timestep
    embedding (diffusers' class_embed_type="projection").
    """
    values = dict(
        sample_size=IMAGE_SIZE,
        in_channels=3,
        out_channels=3,
        block_out_channels=(16, 32, 64),
        down_block_types=("DownBlock2D", "DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D", "UpBlock2D"),
        layers_per_block=1,
        attention_head_dim=4,  # the middle block's self-attention: 4 heads of 16
        cross_attention_dim=16,  # the width of the (all-zero) context token
        norm_num_groups=8,
    )
    if conditional:
        values.update(class_embed_type="projection", projection_class_embeddings_input_dim=CONDITION_DIM)
    return UNetConfig(**{**values, **overrides})


def is_conditional(unet: UNet) -> bool:
    """Whether `unet` takes a condition vector (an attribute-conditional DDPM such as the shipped one)."""
    return unet.config.class_embed_type == "projection"


def schedule(config: dict | None = None) -> NoiseSchedule:
    """The NoiseSchedule of a scheduler config (SCHEDULE by default)."""
    c = SCHEDULE if config is None else config
    return NoiseSchedule(c["num_train_timesteps"], c["beta_start"], c["beta_end"], c["beta_schedule"])


def null_context(unet: UNet, batch: int, device=None, dtype=None) -> torch.Tensor:
    """The context of an unconditional model: one token of zeros per image, (B, 1, cross_attention_dim)."""
    return torch.zeros(batch, 1, unet.config.cross_attention_dim, device=device, dtype=dtype)


# Conditioning ---------------------------------------------------------------------------------


def _attribute_label(head: str, value) -> int:
    """The index of one asked attribute value (a name or an index), -1 for None (not asked)."""
    names = CONDITION_ATTRIBUTES[head]
    if value is None:
        return -1
    if isinstance(value, str) and value in names:
        return names.index(value)
    if not isinstance(value, (str, bool)) and isinstance(value, Integral) and 0 <= value < len(names):
        return int(value)
    raise ValueError(f"Unknown {head} {value!r}: expected one of {', '.join(names)} (or its index), or None for any {head}.")


def attribute_labels(attributes, n: int) -> torch.Tensor:
    """(n, 3) integer labels colour, shape, size (indices into CONDITION_ATTRIBUTES), -1 where nothing is asked.

    attributes: None (nothing asked), one mapping for all n images, or a sequence of n
    mappings (None for an image asks nothing of it); a mapping names some of colour, shape,
    size by name ("red") or index, and None or a missing key leaves that attribute free. Position cannot be asked for (see
    `condition_vector`); a "position" key is refused rather than silently ignored.
    """
    if attributes is None:
        return torch.full((n, len(CONDITION_ATTRIBUTES)), -1, dtype=torch.long)
    if isinstance(attributes, Mapping):
        attributes = [attributes] * n
    attributes = list(attributes)
    if len(attributes) != n:
        raise ValueError(f"Got {len(attributes)} attribute mappings for {n} images; give one mapping, or one per image.")
    rows = []
    for wanted in attributes:
        wanted = {} if wanted is None else wanted
        if not isinstance(wanted, Mapping):
            raise TypeError(f"Each entry of attributes must be a mapping like {{'colour': 'red'}} or None, got {type(wanted).__name__}.")
        unknown = sorted(set(wanted) - set(CONDITION_ATTRIBUTES))
        if unknown:
            raise ValueError(
                f"This DDPM can be told {', '.join(CONDITION_ATTRIBUTES)}, not {unknown}. "
                "Position is left to the noise (see sdlearn.ddpm.condition_vector)."
            )
        rows.append([_attribute_label(head, wanted.get(head)) for head in CONDITION_ATTRIBUTES])
    return torch.tensor(rows, dtype=torch.long)


def condition_vector(labels: torch.Tensor) -> torch.Tensor:
    """(B, CONDITION_DIM) float: one one-hot block per attribute, zeros where a label is -1 (not asked).

    labels: (B, 3) integers colour, shape, size (a dataset's (B, 4) labels work too: the
    fourth column, position, is not used). All zeros is the unconditional input.

    Why not position? The condition is added to the timestep embedding, so it reaches each
    ResNet block as one number per channel, the same at every pixel. Colour, shape and size
    are such global facts; "top left" is not, and a convolutional network, which treats
    every pixel alike, can only act on it through the image borders. A model told all four
    attributes drew the asked position no better than chance (data/ddpm-shapes/README.md,
    "Experiments"), so the shipped model is told three and the noise picks the place.
    (SD's cross-attention has the same blind spot; lesson 09's model learns positions from
    its latent's borders at 8x8, which is easier than at 32x32.)
    """
    labels = torch.as_tensor(labels)
    if labels.ndim != 2 or labels.shape[1] < len(CONDITION_ATTRIBUTES) or labels.is_floating_point():
        raise ValueError(f"labels must be integers of shape (B, 3) (colour, shape, size), got {labels.dtype} {tuple(labels.shape)}.")
    blocks = []
    for j, names in enumerate(CONDITION_ATTRIBUTES.values()):
        column = labels[:, j]
        asked = column >= 0
        blocks.append(F.one_hot(column.clamp(min=0), len(names)).float() * asked[:, None])  # (B, len(names))
    return torch.cat(blocks, dim=1)


# Training -------------------------------------------------------------------------------------


def timestep_probabilities(noise_schedule: NoiseSchedule, prediction_type: str = "v_prediction",
                           min_snr_gamma: float | None = MIN_SNR_GAMMA) -> torch.Tensor:
    """p(t) proportional to the Min-SNR loss weight w(t): where to spend training samples (T,).

    Drawing t uniformly and multiplying each error by w(t) spends most samples on timesteps
    whose w(t) is small (w = 0.005 at t = 999 for SD's schedule and v-prediction, 0.83 at
    its peak near t = 150). Drawing t with probability p(t) and weighting by w(t) / (T p(t))
    has the same expected loss (importance sampling); with p proportional to w that weight is
    the same for every t, so every sample counts fully. Without min_snr_gamma: uniform.
    """
    t = torch.arange(noise_schedule.T)
    if min_snr_gamma is None:
        return torch.full((noise_schedule.T,), 1.0 / noise_schedule.T, dtype=torch.float64)
    w = noise_schedule.min_snr_weight(t, prediction_type, min_snr_gamma).double()
    return w / w.sum()


def training_batch(x0: torch.Tensor, T: int, generator=None, offset_noise: float = 0.0,
                   timestep_probabilities: torch.Tensor | None = None) -> tuple:
    """(x0, t, eps) for a batch of clean images: t ~ U{0..T-1}, eps ~ N(0, I) (Algorithm 1, lines 2-4).

    offset_noise > 0 adds offset_noise * N(0, 1) per image and channel to eps (a random
    brightness shift of the noise; see the module docstring). timestep_probabilities (T,)
    draws t from that distribution instead of uniformly (give the same to DiffusionLoss).
    """
    if timestep_probabilities is None:
        t = torch.randint(0, T, (x0.shape[0],), generator=generator)
    else:
        if timestep_probabilities.shape != (T,):
            raise ValueError(f"timestep_probabilities must have shape ({T},), got {tuple(timestep_probabilities.shape)}.")
        t = torch.multinomial(timestep_probabilities.float(), x0.shape[0], replacement=True, generator=generator)
    eps = torch.randn(x0.shape, generator=generator)
    if offset_noise:
        eps = eps + offset_noise * torch.randn(x0.shape[0], x0.shape[1], 1, 1, generator=generator)  # (B, C, 1, 1)
    return x0, t, eps


def ddpm_loss(unet: UNet, x_t: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """DDPM eq. 14: the mean squared error between the true noise and the predicted noise."""
    eps_pred = unet(x_t, t, null_context(unet, x_t.shape[0], x_t.device, x_t.dtype))
    return F.mse_loss(eps_pred, eps)


class DiffusionLoss:
    """train()'s loss_fn for a denoiser: noise x_0 to x_t (eq. 4), predict eps or v, weighted MSE.

        x_t    = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps                   (DDPM eq. 4)
        target = eps, or v = sqrt(alpha_bar_t) eps - sqrt(1 - alpha_bar_t) x_0      (prediction_type)
        L      = mean over the batch of w(t) * mean over pixels (target - UNet(x_t, t, c))^2

    w(t) = 1 gives DDPM's L_simple (eq. 14) for eps; min_snr_gamma gives the Min-SNR-gamma
    weights (NoiseSchedule.min_snr_weight). When the batch's t were drawn from
    timestep_probabilities p instead of uniformly, pass the same p: the weight becomes
    w(t) / (T p(t)), which keeps the expected loss unchanged (`timestep_probabilities`).
    A batch is (x0, t, eps), (x0, t, eps, context) for a text-conditional model, or
    (x0, t, eps, context, class_labels) with context None for an attribute-conditional one;
    without a context the model gets null_context.
    """

    def __init__(self, noise_schedule: NoiseSchedule, prediction_type: str = "epsilon", min_snr_gamma: float | None = None,
                 timestep_probabilities: torch.Tensor | None = None):
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"prediction_type must be one of {list(PREDICTION_TYPES)}, got {prediction_type!r}.")
        self.schedule, self.prediction_type, self.min_snr_gamma = noise_schedule, prediction_type, min_snr_gamma
        self.timestep_probabilities = timestep_probabilities

    def weights(self, t: torch.Tensor) -> torch.Tensor | None:
        """The loss weight of each timestep in t (B,), or None for unweighted uniform training."""
        w = None if self.min_snr_gamma is None else self.schedule.min_snr_weight(t.cpu(), self.prediction_type, self.min_snr_gamma).to(t.device)
        if self.timestep_probabilities is None:
            return w
        correction = 1.0 / (self.schedule.T * self.timestep_probabilities[t.cpu()].to(t.device))  # importance weight
        return correction.float() if w is None else (w * correction).float()

    def per_image(self, unet: UNet, batch) -> torch.Tensor:
        """w(t_i) * mean over pixels (target_i - UNet(x_t, t, c)_i)^2 for each image i: shape (B,)."""
        x0, t, eps, *rest = batch
        context = rest[0] if rest and rest[0] is not None else null_context(unet, x0.shape[0], x0.device, x0.dtype)
        class_labels = rest[1] if len(rest) > 1 else None
        x_t = self.schedule.q_sample(x0, t, eps)
        target = eps if self.prediction_type == "epsilon" else self.schedule.v_target(x0, eps, t)
        error = (unet(x_t, t, context, class_labels=class_labels) - target).pow(2).flatten(1).mean(dim=1)  # (B,)
        weight = self.weights(t)
        return error if weight is None else weight.to(error) * error

    def __call__(self, unet: UNet, batch) -> torch.Tensor:
        return self.per_image(unet, batch).mean()

    def __repr__(self) -> str:
        importance = "" if self.timestep_probabilities is None else ", timestep_probabilities=..."
        return f"DiffusionLoss(prediction_type={self.prediction_type!r}, min_snr_gamma={self.min_snr_gamma}{importance})"


def flow_training_batch(x0: torch.Tensor, generator=None, sampling: str = "uniform", logit_mean: float = 0.0,
                        logit_std: float = 1.0) -> tuple:
    """(x0, s, noise) for FlowMatchingLoss: one level s in (0, 1) per image, noise ~ N(0, I).

    sampling="uniform" draws s ~ U(0, 1); "logit_normal" draws SD3's s = sigmoid(N(logit_mean, logit_std^2)),
    which spends more samples on the middle levels (sdlearn.diffusion.flow_matching).
    """
    s = sample_flow_levels(x0.shape[0], sampling, logit_mean, logit_std, generator=generator)  # (B,)
    noise = torch.randn(x0.shape, generator=generator)
    return x0, s.to(x0.device), noise.to(x0.device)


class FlowMatchingLoss:
    """train()'s loss_fn for a flow-matching (rectified flow) model, as SD3 and Flux train:

        x_s    = (1 - s) x_0 + s noise                  (the straight path; flow_matching eq. 1)
        target = v = noise - x_0                        (its velocity, eq. 2)
        L      = mean over the batch and pixels of (v - UNet(x_s, T s, c))^2      (eq. 3)

    A batch is (x0, s, noise) with one level s in [0, 1] per image (`flow_training_batch`
    draws them, uniform or logit-normal), then an optional context and class labels as for
    DiffusionLoss. The network is called with the timestep t = T s (T = num_train_timesteps,
    1000), a float, as diffusers' SD3 pipeline does; `get_sampler("flow_euler")` samples it.
    """

    def __init__(self, num_train_timesteps: int = 1000):
        self.num_train_timesteps = num_train_timesteps

    def per_image(self, unet: UNet, batch) -> torch.Tensor:
        """mean over pixels (v_i - UNet(x_s, T s, c)_i)^2 for each image i: shape (B,)."""
        x0, s, noise, *rest = batch
        if s.shape != (x0.shape[0],) or not s.is_floating_point():
            raise ValueError(
                f"FlowMatchingLoss takes one float level s in [0, 1] per image, shape ({x0.shape[0]},); got "
                f"{s.dtype} {tuple(s.shape)}. (DiffusionLoss takes integer timesteps; flow_training_batch makes s.)"
            )
        context = rest[0] if rest and rest[0] is not None else null_context(unet, x0.shape[0], x0.device, x0.dtype)
        class_labels = rest[1] if len(rest) > 1 else None
        x_s = flow_interpolate(x0, noise, s)  # (B, C, H, W)
        target = flow_velocity(x0, noise)
        v_pred = unet(x_s, s * self.num_train_timesteps, context, class_labels=class_labels)
        return (v_pred - target).pow(2).flatten(1).mean(dim=1)  # (B,)

    def __call__(self, unet: UNet, batch) -> torch.Tensor:
        return self.per_image(unet, batch).mean()

    def __repr__(self) -> str:
        return f"FlowMatchingLoss(num_train_timesteps={self.num_train_timesteps})"


# Loading and sampling -------------------------------------------------------------------------


def load_ddpm(folder=None, device=None) -> tuple:
    """(unet, scheduler config dict) of a trained model folder (data/ddpm-shapes by default)."""
    folder = data_path(DEFAULT_FOLDER, MAKE_TARGET) if folder is None else Path(folder)
    unet_folder, config_file = folder / "unet", folder / "scheduler" / "scheduler_config.json"
    if not (unet_folder / "config.json").is_file() or not config_file.is_file():
        raise FileNotFoundError(
            f"No trained DDPM in {folder}: expected unet/ and scheduler/scheduler_config.json. "
            f"Train one with `make {MAKE_TARGET}` (python -m sdlearn.recipes.ddpm --out {folder})."
        )
    unet = UNet.from_pretrained(unet_folder, device=device).eval()
    return unet, json.loads(config_file.read_text())


def recommended_guidance(folder=None, default: float = 1.0) -> float:
    """The guidance scale a trained model folder's training.json records (its recipe measures it), else `default`.

    folder: data/ddpm-shapes when None; any folder a recipe wrote works (data/mini-sd records one too).
    default: for a folder without that record; 1 means no guidance (text-to-image callers pass 4,
    sdlearn.evaluate.TEXT_TO_IMAGE_GUIDANCE). The one definition: sdlearn.evaluate re-exports it.
    """
    folder = data_path(DEFAULT_FOLDER, MAKE_TARGET) if folder is None else Path(folder)
    record = folder / "training.json"
    if not record.is_file():
        return default
    return float(json.loads(record.read_text()).get("guidance_scale", default))


def make_sampler(name: str, schedule_config: dict | None = None) -> Sampler:
    """A sampler by name (ddpm, ddim, plms, euler, euler_a, dpmpp_2m) on the model's schedule."""
    return sampler_from_config(dict(SCHEDULE if schedule_config is None else schedule_config), name)


def denoiser(unet: UNet, n: int, attributes=None, guidance_scale: float = 1.0):
    """model_fn(x, t) -> the network's output for a batch of n images: what a sampler calls.

    Unconditional models get null_context. A conditional model is told `attributes`
    (`attribute_labels`: None asks for nothing, which is its unconditional mode); with
    guidance_scale != 1 it is guided (classifier-free guidance, Ho & Salimans 2022; lesson 09;
    sdlearn.diffusion.guidance):

        out = out(nothing asked) + guidance_scale * (out(attributes) - out(nothing asked))
    """
    device, dtype = next(unet.parameters()).device, next(unet.parameters()).dtype
    if not is_conditional(unet):
        if attributes is not None or guidance_scale != 1.0:
            raise ValueError("This DDPM is unconditional: it takes no attributes and no guidance_scale. "
                             "The shipped data/ddpm-shapes model is conditional (load_ddpm()).")
        context = null_context(unet, n, device, dtype)

        def unconditional(x, t):
            return unet(x, t, context)

        return unconditional

    y = condition_vector(attribute_labels(attributes, n)).to(device, dtype)  # (n, CONDITION_DIM)
    if guidance_scale == 1.0:
        context = null_context(unet, n, device, dtype)

        def conditional(x, t):
            return unet(x, t, context, class_labels=y)

        return conditional
    if not y.any():
        raise ValueError("guidance_scale needs attributes to guide towards, e.g. {'colour': 'red'}; without them use 1.")
    context, both = null_context(unet, 2 * n, device, dtype), torch.cat([torch.zeros_like(y), y])  # (2n, CONDITION_DIM)

    def guided(x, t):
        out_free, out_asked = unet(torch.cat([x, x]), t, context, class_labels=both).chunk(2)  # (n, C, H, W) each
        return classifier_free_guidance(out_free, out_asked, guidance_scale)

    return guided


@torch.no_grad()
def sample(
    unet: UNet,
    sampler="ddim",
    n: int = 16,
    seed: int = 0,
    steps: int = 50,
    size: int | None = None,
    callback=None,
    schedule_config: dict | None = None,
    noise: torch.Tensor | None = None,
    progress: bool = False,
    attributes=None,
    guidance_scale: float = 1.0,
) -> torch.Tensor:
    """n images (n, 3, size, size) in [-1, 1] from pure noise: the reverse process with `sampler`.

    sampler: a name or a Sampler. seed fixes both the initial noise x_T and the noise of
    stochastic samplers (or pass `noise`, unit Gaussian (n, 3, size, size), to start from a
    given x_T). callback(i, t, x, model_output, step_output) runs after every step.
    attributes and guidance_scale tell a conditional model what to draw (`denoiser`).
    """
    if isinstance(sampler, str):
        sampler = make_sampler(sampler, schedule_config)
    size = size or unet.config.sample_size or IMAGE_SIZE
    device = next(unet.parameters()).device
    dtype = next(unet.parameters()).dtype
    generator = torch.Generator().manual_seed(seed)
    if noise is None:
        noise = randn((n, unet.config.in_channels, size, size), generator=generator, device=device, dtype=dtype)
    elif noise.shape != (n, unet.config.in_channels, size, size):
        raise ValueError(f"noise must have shape {(n, unet.config.in_channels, size, size)}, got {tuple(noise.shape)}.")
    model_fn = denoiser(unet, n, attributes, guidance_scale)
    x0 = run_sampler(model_fn, sampler, noise, steps=steps, generator=generator, callback=callback, progress=progress)
    return x0.clamp(-1.0, 1.0)
