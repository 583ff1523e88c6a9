"""Images and masks in, images out: the conversions between what people hold and what models see.

Models see an image as a float tensor (C, H, W) in [-1, 1]; people see 8-bit pixels. The
maps between them are exact inverses on 8-bit images:

    x = pixels / 127.5 - 1,      pixels = round((x + 1) / 2 * 255) clipped to [0, 255]

A mask is 1 where the pipeline repaints and 0 where it keeps the image (diffusers'
convention), thresholded at 0.5.
"""

import numpy as np
import torch
from PIL import Image


def to_pil(images: torch.Tensor, value_range=(-1.0, 1.0)):
    """A (C, H, W) tensor -> PIL image; a (B, C, H, W) tensor -> list of PIL images.

    C is 1 (greyscale) or 3 (RGB). Values outside value_range are clipped.
    """
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"to_pil expects a torch.Tensor, got {type(images).__name__}. (PIL images need no conversion.)")
    if images.dim() == 4:
        return [to_pil(image, value_range) for image in images]
    if images.dim() != 3:
        raise ValueError(f"to_pil expects (C, H, W) or (B, C, H, W), got shape {tuple(images.shape)}.")
    if images.shape[0] not in (1, 3):
        raise ValueError(
            f"to_pil expects 1 or 3 channels first, got shape {tuple(images.shape)}. "
            "Is the tensor (H, W, C)? Use .permute(2, 0, 1). For 4-channel latents, show one channel at a time: z[i:i+1]."
        )
    x = images.detach().cpu().double()
    if not torch.isfinite(x).all():
        raise ValueError("The image has NaN or infinite values; a model or sampler upstream has diverged.")
    low, high = value_range
    x = (x - low) / (high - low)  # [0, 1]
    pixels = (x.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()  # (H, W, C)
    return Image.fromarray(pixels[..., 0] if pixels.shape[-1] == 1 else pixels)


def to_tensor(image) -> torch.Tensor:
    """A PIL image -> (3, H, W) float tensor in [-1, 1]; a list of same-size images -> (B, 3, H, W)."""
    if isinstance(image, (list, tuple)):
        return torch.stack([to_tensor(im) for im in image])
    if not isinstance(image, Image.Image):
        raise TypeError(f"to_tensor expects a PIL image or a list of them, got {type(image).__name__}.")
    pixels = np.asarray(image.convert("RGB"))  # (H, W, 3) uint8
    return torch.from_numpy(pixels.copy()).permute(2, 0, 1).float() / 127.5 - 1.0


def _as_list(x) -> list:
    return list(x) if isinstance(x, (list, tuple)) else [x]


def image_to_tensor(image, height: int | None = None, width: int | None = None) -> torch.Tensor:
    """PIL image(s) or a tensor in [-1, 1] -> (B, 3, H, W) float tensor in [-1, 1].

    PIL images are resized to (height, width) with Lanczos filtering when those are given
    and differ (as diffusers does); tensors must already have the requested size.
    """
    if isinstance(image, torch.Tensor):
        x = image[None] if image.ndim == 3 else image
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"Expected an image tensor (3, H, W) or (B, 3, H, W) in [-1, 1], got shape {tuple(image.shape)}.")
        if not x.is_floating_point():
            raise ValueError(f"Expected a float image tensor in [-1, 1], got dtype {x.dtype}. For uint8 pixels use x / 127.5 - 1.")
        finite = torch.isfinite(x)
        if not finite.all():
            raise ValueError(
                f"Expected an image tensor of finite values in [-1, 1], got {int((~finite).sum())} NaN or infinite values "
                f"of {x.numel()}. Find where they came from (a division by zero, a NaN decode), or replace them, "
                "e.g. x.nan_to_num(0.0).clamp(-1, 1)."
            )
        if x.min() < -1.001 or x.max() > 1.001:
            raise ValueError(
                f"Image tensors must lie in [-1, 1] (sdlearn's convention), got values in [{x.min():.3g}, {x.max():.3g}]. "
                "For an image in [0, 1] pass 2 * x - 1."
            )
        H, W = x.shape[-2:]
        if (height is not None and height != H) or (width is not None and width != W):
            raise ValueError(f"The image tensor is {H}x{W} (HxW) but height x width = {height}x{width} was asked; resize it first.")
        return x
    images = _as_list(image)
    if not images or not all(isinstance(im, Image.Image) for im in images):
        raise TypeError(f"Expected a PIL image, a list of PIL images or a tensor in [-1, 1], got {type(image).__name__}.")
    tensors = []
    for im in images:
        if (height is not None and height != im.height) or (width is not None and width != im.width):
            im = im.resize((width or im.width, height or im.height), resample=Image.LANCZOS)
        pixels = np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0  # (H, W, 3) in [0, 1]
        tensors.append(torch.from_numpy(pixels).permute(2, 0, 1) * 2.0 - 1.0)  # (3, H, W) in [-1, 1]
    if len({t.shape for t in tensors}) > 1:
        raise ValueError(f"All images must have the same size, got {sorted({tuple(t.shape[1:]) for t in tensors})}.")
    return torch.stack(tensors)


def mask_to_tensor(mask, height: int | None = None, width: int | None = None) -> torch.Tensor:
    """PIL mask(s) or a tensor in [0, 1] -> (B, 1, H, W) of 0 (keep) and 1 (repaint).

    White (>= 0.5) means repaint, black means keep, as in diffusers. PIL masks are resized
    like images, converted to greyscale, then thresholded at 0.5.
    """
    if isinstance(mask, torch.Tensor):
        m = mask.float()
        if m.ndim == 2:
            m = m[None, None]
        elif m.ndim == 3:
            m = m[:, None] if m.shape[0] != 1 else m[None]
        if m.ndim != 4 or m.shape[1] != 1:
            raise ValueError(f"Expected a mask tensor (H, W), (1, H, W) or (B, 1, H, W) in [0, 1], got shape {tuple(mask.shape)}.")
        H, W = m.shape[-2:]
        bad = ~((m >= 0) & (m <= 1))  # NaN fails both
        if bad.any():
            lowest, highest = m.nan_to_num(0.5).min().item(), m.nan_to_num(0.5).max().item()
            nans = int(m.isnan().sum())
            raise ValueError(
                f"Expected a mask tensor with values in [0, 1] (1 = repaint, 0 = keep), got {int(bad.sum())} values outside it "
                f"(range [{lowest:.3g}, {highest:.3g}], {nans} NaN). For 0..255 pixels pass mask / 255; "
                "replace NaN with mask.nan_to_num(0.0) (keep) or 1.0 (repaint)."
            )
        if (height is not None and height != H) or (width is not None and width != W):
            raise ValueError(f"The mask tensor is {H}x{W} (HxW) but height x width = {height}x{width} was asked; resize it first.")
    else:
        masks = _as_list(mask)
        if not masks or not all(isinstance(im, Image.Image) for im in masks):
            raise TypeError(f"Expected a PIL mask, a list of PIL masks or a tensor in [0, 1], got {type(mask).__name__}.")
        tensors = []
        for im in masks:
            if (height is not None and height != im.height) or (width is not None and width != im.width):
                im = im.resize((width or im.width, height or im.height), resample=Image.LANCZOS)
            tensors.append(torch.from_numpy(np.asarray(im.convert("L"), dtype=np.float32) / 255.0)[None])  # (1, H, W)
        m = torch.stack(tensors)
    return (m >= 0.5).to(torch.float32)  # binary: repaint where 1
