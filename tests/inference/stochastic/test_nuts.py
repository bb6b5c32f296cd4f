"""NUTS: posterior means near the ML estimates (a random-intercept model, Theophylline); the
flat, traced posterior it samples is the model's density."""

import math

import pytest
import torch

from deepnlme.data import load_dataset
from deepnlme.inference import Laplace, fit
from deepnlme.inference.pyro.nuts import FlatPosterior, NUTSEstimator, save_trace_plot
from deepnlme.likelihood import residual
from deepnlme.model import NLMEModel, RandomEffects, positive
from deepnlme.model.params import Param
from deepnlme.model.zoo.neural import NeuralPKModel
from deepnlme.model.zoo.pk import OneCmtOralModel
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


# Exact marginal-likelihood optimum of Theophylline (adaptive Gauss–Hermite quadrature).
EXACT_ML = {"tvka": 1.5817, "tvcl": 0.040025, "tvv": 0.45755}


def theophylline():
    pop = load_dataset("theophylline", dtype=torch.float64)
    return pop, OneCmtOralModel().double()


def test_flat_posterior_centred_on_typical_values_is_the_same_density():
    """ψ-centred and non-centred coordinates give one posterior: at the same (θ, Ω, σ, η) the
    potentials differ by log|det ∂η/∂z| = N Σ log sd (Jacobian of η = L z); the traced
    potential equals the eager one and its gradient matches central differences."""
    pop, model = theophylline()
    centred, noncentred = (
        FlatPosterior(NUTSEstimator(model, centred=c), pop) for c in (True, False)
    )
    assert centred.mu == {0: "tvka", 1: "tvcl", 2: "tvv"} and noncentred.mu == {}
    g = torch.Generator().manual_seed(0)
    sites = centred.estimator._initial(pop)
    sites["omega_sd"] = torch.tensor([-0.4, -1.3, -2.0], dtype=torch.float64)
    sd = sites["omega_sd"].exp()
    eta = torch.randn(len(pop), 3, generator=g, dtype=torch.float64) * sd
    u_c = centred.flatten({**sites, "z": eta})
    u_nc = noncentred.flatten({**sites, "z": eta / sd})
    jacobian = len(pop) * sites["omega_sd"].sum()
    assert float(centred(u_c)) == pytest.approx(float(noncentred(u_nc) + jacobian), rel=1e-12)
    psi = centred.unflatten(u_c)["z"]
    typical = torch.stack([model.tvka.raw, model.tvcl.raw, model.tvv.raw]).detach()
    assert torch.allclose(psi - eta, typical.expand_as(eta))
    traced = centred.compiled(u_c)
    assert isinstance(traced, torch.jit.ScriptFunction)
    probe = (u_c + 0.05 * torch.randn(u_c.shape, generator=g, dtype=u_c.dtype)).requires_grad_()
    value = traced(probe)
    (grad,) = torch.autograd.grad(value, probe)
    assert float(value) == pytest.approx(float(centred(probe)), rel=1e-12)
    h = 1e-6
    for i in (0, 3, 4, 7, 20, len(u_c) - 1):  # θ, σ, Ω, ψ entries
        e = torch.zeros_like(u_c)
        e[i] = h
        with torch.no_grad():
            fd = (centred(probe + e) - centred(probe - e)) / (2 * h)
        assert float(grad[i]) == pytest.approx(float(fd), rel=1e-5, abs=1e-6), i


@pytest.mark.slow
def test_theophylline_posterior_covers_the_ml_estimates():
    """Two short chains: R-hat near 1 and the posterior means of log ka, log CL, log V within
    one posterior SD of the exact ML estimates (4 × (300 + 500) in the experiment's README)."""
    pop, model = theophylline()
    est = NUTSEstimator(model, num_samples=150, warmup=150, num_chains=2, progress=False)
    est.run(pop)
    table = est.summary()
    for name, ml in EXACT_ML.items():
        row = table[f"log_{name}"]
        assert abs(row["mean"] - math.log(ml)) < row["sd"], name
    assert max(row["rhat"] for row in table.values()) < 1.05
    assert min(row["ess_bulk"] for row in table.values()) > 50
