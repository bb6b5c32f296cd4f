"""The marginal log-likelihood of a variational fit on subjects it was not fitted to."""

import pytest
import torch

from deepnlme.inference.pyro.importance import importance_loglik
from deepnlme.inference.pyro.vi import VariationalEstimator
from tests.inference.linear_model import RandomSlopeModel, exact_loglik, random_slope_population


@pytest.mark.parametrize("guide", ["subject", "amortized"])
def test_new_subjects_loglik_is_exact_whatever_the_guide(guide):
    """Linear Gaussian model: the Laplace approximation is each new subject's exact posterior,
    so importance sampling from it gives the exact marginal likelihood, also when the
    amortized encoder's q is far off (here its output bias for the means shifted by 5)."""
    model = RandomSlopeModel()
    est = VariationalEstimator(model, guide=guide, is_samples=400, seed=2)
    fitted = random_slope_population(n=7, seed=0)
    est.setup(fitted)
    new = random_slope_population(n=5, seed=1)
    if guide == "amortized":
        with torch.no_grad():
            est.guide.head[-1].bias[:2] += 5.0
        far = importance_loglik(model, new, *est.posterior(new), n_samples=400, seed=2)
        assert far.loglik < exact_loglik(model, new) - 5.0  # the encoder's q: a poor proposal
    loglik = est.subject_loglik(new)
    assert loglik.shape == (5,)
    assert float(loglik.sum()) == pytest.approx(exact_loglik(model, new), abs=0.02)
    # the fitted subjects by their own q(η_i) (untrained here: a poor proposal) mixed half
    # and half with the Laplace approximation: exact as well
    own_q = importance_loglik(model, fitted, *est.posterior(fitted), n_samples=400, seed=2)
    mixed = est.subject_loglik(fitted)
    assert float(mixed.sum()) == pytest.approx(exact_loglik(model, fitted), abs=0.05)
    assert float(mixed.sum()) > own_q.loglik
