"""NUTS on a small random-intercept model: posterior means near the ML estimates."""

import pytest
import torch

from deepnlme.inference import Laplace, fit
from deepnlme.inference.pyro.nuts import NUTSEstimator, save_trace_plot
from deepnlme.likelihood import residual
from deepnlme.model import NLMEModel, RandomEffects, positive
from deepnlme.model.params import Param
from deepnlme.model.zoo.neural import NeuralPKModel
from tests.inference.linear_model import random_slope_population


class RandomIntercept(NLMEModel):
    """y_it = b0 + η_i + ε, η ~ N(0, ω²), ε ~ N(0, σ²)."""

    def __init__(self):
        super().__init__()
        self.b0 = Param(init=1.0)
        self.omega = RandomEffects(["int"], [0.5])
        self.sigma = positive(0.5)

    def pre(self, p, eta, cov):
        return {"a": p.b0 + eta.int}

    def derived(self, p, indiv, amounts, cov):
        return residual.additive(indiv.a[:, None].expand(-1, self.t.shape[1]), p.sigma)

    def observe(self, eta, pop):
        self.t = pop.obs_time
        return super().observe(eta, pop)


def test_posterior_covers_the_ml_estimates(tmp_path):
    pop = random_slope_population(n=8, seed=4)
    ml = RandomIntercept()
    fit(Laplace(ml), pop)  # exact ML (linear Gaussian model)
    model = RandomIntercept()
    est = NUTSEstimator(model, num_samples=100, warmup=100, num_chains=2, max_tree_depth=4)
    est.run(pop)
    table = est.summary()
    assert set(table) == {"b0", "sigma", "log_sigma", "omega_sd_int"}
    row = table["b0"]
    assert set(row) == {"mean", "sd", "q2.5", "q97.5", "rhat", "ess_bulk"}
    assert abs(row["mean"] - float(ml.param_values()["b0"])) < 2 * row["sd"]
    assert row["q2.5"] < row["mean"] < row["q97.5"]
    assert row["rhat"] < 1.2 and row["ess_bulk"] > 20
    sigma = table["sigma"]
    assert abs(sigma["mean"] - float(ml.param_values()["sigma"])) < 2 * sigma["sd"]
    assert float(model.param_values()["b0"]) == pytest.approx(row["mean"])  # posterior mean
    assert est.draws.sites["b0"].shape == (2, 100)
    assert save_trace_plot(est, tmp_path / "trace.png").stat().st_size > 0
    assert torch.isfinite(est.subject_loglik(pop)).all()


def test_network_weights_are_refused():
    with pytest.raises(ValueError, match="method=nuts needs a model whose parameters are all"):
        NUTSEstimator(NeuralPKModel(covariates=["WT"]))
