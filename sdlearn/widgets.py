"""Interactive widgets for the lessons: sliders over frames computed in advance.

Every widget here is built in two layers:

1. A pure function computes all the frames up front, as tensors (no widgets involved), so
   it can be tested, reused for static figures, and run without a browser.
2. A factory wraps the frames in ipywidgets and returns the widget *and its parts* (slider,
   images, label) in a small dataclass that displays as the widget. Its callbacks only
   index the precomputed PNGs: moving a slider never recomputes anything.

Tests (and curious learners) drive a widget by setting its slider's `.value` and reading
what the image and label show.

Widgets:

- noise_frames / noise_explorer (lesson 03): x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps
  for one image over the timesteps, beside a plot of alpha_bar_t and SNR(t) with a marker at t.
- record_sampling / denoising_stepper (lessons 04, 05): replay a finished sampling run, step
  by step: x_t, the predicted x_0 and the predicted noise at every step, with a play button.
"""

import io
import math
from dataclasses import dataclass, field

import ipywidgets as widgets
import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image, ImageDraw

from sdlearn.plotting import STYLE, image_grid, to_tensor
from sdlearn.samplers import Sampler, sample
from sdlearn.schedules import NoiseSchedule

# Shared helpers: tensors -> PNG bytes --------------------------------------------------


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="png", compress_level=1)  # fast; the bytes stay in the kernel
    return buffer.getvalue()


