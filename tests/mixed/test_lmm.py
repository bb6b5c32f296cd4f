"""Gaussian LMM by the profiled deviance against lme4 1.1-31 (values printed by R here)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from deepnlme.mixed.datasets import table_path
from deepnlme.mixed.design import build_design
from deepnlme.mixed.formula import parse_formula
from deepnlme.mixed.lmm import ProfiledDeviance, fit_lmm
from tests.mixed.conftest import design, table

SLEEP = "Reaction ~ Days + (Days|Subject)"


def close(actual, expected, rel):
    np.testing.assert_allclose(actual, expected, rtol=rel)


@pytest.mark.parametrize(
    ("reml", "loglik", "sds", "corr", "sigma", "se"),
    [
        (False, -875.9697, [23.7798, 5.7168], 0.081, 25.5919, [6.632123, 1.502230]),
        (True, -871.8141, [24.7407, 5.9221], 0.066, 25.5918, [6.824597, 1.545790]),
    ],
)
def test_sleepstudy_matches_lme4(reml, loglik, sds, corr, sigma, se):
    fit = fit_lmm(design("sleepstudy", SLEEP), reml=reml)
    assert fit.converged
    assert abs(fit.loglik - loglik) < 0.01
    close(list(fit.fixef.values()), [251.4051, 10.46729], 1e-5)
    close(list(fit.se_fixef.values()), se, 1e-3)
    vc = fit.varcorr()
    close(vc["Subject"]["sd"], sds, 1e-3)
    assert abs(vc["Subject"]["corr"][0][1] - corr) < 5e-3
    close(vc["Residual"]["sd"], [sigma], 1e-4)
    modes = fit.modes[0]
    assert modes.mode.shape == (18, 2) and np.all(modes.sd > 0)
    # lme4: ranef(m)$Subject["308", ] (ML) = 2.815683, 9.075524
    if not reml:
        close(modes.mode[0], [2.815683, 9.075524], 1e-3)


def test_uncorrelated_slopes_match_lme4():
    fit = fit_lmm(design("sleepstudy", "Reaction ~ Days + (Days||Subject)"))
    assert abs(fit.loglik - -876.0016) < 0.01
    vc = fit.varcorr()
    close([vc["Subject"]["sd"][0], vc["Subject.1"]["sd"][0], vc["Residual"]["sd"][0]],
          [24.1716, 5.7994, 25.5561], 1e-3)


@pytest.mark.parametrize("reml", [False, True])
def test_deviance_gradient_matches_finite_differences(reml):
    rng = np.random.default_rng(0)
    t = table("sleepstudy").assign(g=rng.integers(0, 6, 180), h=rng.integers(0, 3, 180))
    d = build_design(t, parse_formula("Reaction ~ Days + (Days|Subject) + (Days|g) + (1|h)"), "t")
    objective = ProfiledDeviance(d, reml)
    theta = torch.tensor(rng.uniform(0.2, 1.2, objective.cov.n_theta), requires_grad=True)
    (grad,) = torch.autograd.grad(objective(theta), theta)
    h = 1e-6
    for i in range(len(theta)):
        e = torch.zeros_like(theta)
        e[i] = h
        fd = (objective(theta.detach() + e) - objective(theta.detach() - e)) / (2 * h)
        assert abs(float(grad[i]) - float(fd)) < 1e-5 * max(1.0, abs(float(fd)))


def test_insteval_ml_matches_lme4():
    t = pd.read_csv(table_path("insteval"))
    d = build_design(t, parse_formula("y ~ service + (1|s) + (1|d) + (1|dept)"), "insteval")
    fit = fit_lmm(d)
    assert fit.converged
    assert abs(fit.loglik - -118860.88) < 0.01
    close([fit.fixef["(Intercept)"], fit.fixef["service"]], [3.28258, -0.09259], 1e-3)
    vc = fit.varcorr()
    close([vc[g]["var"][0] for g in ("s", "d", "dept", "Residual")],
          [0.10597, 0.26520, 0.0061678, 1.38649], 1e-3)
