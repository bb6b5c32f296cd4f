"""Laplace, FOCEI and FOCE are exact for a model linear in η with additive error."""

import pytest

from deepnlme.inference import FOCE, FOCEI, Laplace, OuterOptions, fit
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
