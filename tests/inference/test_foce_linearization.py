"""FOCE equals the classical linearized marginal likelihood around η̂ (an independent formula)."""

import math

import pytest
import torch

from deepnlme.data import load_dataset
from deepnlme.inference import FOCE
from deepnlme.model.zoo.pk import PhenoModel


def linearized_loglik(model, pop, eta_hat) -> float:
    """Σ_i log N(y_i; f(η̂) - G η̂, G Ω Gᵀ + R0), G = ∂f/∂η at η̂, R0 = variance at η = 0."""
    omega = model.param_values()["omega"]
    r0 = model.observe(torch.zeros_like(eta_hat), pop).variance
    total = 0.0
    for i in range(len(pop)):
        sub = pop.subset([i])
        m = sub.obs_mask[0]
        e = eta_hat[i : i + 1]
        f = model.observe(e, sub).mean[0][m]
        g = torch.autograd.functional.jacobian(
            lambda x, sub=sub, m=m: model.observe(x, sub).mean[0][m], e
        )
        g = g.reshape(len(f), -1)
        cov = g @ omega @ g.T + torch.diag(r0[i][pop.obs_mask[i]])
        dist = torch.distributions.MultivariateNormal(f - g @ e[0], cov)
        total += dist.log_prob(sub.obs_dv[0][m]).item()
    return total


def test_foce_equals_linearized_likelihood():
    pop = load_dataset("phenobarbital").subset(list(range(10)))
    model = PhenoModel(init={"omega": [0.05, 0.04], "sigma_prop": 0.12})
    est = FOCE(model, inner={"gtol": 1e-11})
    eta_hat = est.modes(pop, warm_start=False)
    assert est.loglik(pop) == pytest.approx(linearized_loglik(model, pop, eta_hat), abs=1e-8)
    assert not math.isnan(est.loglik(pop))
