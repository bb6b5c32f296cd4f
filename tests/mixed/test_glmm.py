"""Binomial, Poisson and ordinal mixed models by Laplace against lme4::glmer 1.1-31 and
ordinal::clmm 2023.12 (values printed by R here on the same tables)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from deepnlme.mixed.datasets import table_path
from deepnlme.mixed.design import build_design
from deepnlme.mixed.formula import parse_formula
from deepnlme.mixed.glmm import LaplaceObjective, fit_glmm
from tests.mixed.conftest import design

CBPP = "cbind(incidence, size - incidence) ~ period + (1 | herd)"


def close(actual, expected, rel):
    np.testing.assert_allclose(actual, expected, rtol=rel)


def test_laplace_gradient_matches_finite_differences():
    objective = LaplaceObjective(design("cbpp", CBPP, ["period"]), "binomial", "logit")
    x = torch.tensor(objective.initial() + 0.1, requires_grad=True)
    (grad,) = torch.autograd.grad(objective(x), x)
    h = 1e-6
    for i in range(len(x)):
        e = torch.zeros_like(x)
        e[i] = h
        fd = (objective(x.detach() + e) - objective(x.detach() - e)) / (2 * h)
        assert abs(float(grad[i]) - float(fd)) < 1e-5 * max(1.0, abs(float(fd)))


def test_binomial_cbpp_matches_glmer():
    fit = fit_glmm(design("cbpp", CBPP, ["period"]), "binomial")
    assert fit.converged
    assert fit.loglik > -92.02657 - 1e-6 and abs(fit.loglik - -92.02657) < 0.01
    close(list(fit.fixef.values()), [-1.39834286, -0.99192497, -1.12821622, -1.57974541], 2e-3)
    close(list(fit.se_fixef.values()), [0.2312140, 0.3031506, 0.3228302, 0.4220492], 2e-2)
    close(fit.varcorr()["herd"]["sd"], [0.64206993], 2e-3)


def test_poisson_crossed_matches_glmer():
    fit = fit_glmm(design("grouseticks", "TICKS ~ YEAR + (1|BROOD) + (1|LOCATION)", ["YEAR"]),
                   "poisson")
    assert fit.converged
    assert fit.loglik > -1005.063311 - 1e-6 and abs(fit.loglik - -1005.063311) < 0.01
    close(list(fit.fixef.values()), [0.33268336, 1.29414016, -0.93978564], 1e-2)
    vc = fit.varcorr()
    close([vc["BROOD"]["sd"][0], vc["LOCATION"]["sd"][0]], [0.72605659, 1.04928776], 1e-2)


@pytest.mark.parametrize(
    ("link", "loglik", "thresholds", "service", "var_s", "var_d"),
    [
        ("logit", -4610.333463, [-2.34077018, -1.11808527, 0.16111118, 1.37061172],
         0.15239475, 0.29835436, 0.59621983),
        ("probit", -4603.378499, [-1.376149972, -0.675916803, 0.094888385, 0.818210770],
         0.089628845, 0.10783007, 0.22406065),
    ],
)
def test_ordinal_matches_clmm(link, loglik, thresholds, service, var_s, var_d):
    t = pd.read_csv(table_path("insteval")).iloc[:3000]
    d = build_design(t, parse_formula("y ~ service + (1|s) + (1|d)"), "insteval[:3000]")
    fit = fit_glmm(d, "ordinal", link, se=False)
    assert fit.converged and list(fit.fixef) == ["service"]
    assert abs(fit.loglik - loglik) < 0.01
    close(fit.thresholds, thresholds, 5e-3)
    close(fit.fixef["service"], service, 1e-2)
    vc = fit.varcorr()
    close([vc["s"]["var"][0], vc["d"]["var"][0]], [var_s, var_d], 2e-2)


def test_ordinal_thresholds_have_clmm_standard_errors():
    """``clmm(rating ~ temp + contact + (1|judge), data = wine)`` (the ordinal package's wine
    data, shipped in tests/mixed/data): its summary's estimates and standard errors."""
    fit = fit_glmm(design("wine", "rating ~ temp + contact + (1|judge)"), "ordinal", "logit")
    assert fit.converged and abs(fit.loglik - -81.57) < 0.005
    close(fit.thresholds, [-1.6237, 1.5134, 4.2285, 6.0888], 1e-4)
    close(fit.se_thresholds, [0.6824, 0.6038, 0.8090, 0.9725], 2e-4)
    close([fit.se_fixef["tempwarm"], fit.se_fixef["contactyes"]], [0.5954, 0.5125], 2e-4)
    close(fit.varcorr()["judge"]["var"], [1.279], 1e-3)
    table = pd.DataFrame(fit.coefficients()).set_index("term")
    assert list(table.index) == ["tempwarm", "contactyes", "1|2", "2|3", "3|4", "4|5"]
    close(table.loc[["1|2", "4|5"], "z_value"], [-2.379, 6.261], 1e-3)
    close(table.loc["contactyes", "p_value"], 0.000344, 2e-3)
    assert fit.summary()["se_thresholds"] == fit.se_thresholds
