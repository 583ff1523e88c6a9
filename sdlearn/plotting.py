"""From tensors to pictures: conversions, image grids, loss curves, and the course's figure style.

Models see an image as a float tensor (C, H, W) in [-1, 1]; people see 8-bit pixels.
The two maps between them are exact inverses on 8-bit images:

    pixel = round((x + 1) * 127.5), clipped to 0..255        (to_pil)
    x     = pixel / 127.5 - 1                                  (to_tensor)

Loss curves are noisy (each step sees a different random batch and noise level), so
plot_loss draws the raw values faintly under an exponential moving average, debiased as
in Adam (Kingma & Ba, 2015, section 3) so the first steps are not pulled towards zero:

    s_t = smooth * s_{t-1} + (1 - smooth) * loss_t,    s_0 = 0
    shown_t = s_t / (1 - smooth^t)

Figures display exactly once in a notebook, whether the call is the last line of a cell,
assigned to a name, or in the middle of a cell, and each function returns the
matplotlib Figure so it can be saved or changed.
"""

import io
import math
import textwrap
from typing import Mapping, Sequence

import matplotlib.pyplot as plt
import numpy as np
import torch
from matplotlib.figure import Figure
from PIL import Image

from sdlearn.pipeline.images import to_pil, to_tensor  # noqa: F401 (to_tensor re-exported: lessons use both from here)

DPI = 80  # small PNGs keep the executed notebooks small
STYLE = {
    "figure.dpi": DPI,
    "figure.facecolor": "white",
    "savefig.facecolor": "white",
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.grid": True,
    "grid.alpha": 0.3,
    "font.size": 9,
    "axes.titlesize": 9,
}


class CourseFigure(Figure):
    """A matplotlib Figure that a notebook displays once and then closes.

    Jupyter shows open pyplot figures at the end of a cell, and shows a returned Figure
    again as the cell's value: the familiar double plot. Whichever of the two asks first
    gets the PNG here, and the figure is closed so the other finds nothing to show.
    """

    def _ipython_display_(self):
        from IPython.display import Image as PNG, display

        buffer = io.BytesIO()
        self.savefig(buffer, format="png", dpi=self.dpi, bbox_inches="tight")
        display(PNG(data=buffer.getvalue(), format="png"))
        plt.close(self)


def figure(nrows: int = 1, ncols: int = 1, figsize=(5.0, 3.0), **kwargs):
    """plt.subplots in the course style: returns (CourseFigure, axes)."""
    with plt.rc_context(STYLE):
        return plt.subplots(nrows, ncols, figsize=figsize, dpi=DPI, FigureClass=CourseFigure, **kwargs)


# ---------------------------------------------------------------------------------------
# Conversions
# ---------------------------------------------------------------------------------------


def _pil_list(images) -> list:
    """Accept a tensor (C,H,W)/(B,C,H,W) in [-1, 1], a PIL image, or a list of either."""
    if isinstance(images, Image.Image):
        return [images]
    if isinstance(images, torch.Tensor):
        out = to_pil(images)
        return out if isinstance(out, list) else [out]
    if isinstance(images, (list, tuple)):
        if not images:
            raise ValueError("No images to show: the list is empty.")
        return [im for item in images for im in _pil_list(item)]
    raise TypeError(f"Expected tensors or PIL images (or a list of them), got {type(images).__name__}.")


# ---------------------------------------------------------------------------------------
# Grids and figures
# ---------------------------------------------------------------------------------------


def image_grid(images, ncols: int | None = None, pad: int = 2, background=(255, 255, 255)) -> Image.Image:
    """Paste images into one PIL image, row by row, `pad` pixels apart (sizes may differ)."""
    pils = [im.convert("RGB") for im in _pil_list(images)]
    ncols = ncols or math.ceil(math.sqrt(len(pils)))
    nrows = math.ceil(len(pils) / ncols)
    w = max(im.width for im in pils)
    h = max(im.height for im in pils)
    grid = Image.new("RGB", (ncols * w + (ncols + 1) * pad, nrows * h + (nrows + 1) * pad), background)
    for k, im in enumerate(pils):
        row, col = divmod(k, ncols)
        grid.paste(im, (pad + col * (w + pad) + (w - im.width) // 2, pad + row * (h + pad) + (h - im.height) // 2))
    return grid


def show_images(images, captions: Sequence[str] | None = None, ncols: int | None = None, scale: float = 1.4, title: str | None = None):
    """A figure with one panel per image (tensors in [-1, 1], PIL images, or lists), captioned."""
    pils = _pil_list(images)
    if captions is not None and len(captions) != len(pils):
        raise ValueError(f"Got {len(pils)} images but {len(captions)} captions; give one caption per image.")
    ncols = min(ncols or min(len(pils), 8), len(pils))
    nrows = math.ceil(len(pils) / ncols)
    caption_lines = 0
    if captions is not None:
        width = max(8, int(scale * 13))  # characters per line that fit under a panel
        captions = [textwrap.fill(str(c), width) for c in captions]
        caption_lines = max(c.count("\n") + 1 for c in captions)
    panel_h = scale + 0.16 * caption_lines
    fig, axes = figure(nrows, ncols, figsize=(ncols * scale, nrows * panel_h + (0.3 if title else 0)), squeeze=False, layout="constrained")
    for k, ax in enumerate(axes.flat):
        ax.set_axis_off()
        if k < len(pils):
            im = pils[k]
            ax.imshow(im, cmap="gray" if im.mode == "L" else None, vmin=0, vmax=255, interpolation="nearest")
            if captions is not None:
                ax.set_title(captions[k], fontsize=7)
    if title:
        fig.suptitle(title)
    return fig


def ema(values: Sequence[float], smooth: float) -> np.ndarray:
    """Debiased exponential moving average (see the module docstring)."""
    if not 0.0 <= smooth < 1.0:
        raise ValueError(f"smooth must be in [0, 1) (0 = no smoothing, 0.99 = very smooth), got {smooth}.")
    out = np.empty(len(values))
    s = 0.0
    for t, v in enumerate(values, start=1):
        s = smooth * s + (1 - smooth) * float(v)
        out[t - 1] = s / (1 - smooth**t)
    return out


def plot_loss(losses, smooth: float = 0.9, log: bool = False, title: str | None = None, ax=None):
    """Plot a loss curve (a sequence of numbers or a dict of named sequences), raw and smoothed."""
    series = dict(losses) if isinstance(losses, Mapping) else {"loss": losses}
    if ax is None:
        fig, ax = figure(figsize=(5.0, 3.0), layout="constrained")
    else:
        fig = ax.figure
    for k, (name, values) in enumerate(series.items()):
        values = [float(v) for v in values]
        if not values:
            raise ValueError(f"The loss series {name!r} is empty: nothing to plot.")
        steps = np.arange(1, len(values) + 1)
        colour = f"C{k}"
        ax.plot(steps, values, color=colour, alpha=0.25, linewidth=0.8)
        ax.plot(steps, ema(values, smooth), color=colour, linewidth=1.6, label=name)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    if log:
        ax.set_yscale("log")
    if len(series) > 1:
        ax.legend()
    if title:
        ax.set_title(title)
    return fig
