"""Exercise checkers of lessons 01-02 accept the reference and name each known mistake."""

import math

import pytest
import torch

from sdlearn import autoencoder as ae
from sdlearn.exercises import ExerciseError
from sdlearn.exercises import lesson01, lesson02

CHECKERS = [
    (lesson01.check_compression_factor, lesson01.compression_factor, lesson01.COMPRESSION_MISTAKES),
    (lesson01.check_reconstruction_error, ae.reconstruction_error, lesson01.RECONSTRUCTION_MISTAKES),
    (lesson01.check_psnr, ae.psnr, lesson01.PSNR_MISTAKES),
    (lesson02.check_reparameterise, ae.reparameterise, lesson02.REPARAMETERISE_MISTAKES),
    (lesson02.check_kl_divergence, ae.kl_divergence, lesson02.KL_MISTAKES),
    (lesson02.check_elbo_loss, ae.elbo_loss, lesson02.ELBO_MISTAKES),
]
IDS = [checker.__name__ for checker, _, _ in CHECKERS]


@pytest.mark.parametrize("checker, reference, mistakes", CHECKERS, ids=IDS)
def test_reference_passes(checker, reference, mistakes, capsys):
    assert checker(reference) is True
    assert "Correct!" in capsys.readouterr().out


@pytest.mark.parametrize("checker, reference, mistakes", CHECKERS, ids=IDS)
def test_each_known_mistake_gets_its_own_message(checker, reference, mistakes):
    assert len(mistakes) >= 3
    for mistake in mistakes:
        with pytest.raises(ExerciseError) as info:
            checker(mistake.fn)
        assert mistake.message in str(info.value), (mistake.message, str(info.value))


@pytest.mark.parametrize("checker, reference, mistakes", CHECKERS, ids=IDS)
def test_unfinished_and_empty_answers(checker, reference, mistakes):
    def not_written(*args):
        raise NotImplementedError

    def forgot_return(*args):
        reference(*args)

    assert checker(not_written) is False  # a blank is reported, not raised
    with pytest.raises(ExerciseError, match="returned None"):
        checker(forgot_return)


# Wrong answers written the way a learner would write them, independent of the lists above.


def test_learner_style_reparameterise_with_variance():
    def reparameterise(mu, logvar, eps):
        var = logvar.exp()
        return mu + var * eps

    with pytest.raises(ExerciseError, match="variance sigma\\^2"):
        lesson02.check_reparameterise(reparameterise)


def test_learner_style_reparameterise_with_logvar_as_std():
    with pytest.raises(ExerciseError, match="log-variance as the standard deviation"):
        lesson02.check_reparameterise(lambda mu, logvar, eps: eps * logvar + mu)


def test_learner_style_kl_without_half_and_with_mean():
    def kl_no_half(mu, logvar):
        return torch.sum(mu.pow(2) + logvar.exp() - 1 - logvar, dim=-1).mean()

    def kl_mean_dims(mu, logvar):
        return -0.5 * torch.mean(1 + logvar - mu.pow(2) - logvar.exp())

    with pytest.raises(ExerciseError, match="factor 1/2"):
        lesson02.check_kl_divergence(kl_no_half)
    with pytest.raises(ExerciseError, match="averaged over the latent dimensions"):
        lesson02.check_kl_divergence(kl_mean_dims)


def test_learner_style_kl_correct_in_another_form_passes():
    def kl(mu, logvar):  # the form of the Kingma & Welling appendix B
        return (-0.5 * (1 + logvar - mu**2 - logvar.exp()).sum(dim=1)).mean()

    assert lesson02.check_kl_divergence(kl)


def test_learner_style_elbo_with_mse_and_with_beta_on_reconstruction():
    def elbo_mse(x, x_recon, mu, logvar, beta):
        return torch.nn.functional.mse_loss(x_recon, x) + beta * ae.kl_divergence(mu, logvar)

    def elbo_beta_wrong(x, x_recon, mu, logvar, beta):
        return beta * ae.reconstruction_error(x, x_recon) + ae.kl_divergence(mu, logvar)

    with pytest.raises(ExerciseError, match="mean squared error"):
        lesson02.check_elbo_loss(elbo_mse)
    with pytest.raises(ExerciseError, match="put beta on the reconstruction"):
        lesson02.check_elbo_loss(elbo_beta_wrong)


def test_learner_style_psnr_with_peak_one_and_unknown_error():
    def psnr_peak_one(a, b):
        mse = ((a - b) ** 2).flatten(1).mean(1)
        return (10 * torch.log10(1 / mse)).mean()

    with pytest.raises(ExerciseError, match="peak of 1"):
        lesson01.check_psnr(psnr_peak_one)
    # an error no known mistake explains still fails, with the numbers
    with pytest.raises(ExerciseError, match="wrong values: the largest error is 0.5"):
        lesson01.check_psnr(lambda a, b: ae.psnr(a, b) + 0.5)


def test_learner_style_compression_factor():
    assert lesson01.check_compression_factor(lambda image, latent: math.prod(image) / math.prod(latent))
    with pytest.raises(ExerciseError, match="height x width only"):
        lesson01.check_compression_factor(lambda image, latent: (image[1] * image[2]) / (latent[-1] * latent[-2]))


def test_learner_style_reconstruction_mse():
    with pytest.raises(ExerciseError, match="the MSE"):
        lesson01.check_reconstruction_error(lambda x, x_recon: torch.nn.functional.mse_loss(x_recon, x))
