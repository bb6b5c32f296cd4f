"""Residual-error models: the distribution of each observation given its prediction.

A :class:`GaussianResidual` says ``g(DV) ~ Normal(mean, variance)`` where ``g`` is the
identity or ``log`` (log-normal error). Knowing mean and variance separately is what the
FOCE/FOCEI estimators need; the Laplace estimator only needs :meth:`log_prob`, so a model's
``derived`` may also return any ``torch.distributions.Distribution``.
All tensors are ``(N, T)`` (subjects x observation slots).
"""

from __future__ import annotations

import torch
from torch import Tensor

from deepnlme.model.domains import LOG_2PI


class GaussianResidual:
    """``g(DV) ~ Normal(mean, variance)``, ``g = log`` when ``log_scale`` else identity.

    ``prediction`` is the model prediction on the DV scale (for tables and plots).
    """

    def __init__(self, prediction: Tensor, mean: Tensor, variance: Tensor, log_scale: bool = False):
        self.prediction = prediction
        self.mean = mean
        self.variance = variance
        self.log_scale = log_scale

    def transform(self, dv: Tensor) -> Tensor:
        """DV on the scale where the error is Gaussian."""
        return torch.log(dv) if self.log_scale else dv

    def log_jacobian(self, dv: Tensor) -> Tensor:
        """log |dg/dDV|, added to the Gaussian log density to get the density of DV."""
        return -torch.log(dv) if self.log_scale else torch.zeros_like(dv)

    def log_prob(self, dv: Tensor) -> Tensor:
        """Log density of each DV, ``(N, T)``, all constants included."""
        r = self.transform(dv) - self.mean
        return -0.5 * (LOG_2PI + torch.log(self.variance) + r * r / self.variance) + (
            self.log_jacobian(dv)
        )

    def sample(self, generator: torch.Generator | None = None) -> Tensor:
        eps = torch.randn(self.mean.shape, generator=generator, dtype=self.mean.dtype)
        y = self.mean + self.variance.sqrt() * eps.to(self.mean.device)
        return torch.exp(y) if self.log_scale else y

    def weighted_residual(self, dv: Tensor) -> Tensor:
        """(g(DV) - mean) / sd: IWRES at the individual prediction."""
        return (self.transform(dv) - self.mean) / self.variance.sqrt()


def additive(prediction: Tensor, sd: Tensor) -> GaussianResidual:
    """DV ~ Normal(pred, sd²)."""
    return GaussianResidual(prediction, prediction, (sd * sd).expand_as(prediction))


def proportional(prediction: Tensor, sd: Tensor) -> GaussianResidual:
    """DV ~ Normal(pred, (sd·pred)²)."""
    return GaussianResidual(prediction, prediction, (sd * prediction) ** 2)


def combined(prediction: Tensor, sd_add: Tensor, sd_prop: Tensor) -> GaussianResidual:
    """DV ~ Normal(pred, sd_add² + (sd_prop·pred)²)."""
    return GaussianResidual(prediction, prediction, sd_add**2 + (sd_prop * prediction) ** 2)


def lognormal(prediction: Tensor, sd: Tensor) -> GaussianResidual:
    """log DV ~ Normal(log pred, sd²) (exponential error)."""
    mean = torch.log(prediction)
    return GaussianResidual(prediction, mean, (sd * sd).expand_as(mean), log_scale=True)
