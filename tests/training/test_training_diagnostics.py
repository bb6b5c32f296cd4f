"""Diagnostics are pure functions of model, estimator and population."""

from __future__ import annotations

import json
import math

import pandas as pd
import pytest
import torch

from deepnlme.data import load_dataset
from deepnlme.diagnostics import (
    estimates_table,
    evaluate,
    objective_summary,
    omega_blocks,
    param_values,
    predict,
    rmse,
    sample_eta,
    write_results,
    write_tables,
)
from deepnlme.fitted import default_dtype
from deepnlme.inference import FOCEI, Laplace
from deepnlme.model.zoo.pk import OneCmtOralModel, PhenoModel

# Theophylline reference estimates (Laplace, additive error); see tests/test_cli.py.
THEO_INIT = {
    "tvka": 1.5789, "tvcl": 0.04004, "tvv": 0.4575,
    "omega": [0.6526**2, 0.2652**2, 0.1339**2], "sigma_add": 0.6912,
}


@pytest.fixture(scope="module")
def theo():
    with default_dtype(torch.float64):
        model = OneCmtOralModel(init=THEO_INIT)
    return model, load_dataset("theophylline", dtype=torch.float64)


def test_objective_summary_formulas():
    s = objective_summary(-100.0, 5, 50)
    assert s["ofv"] == 200.0
    assert s["ofv_nonmem"] == pytest.approx(200.0 - 50 * math.log(2 * math.pi))
    assert s["aic"] == 210.0
    assert s["bic"] == pytest.approx(200.0 + 5 * math.log(50))


def test_param_values_and_omega_are_plain_natural_scale(theo):
    model, _ = theo
    params = param_values(model)
    assert list(params) == ["tvka", "tvcl", "tvv", "omega", "sigma_add"]
    assert params["tvv"] == pytest.approx(0.4575)
    assert len(params["omega"]) == 3 and len(params["omega"][0]) == 3
    blocks = omega_blocks(model)
    assert blocks["omega"]["names"] == ["ka", "cl", "v"]
    assert blocks["omega"]["cov"][1][1] == pytest.approx(0.2652**2)
    json.dumps(params)  # plain Python


def test_estimates_table_names_elements():
    table = estimates_table(OneCmtOralModel(omega_structure="full", init={"tvv": 2.0}))
    names = table["name"].tolist()
    assert names[:3] == ["tvka", "tvcl", "tvv"]
    assert "omega[cl,ka]" in names and "omega[ka,cl]" not in names
    assert table.set_index("name").loc["tvv", "value"] == pytest.approx(2.0)
    diagonal = estimates_table(OneCmtOralModel())["name"].tolist()
    assert [n for n in diagonal if n.startswith("omega")] == [
        "omega[ka,ka]", "omega[cl,cl]", "omega[v,v]"
    ]


def test_predictions_pred_is_eta_zero_and_ipred_fits_better(theo):
    model, pop = theo
    evaluation = evaluate(model, Laplace(model), pop)
    assert evaluation.eta.shape == (12, 3)
    zero = predict(model, pop, torch.zeros(12, 3, dtype=torch.float64))
    assert torch.allclose(zero.pred, zero.ipred)
    metrics = evaluation.metrics()
    assert set(metrics) == {"n_subjects", "n_obs", "loglik", "rmse_ipred", "rmse_pred"}
    assert metrics["rmse_ipred"] < metrics["rmse_pred"]
    assert metrics["loglik"] == pytest.approx(-180.153, abs=0.05)
    assert rmse(evaluation.predictions.ipred, pop) == metrics["rmse_ipred"]

    table = evaluation.prediction_table()
    assert list(table.columns) == ["ID", "TIME", "DV", "PRED", "IPRED", "IWRES", "CMT", "split"]
    assert len(table) == pop.n_obs
    ebes = evaluation.ebes
    assert list(ebes.columns[:6]) == ["ID", "split", "loglik", "eta_ka", "eta_cl", "eta_v"]
    assert {"ka", "cl", "v"} <= set(ebes.columns)
    assert ebes["loglik"].sum() == pytest.approx(evaluation.loglik)


def test_iwres_is_standardized_residual_for_proportional_error():
    pop = load_dataset("phenobarbital", dtype=torch.float64)
    model = PhenoModel()  # float64: tests/conftest.py
    evaluation = evaluate(model, FOCEI(model), pop)
    preds, mask = evaluation.predictions, pop.obs_mask
    sd = model.sigma_prop.value().detach() * preds.ipred
    expected = ((pop.obs_dv - preds.ipred) / sd)[mask]
    assert torch.allclose(preds.iwres[mask], expected)


def test_write_tables_and_results(tmp_path, theo):
    model, pop = theo
    fit = evaluate(model, Laplace(model), pop.subset([0, 1, 2]), "fit")
    held = evaluate(model, Laplace(model), pop.subset([3, 4]), "heldout")
    written = write_tables(tmp_path, [fit, held], model)
    assert {p.name for p in written} == {
        "predictions.csv", "ebes.csv", "estimates.csv", "gof.png"
    }
    predictions = pd.read_csv(tmp_path / "predictions.csv")
    assert set(predictions["split"]) == {"fit", "heldout"}
    assert len(pd.read_csv(tmp_path / "ebes.csv")) == 5
    assert (tmp_path / "gof.png").stat().st_size > 10_000
    write_results(tmp_path / "results.json", {"loglik": -1.5, "bad": float("nan"), "m": [[1, 2]]})
    assert json.loads((tmp_path / "results.json").read_text()) == {
        "loglik": -1.5, "bad": None, "m": [[1, 2]]
    }


def test_sample_eta_has_covariance_omega(theo):
    model, _ = theo
    eta = sample_eta(model, 20000, torch.Generator().manual_seed(0))
    cov = torch.cov(eta.T)
    omega = model.omega.value().detach()
    assert torch.allclose(cov, omega, atol=0.02)
