"""Gaussian noise drawn exactly as diffusers draws it, so a seed gives the same image in both.

One function, used wherever the course draws noise: the VAE's posterior sample, the
samplers' stochastic steps, the pipeline's initial latents.
"""

import torch


def randn(shape, generator=None, device=None, dtype=None) -> torch.Tensor:
    """Standard Gaussian noise, drawn exactly as diffusers' `randn_tensor` draws it.

    A CPU generator draws on the CPU and the result is moved to `device`, so a seed gives the
    same numbers on every machine. A list of generators draws one batch item from each.
    """
    shape = tuple(shape)
    device = torch.device(device) if device is not None else torch.device("cpu")
    if isinstance(generator, (list, tuple)):
        if len(generator) == 1:
            generator = generator[0]
        else:
            if len(generator) != shape[0]:
                raise ValueError(f"Got {len(generator)} generators for a batch of {shape[0]}: give one per item, or one in all.")
            return torch.cat([randn((1, *shape[1:]), g, device, dtype) for g in generator])
    draw_on = device
    if generator is not None and generator.device.type != device.type:
        if generator.device.type != "cpu":
            raise ValueError(
                f"A {generator.device.type} generator cannot draw noise for {device}. "
                f"Use a CPU generator, or one on {device}."
            )
        draw_on = torch.device("cpu")
    return torch.randn(shape, generator=generator, device=draw_on, dtype=dtype).to(device)
