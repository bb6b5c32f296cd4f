"""MCEM with an HMC E-step for NLME models: Theophylline reaches the exact ML optimum; the
closed-form M-step is the moment estimate; method=mcem runs from the command line."""

from __future__ import annotations

import pytest
import torch

from deepnlme.data import load_dataset
from deepnlme.inference.pyro.mcem import MCEMEstimator
from deepnlme.inference.pyro.saem import mu_referenced
from deepnlme.model.zoo.pk import OneCmtOralModel
from tests.inference.stochastic.test_saem import assert_near_exact_ml
from tests.test_cli import in_process_error
from tests.training.test_training_stochastic import in_process  # noqa: F401 (fixture)


def theophylline():
    pop = load_dataset("theophylline", dtype=torch.float64)
    return pop, OneCmtOralModel().double()


@pytest.mark.slow
def test_theophylline_within_three_percent_of_exact_ml():
    pop, model = theophylline()
    est = MCEMEstimator(model, n_iter=400, n_chains=4, seed=0)
    result = est.fit(pop)
    assert 0.5 < result.accept_rate < 1.0
    assert_near_exact_ml(model, pop, rel=0.03, is_samples=2000)


def test_closed_form_m_step_is_the_moment_estimate():
    """Typical values are the mean of ψ, Ω the (diagonal) variance of η about them; during
    warm-up a variance shrinks by at most the annealing factor; after it the statistics are
    running averages (weight gamma)."""
    pop, model = theophylline()
    est = MCEMEstimator(model, n_chains=1, anneal=0.5)
    est._mu = mu_referenced(model, pop)
    g = torch.Generator().manual_seed(0)
    centre = torch.tensor([0.4, -3.2, -0.8], dtype=torch.float64)
    psi = centre + torch.randn(len(pop), 3, generator=g, dtype=torch.float64) * 0.3
    est.closed_form(psi.flatten(), 1.0, False)
    typical = torch.stack([model.tvka.raw, model.tvcl.raw, model.tvv.raw]).detach()
    assert torch.allclose(typical, psi.mean(0))
    var = psi.var(0, unbiased=False)
    assert torch.allclose(torch.diagonal(model.omega.value()).detach(), var)
    assert float(model.omega.value()[0, 1].detach()) == 0.0  # the diagonal block stays diagonal
    narrow = centre + (psi - psi.mean(0)) * 0.1  # variances 100× smaller
    est.closed_form(narrow.flatten(), 0.5, False)  # half way between the two samples' moments
    second = 0.5 * ((psi**2).mean(0) + (narrow**2).mean(0))
    mean = 0.5 * (psi.mean(0) + narrow.mean(0))
    averaged = torch.diagonal(model.omega.value()).detach()
    assert torch.allclose(averaged, second - mean**2)
    est.closed_form(narrow.flatten(), 1.0, True)  # warm-up: shrinks by at most 0.5×
    assert torch.allclose(torch.diagonal(model.omega.value()).detach(), 0.5 * averaged)


def test_method_mcem_writes_results_with_loglik_is(in_process, capsys, tmp_path):  # noqa: F811
    results = in_process(
        tmp_path, "model=one_cmt_oral", "data=theophylline", "method=mcem", "method.n_iter=60",
        "method.estimator.is_samples=200", "loglik_is_samples=200", "se=false",
        "trainer.enable_progress_bar=false",
    )
    assert results["method"] == "mcem" and results["n_iter"] == 60
    assert results["loglik"] == pytest.approx(results["loglik_is"], abs=1e-9)  # same draws
    assert 0 < results["loglik_is_se"] < 0.5
    assert (tmp_path / "checkpoints" / "last.ckpt").exists()
    no_eta = "model._target_=tests.inference.stochastic.test_saem.NoRandomEffects"
    line = in_process_error(in_process, capsys, tmp_path, "data=theophylline",
                            "method=mcem", no_eta)
    assert "method=mcem needs random effects; NoRandomEffects has none" in line
