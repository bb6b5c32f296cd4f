"""Importance-sampled marginal likelihood against quadrature and exact references."""

import math

import pytest
import torch

from deepnlme.data import load_dataset
from deepnlme.inference.pyro.importance import importance_loglik, mode_proposal
from deepnlme.model.zoo.pk import OneCmtOralModel
from tests.inference.linear_model import RandomSlopeModel, exact_loglik, random_slope_population

# Laplace optimum of Theophylline (one_cmt_oral, additive error, diagonal Ω); its exact
# marginal log-likelihood there by adaptive Gauss–Hermite quadrature (15³ nodes): -179.951.
LAPLACE_OPTIMUM = {
    "tvka": 1.5789,
    "tvcl": 0.040037,
    "tvv": 0.45749,
    "omega": [0.6526**2, 0.2652**2, 0.1339**2],
    "sigma_add": 0.6912,
}
QUADRATURE_LOGLIK = -179.951


def test_theophylline_matches_quadrature():
    pop = load_dataset("theophylline")
    model = OneCmtOralModel(init=LAPLACE_OPTIMUM)
    loc, scale_tril = mode_proposal(model, pop)
    result = importance_loglik(model, pop, loc, scale_tril, n_samples=5000, seed=0)
    assert result.se < 0.05
    assert result.loglik == pytest.approx(QUADRATURE_LOGLIK, abs=0.05)
    assert result.subject_loglik.shape == (len(pop),)
    assert float(result.subject_loglik.sum()) == pytest.approx(result.loglik)


def test_linear_gaussian_model_is_exact_with_any_proposal():
    """y = θ + η + ε with Gaussian η, ε: log p(y) is a Gaussian density in closed form; a
    deliberately poor proposal (off-centre, too wide) still converges to it, and the
    reported SE covers the error."""
    pop = random_slope_population(n=8)
    model = RandomSlopeModel()
    exact = exact_loglik(model, pop)
    k = model.n_eta
    loc = pop.obs_time.new_full((len(pop), k), 0.3)
    scale_tril = 2.0 * torch.eye(k).expand(len(pop), k, k)
    result = importance_loglik(model, pop, loc, scale_tril, n_samples=4000, seed=3)
    assert abs(result.loglik - exact) < 4 * result.se + 1e-9
    assert math.isfinite(result.se) and result.se > 0


def test_a_defensive_laplace_component_rescues_a_proposal_that_misses():
    """A proposal far off and too narrow (as an encoder's q on unlike subjects) gives a
    log-likelihood far too low; mixed half and half with the Laplace approximation the
    estimate is exact within its SE, and the mixture's density is right (a perfect pair of
    proposals gives the exact value)."""
    pop = random_slope_population(n=8)
    model = RandomSlopeModel()
    exact = exact_loglik(model, pop)
    k = model.n_eta
    laplace = mode_proposal(model, pop)
    off = (laplace[0] + 3.0, 0.05 * torch.eye(k, dtype=laplace[1].dtype).expand(len(pop), k, k))
    alone = importance_loglik(model, pop, *off, n_samples=2000, seed=3)
    mixed = importance_loglik(model, pop, *off, n_samples=2000, seed=3, defensive=laplace)
    assert alone.loglik < exact - 50
    assert abs(mixed.loglik - exact) < 4 * mixed.se + 1e-6
    assert mixed.se < 0.2
    twice = importance_loglik(model, pop, *laplace, n_samples=2000, seed=3, defensive=laplace)
    single = importance_loglik(model, pop, *laplace, n_samples=2000, seed=3)
    assert abs(twice.loglik - exact) < 4 * twice.se + 1e-6
    assert twice.se == pytest.approx(single.se, rel=0.3)
