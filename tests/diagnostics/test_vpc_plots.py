"""VPC curves span the observed time range with a legend naming each thing once; the
prediction-corrected VPC (time after dose, strata); the smoother; individual-fit curves."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from deepnlme.diagnostics import predict
from deepnlme.diagnostics.curves import grid_population, individual_curves
from deepnlme.diagnostics.npde import simulate_dv
from deepnlme.diagnostics.pcvpc import (
    pcvpc_figure,
    pcvpc_statistics,
    pcvpc_table,
    strata_labels,
    time_after_dose,
)
from deepnlme.diagnostics.plots import loess
from deepnlme.diagnostics.predictions import observation_table
from deepnlme.diagnostics.vpc import vpc_figure, vpc_statistics


def simulated_table(model, pop, n: int = 30, seed: int = 3) -> pd.DataFrame:
    sims = simulate_dv(model, pop, n, torch.Generator().manual_seed(seed))
    base = observation_table(pop, {})
    parts = [base.assign(REP=r + 1, DV=sims[r][pop.obs_mask].numpy()) for r in range(n)]
    return pd.concat(parts, ignore_index=True)


def test_vpc_lines_span_the_observed_times_and_the_legend_is_unique(pheno):
    model, _, pop, _ = pheno
    observed = observation_table(pop, {})
    fig = vpc_figure(observed, simulated_table(model, pop), bins=8)
    ax = fig.axes[0]
    t_min, t_max = observed["TIME"].min(), observed["TIME"].max()
    lines = [  # percentile lines (not the markers alone, nor the vertical bin edges)
        line for line in ax.get_lines()
        if line.get_linestyle() in ("-", "--") and len(set(line.get_xdata())) > 1
    ]
    assert len(lines) == 3  # one per percentile
    for line in lines:
        x = np.asarray(line.get_xdata(), dtype=float)
        assert x.min() == pytest.approx(t_min) and x.max() == pytest.approx(t_max)
    for band in ax.collections[1:]:  # the fill_between bands (the first is the scatter)
        x = band.get_paths()[0].vertices[:, 0]
        assert x.min() == pytest.approx(t_min) and x.max() == pytest.approx(t_max)
    labels = [t.get_text() for t in fig.legends[0].get_texts()]
    assert len(labels) == len(set(labels)) == 5


def test_time_after_dose_matches_nonmem_tad(pheno):
    """NONMEM's TAD for pheno subjects 1 and 2 (observations): 2.0, 4.0; 2.0, 11.5, 11.5."""
    _, _, pop, _ = pheno
    tad = time_after_dose(pop)
    assert tad[0][pop.obs_mask[0]].tolist() == pytest.approx([2.0, 4.0])
    assert tad[1][pop.obs_mask[1]].tolist() == pytest.approx([2.0, 11.5, 11.5])


def test_prediction_correction_with_constant_pred_is_the_plain_vpc(pheno):
    model, _, pop, _ = pheno
    sims = simulate_dv(model, pop, 20, torch.Generator().manual_seed(1))
    observed = pcvpc_table(pop, torch.ones_like(pop.obs_time), x="TIME")
    stats = pcvpc_statistics(observed, sims[:, pop.obs_mask].numpy(), bins=6)
    plain = vpc_statistics(observation_table(pop, {}), simulated_table(model, pop, 20, 1), 6)
    columns = ["bin", "quantile", "observed", "sim_lo", "sim_median", "sim_hi"]
    pd.testing.assert_frame_equal(stats[columns], plain[columns], check_dtype=False)
    assert set(stats["STRATUM"]) == {"all"}


def test_pcvpc_strata_and_correction(pheno):
    model, _, pop, eta = pheno
    pred = predict(model, pop, eta).pred
    observed = pcvpc_table(pop, pred, x="TAD", stratify="APGAR")
    assert set(observed["STRATUM"]) == {"APGAR<=7", "APGAR>7"}  # 10 levels: halves
    sims = simulate_dv(model, pop, 40, torch.Generator().manual_seed(2))[:, pop.obs_mask]
    stats = pcvpc_statistics(observed, sims.numpy(), bins=4)
    assert set(stats["STRATUM"]) == set(observed["STRATUM"])
    # corrected DVs of one bin: DV · median(PRED in bin) / PRED
    one = observed[observed["STRATUM"] == "APGAR>7"]
    assert len(stats[stats["STRATUM"] == "APGAR>7"]) == 4 * 3
    fig = pcvpc_figure(observed, stats)
    assert len([ax for ax in fig.axes if ax.get_title()]) == 2 and len(one) > 0
    with pytest.raises(ValueError, match="cannot stratify the VPC by 'AGE'"):
        pcvpc_table(pop, pred, stratify="AGE")


def test_strata_labels():
    assert list(strata_labels(np.array([1.0, 2.0, 1.0]), "SEX")) == ["SEX=1", "SEX=2", "SEX=1"]
    labels = strata_labels(np.arange(10.0), "WT")
    assert list(labels[:5]) == ["WT<=4.5"] * 5 and list(labels[5:]) == ["WT>4.5"] * 5


def test_loess_reproduces_a_line_and_smooths_noise():
    x = np.linspace(0, 10, 60)
    grid, fit = loess(x, 3 - 2 * x)
    assert fit == pytest.approx(3 - 2 * grid, abs=1e-9)
    rng = np.random.default_rng(0)
    grid, fit = loess(x, np.sin(x) + rng.normal(scale=0.3, size=x.size), frac=0.3)
    assert np.abs(fit - np.sin(grid)).max() < 0.35
    assert loess(x[:3], x[:3])[0].size == 0


def test_individual_curves_pass_through_the_predictions(pheno):
    """The grid ends at each subject's last record; there the curves equal PRED/IPRED."""
    model, _, pop, eta = pheno
    curves = individual_curves(model, pop, eta, n_points=50)
    grid = grid_population(pop, 50)
    assert grid.obs_time.shape == (len(pop), 50) and bool(grid.obs_mask.all())
    preds = predict(model, pop, eta)
    last_obs = pop.obs_mask.sum(-1) - 1
    for i in (0, 1, 7):
        row = curves[curves["ID"] == pop.ids[i]].iloc[-1]
        t = int(last_obs[i])
        if float(pop.obs_time[i, t]) >= float(pop.dose_time[i][pop.dose_mask[i]].max()):
            assert row["TIME"] == pytest.approx(float(pop.obs_time[i, t]))
            assert row["IPRED"] == pytest.approx(float(preds.ipred[i, t]))
            assert row["PRED"] == pytest.approx(float(preds.pred[i, t]))


def test_prediction_correction_skips_zero_pred():
    """pcDV = DV · median(positive PRED in the bin) / PRED; PRED = 0 rows are left out."""
    observed = pd.DataFrame({"X": [0.0, 0.0, 1.0, 1.0], "DV": [5.0, 5.0, 2.0, 4.0],
                             "PRED": [0.0, 0.0, 2.0, 4.0], "CMT": 1, "STRATUM": "all"})
    sims = np.tile(observed["DV"].to_numpy(), (3, 1))
    stats = pcvpc_statistics(observed, sims, bins=1, quantiles=(0.5,))
    assert stats["observed"].tolist() == pytest.approx([3.0])
    assert stats[["sim_lo", "sim_hi"]].to_numpy().ravel() == pytest.approx([3.0, 3.0])
