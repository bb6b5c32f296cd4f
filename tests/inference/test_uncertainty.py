"""Standard errors: inverse observed information, against the exact likelihood's Hessian."""

import pytest
import torch

from deepnlme.inference import Laplace, OuterOptions, fit
from deepnlme.inference.uncertainty import parameter_covariance
from deepnlme.model.zoo.neural import NeuralPKModel
from tests.inference.linear_model import RandomSlopeModel, random_slope_population


def exact_neg_loglik(raw: torch.Tensor, pop) -> torch.Tensor:
    """-Σ_i log N(y_i; X_i b, Z_i Ω Z_iᵀ + σ² I) of the random-slope model as a function of
    raw = (b0, b1, log-Cholesky L00, L10, L11, log σ)."""
    b0, b1, l00, l10, l11, log_sigma = raw
    chol = torch.stack([torch.stack([l00.exp(), 0 * l00]), torch.stack([l10, l11.exp()])])
    omega = chol @ chol.T
    total = raw.new_zeros(())
    for i in range(len(pop)):
        m = pop.obs_mask[i]
        t, y = pop.obs_time[i][m], pop.obs_dv[i][m]
        z = torch.stack([torch.ones_like(t), t], -1)
        cov = z @ omega @ z.T + torch.exp(2 * log_sigma) * torch.eye(len(t))
        total = total - torch.distributions.MultivariateNormal(b0 + b1 * t, cov).log_prob(y)
    return total


def test_standard_errors_equal_exact_inverse_information():
    pop = random_slope_population(n=8, seed=3)
    model = RandomSlopeModel()
    estimator = Laplace(model)
    assert fit(estimator, pop, OuterOptions(gtol=1e-9)).converged
    cov = parameter_covariance(estimator, pop)
    om = model.omega.raw.detach()
    raw = torch.stack(
        [model.b0.raw, model.b1.raw, om[0, 0], om[1, 0], om[1, 1], model.sigma.raw]
    ).detach()
    hess = torch.autograd.functional.hessian(lambda r: exact_neg_loglik(r, pop), raw)
    exact = torch.linalg.inv(hess)
    assert cov.names == ["b0", "b1", "omega", "omega", "omega", "sigma"]
    torch.testing.assert_close(cov.raw_covariance, exact, rtol=1e-5, atol=1e-9)
    sd = exact.diagonal().sqrt()
    assert float(cov.se["b0"]) == pytest.approx(float(sd[0]), rel=1e-5)
    assert float(cov.se["b1"]) == pytest.approx(float(sd[1]), rel=1e-5)
    # σ = exp(raw): delta method
    sigma = float(model.sigma.value().detach())
    assert float(cov.se["sigma"]) == pytest.approx(sigma * float(sd[5]), rel=1e-5)
    assert cov.se["omega"].shape == (2, 2) and cov.min_eigenvalue > 0
    # the parameters are restored after the finite differences
    assert float(model.b0.raw) == float(raw[0]) and float(model.sigma.raw) == float(raw[5])


def test_fixed_parameters_have_no_standard_error():
    pop = random_slope_population(n=8, seed=3)
    model = RandomSlopeModel(fixed=["b1"])
    estimator = Laplace(model)
    fit(estimator, pop)
    cov = parameter_covariance(estimator, pop)
    assert cov.se["b1"] is None and "b1" not in cov.names
    assert cov.raw_covariance.shape == (5, 5)


def test_models_with_network_weights_are_refused():
    model = NeuralPKModel(covariates=["WT"])
    with pytest.raises(ValueError, match=r"free parameters are all declared .* NeuralPKModel has"):
        parameter_covariance(Laplace(model), random_slope_population())
