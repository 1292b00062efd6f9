"""The VAE's loss, the negative ELBO, in nats per image; and the AE's reconstruction loss.

-ELBO(x) = E_q(z|x)[-log p(x|z)] + KL(q(z|x) || p(z)), estimated with one reparameterized sample of z
for the first term and in closed form for the second (Kingma and Welling, 'Auto-Encoding Variational
Bayes', 2014, section 2.4 and Appendix B).

Two likelihoods:
- `bernoulli` (the default): -log p(x|z) is the binary cross-entropy summed over the 784 pixels,
  with the grey levels in [0,1] as targets, so the loss is in nats.
- `gaussian`: the book's recipe (Foster, 'Generative Deep Learning', chapter 3): the mean squared
  error over the pixels times a reconstruction weight (its r_loss_factor, 1000). That is a Gaussian
  likelihood with a fixed variance up to a constant, not nats; evaluation scores every model with the
  Bernoulli ELBO so that the numbers compare.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from training.run import Likelihood

LIKELIHOODS: tuple[Likelihood, ...] = ("bernoulli", "gaussian")


@dataclass(frozen=True)
class LossTerms:
    """Batch means of the total loss and its two parts; `total = recon + beta * kl`."""

    total: Tensor
    recon: Tensor
    kl: Tensor


def gaussian_kl(mean: Tensor, log_var: Tensor) -> Tensor:
    """KL(N(mean, diag(exp(log_var))) || N(0, I)) per row, [N], in nats.

    Kingma and Welling, Appendix B: -KL = 1/2 * sum_j (1 + log sigma_j^2 - mu_j^2 - sigma_j^2).
    """
    return -0.5 * torch.sum(1.0 + log_var - mean.pow(2) - log_var.exp(), dim=1)


def bernoulli_nll(logits: Tensor, images: Tensor) -> Tensor:
    """-log p(x|z) per image, [N], in nats: the cross-entropy summed over pixels.

    Computed from logits, which is stable where sigmoid(logits) rounds to 0 or 1.
    """
    per_pixel = F.binary_cross_entropy_with_logits(logits, images, reduction="none")
    return per_pixel.flatten(1).sum(dim=1)


def gaussian_recon(logits: Tensor, images: Tensor, weight: float) -> Tensor:
    """The book's reconstruction loss per image, [N]: weight * mean squared error over pixels."""
    return weight * (torch.sigmoid(logits) - images).pow(2).flatten(1).mean(dim=1)


def reconstruction_loss(
    logits: Tensor, images: Tensor, likelihood: Likelihood, recon_weight: float
) -> Tensor:
    """Per image, [N], for the chosen likelihood."""
    if likelihood == "bernoulli":
        return bernoulli_nll(logits, images)
    if likelihood == "gaussian":
        return gaussian_recon(logits, images, recon_weight)
    raise ValueError(f"unknown likelihood {likelihood!r}: expected one of {', '.join(LIKELIHOODS)}")


def vae_loss(
    logits: Tensor,
    images: Tensor,
    mean: Tensor,
    log_var: Tensor,
    *,
    beta: float = 1.0,
    likelihood: Likelihood = "bernoulli",
    recon_weight: float = 1000.0,
) -> LossTerms:
    """recon + beta * KL, averaged over the batch (beta = 1 is the ELBO)."""
    recon = reconstruction_loss(logits, images, likelihood, recon_weight).mean()
    kl = gaussian_kl(mean, log_var).mean()
    return LossTerms(total=recon + beta * kl, recon=recon, kl=kl)


def ae_loss(
    logits: Tensor, images: Tensor, *, likelihood: Likelihood = "bernoulli", recon_weight: float = 1000.0
) -> LossTerms:
    """The AE's loss: reconstruction only (its KL term is zero by definition)."""
    recon = reconstruction_loss(logits, images, likelihood, recon_weight).mean()
    return LossTerms(total=recon, recon=recon, kl=torch.zeros((), device=recon.device))