def _as_rgb(x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, 1 or 3, H, W): latents with 4 channels show their first three as RGB."""
    if x.shape[1] in (1, 3):
        return x
    return x[:, :3] if x.shape[1] > 3 else x[:, :1]


def _resize(image: Image.Image, size: int) -> Image.Image:
    """Scale to size x size: blocky pixels when enlarging (so 64 x 64 images stay crisp)."""
    if image.size == (size, size):
        return image
    enlarging = size >= max(image.size)
    return image.resize((size, size), Image.Resampling.NEAREST if enlarging else Image.Resampling.LANCZOS)


def _to_uint8(images: torch.Tensor, value_range) -> np.ndarray:
    """(..., C, H, W) tensor -> (..., H, W, C) uint8, value_range mapped to 0..255 (as plotting.to_pil).

    Done once for a whole stack of frames, in numpy: many small torch calls are slow on a busy CPU.
    """
    x = images.detach().cpu().double().numpy()
    if not np.isfinite(x).all():
        raise ValueError("The frames have NaN or infinite values; a model or sampler upstream has diverged.")
    low, high = value_range
    pixels = (np.clip((x - low) / (high - low), 0, 1) * 255).round().astype(np.uint8)
    return np.moveaxis(pixels, -3, -1)


def _panel(pixels: np.ndarray, size: int) -> Image.Image:
    """(B, H, W, C) uint8 -> the images in a row, each size x size."""
    pils = [Image.fromarray(p[..., 0] if p.shape[-1] == 1 else p) for p in pixels]
    return image_grid([_resize(im, size) for im in pils], ncols=len(pils))


def tensor_panels(frames: torch.Tensor, size: int = 128, value_range=(-1.0, 1.0), max_images: int = 4) -> list:
    """(N, B, C, H, W) frames -> N PIL panels, each up to max_images in a row, size x size pixels apiece."""
    pixels = _to_uint8(_as_rgb(frames[:, :max_images].flatten(0, 1)), value_range)
    pixels = pixels.reshape(frames.shape[0], -1, *pixels.shape[1:])  # (N, B, H, W, C)
    return [_panel(p, size) for p in pixels]


def _image_from(image) -> torch.Tensor:
    """A PIL image, (C, H, W) or (1, C, H, W) tensor in [-1, 1] -> (1, C, H, W) float tensor."""
    if isinstance(image, Image.Image):
        image = to_tensor(image)
    if not isinstance(image, torch.Tensor):
        raise TypeError(f"Expected a PIL image or a tensor in [-1, 1], got {type(image).__name__}.")
    if image.dim() == 3:
        image = image[None]
    if image.dim() != 4 or image.shape[0] != 1:
        raise ValueError(f"Expected one image, (C, H, W) or (1, C, H, W), got shape {tuple(image.shape)}.")
    return image.float()


# 1. Noise-level explorer ---------------------------------------------------------------


@dataclass
class NoiseFrames:
    """One image noised to each of a list of timesteps, with the same eps throughout."""

    timesteps: list  # N ints
    x_t: torch.Tensor  # (N, C, H, W)
    alpha_bar: torch.Tensor  # (N,)
    snr: torch.Tensor  # (N,)
    x0: torch.Tensor  # (1, C, H, W)
    eps: torch.Tensor  # (1, C, H, W)


def default_timesteps(T: int, frames: int = 50) -> list:
    """0, T/frames, 2T/frames, ... and the last timestep T - 1."""
    return sorted(set(range(0, T, max(1, T // frames))) | {T - 1})


def noise_frames(image, schedule: NoiseSchedule | None = None, timesteps=None, seed: int = 0) -> NoiseFrames:
    """x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps for each t (DDPM eq. 4).

    One eps (from `seed`) serves every t, so that moving t fades the same noise in and out.
    The schedule defaults to Stable Diffusion's; timesteps to about 50 spread over 0..T-1.
    """
    schedule = schedule or NoiseSchedule.sd()
    x0 = _image_from(image)  # (1, C, H, W)
    timesteps = [int(t) for t in (timesteps if timesteps is not None else default_timesteps(schedule.T))]
    if not timesteps:
        raise ValueError("timesteps is empty: give at least one timestep in 0..T-1.")
    eps = torch.randn(x0.shape, generator=torch.Generator().manual_seed(seed))
    t = torch.tensor(timesteps)
    n = len(timesteps)
    x_t = schedule.q_sample(x0.expand(n, -1, -1, -1), t, eps.expand(n, -1, -1, -1))  # (N, C, H, W)
    return NoiseFrames(timesteps, x_t, schedule.alpha_bar[t], schedule.snr(t), x0, eps)


def _schedule_plot(schedule: NoiseSchedule, frames: NoiseFrames, figsize=(4.4, 2.6)):
    """Render alpha_bar_t and SNR(t) once; return the RGBA pixels and each frame's marker positions."""
    fig = Figure(figsize=figsize, dpi=STYLE["figure.dpi"], facecolor="white")
    canvas = FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    t_all = np.arange(schedule.T)
    ax.plot(t_all, schedule.alpha_bar.numpy(), color="tab:blue")
    ax.set_xlabel("timestep t", fontsize=8)
    ax.set_ylabel(r"$\bar\alpha_t$ (signal$^2$)", color="tab:blue", fontsize=8)
    ax.set_ylim(-0.03, 1.03)
    ax.tick_params(labelsize=7)
    ax.grid(alpha=0.3)
    ax_snr = ax.twinx()
    ax_snr.semilogy(t_all, schedule.snr().numpy(), color="tab:red")
    ax_snr.set_ylabel("SNR (log scale)", color="tab:red", fontsize=8)
    ax_snr.tick_params(labelsize=7)
    fig.tight_layout()
    canvas.draw()
    pixels = np.asarray(canvas.buffer_rgba()).copy()  # (H, W, 4)
    height = pixels.shape[0]
    # display coordinates are measured from the bottom; image rows from the top
    top, bottom = height - ax.bbox.y1, height - ax.bbox.y0
    markers = []
    for t, alpha_bar, snr in zip(frames.timesteps, frames.alpha_bar.tolist(), frames.snr.tolist()):
        x_px, y_ab = ax.transData.transform((t, alpha_bar))
        _, y_snr = ax_snr.transData.transform((t, snr))
        markers.append((x_px, height - y_ab, height - y_snr))
    return pixels, markers, (top, bottom)


def _marked_plot(pixels: np.ndarray, marker, span) -> Image.Image:
    image = Image.fromarray(pixels).convert("RGB")
    draw = ImageDraw.Draw(image)
    x, y_ab, y_snr = marker
    draw.line([(x, span[0]), (x, span[1])], fill=(90, 90, 90), width=1)
    for y, colour in ((y_ab, (31, 119, 180)), (y_snr, (214, 39, 40))):
        draw.ellipse([x - 4, y - 4, x + 4, y + 4], fill=colour, outline="black")
    return image


