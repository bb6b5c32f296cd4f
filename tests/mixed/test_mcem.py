"""MCEM with an HMC E-step: the HMC kernel samples a known Gaussian; the MCEM fit of
sleepstudy reaches lme4's ML estimates."""

from __future__ import annotations

import numpy as np
import torch

from deepnlme.inference.mcem import MCEMOptions, hmc_transition
from deepnlme.mixed.lmm import fit_lmm
from deepnlme.mixed.mcem_fit import fit_mcem
from tests.mixed.conftest import design


def test_hmc_transition_samples_a_correlated_gaussian():
    mean = torch.tensor([1.0, -2.0], dtype=torch.float64)
    cov = torch.tensor([[1.0, 0.6], [0.6, 2.0]], dtype=torch.float64)
    prec = torch.linalg.inv(cov)

    def log_prob(x, _):
        d = x - mean
        return -0.5 * d @ prec @ d

    gen = torch.Generator().manual_seed(0)
    x, samples = torch.zeros(2, dtype=torch.float64), []
    for _ in range(2000):
        x, _ = hmc_transition(log_prob, x, None, 0.4, torch.ones(2, dtype=torch.float64), 5, gen)
        samples.append(x)
    s = torch.stack(samples[500:]).numpy()
    np.testing.assert_allclose(s.mean(0), mean.numpy(), atol=0.15)
    np.testing.assert_allclose(np.cov(s.T), cov.numpy(), atol=0.25)


def test_mcem_reaches_the_ml_fit():
    d = design("sleepstudy", "Reaction ~ Days + (1|Subject)")
    ml = fit_lmm(d)  # = lme4 (tests/mixed/test_lmm.py)
    fit = fit_mcem(d, "gaussian", None, MCEMOptions(n_iter=600, seed=1))
    assert ml.loglik - 0.1 < fit.loglik <= ml.loglik + 1e-9
    np.testing.assert_allclose(list(fit.fixef.values()), list(ml.fixef.values()), rtol=0.01)
    np.testing.assert_allclose(fit.sigma, ml.sigma, rtol=0.03)
    sd, sd_ml = fit.varcorr()["Subject"]["sd"][0], ml.varcorr()["Subject"]["sd"][0]
    assert abs(sd - sd_ml) < 0.1 * sd_ml
    assert fit.modes[0].mode.shape == (18, 1) and fit.extra["hmc_accept_rate"] > 0.5
