"""Classifier-free guidance (Ho & Salimans 2022): one formula, used by every denoising loop.

The same network is asked twice at each step, once with the condition c (the prompt, the
attributes) and once with "nothing" (the empty prompt, a negative prompt, no attributes):

    out = out_uncond + s (out_cond - out_uncond)

s = 1 gives the conditional output; s > 1 moves further along the direction the condition
adds, trading variety for faithfulness. Works the same for eps and for v predictions.

Reference: Ho & Salimans, "Classifier-Free Diffusion Guidance" (2022), eq. 6.
"""

import torch


def classifier_free_guidance(out_uncond: torch.Tensor, out_cond: torch.Tensor, guidance_scale: float) -> torch.Tensor:
    """out_uncond + s (out_cond - out_uncond), for model outputs of the same shape."""
    return out_uncond + guidance_scale * (out_cond - out_uncond)