def _noise_label(t: int, alpha_bar: float, snr: float) -> str:
    db = 10 * math.log10(snr)
    return (
        f"<b>t = {t}</b> &nbsp; &alpha;&#772;<sub>t</sub> = {alpha_bar:.4f} &nbsp; "
        f"signal &radic;&alpha;&#772;<sub>t</sub> = {alpha_bar ** 0.5:.3f} &nbsp; "
        f"noise &radic;(1&minus;&alpha;&#772;<sub>t</sub>) = {(1 - alpha_bar) ** 0.5:.3f} &nbsp; "
        f"SNR = {snr:.3g} ({db:+.1f} dB)"
    )


@dataclass
class NoiseExplorer:
    """The noise-level explorer and its parts. Displays as `widget`; set `slider.value = t`."""

    widget: widgets.VBox
    slider: widgets.SelectionSlider
    image: widgets.Image
    plot: widgets.Image
    label: widgets.HTML
    frames: NoiseFrames
    image_pngs: list = field(repr=False)
    plot_pngs: list = field(repr=False)
    labels: list = field(repr=False)

    def _on_change(self, change) -> None:
        k = self.frames.timesteps.index(change["new"])
        self.image.value = self.image_pngs[k]
        self.plot.value = self.plot_pngs[k]
        self.label.value = self.labels[k]

    def _repr_mimebundle_(self, **kwargs):
        return self.widget._repr_mimebundle_(**kwargs)


def noise_explorer(
    image,
    schedule: NoiseSchedule | None = None,
    timesteps=None,
    seed: int = 0,
    size: int = 256,
    start: int | None = None,
) -> NoiseExplorer:
    """A slider over t showing x_t for `image`, and alpha_bar_t and SNR(t) with a marker at t.

    image: a PIL image or a (C, H, W) tensor in [-1, 1]. size: displayed side in pixels.
    """
    schedule = schedule or NoiseSchedule.sd()
    frames = noise_frames(image, schedule, timesteps, seed)
    pixels, markers, span = _schedule_plot(schedule, frames)
    image_pngs = [_png(panel) for panel in tensor_panels(frames.x_t[:, None], size=size)]
    plot_pngs = [_png(_marked_plot(pixels, marker, span)) for marker in markers]
    labels = [_noise_label(t, a, s) for t, a, s in zip(frames.timesteps, frames.alpha_bar.tolist(), frames.snr.tolist())]

    k = 0 if start is None else frames.timesteps.index(start)
    slider = widgets.SelectionSlider(
        options=frames.timesteps, value=frames.timesteps[k], description="t", continuous_update=True,
        layout=widgets.Layout(width="95%"),
    )
    image_widget = widgets.Image(value=image_pngs[k], format="png")
    plot_widget = widgets.Image(value=plot_pngs[k], format="png")
    label = widgets.HTML(labels[k])
    box = widgets.VBox([slider, label, widgets.HBox([image_widget, plot_widget])])
    explorer = NoiseExplorer(box, slider, image_widget, plot_widget, label, frames, image_pngs, plot_pngs, labels)
    slider.observe(explorer._on_change, names="value")
    return explorer


# 2. Denoising stepper ------------------------------------------------------------------


@dataclass
class SamplingRecord:
    """A finished sampling run, step by step (the first `keep` images of the batch, on the CPU).

    x_t is the model's input at each step (the variance-preserving scale for every sampler,
    so Euler's samples look like DDIM's); x0_pred is what the sampler predicted (after any
    clipping); eps_pred the noise the model saw in x_t.
    """

    sampler: str
    timesteps: list  # n
    x_t: torch.Tensor  # (n, B, C, H, W)
    x0_pred: torch.Tensor  # (n, B, C, H, W)
    eps_pred: torch.Tensor  # (n, B, C, H, W)
    final: torch.Tensor  # (B, C, H, W)

    def __len__(self) -> int:
        return len(self.timesteps)


