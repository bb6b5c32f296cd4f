"""write_all: every table, plot and the report of a run directory, and its options."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from deepnlme.diagnostics import DiagnosticOptions, evaluate, write_all


def test_write_all_writes_tables_plots_and_report(theo, tmp_path, caplog):
    model, est, pop, _ = theo
    evaluation = evaluate(model, est, pop, "fit")
    trace = pd.DataFrame({"iteration": [0, 1, 2], "objective": [200.0, 185.0, 180.2],
                          "tvka": [1.0, 1.4, 1.58]})
    options = {"covariance": "sandwich", "n_sim": 60, "per_page": 6, "stratify": "WT"}
    with caplog.at_level("INFO", logger="deepnlme.diagnostics"):
        results = write_all(tmp_path, est, [evaluation], {"loglik": evaluation.loglik},
                            options, se=True, trace=trace)
    pngs = ["dv_pred.png", "residuals.png", "qq.png", "eta_hist.png", "eta_covariates.png",
            "individual_01.png", "individual_02.png", "pcvpc.png", "convergence.png", "gof.png"]
    for name in pngs:
        assert (tmp_path / name).stat().st_size > 10_000, name
    report = (tmp_path / "report.md").read_text()
    assert all(f"]({name})" in report for name in pngs if name != "gof.png")
    assert "Method `sandwich`, status: ok." in report
    predictions = pd.read_csv(tmp_path / "predictions.csv")
    for column in ("TAD", "CPRED", "CWRES", "CIWRES", "NPD", "NPDE"):
        assert predictions[column].notna().all(), column
    params = pd.read_csv(tmp_path / "parameters.csv")
    assert params["se"].notna().all()
    assert json.loads((tmp_path / "results.json").read_text())["covariance_step"]["method"] == (
        "sandwich")
    assert results["covariance_step"]["status"] == "ok"
    assert set(results["shrinkage"]["eta_sd_pct"]) == {"ka", "cl", "v"}
    assert abs(results["npde"]["mean"]) < 0.5 and results["npde"]["n_sim"] == 60
    assert set(pd.read_csv(tmp_path / "pcvpc.csv")["STRATUM"]) == {"WT<=70.5", "WT>70.5"}
    corr = pd.read_csv(tmp_path / "correlation.csv", index_col=0)
    assert list(corr.index) == list(corr.columns) and len(corr) == 7
    text = caplog.text
    assert "covariance step (sandwich R⁻¹SR⁻¹): ok" in text and "ε-shrinkage (SD)" in text


def test_write_all_without_simulations_plots_or_se(theo, tmp_path):
    model, est, pop, _ = theo
    evaluation = evaluate(model, est, pop, "fit")
    results = write_all(tmp_path, est, [evaluation], {}, {"n_sim": 0, "plots": False}, se=False)
    assert "se" not in results and "npde" not in results
    assert [p.name for p in tmp_path.glob("*.png")] == ["gof.png"]  # write_tables' own plot
    assert not (tmp_path / "report.md").exists()
    assert "NPDE" not in pd.read_csv(tmp_path / "predictions.csv")


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"covariance": "S"}, "diagnostics.covariance must be one of"),
        ({"vpc_x": "DOSE"}, "diagnostics.vpc_x must be TAD or TIME"),
        ({"n_sim": -1}, "diagnostics.n_sim must be >= 0"),
        ({"nsim": 10}, "unknown diagnostics options ['nsim']"),
        ({"n_sim": "many"}, "diagnostics options:"),
    ],
)
def test_bad_options_are_one_clear_message(options, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        DiagnosticOptions.from_mapping(options)
