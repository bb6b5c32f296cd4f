"""Classic datasets against reference values (an independent Laplace optimum; NONMEM)."""

import math

import pytest
import torch

from deepnlme.data import load_dataset
from deepnlme.inference import FOCEI, Laplace, fit
from deepnlme.model.zoo.pk import OneCmtOralModel, PhenoModel

# NONMEM 7 FOCEI on pheno: OFV and estimates (θ, Ω diagonal, σ²).
NONMEM_PHENO = {
    "ofv": 586.276,
    "tvcl": 0.0046956,
    "tvv": 0.98426,
    "apgar_v": 0.15892,
    "omega": (0.029351, 0.027906),
    "sigma2": 0.013241,
}


def ofv_nonmem(loglik: float, n_obs: int) -> float:
    return -2 * loglik - n_obs * math.log(2 * math.pi)


def test_theophylline_laplace_matches_reference():
    pop = load_dataset("theophylline")
    model = OneCmtOralModel(error="additive")
    est = Laplace(model)
    result = fit(est, pop)
    assert result.converged
    assert est.loglik(pop) == pytest.approx(-180.153, abs=0.01)
    p = model.param_values()
    sd = torch.diagonal(p["omega"]).sqrt().tolist()
    for got, want in [
        (p["tvka"], 1.5789),
        (p["tvcl"], 0.04004),
        (p["tvv"], 0.4575),
        (sd[0], 0.6526),
        (sd[1], 0.2652),
        (sd[2], 0.1339),
        (p["sigma_add"], 0.6912),
    ]:
        assert float(got) == pytest.approx(want, rel=0.01)


def nonmem_pheno_model() -> PhenoModel:
    ref = NONMEM_PHENO
    return PhenoModel(
        init={
            "tvcl": ref["tvcl"],
            "tvv": ref["tvv"],
            "apgar_v": ref["apgar_v"],
            "omega": list(ref["omega"]),
            "sigma_prop": math.sqrt(ref["sigma2"]),
        }
    )


def test_pheno_ofv_at_nonmem_estimates_from_zero_etas():
    pop = load_dataset("phenobarbital")
    est = FOCEI(nonmem_pheno_model())
    loglik = est.loglik(pop, warm_start=False)
    assert ofv_nonmem(loglik, pop.n_obs) == pytest.approx(NONMEM_PHENO["ofv"], abs=0.01)
    assert bool(est.last_inner.converged.all())


def test_pheno_focei_fit_matches_nonmem():
    pop = load_dataset("phenobarbital")
    model = PhenoModel()
    est = FOCEI(model)
    result = fit(est, pop)
    assert result.converged
    assert ofv_nonmem(est.loglik(pop), pop.n_obs) == pytest.approx(NONMEM_PHENO["ofv"], abs=0.01)
    p = model.param_values()
    for name in ("tvcl", "tvv", "apgar_v"):
        assert float(p[name]) == pytest.approx(NONMEM_PHENO[name], rel=0.01)
    omega = torch.diagonal(p["omega"]).tolist()
    assert omega == pytest.approx(list(NONMEM_PHENO["omega"]), rel=0.01)
    assert float(p["sigma_prop"]) ** 2 == pytest.approx(NONMEM_PHENO["sigma2"], rel=0.01)


def test_warm_and_cold_started_modes_agree():
    pop = load_dataset("phenobarbital")
    est = FOCEI(nonmem_pheno_model(), inner={"gtol": 1e-10})
    cold = est.modes(pop, warm_start=False)
    # Warm start from deliberately bad modes: the same optimum must come back.
    est._eta_hat = cold + 0.5
    warm = est.modes(pop, warm_start=True)
    assert torch.allclose(warm, cold, atol=1e-8)
