"""The loss math: the analytic KL against Monte Carlo, the cross-entropy in nats, the composition."""

from __future__ import annotations

import math

import pytest
import torch

from training.losses import (
    ae_loss,
    bernoulli_nll,
    gaussian_kl,
    gaussian_recon,
    reconstruction_loss,
    vae_loss,
)


def test_the_analytic_kl_matches_a_monte_carlo_estimate() -> None:
    generator = torch.Generator().manual_seed(0)
    mean = torch.randn(4, 3, generator=generator)
    log_var = torch.randn(4, 3, generator=generator) * 0.5
    std = torch.exp(0.5 * log_var)
    samples = 200_000
    z = mean + std * torch.randn(samples, 4, 3, generator=generator, dtype=torch.float64)
    # log q(z|x) - log p(z); the 1/2 log(2 pi) terms cancel.
    log_ratio = -0.5 * ((z - mean) / std) ** 2 - torch.log(std) + 0.5 * z**2
    monte_carlo = log_ratio.sum(dim=2).mean(dim=0)
    torch.testing.assert_close(gaussian_kl(mean, log_var).double(), monte_carlo, atol=0.02, rtol=0.0)


def test_the_kl_is_zero_at_the_prior_and_positive_elsewhere() -> None:
    zeros = torch.zeros(2, 5)
    torch.testing.assert_close(gaussian_kl(zeros, zeros), torch.zeros(2))
    assert bool((gaussian_kl(torch.ones(2, 5), zeros) > 0).all())


def test_the_bernoulli_term_is_the_cross_entropy_summed_over_pixels_in_nats() -> None:
    probability = 0.25
    logits = torch.full((2, 1, 28, 28), math.log(probability / (1 - probability)))
    images = torch.ones(2, 1, 28, 28)
    expected = torch.full((2,), -784 * math.log(probability))
    torch.testing.assert_close(bernoulli_nll(logits, images), expected)


def test_the_gaussian_term_is_the_books_weighted_mean_squared_error() -> None:
    logits = torch.zeros(1, 1, 28, 28)  # sigmoid(0) = 0.5 everywhere
    images = torch.ones(1, 1, 28, 28)
    torch.testing.assert_close(gaussian_recon(logits, images, 1000.0), torch.tensor([250.0]))


def test_the_vae_loss_is_recon_plus_beta_times_kl_averaged_over_the_batch() -> None:
    generator = torch.Generator().manual_seed(1)
    logits = torch.randn(3, 1, 28, 28, generator=generator)
    images = torch.rand(3, 1, 28, 28, generator=generator)
    mean, log_var = torch.randn(3, 2, generator=generator), torch.randn(3, 2, generator=generator)
    terms = vae_loss(logits, images, mean, log_var, beta=0.5)
    torch.testing.assert_close(terms.recon, bernoulli_nll(logits, images).mean())
    torch.testing.assert_close(terms.kl, gaussian_kl(mean, log_var).mean())
    torch.testing.assert_close(terms.total, terms.recon + 0.5 * terms.kl)
    ae_terms = ae_loss(logits, images)
    torch.testing.assert_close(ae_terms.total, terms.recon)


def test_the_bernoulli_term_scores_grey_and_black_pixels_too() -> None:
    p, x = 0.25, 0.3
    logits = torch.full((2, 1, 28, 28), math.log(p / (1 - p)))
    images = torch.full((2, 1, 28, 28), x)
    expected = torch.full((2,), -784 * (x * math.log(p) + (1 - x) * math.log(1 - p)))
    torch.testing.assert_close(bernoulli_nll(logits, images), expected)


def test_the_gaussian_likelihood_uses_the_recon_weight_asked_for() -> None:
    g = torch.Generator().manual_seed(2)
    logits, images = torch.randn(3, 1, 28, 28, generator=g), torch.rand(3, 1, 28, 28, generator=g)
    mean, log_var = torch.randn(3, 2, generator=g), torch.randn(3, 2, generator=g)
    terms = vae_loss(logits, images, mean, log_var, likelihood="gaussian", recon_weight=10.0)
    torch.testing.assert_close(terms.recon, gaussian_recon(logits, images, 10.0).mean())
    torch.testing.assert_close(terms.total, terms.recon + gaussian_kl(mean, log_var).mean())


def test_the_ae_loss_with_the_gaussian_likelihood_is_the_weighted_mean_squared_error_batch_mean() -> None:
    logits = torch.zeros(2, 1, 28, 28)  # sigmoid(0) = 0.5 everywhere
    images = torch.stack([torch.ones(1, 28, 28), torch.full((1, 28, 28), 0.75)])
    terms = ae_loss(logits, images, likelihood="gaussian", recon_weight=8.0)
    # Per image 8 * 0.5^2 = 2 and 8 * 0.25^2 = 0.5; the batch's mean 1.25; no KL term.
    torch.testing.assert_close(terms.recon, torch.tensor(1.25))
    torch.testing.assert_close(terms.total, torch.tensor(1.25))
    torch.testing.assert_close(terms.kl, torch.tensor(0.0))


def test_an_unknown_likelihood_is_refused_naming_the_known_ones() -> None:
    with pytest.raises(ValueError, match="unknown likelihood 'poisson': expected one of bernoulli, gaussian"):
        reconstruction_loss(torch.zeros(1, 1, 28, 28), torch.zeros(1, 1, 28, 28), "poisson", 1.0)  # type: ignore[arg-type]
