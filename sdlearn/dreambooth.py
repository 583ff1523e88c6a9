"""DreamBooth: fine-tune the whole UNet on a few images of a new subject, with prior preservation
(Ruiz et al. 2023, "DreamBooth: Fine Tuning Text-to-Image Diffusion Models for Subject-Driven
Generation", eq. 2).

Notation (used everywhere below):
    x, c          an instance image of the new subject and its prompt ("a large red star ...")
    x_pr, c_pr    a class image and its prompt: an image the *base* model drew for a prompt of
                  the same class ("a large red circle ..."), generated once before training
    w             the prior-preservation weight (lambda in the paper; diffusers' `prior_loss_weight`)
    L(x, c)       the diffusion loss of one image, w(t) || target - UNet(z_t, t, c) ||^2
                  (sdlearn.ddpm.DiffusionLoss, per image)

Every weight of the UNet is trained, so it can learn anything, and it can also forget: after a
few hundred steps on stars alone, the UNet draws stars where it was asked for circles
("language drift", section 4.2 of the paper). Prior preservation adds the class images to every
batch, so the model is also asked to keep drawing what it drew before:

    L_DreamBooth = mean over instance images L(x, c)  +  w * mean over class images L(x_pr, c_pr)

A batch holds as many class images as instance images, interleaved (instance, class,
instance, class, ...), and `is_prior` marks the class rows. Written as one sum over the batch,

    L_DreamBooth = (1 / n_instance) * sum_i c_i L_i,   c_i = 1 for an instance row, w for a class row,

which equals the line above when the batch has equal counts, and stays the same when the batch
is split into contiguous halves across processes (each half has equal counts too).

The recipe that trains it on mini-SD, with and without the prior, is
sdlearn.recipes.personalise (`--method dreambooth --prior-weight 1`).

References: diffusers `examples/dreambooth/train_dreambooth.py` (class images, `with_prior_preservation`,
the loss `loss + prior_loss_weight * prior_loss` over the two halves of the batch).
"""

import torch

from sdlearn.ddpm import DiffusionLoss


def interleave(instance: torch.Tensor, prior: torch.Tensor) -> torch.Tensor:
    """Rows instance[0], prior[0], instance[1], prior[1], ... (both (n, ...) with the same n)."""
    if instance.shape != prior.shape:
        raise ValueError(f"Interleaving needs as many class rows as instance rows of the same shape; "
                         f"got {tuple(instance.shape)} and {tuple(prior.shape)}.")
    return torch.stack([instance, prior], dim=1).flatten(0, 1)


def prior_preservation_loss(errors: torch.Tensor, is_prior: torch.Tensor, prior_weight: float) -> torch.Tensor:
    """L = mean(instance errors) + w * mean(class errors), as (1 / n_instance) * sum_i c_i L_i.

    errors: (B,) the per-image diffusion losses; is_prior: (B,) bool, True on class rows.
    The batch must hold as many class rows as instance rows (what `interleave` makes).
    """
    is_prior = is_prior.bool()
    n_instance = int((~is_prior).sum())
    if n_instance == 0 or n_instance != int(is_prior.sum()):
        raise ValueError(f"A prior-preservation batch holds as many class images as instance images; this one has "
                         f"{n_instance} instance and {int(is_prior.sum())} class rows. Build it with interleave().")
    c = torch.where(is_prior, torch.full_like(errors, float(prior_weight)), torch.ones_like(errors))
    return (c * errors).sum() / n_instance


class PriorPreservationLoss:
    """train()'s loss_fn for DreamBooth: a batch is (z0, t, eps, context, is_prior).

    With prior_weight = 0 the class rows still pass through the UNet but count for nothing; to
    train without the prior, build batches of instance images only and use DiffusionLoss.
    """

    def __init__(self, diffusion_loss: DiffusionLoss, prior_weight: float = 1.0):
        if not prior_weight >= 0:
            raise ValueError(f"prior_weight must be 0 or more, got {prior_weight}.")
        self.diffusion_loss, self.prior_weight = diffusion_loss, float(prior_weight)

    def __call__(self, unet, batch) -> torch.Tensor:
        *core, is_prior = batch
        return prior_preservation_loss(self.diffusion_loss.per_image(unet, core), is_prior, self.prior_weight)

    def __repr__(self) -> str:
        return f"PriorPreservationLoss({self.diffusion_loss!r}, prior_weight={self.prior_weight:g})"
