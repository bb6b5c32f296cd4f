"""Covariance step: the sandwich reproduces NONMEM's pheno $COV (its default, R⁻¹SR⁻¹); R⁻¹
agrees with the existing standard errors; a failed step says so; the parameter table's scales
and delta-method SEs."""

from __future__ import annotations

import math

import pytest
import torch

from deepnlme.diagnostics.coeftable import parameter_table
from deepnlme.diagnostics.covariance import CovarianceStep, covariance_step
from deepnlme.inference.uncertainty import parameter_covariance
from deepnlme.model.zoo.pk import OneCmtIVModel

# NONMEM 7.4.2 pheno FOCEI, $COVARIANCE (default: sandwich): SEs of TH1-3, OM11, OM22, SG11.
NONMEM_SE = [2.10e-4, 2.69e-2, 8.38e-2, 1.34e-2, 7.48e-3, 2.28e-3]
# and correlations of the estimates: (TH1, OM11), (TH2, TH3), (TH2, OM22), (TH1, SG11)
NONMEM_CORR = {("tvcl", "omega[cl,cl]"): -0.388, ("tvv", "apgar_v"): -0.357,
               ("tvv", "omega[v,v]"): 0.357, ("tvcl", "sigma_prop"): 0.171}


@pytest.fixture(scope="module")
def pheno_steps(pheno):
    _, est, pop, _ = pheno
    return covariance_step(est, pop, "r"), covariance_step(est, pop, "sandwich")


def test_sandwich_matches_nonmem_covariance_step(pheno, pheno_steps):
    model, _, _, _ = pheno
    _, sandwich = pheno_steps
    assert sandwich.ok and sandwich.method == "sandwich"
    table = parameter_table(model, sandwich).set_index(["parameter", "scale"])
    rows = [("tvcl", "natural"), ("tvv", "natural"), ("apgar_v", "natural"),
            ("omega[cl,cl]", "variance"), ("omega[v,v]", "variance"), ("sigma_prop", "variance")]
    se = [table.loc[r, "se"] for r in rows]
    assert se == pytest.approx(NONMEM_SE, rel=0.01)
    index = {label: k for k, label in enumerate(sandwich.labels)}
    corr = sandwich.correlation
    for (a, b), ref in NONMEM_CORR.items():
        value = float(corr[index[a], index[b]])
        if b == "sigma_prop":  # NONMEM's SG11 is σ²: same sign and size as for σ
            assert value == pytest.approx(ref, abs=0.01)
        else:
            assert value == pytest.approx(ref, abs=0.01), (a, b)


def test_r_inverse_agrees_with_parameter_covariance(pheno, pheno_steps):
    """Same Hessian, separate delta-method code (inference.uncertainty)."""
    _, est, pop, _ = pheno
    r, _ = pheno_steps
    reference = parameter_covariance(est, pop).se
    for name, value in r.se.items():
        assert value.flatten().tolist() == pytest.approx(
            reference[name].flatten().tolist(), rel=1e-6), name
    ev = r.eigenvalues
    assert r.condition_number == pytest.approx(float(ev[-1] / ev[0]))
    assert float(ev.sum()) == pytest.approx(len(r.labels))  # trace of a correlation matrix
    assert torch.diagonal(r.correlation) == pytest.approx(torch.ones(len(r.labels)))


class SaddleEstimator:
    """An objective with negative curvature in tvcl's raw parameter (not a minimum)."""

    def __init__(self, model):
        self.model = model

    def loss(self, pop):
        raws = [p.raw for p in self.model.declared().values()]
        return -raws[0].pow(2).sum() + sum(r.pow(2).sum() for r in raws[1:])


def test_failed_step_is_reported_not_raised():
    step = covariance_step(SaddleEstimator(OneCmtIVModel()), pop=None, method="sandwich")
    assert step.status.startswith("failed: the R matrix is not positive definite")
    assert not step.ok and math.isnan(step.condition_number)
    assert all(torch.isnan(v).all() for v in step.se.values() if v is not None)
    table = parameter_table(step_model := SaddleEstimator(OneCmtIVModel()).model, step)
    assert table["se"].isna().all() and len(table) == len(parameter_table(step_model))


def test_unknown_method_is_rejected(pheno):
    _, est, pop, _ = pheno
    with pytest.raises(ValueError, match="covariance method must be one of"):
        covariance_step(est, pop, "s")


def test_table_scales_and_delta_method():
    """Known covariance of (tvcl, tvv, Ω full 2x2, σ): derived rows follow the delta method."""
    model = OneCmtIVModel(omega_structure="full", init={
        "tvcl": 2.0, "tvv": 10.0, "omega": [[0.09, 0.03], [0.03, 0.16]], "sigma_prop": 0.2})
    labels = ["tvcl", "tvv", "omega[cl,cl]", "omega[v,cl]", "omega[v,v]", "sigma_prop"]
    sd = torch.tensor([0.1, 0.5, 0.02, 0.01, 0.04, 0.03])
    cov = torch.diag(sd**2)
    step = CovarianceStep("r", "ok", labels, labels, torch.zeros(6), cov)
    t = parameter_table(model, step).set_index(["parameter", "scale"])
    assert list(t.index.get_level_values("scale")) == [
        "natural", "natural", "variance", "SD", "CV% (log-normal)", "covariance",
        "correlation", "variance", "SD", "CV% (log-normal)", "SD", "variance"]
    assert t.loc[("omega[cl,cl]", "CV% (log-normal)"), "estimate"] == pytest.approx(
        100 * math.sqrt(math.exp(0.09) - 1))
    assert t.loc[("omega[cl,cl]", "SD"), "se"] == pytest.approx(0.02 / (2 * 0.3))
    assert t.loc[("sigma_prop", "variance"), "estimate"] == pytest.approx(0.04)
    assert t.loc[("sigma_prop", "variance"), "se"] == pytest.approx(2 * 0.2 * 0.03)
    assert t.loc[("omega[v,cl]", "correlation"), "estimate"] == pytest.approx(0.03 / 0.12)
    # correlation r = c/√(ab): ∂r/∂c = 1/√(ab), ∂r/∂a = -r/(2a), ∂r/∂b = -r/(2b)
    r = 0.25
    var = (0.01 / 0.12) ** 2 + (r / 0.18 * 0.02) ** 2 + (r / 0.32 * 0.04) ** 2
    assert t.loc[("omega[v,cl]", "correlation"), "se"] == pytest.approx(math.sqrt(var))
    row = t.loc[("tvcl", "natural")]
    assert row["rse_pct"] == pytest.approx(5.0)
    assert (row["ci_lower"], row["ci_upper"]) == pytest.approx((2 - 0.196, 2 + 0.196), abs=1e-4)
