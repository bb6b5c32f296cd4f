"""CWRES against an independent FOCE linearization and against NONMEM's own table for pheno;
ETABAR and shrinkage against NONMEM's pheno output."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg
import torch

from deepnlme.diagnostics import predict
from deepnlme.diagnostics.residuals import (
    conditional_residuals,
    eps_shrinkage,
    eta_shrinkage,
    etabar,
)

# NONMEM 7.4.2, pheno FOCEI (the same model and data, $TABLE CWRES of the pheno_real run in
# pharmpy's test data): CWRES of the first 25 observations (subjects 1-9).
NONMEM_CWRES = [
    -0.40104, 0.58781, -1.2788, 1.6707, 1.3526, -0.15180, -0.055757, -1.5248, 0.020685,
    -0.34052, 0.31411, -0.92273, -0.70228, -1.7585, 0.15063, -2.1648, 0.90597, -0.26138,
    0.14310, -0.60265, 0.94941, 1.0453, 0.21384, 0.36241, 0.60313,
]


def independent_cwres(model, pop, eta_hat, interaction: bool) -> np.ndarray:
    """CWRES subject by subject: G by torch.autograd.functional.jacobian, C = GΩGᵀ + diag V,
    C^{-1/2} by scipy's matrix square root."""
    omega = model.param_values()["omega"].detach().numpy()
    out = []
    for i in range(len(pop)):
        sub = pop.subset([i])
        m = sub.obs_mask[0]
        e = eta_hat[i : i + 1].detach()

        def mean(x, sub=sub, m=m):
            return model.observe(x, sub).mean[0][m]

        f = mean(e).detach().numpy()
        g = torch.autograd.functional.jacobian(mean, e).reshape(int(m.sum()), -1).numpy()
        at = e if interaction else torch.zeros_like(e)
        v = model.observe(at, sub).variance[0][m].detach().numpy()
        cov = g @ omega @ g.T + np.diag(v)
        y = sub.obs_dv[0][m].numpy()
        resid = y - (f - g @ e[0].numpy())
        root = np.real(scipy.linalg.sqrtm(cov))
        out.append(np.linalg.solve(root, resid))
    return np.concatenate(out)


@pytest.mark.parametrize("interaction", [True, False])
def test_cwres_equals_the_foce_linearization(pheno, interaction):
    model, _, pop, eta = pheno
    ours = conditional_residuals(model, pop, eta, interaction).cwres[pop.obs_mask].numpy()
    assert ours == pytest.approx(independent_cwres(model, pop, eta, interaction), abs=1e-6)


def test_cwres_matches_nonmem_table(pheno):
    """Same numbers as NONMEM's table to its 5 printed digits (estimates rounded to 5)."""
    model, _, pop, eta = pheno
    ours = conditional_residuals(model, pop, eta).cwres[pop.obs_mask][: len(NONMEM_CWRES)]
    assert ours.numpy() == pytest.approx(NONMEM_CWRES, abs=2e-4)


def test_ciwres_is_iwres_with_interaction(pheno):
    model, _, pop, eta = pheno
    res = conditional_residuals(model, pop, eta, interaction=True)
    iwres = predict(model, pop, eta).iwres
    assert res.ciwres[pop.obs_mask].numpy() == pytest.approx(iwres[pop.obs_mask].numpy())
    # without interaction the variance is at η = 0 (PRED): different weights
    no_int = conditional_residuals(model, pop, eta, interaction=False).ciwres[pop.obs_mask]
    assert not torch.allclose(no_int, res.ciwres[pop.obs_mask])


def test_shrinkage_and_etabar_match_nonmem(pheno):
    """NONMEM's pheno output: ETASHRINKSD 47.130 / 12.839 %, EPSSHRINKSD 21.198 %,
    ETABAR SE 1.1692e-2 / 1.8795e-2, P VAL 0.885 / 0.949."""
    model, _, pop, eta = pheno
    shrink = eta_shrinkage(model, eta)
    assert 100 * shrink["cl"] == pytest.approx(47.130, abs=0.05)
    assert 100 * shrink["v"] == pytest.approx(12.839, abs=0.05)
    iwres = predict(model, pop, eta).iwres
    assert 100 * eps_shrinkage(iwres, pop.obs_mask) == pytest.approx(21.198, abs=0.05)
    table = etabar(model, eta)
    assert table["se"].to_numpy() == pytest.approx([1.1692e-2, 1.8795e-2], rel=2e-3)
    assert table["p_value"].to_numpy() == pytest.approx([0.885, 0.949], abs=0.005)
    assert table["etabar"].to_numpy() == pytest.approx([1.6884e-3, -1.1976e-3], abs=5e-5)
