"""Laplace, FOCEI and FOCE are exact for a model linear in η with additive error."""

import pytest
import torch

from deepnlme.inference import FOCE, FOCEI, Laplace, OuterOptions, fit
from deepnlme.likelihood import residual
from tests.inference.linear_model import RandomSlopeModel, exact_loglik, random_slope_population


@pytest.mark.parametrize("method", [Laplace, FOCEI, FOCE])
def test_linear_model_loglik_is_exact(method):
    pop = random_slope_population()
    model = RandomSlopeModel()
    assert method(model).loglik(pop) == pytest.approx(exact_loglik(model, pop), abs=1e-9)


def test_fitted_linear_model_maximizes_exact_likelihood():
    pop = random_slope_population(n=8, seed=3)
    model = RandomSlopeModel()
    result = fit(Laplace(model), pop, OuterOptions(gtol=1e-9))
    assert result.converged
    best = exact_loglik(model, pop)
    # Moving any parameter away from the fitted value lowers the exact likelihood.
    for param in model.declared().values():
        raw = param.raw.detach().clone()
        for step in (-1e-3, 1e-3):
            param.raw.data = raw + step
            assert exact_loglik(model, pop) < best
        param.raw.data = raw


class LogNormalSlopeModel(RandomSlopeModel):
    """log y = a + b·t + ε as a torch ``LogNormal`` (the estimators' non-Gaussian branch)."""

    def derived(self, p, indiv, amounts, cov):
        mean = indiv.a[:, None] + indiv.b[:, None] * self.t
        return torch.distributions.LogNormal(mean, p.sigma)


def test_distribution_branch_on_padded_data_equals_gaussian_residual():
    """Ragged subjects (padding) with a positive-support distribution: the padded slots must
    not reach ``log_prob`` as 0 (outside the support); the result equals the log-normal
    residual model of the Gaussian branch."""
    pop = random_slope_population()
    pop.obs_dv = torch.where(pop.obs_mask, torch.exp(pop.obs_dv / 3), 0.0)
    assert not pop.fully_observed
    model = LogNormalSlopeModel()
    loglik = Laplace(model).loglik(pop)
    reference = RandomSlopeModel()
    reference.derived = lambda p, indiv, amounts, cov: residual.lognormal(
        torch.exp(indiv.a[:, None] + indiv.b[:, None] * reference.t), p.sigma
    )
    assert loglik == pytest.approx(Laplace(reference).loglik(pop), abs=1e-9)
