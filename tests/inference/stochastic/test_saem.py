"""SAEM against the exact maximum-likelihood optimum of Theophylline."""

import pytest
import torch

from deepnlme.data import load_dataset
from deepnlme.inference.pyro.importance import importance_loglik, mode_proposal
from deepnlme.inference.pyro.saem import SAEMEstimator, mu_referenced
from deepnlme.likelihood import residual
from deepnlme.model import NLMEModel, positive
from deepnlme.model.zoo.pk import OneCmtOralModel

# Exact marginal-likelihood optimum (adaptive Gauss–Hermite quadrature, 15³ nodes).
EXACT_ML = {"tvka": 1.5817, "tvcl": 0.040025, "tvv": 0.45755, "sigma_add": 0.6915}
EXACT_OMEGA_SD = (0.6580, 0.2657, 0.1346)
EXACT_LOGLIK = -179.950


def assert_near_exact_ml(model, pop, rel: float, is_samples: int) -> None:
    """Every estimate within ``rel`` of the exact optimum, importance-sampled loglik within
    0.1 of its maximum."""
    p = model.param_values()
    for name, want in EXACT_ML.items():
        assert float(p[name]) == pytest.approx(want, rel=rel), name
    sd = torch.diagonal(p["omega"]).sqrt().tolist()
    assert sd == pytest.approx(list(EXACT_OMEGA_SD), rel=rel)
    loc, scale_tril = mode_proposal(model, pop)
    result = importance_loglik(model, pop, loc, scale_tril, is_samples, seed=0)
    assert result.loglik == pytest.approx(EXACT_LOGLIK, abs=0.1)


def test_theophylline_within_two_percent_of_exact_ml(tmp_path):
    pop = load_dataset("theophylline")
    model = OneCmtOralModel()
    est = SAEMEstimator(model, seed=12345)
    history = est.fit(pop)
    assert len(history) == 500
    assert_near_exact_ml(model, pop, rel=0.02, is_samples=4000)
    from deepnlme.inference.pyro.saem import save_convergence_plot

    assert save_convergence_plot(history, tmp_path / "c.png", est.n_explore).stat().st_size > 0


def test_mu_referencing_pairs_typical_values_with_their_eta():
    pop = load_dataset("theophylline")
    model = OneCmtOralModel()
    pairs = mu_referenced(model, pop)
    assert sorted(pairs) == [0, 1, 2]
    assert pairs[0] is model.tvka.raw
    assert pairs[1] is model.tvcl.raw
    assert pairs[2] is model.tvv.raw
    assert mu_referenced(OneCmtOralModel(error="proportional"), pop)[1] is not None


class NoRandomEffects(NLMEModel):
    def __init__(self):
        super().__init__()
        self.level = positive(1.0)
        self.sigma = positive(0.5)

    def pre(self, p, eta, cov):
        return {}

    def derived(self, p, indiv, amounts, cov):
        return residual.additive(p.level.expand(1, 1), p.sigma)


def test_model_without_random_effects_is_refused():
    with pytest.raises(ValueError, match="method=saem needs random effects; NoRandomEffects"):
        SAEMEstimator(NoRandomEffects())