def record_sampling(
    model_fn,
    sampler: Sampler,
    noise: torch.Tensor,
    steps: int | None = None,
    generator=None,
    keep: int = 4,
    progress: bool = False,
) -> SamplingRecord:
    """Run `sdlearn.samplers.sample` and keep x_t, x0_pred and eps_pred of every step.

    model_fn(x_in, t) -> model output; noise: unit Gaussian x_T before init_noise_sigma.
    """
    x_ts, x0s, epss, ts = [], [], [], []

    def keep_step(i, t, x, model_output, out):
        x_in = sampler.scale_model_input(x, t)
        eps = sampler.predict(model_output, t, x_in).eps
        ts.append(t.item() if isinstance(t, torch.Tensor) else t)
        for store, value in ((x_ts, x_in), (x0s, out.pred_original_sample), (epss, eps)):
            store.append(value[:keep].detach().float().cpu())

    final = sample(model_fn, sampler, noise, steps=steps, generator=generator, callback=keep_step, progress=progress)
    final = final[:keep].detach().float().cpu()
    return SamplingRecord(sampler.name, ts, torch.stack(x_ts), torch.stack(x0s), torch.stack(epss), final)


PANELS = ("x_t", "x0_pred", "eps_pred")
PANEL_TITLES = {
    "x_t": "x<sub>t</sub> (the sample)",
    "x0_pred": "predicted x<sub>0</sub>",
    "eps_pred": "predicted noise &epsilon;",
}


@dataclass
class DenoisingStepper:
    """The denoising stepper and its parts. Displays as `widget`; set `slider.value = step`."""

    widget: widgets.VBox
    play: widgets.Play
    slider: widgets.IntSlider
    images: dict  # panel name -> widgets.Image
    label: widgets.HTML
    record: SamplingRecord
    pngs: dict = field(repr=False)  # panel name -> list of PNG bytes, one per step
    labels: list = field(repr=False)

    def _on_change(self, change) -> None:
        k = change["new"]
        for name, image in self.images.items():
            image.value = self.pngs[name][k]
        self.label.value = self.labels[k]

    def _repr_mimebundle_(self, **kwargs):
        return self.widget._repr_mimebundle_(**kwargs)


def denoising_stepper(
    record: SamplingRecord,
    max_images: int = 4,
    size: int = 96,
    value_range=(-1.0, 1.0),
    noise_range: float = 3.0,
    interval_ms: int = 150,
) -> DenoisingStepper:
    """Replay a recorded sampling run: play button and slider over steps, x_t | x0_pred | eps_pred.

    value_range maps x_t and x0_pred to black..white; noise is shown over [-noise_range, noise_range].
    """
    if len(record) == 0:
        raise ValueError("The record has no steps. Record a sampling run with record_sampling(...) first.")
    ranges = {"x_t": value_range, "x0_pred": value_range, "eps_pred": (-noise_range, noise_range)}
    pngs = {name: [_png(p) for p in tensor_panels(getattr(record, name), size, ranges[name], max_images)] for name in PANELS}
    n = len(record)
    labels = [f"<b>step {k + 1} of {n}</b> &nbsp; t = {t:g} &nbsp; ({record.sampler})" for k, t in enumerate(record.timesteps)]

    slider = widgets.IntSlider(value=0, min=0, max=n - 1, description="step", continuous_update=True)
    play = widgets.Play(value=0, min=0, max=n - 1, interval=interval_ms, description="play")
    widgets.link((play, "value"), (slider, "value"))  # kernel-side link: works in tests too
    images = {name: widgets.Image(value=pngs[name][0], format="png") for name in PANELS}
    columns = [widgets.VBox([widgets.HTML(PANEL_TITLES[name]), images[name]]) for name in PANELS]
    label = widgets.HTML(labels[0])
    box = widgets.VBox([widgets.HBox([play, slider]), label, widgets.HBox(columns)])
    stepper = DenoisingStepper(box, play, slider, images, label, record, pngs, labels)
    slider.observe(stepper._on_change, names="value")
    return stepper
