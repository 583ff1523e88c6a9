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
- record_pipeline / latent_stepper (lesson 09): the same for a text-to-image run of a latent
  pipeline: the latents z_t and the predicted z_0 of every step, each decoded to pixels by
  the autoencoder (once per frame, up front), and the guided noise prediction in latent space.
- guidance_frames / guidance_explorer (lesson 09): one seed at several classifier-free
  guidance scales s, where the step uses e = e_neg + s (e_cond - e_neg); a slider over s.
- token_attention / attention_viewer (lessons 06, 09): which pixels each prompt token draws
  on. The cross-attention probabilities softmax(Q K^T / sqrt(d)) of every cross-attention
  layer are recorded during sampling, averaged over heads, steps and layers (each layer's
  map resized to the image first) and shown over the image, one token at a time.
"""

import io
import math
from dataclasses import dataclass, field, replace

import ipywidgets as widgets
import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image, ImageDraw

from sdlearn.pipeline.stable_diffusion import StepRecorder
from sdlearn.plotting import STYLE, image_grid, to_tensor
from sdlearn.diffusion.samplers import Sampler, sample
from sdlearn.diffusion.schedules import NoiseSchedule

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


def _pil(image: torch.Tensor) -> Image.Image:
    """(3, H, W) in [-1, 1] -> PIL image."""
    return Image.fromarray(_to_uint8(image[None], (-1.0, 1.0))[0])


GAP = (170, 170, 170)  # the 2-pixel lines between (and around) the images of a panel


def _panel(pixels: np.ndarray, size: int) -> Image.Image:
    """(B, H, W, C) uint8 -> the images in a row, each size x size."""
    pils = [Image.fromarray(p[..., 0] if p.shape[-1] == 1 else p) for p in pixels]
    return image_grid([_resize(im, size) for im in pils], ncols=len(pils), background=GAP)  # grey gaps: white images stay apart


def tensor_panels(frames: torch.Tensor, size: int = 128, value_range=(-1.0, 1.0), max_images: int = 4) -> list:
    """(N, B, C, H, W) frames -> N PIL panels, each up to max_images in a row, size x size pixels apiece."""
    pixels = _to_uint8(_as_rgb(frames[:, :max_images].flatten(0, 1)), value_range)
    pixels = pixels.reshape(frames.shape[0], -1, *pixels.shape[1:])  # (N, B, H, W, C)
    return [_panel(p, size) for p in pixels]


def _image(png: bytes, margin: str = "0 12px 6px 0") -> widgets.Image:
    """An image widget drawn at its PNG's own size, in a thin grey frame: the browser neither stretches nor shrinks it."""
    width, height = Image.open(io.BytesIO(png)).size
    width, height = width + 2, height + 2  # JupyterLab sizes widgets border-box: room for the 1-pixel frame
    return widgets.Image(value=png, format="png", layout=widgets.Layout(
        width=f"{width}px", height=f"{height}px", min_width=f"{width}px", flex="0 0 auto", object_fit="contain",
        margin=margin, border="1px solid #aaa"))


def _row(children) -> widgets.HBox:
    """Panels side by side at their own sizes, wrapping onto the next line when the page is narrow."""
    return widgets.HBox(children, layout=widgets.Layout(flex_flow="row wrap", align_items="flex-end"))  # images in line


def _titled(title: str, child: widgets.Image) -> widgets.VBox:
    """A caption over an image, wrapped to the image's width."""
    return widgets.VBox([widgets.HTML(title, layout=widgets.Layout(width=child.layout.width)), child],
                        layout=widgets.Layout(flex="0 0 auto", margin="0 8px 0 0"))


WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"
FACTORIES = ("noise_explorer", "denoising_stepper", "latent_stepper", "guidance_explorer", "attention_viewer")


def widget_cells(cells) -> list:
    """Indices of the code cells that make a widget (call one of FACTORIES).

    cells: a notebook's cells, as nbformat reads them or as the raw JSON lists them.
    """
    def source(cell) -> str:
        return "".join(cell["source"]) if isinstance(cell["source"], list) else cell["source"]

    return [i for i, cell in enumerate(cells)
            if cell["cell_type"] == "code" and any(f"{name}(" in source(cell) for name in FACTORIES)]
