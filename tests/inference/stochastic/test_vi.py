"""The model as a Pyro program and the variational objectives against exact values.

For a linear Gaussian mixed model the posterior of each η_i is Gaussian and equals its Laplace
approximation; with the guide set to it, log p(y_i, η) - log q(η) = log p(y_i) for every draw,
so the ELBO and the IWAE bound equal the exact marginal log-likelihood whatever the noise
(and a minibatch gives N/B times its subjects' share).
"""

import pytest
import torch

from deepnlme.inference.pyro.importance import mode_proposal
from deepnlme.inference.pyro.program import SubjectBatch, whole
from deepnlme.inference.pyro.vi import NonFiniteObjective, VariationalEstimator
from deepnlme.model.zoo.pk import OneCmtOralModel
from tests.inference.linear_model import RandomSlopeModel, exact_loglik, random_slope_population


def exact_guide(elbo: str, particles: int = 1):
    pop = random_slope_population(n=7)
    model = RandomSlopeModel()
    est = VariationalEstimator(model, guide="subject", elbo=elbo, num_particles=particles)
    guide = est.setup(pop)
    loc, scale_tril = mode_proposal(model, pop)
    with torch.no_grad():
        guide.loc.copy_(loc)
        guide.offdiag.copy_(scale_tril[:, 1, 0:1])
        diag = torch.diagonal(scale_tril, dim1=-2, dim2=-1) - 1e-5
        guide.diag_raw.copy_(diag + torch.log(-torch.expm1(-diag)))
    return pop, model, est


@pytest.mark.parametrize("elbo,particles", [("trace", 1), ("trace", 3), ("iwae", 4)])
def test_bound_is_exact_at_the_true_posterior(elbo, particles):
    pop, model, est = exact_guide(elbo, particles)
    exact = exact_loglik(model, pop)
    for step in range(3):
        est.step = step
        assert -est.loss(whole(pop)).item() == pytest.approx(exact, abs=1e-8)


def test_minibatch_is_scaled_to_the_population():
    pop, model, est = exact_guide("trace")
    index = torch.tensor([1, 4, 5])
    batch = SubjectBatch(index, pop.subset(index))
    part = exact_loglik(model, pop.subset(index))
    assert -est.loss(batch).item() == pytest.approx(len(pop) / 3 * part, abs=1e-8)


def test_elbo_below_the_likelihood_and_gradients_reach_every_parameter():
    pop = random_slope_population(n=7)
    model = RandomSlopeModel()
    est = VariationalEstimator(model, guide="amortized", num_particles=2)
    guide = est.setup(pop)
    assert est.elbo_value(pop, particles=256) < exact_loglik(model, pop)
    est.loss(whole(pop)).backward()
    for name, p in [*model.named_parameters(), *guide.named_parameters()]:
        assert p.grad is not None and bool(torch.isfinite(p.grad).all()), name
    assert float(model.omega.raw.grad.abs().sum()) > 0
    assert float(guide.head[-1].weight.grad.abs().sum()) > 0


def test_bad_settings_and_non_finite_objective():
    model = OneCmtOralModel()
    with pytest.raises(ValueError, match="unknown guide 'flow'"):
        VariationalEstimator(model, guide="flow")
    with pytest.raises(ValueError, match="unknown elbo"):
        VariationalEstimator(model, elbo="renyi")
    pop = random_slope_population(n=3)
    model = RandomSlopeModel()
    est = VariationalEstimator(model)
    est.setup(pop)
    with torch.no_grad():
        model.sigma.raw.fill_(float("nan"))
    with pytest.raises(NonFiniteObjective, match="not finite at step 0"):
        est.loss(whole(pop))
