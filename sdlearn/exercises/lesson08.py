"""Lesson 08 exercise: CLIP's contrastive loss.

    from sdlearn.exercises import lesson08 as ex
    ex.check_contrastive_loss(my_loss)   # my_loss(image_emb (N, E), text_emb (N, E), logit_scale) -> scalar

For N matching pairs: normalise both embeddings, logits = exp(logit_scale) * u v^T (N, N),
the right caption of image i is caption i (labels 0..N-1, the diagonal), and the loss is the
mean of the cross-entropy over rows (image -> text) and over columns (text -> image).
"""

import torch
import torch.nn.functional as F

from sdlearn.models.clip import contrastive_loss
from sdlearn.exercises.core import Case, Mistake, checker


def reference_contrastive_loss(image_emb, text_emb, logit_scale):
    """Symmetric InfoNCE with temperature exp(-logit_scale); see sdlearn.clip.contrastive_loss."""
    return contrastive_loss(image_emb, text_emb, logit_scale)


def _logits(image_emb, text_emb, scale):
    return scale * F.normalize(image_emb, dim=-1) @ F.normalize(text_emb, dim=-1).T


def _diagonal(n):
    return torch.arange(n)


def _image_to_text_only(image_emb, text_emb, logit_scale):
    return F.cross_entropy(_logits(image_emb, text_emb, logit_scale.exp()), _diagonal(len(image_emb)))


def _text_to_image_only(image_emb, text_emb, logit_scale):
    return F.cross_entropy(_logits(image_emb, text_emb, logit_scale.exp()).T, _diagonal(len(image_emb)))


def _symmetric(logits, labels):
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


def _no_scale(image_emb, text_emb, logit_scale):
    return _symmetric(_logits(image_emb, text_emb, 1.0), _diagonal(len(image_emb)))


def _scale_not_exponentiated(image_emb, text_emb, logit_scale):
    return _symmetric(_logits(image_emb, text_emb, logit_scale), _diagonal(len(image_emb)))


def _not_normalised(image_emb, text_emb, logit_scale):
    return _symmetric(logit_scale.exp() * image_emb @ text_emb.T, _diagonal(len(image_emb)))


def _labels_reversed(image_emb, text_emb, logit_scale):
    return _symmetric(_logits(image_emb, text_emb, logit_scale.exp()), _diagonal(len(image_emb)).flip(0))


def _labels_zero(image_emb, text_emb, logit_scale):
    return _symmetric(_logits(image_emb, text_emb, logit_scale.exp()), torch.zeros(len(image_emb), dtype=torch.long))


def _summed_not_averaged(image_emb, text_emb, logit_scale):
    return 2 * _symmetric(_logits(image_emb, text_emb, logit_scale.exp()), _diagonal(len(image_emb)))


MISTAKES = [
    Mistake(_image_to_text_only, "You only scored images -> captions (rows). CLIP's loss is symmetric: also take the "
            "cross-entropy of the transposed logits (captions -> images) and average the two."),
    Mistake(_text_to_image_only, "You only scored captions -> images (columns). Also take the cross-entropy over the "
            "rows (images -> captions) and average the two."),
    Mistake(_no_scale, "You left out the temperature: multiply the cosine similarities by exp(logit_scale). "
            "Cosines lie in [-1, 1], too flat for a softmax over N captions."),
    Mistake(_scale_not_exponentiated, "logit_scale is the log of the scale (a learned t, kept positive through exp): "
            "multiply the cosines by logit_scale.exp(), not by logit_scale."),
    Mistake(_not_normalised, "Normalise both embeddings to unit length first (F.normalize(x, dim=-1)), so the logits "
            "are exp(t) times cosine similarities."),
    Mistake(_labels_reversed, "The labels must be the diagonal: image i belongs with caption i, so labels = "
            "torch.arange(N)."),
    Mistake(_labels_zero, "The labels must be torch.arange(N) (image i matches caption i), not all zeros."),
    Mistake(_summed_not_averaged, "You added the two directions; average them (divide by 2)."),
]


def _case(seed, n, dim, scale):
    g = torch.Generator().manual_seed(seed)
    norms = torch.rand(n, 1, generator=g) * 3 + 0.5  # not unit length, so normalising matters
    return Case(torch.randn(n, dim, generator=g) * norms, torch.randn(n, dim, generator=g), torch.tensor(scale))


CASES = [_case(0, 6, 8, 2.0), _case(1, 5, 16, 2.6592)]


@checker(reference_contrastive_loss, CASES, name="contrastive_loss", mistakes=MISTAKES)
def check_contrastive_loss(fn) -> bool:
    """fn(image_emb (N, E), text_emb (N, E), logit_scale (a 0-d tensor)) -> scalar tensor."""