RUN_TO_RESTORE = "Interactive widget: run this cell to bring it back (it needs the running kernel)."
PICTURE_NOTE = ("A saved picture of the widget above, for where it cannot run (GitHub, a notebook not run yet). "
                "If the widget says \"Error displaying widget\", its kernel has gone: run the cell to bring it back.")


def key_frames_png(rows: list, captions: list, row_titles: list | None = None, title: str = "",
                   note: str = PICTURE_NOTE, panel_inches: float = 1.6) -> bytes:
    """A grid of key frames as one PNG: rows[r][c] is an (H, W, C) uint8 array, captions[c] names column c.

    Pixels are drawn nearest-neighbour (blocky, never blurred), each panel with a grey frame
    so that white images stay apart. This is the static picture shown beside a widget.
    """
    import textwrap

    n_rows, n_cols = len(rows), len(captions)
    fig = Figure(figsize=(panel_inches * n_cols + (0.9 if row_titles else 0.2), panel_inches * n_rows + 0.75),
                 dpi=STYLE["figure.dpi"], facecolor="white")
    FigureCanvasAgg(fig)
    axes = fig.subplots(n_rows, n_cols, squeeze=False)
    for r, row in enumerate(rows):
        for c, pixels in enumerate(row):
            ax = axes[r][c]
            ax.imshow(pixels[..., 0] if pixels.shape[-1] == 1 else pixels, cmap="gray", vmin=0, vmax=255,
                      interpolation="nearest")
            ax.set_xticks([]), ax.set_yticks([])
            for spine in ax.spines.values():
                spine.set_visible(True), spine.set_color("0.6")
            if r == 0:
                ax.set_title(captions[c], fontsize=7)
            if c == 0 and row_titles:
                ax.set_ylabel(row_titles[r], fontsize=7)
    fig.suptitle(title, fontsize=8)
    fig.text(0.5, 0.005, "\n".join(textwrap.wrap(note, 40 * n_cols // 2 + 30)), ha="center", va="bottom",
             fontsize=7, color="0.35", style="italic")
    fig.tight_layout(rect=(0, 0.1, 1, 1))
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return buffer.getvalue()


class _ShowsPicture:
    """Mixin: in a notebook, display the live widget and, below it, its key frames as a saved picture.

    Jupyter saves both. Where no kernel runs the widget (GitHub, nbviewer, a notebook not run
    yet, whose saved widget output keeps only its text), the picture shows what the widget shows.
    """

    def picture(self) -> bytes:  # each widget class draws its own key frames
        raise NotImplementedError

    def _repr_mimebundle_(self, **kwargs):
        bundle = self.widget._repr_mimebundle_(**kwargs)
        bundle["text/plain"] = RUN_TO_RESTORE
        return bundle

    def _ipython_display_(self):
        from IPython.display import Image as PictureOutput
        from IPython.display import display

        display(self._repr_mimebundle_(), raw=True)
        display(PictureOutput(data=self.picture(), format="png"))


def _wrap(text: str, width: int) -> str:
    import textwrap

    return "\n".join(textwrap.wrap(text, width))


def _pick(n: int, k: int = 6) -> list:
    """k indices spread evenly over 0..n-1, both ends included."""
    return sorted({round(i * (n - 1) / max(1, k - 1)) for i in range(k)}) if n > 1 else [0]


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
class NoiseExplorer(_ShowsPicture):
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

    def picture(self) -> bytes:
        """x_t at six timesteps from 0 to T - 1."""
        f = self.frames
        picks = _pick(len(f.timesteps))
        pixels = _to_uint8(_as_rgb(f.x_t[picks]), (-1.0, 1.0))
        captions = [f"t = {f.timesteps[k]}\nSNR {f.snr[k].item():.2g}" for k in picks]
        return key_frames_png([list(pixels)], captions, title="x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps")


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
    image_widget = _image(image_pngs[k])
    plot_widget = _image(plot_pngs[k])
    label = widgets.HTML(labels[k])
    box = widgets.VBox([slider, label, _row([image_widget, plot_widget])])
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
    space: str = "pixel"  # "latent": x_t and x0_pred are decoded latents, eps_pred is in latent space

    def __len__(self) -> int:
        return len(self.timesteps)


def sampling_record_from_steps(recorder, pipe=None, sampler: str = "", keep: int = 4) -> SamplingRecord:
    """A pipeline run kept by a `StepRecorder`, as a SamplingRecord for `denoising_stepper`.

    With `pipe`, the latents after each step and the x0 predictions are decoded to images
    by its VAE (keep images of the batch, one VAE call per step); without it the stepper
    shows the first three latent channels. The noise panel shows the guided eps.
    """
    latents, x0_pred, eps = (recorder.stack(name)[:, :keep] for name in ("latents", "x0_pred", "eps"))  # (steps, B, 4, h, w)
    if pipe is not None:
        latents, x0_pred = (
            torch.stack([pipe.decode_latents(z.to(pipe.device)).float().cpu() for z in frames])  # (steps, B, 3, H, W)
            for frames in (latents, x0_pred)
        )
    return SamplingRecord(sampler, recorder.timesteps, latents, x0_pred, eps, final=latents[-1])


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
    "pixel": {
        "x_t": "x<sub>t</sub> (the sample)",
        "x0_pred": "predicted x<sub>0</sub>",
        "eps_pred": "predicted noise &epsilon;",
    },
    "latent": {
        "x_t": "decoded z<sub>t</sub> (after the step)",
        "x0_pred": "decoded predicted z<sub>0</sub>",
        "eps_pred": "guided noise e (latent, 3 of 4 channels)",
    },
}
PANEL_TEXT = {  # the same titles as plain text, for the saved picture
    "pixel": {"x_t": "x_t (the sample)", "x0_pred": "predicted x_0", "eps_pred": "predicted noise"},
    "latent": {"x_t": "decoded z_t", "x0_pred": "decoded predicted z_0", "eps_pred": "guided noise e\n(latent, 3 of 4 ch.)"},
}


@dataclass
class DenoisingStepper(_ShowsPicture):
    """The denoising stepper and its parts. Displays as `widget`; set `slider.value = step` (1 .. n).

    Steps are counted from 1 everywhere (slider, play button, label); `pngs[name][step - 1]`
    is what the panel shows at that step.
    """

    widget: widgets.VBox
    play: widgets.Play
    slider: widgets.IntSlider
    images: dict  # panel name -> widgets.Image
    label: widgets.HTML
    record: SamplingRecord
    pngs: dict = field(repr=False)  # panel name -> list of PNG bytes, one per step
    labels: list = field(repr=False)
    ranges: dict = field(repr=False, default_factory=dict)  # panel name -> the values shown black .. white

    def _on_change(self, change) -> None:
        k = change["new"] - 1
        for name, image in self.images.items():
            image.value = self.pngs[name][k]
        self.label.value = self.labels[k]

    def picture(self) -> bytes:
        """The first image of the batch in every panel at six steps, first to last."""
        record = self.record
        picks = _pick(len(record))
        ranges = self.ranges
        rows = [list(_to_uint8(_as_rgb(getattr(record, name)[picks, 0]), ranges[name])) for name in self.images]
        titles = [PANEL_TEXT[record.space][name] for name in self.images]
        captions = [f"step {k + 1} of {len(record)}\nt = {record.timesteps[k]:g}" for k in picks]
        return key_frames_png(rows, captions, titles, title=f"{record.sampler} sampling, step by step (first image)")


def denoising_stepper(
    record: SamplingRecord,
    max_images: int = 4,
    size: int = 96,
    value_range=(-1.0, 1.0),
    noise_range: float = 3.0,
    interval_ms: int = 150,
    panels=PANELS,
) -> DenoisingStepper:
    """Replay a recorded sampling run: play button and slider over steps, x_t | x0_pred | eps_pred.

    value_range maps x_t and x0_pred to black..white; noise is shown over [-noise_range, noise_range].
    panels: which of PANELS to show, in order.
    """
    if len(record) == 0:
        raise ValueError("The record has no steps. Record a sampling run with record_sampling(...) first.")
    panels = tuple(panels)
    if not panels or any(name not in PANELS for name in panels):
        raise ValueError(f"panels must be a non-empty selection of {PANELS}, got {panels!r}.")
    ranges = {"x_t": value_range, "x0_pred": value_range, "eps_pred": (-noise_range, noise_range)}
    pngs = {name: [_png(p) for p in tensor_panels(getattr(record, name), size, ranges[name], max_images)] for name in panels}
    n = len(record)
    labels = [f"<b>step {k + 1} of {n}</b> &nbsp; t = {t:g} &nbsp; ({record.sampler})" for k, t in enumerate(record.timesteps)]

    # steps count from 1 in the slider, the play button and the label alike
    slider = widgets.IntSlider(value=1, min=1, max=n, description="step", continuous_update=True,
                               layout=widgets.Layout(width="480px"))
    play = widgets.Play(value=1, min=1, max=n, interval=interval_ms, description="play")
    widgets.link((play, "value"), (slider, "value"))  # kernel-side link: works in tests too
    images = {name: _image(pngs[name][0]) for name in panels}
    titles = PANEL_TITLES[record.space]
    label = widgets.HTML(labels[0])
    box = widgets.VBox([widgets.HBox([play, slider]), label, _row([_titled(titles[name], images[name]) for name in panels])])
    stepper = DenoisingStepper(box, play, slider, images, label, record, pngs, labels, {name: ranges[name] for name in panels})
    slider.observe(stepper._on_change, names="value")
    return stepper


# 3. Latent denoising stepper (a text-to-image run of a pipeline) -----------------------


def record_pipeline(
    pipe,
    prompt,
    steps: int = 25,
    guidance_scale: float = 7.5,
    sampler: str | None = None,
    seed: int = 0,
    keep: int = 4,
    **kwargs,
) -> SamplingRecord:
    """Run `pipe.text_to_image` and keep every step, decoded: a SamplingRecord with space="latent".

    x_t holds the latents after each step and x0_pred the sampler's estimate of z_0, both
    decoded to pixels by the pipeline's VAE (one decoder call per frame, all up front);
    eps_pred is the guided noise prediction e = e_neg + s (e_cond - e_neg) in latent space.
    kwargs go to text_to_image (negative_prompt, height, width, eta, ...).
    """
    recorder = StepRecorder()
    pipe.text_to_image(prompt, steps=steps, guidance_scale=guidance_scale, sampler=sampler, seed=seed,
                       callback=recorder, output_type="latent", **kwargs)
    name = sampler or pipe.default_sampler or ""
    record = sampling_record_from_steps(recorder, pipe, sampler=name, keep=keep)  # (steps, B, 3, H, W) decoded frames
    return replace(record, space="latent")


def latent_stepper(pipe, prompt, steps: int = 25, guidance_scale: float = 7.5, sampler: str | None = None,
                   seed: int = 0, size: int = 128, max_images: int = 4, **kwargs) -> DenoisingStepper:
    """The denoising stepper for a latent pipeline: decoded z_t | decoded predicted z_0 | latent noise."""
    record = record_pipeline(pipe, prompt, steps, guidance_scale, sampler, seed, keep=max_images, **kwargs)
    return denoising_stepper(record, max_images=max_images, size=size)


# 4. Guidance explorer ---------------------------------------------------------------------


@dataclass
class GuidanceFrames:
    """The same prompt and seed generated at each guidance scale."""

    prompt: str
    scales: list  # N floats
    images: torch.Tensor  # (N, B, 3, H, W) in [-1, 1]
    prompts: list = field(default_factory=list)  # B prompts, one per image
    negative_prompts: list = field(default_factory=list)  # B negative prompts (empty: none given)

    def changed(self, k: int, threshold: float = 0.2) -> torch.Tensor:
        """(B,) fraction of pixels of frame k that differ from frame 0 (any channel by > threshold in [-1, 1])."""
        return ((self.images[k] - self.images[0]).abs().amax(1) > threshold).float().mean((1, 2))


def guidance_frames(pipe, prompt, scales=(1.0, 2.0, 4.0, 7.5, 12.0), steps: int = 25, sampler: str | None = None,
                    seed: int = 0, **kwargs) -> GuidanceFrames:
    """pipe.text_to_image(prompt, guidance_scale=s, seed=seed) for every s in `scales`.

    The seed fixes the starting noise, so only the guidance changes between frames. A scale of
    1 (or less) is the conditional model alone: the pipeline then skips the unconditional half,
    and a negative_prompt (in kwargs) is used only at the scales above 1.
    """
    scales = [float(s) for s in scales]
    if not scales:
        raise ValueError("scales is empty: give at least one guidance scale, e.g. (1, 4, 7.5).")
    if len(set(scales)) != len(scales):
        raise ValueError(f"scales must be distinct (a slider selects them by value), got {scales}.")
    if any(s < 0 for s in scales):
        raise ValueError(f"Guidance scales must be >= 0, got {scales}.")
    images = [
        pipe.text_to_image(prompt, steps=steps, guidance_scale=s, sampler=sampler, seed=seed, output_type="tensor",
                           **_without_negative(kwargs) if s <= 1 else kwargs).float().cpu()
        for s in scales
    ]  # N x (B, 3, H, W)
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    negative = kwargs.get("negative_prompt") or []
    negatives = [negative] * len(prompts) if isinstance(negative, str) else list(negative)
    return GuidanceFrames(" | ".join(prompts), scales, torch.stack(images), prompts, negatives)


def _without_negative(kwargs: dict) -> dict:
    """At s <= 1 there is no unconditional half, so a negative prompt has nothing to act on (and is left out)."""
    return {name: value for name, value in kwargs.items() if name != "negative_prompt"}


@dataclass
class GuidanceExplorer(_ShowsPicture):
    """The guidance explorer and its parts. Displays as `widget`; set `slider.value = scale`.

    One panel per prompt, captioned with it; `pngs[k][j]` is image j at scale k.
    """

    widget: widgets.VBox
    slider: widgets.SelectionSlider
    images: list  # widgets.Image, one per prompt
    label: widgets.HTML
    frames: GuidanceFrames
    pngs: list = field(repr=False)
    labels: list = field(repr=False)

    def _on_change(self, change) -> None:
        k = self.frames.scales.index(change["new"])
        for image, png in zip(self.images, self.pngs[k]):
            image.value = png
        self.label.value = self.labels[k]

    def picture(self) -> bytes:
        """Every prompt (rows) at every scale (columns)."""
        f = self.frames
        n = len(self.images)
        pixels = _to_uint8(f.images[:, :n], (-1.0, 1.0))  # (N, n, H, W, 3)
        rows = [[pixels[k, j] for k in range(len(f.scales))] for j in range(n)]
        titles = [p + (f" / not: {q}" if q else "") for p, q in zip(f.prompts[:n], f.negative_prompts or [""] * n)]
        return key_frames_png(rows, [f"s = {s:g}" for s in f.scales], [_wrap(t, 18) for t in titles],
                              title="classifier-free guidance: the same seed at each scale s")


def guidance_explorer(pipe, prompt, scales=(1.0, 2.0, 4.0, 7.5, 12.0), steps: int = 25, sampler: str | None = None,
                      seed: int = 0, size: int = 128, max_images: int = 4, **kwargs) -> GuidanceExplorer:
    """A slider over guidance scales s showing the same seed's image(s) at each s (all generated up front)."""
    frames = guidance_frames(pipe, prompt, scales, steps, sampler, seed, **kwargs)
    n = min(max_images, frames.images.shape[1])
    pixels = _to_uint8(frames.images[:, :n], (-1.0, 1.0))  # (N, n, H, W, 3), converted once
    pngs = [[_png(_resize(Image.fromarray(p), size)) for p in frame] for frame in pixels]
    labels = []
    for k, s in enumerate(frames.scales):
        changed = frames.changed(k)[:n].mean().item()
        labels.append(
            f"<b>guidance scale s = {s:g}</b> &nbsp; e = e<sub>neg</sub> + {s:g} (e<sub>cond</sub> &minus; e<sub>neg</sub>)"
            + (" &nbsp; (s &le; 1: the conditional prediction alone; no negative prompt)" if s <= 1 else "")
            + (f" &nbsp; {changed:.0%} of the pixels differ from s = {frames.scales[0]:g}" if k else "")
            + f" &nbsp; (seed {seed})")
    slider = widgets.SelectionSlider(options=frames.scales, value=frames.scales[0], description="scale s",
                                     continuous_update=True, layout=widgets.Layout(width="480px"))
    images = [_image(png) for png in pngs[0]]
    label = widgets.HTML(labels[0])
    captions = [f"<i>{text}</i>" + (f"<br><b>not:</b> {negative}" if negative else "")
                for text, negative in zip(frames.prompts, frames.negative_prompts or [""] * n)]
    panels = _row([_titled(caption, image) for caption, image in zip(captions, images)])
    explorer = GuidanceExplorer(widgets.VBox([slider, label, panels]), slider, images, label, frames, pngs, labels)
    slider.observe(explorer._on_change, names="value")
    return explorer


# 5. Cross-attention map viewer --------------------------------------------------------------


@dataclass
class TokenAttention:
    """Where each token of a prompt was looked at, averaged over heads, layers and steps.

    maps[k, y, x] is the attention probability that pixel (y, x) gives token k, so that
    maps.sum(0) == 1 at every pixel when all 77 positions are kept (a softmax over tokens).
    """

    prompt: str
    tokens: list  # the prompt's tokens, start and end tokens included (k = 0 .. len - 1)
    image: torch.Tensor  # (3, H, W) in [-1, 1], the generated image
    maps: torch.Tensor  # (77, H, W): every text position, padding included
    layers: list  # the cross-attention layers averaged


def token_attention(pipe, prompt: str, steps: int = 25, guidance_scale: float = 7.5, sampler: str | None = None,
                    seed: int = 0, layers=None, **kwargs) -> TokenAttention:
    """Generate one image for `prompt` while recording every cross-attention layer's probabilities.

    Per layer: the sum over sampling steps divided by their number, averaged over heads,
    reshaped to its feature map (h, w) and resized (bilinear) to the image; then the mean over
    layers (as prompt-to-prompt does, Hertz et al. 2022). With guidance, the UNet batch is
    [unconditional, conditional]: the conditional half is kept, the one that reads the prompt.
    layers: names of the layers to average (default: all cross-attention layers).
    """
    from sdlearn.models.attention import record_attention  # imported here, like the pipeline

    if not isinstance(prompt, str):
        raise TypeError(f"Expected one prompt string, got {type(prompt).__name__}; attention maps are drawn for one image.")
    with record_attention(pipe.unet, kind="cross", accumulate=True) as recorded:
        image = pipe.text_to_image(prompt, steps=steps, guidance_scale=guidance_scale, sampler=sampler, seed=seed,
                                   output_type="tensor", **kwargs)[0].float().cpu()  # (3, H, W)
    names = list(recorded.keys()) if layers is None else list(layers)
    unknown = [name for name in names if name not in recorded.maps]
    if unknown:
        raise ValueError(f"No cross-attention recorded for {unknown}; recorded layers are {list(recorded.keys())}.")
    maps = recorded.average_token_maps(tuple(image.shape[-2:]), names)  # (B, 77, H, W)
    maps = maps[-1]  # the conditional half (the only half without guidance)     (77, H, W)
    tokens = [pipe.tokenizer.bos_token] + pipe.tokenizer.tokenize(prompt)[: maps.shape[0] - 2] + [pipe.tokenizer.eos_token]
    return TokenAttention(prompt, tokens, image, maps, names)


def _token_label(token: str) -> str:
    return token.replace("</w>", "") or token


def _heatmap(image: torch.Tensor, attention: torch.Tensor, size: int, alpha: float = 0.55) -> Image.Image:
    """The image with one token's map over it (inferno colours, normalised to the map's maximum)."""
    from matplotlib import colormaps  # imported here: only the viewer needs a colour map

    peak = float(attention.max())
    normalised = (attention / peak if peak > 0 else attention).clamp(0, 1).numpy()  # (H, W) in [0, 1]
    heat = colormaps["inferno"](normalised)[..., :3]  # (H, W, 3) in [0, 1]
    base = (image.clamp(-1, 1).numpy().transpose(1, 2, 0) + 1) / 2  # (H, W, 3) in [0, 1]
    blend = (1 - alpha) * base + alpha * heat
    return _resize(Image.fromarray((blend * 255).round().astype(np.uint8)), size)


def _colour_scale(peak: float, height: int) -> Image.Image:
    """The heat map's colour scale: inferno from 0 (bottom) to the map's peak probability (top)."""
    fig = Figure(figsize=(1.1, height / STYLE["figure.dpi"]), dpi=STYLE["figure.dpi"], facecolor="white")
    FigureCanvasAgg(fig)
    ax = fig.add_axes((0.08, 0.06, 0.22, 0.88))
    ax.imshow(np.linspace(1, 0, 128)[:, None], aspect="auto", cmap="inferno", extent=(0, 1, 0, peak))
    ax.set_xticks([])
    ax.yaxis.tick_right()
    ax.set_yticks([0, peak / 2, peak], [f"{v:.1%}" for v in (0, peak / 2, peak)], fontsize=8)
    ax.set_title("attention", fontsize=8)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return Image.open(buffer)


@dataclass
class AttentionViewer(_ShowsPicture):
    """The cross-attention viewer and its parts. Displays as `widget`; set `dropdown.value = k` (a token index).

    Each token's heat map is scaled to its own peak; `scale` shows that colour scale in attention probability.
    """

    widget: widgets.VBox
    dropdown: widgets.Dropdown
    image: widgets.Image
    heatmap: widgets.Image
    label: widgets.HTML
    attention: TokenAttention
    pngs: list = field(repr=False)  # one heat map PNG per token of the prompt
    labels: list = field(repr=False)
    scale: widgets.Image | None = None
    scale_pngs: list = field(repr=False, default_factory=list)  # one colour scale per token

    def _on_change(self, change) -> None:
        k = change["new"]
        self.heatmap.value = self.pngs[k]
        if self.scale is not None:
            self.scale.value = self.scale_pngs[k]
        self.label.value = self.labels[k]

    def picture(self) -> bytes:
        """The image, then every token's heat map (up to 9 tokens)."""
        a = self.attention
        shown = list(range(min(len(a.tokens), 9)))
        side = a.image.shape[-1]
        rows = [[np.asarray(_pil(a.image))] + [np.asarray(_heatmap(a.image, a.maps[k], side)) for k in shown]]
        captions = ["image"] + [_token_label(a.tokens[k]) for k in shown]
        return key_frames_png(rows, captions, title=f"cross-attention per token, each map scaled to its own peak: {a.prompt}")


def attention_viewer(pipe, prompt: str, steps: int = 25, guidance_scale: float = 7.5, sampler: str | None = None,
                     seed: int = 0, size: int = 192, start: int | None = None, **kwargs) -> AttentionViewer:
    """A dropdown over the prompt's tokens; the image beside where that token was attended to.

    start: the token shown first (default: the first word after the start token).
    """
    attention = token_attention(pipe, prompt, steps, guidance_scale, sampler, seed, **kwargs)
    n = len(attention.tokens)
    pngs = [_png(_heatmap(attention.image, attention.maps[k], size)) for k in range(n)]
    labels = []
    for k, token in enumerate(attention.tokens):
        share = float(attention.maps[k].mean())
        labels.append(f"token {k}: <b>{_token_label(token)}</b> &nbsp; receives {share:.1%} of the attention on average "
                      f"(over {len(attention.layers)} layers, heads and {steps} steps)")
    k = (1 if n > 2 else 0) if start is None else start
    if not 0 <= k < n:
        raise ValueError(f"start must be a token index in 0..{n - 1}, got {start}.")
    dropdown = widgets.Dropdown(options=[(f"{i}: {_token_label(t)}", i) for i, t in enumerate(attention.tokens)], value=k,
                                description="token")
    scale_pngs = [_png(_colour_scale(float(attention.maps[i].max()), size)) for i in range(n)]
    image = _image(_png(_resize(_pil(attention.image), size)))
    heatmap = _image(pngs[k], margin="0 2px 6px 0")
    scale = _image(scale_pngs[k])
    label = widgets.HTML(labels[k])
    viewer = AttentionViewer(widgets.VBox([dropdown, label, _row([image, heatmap, scale])]), dropdown, image, heatmap,
                             label, attention, pngs, labels, scale, scale_pngs)
    dropdown.observe(viewer._on_change, names="value")
    return viewer
