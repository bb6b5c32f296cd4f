"""The synthetic PK population (Michaelis–Menten elimination): determinism, layout, agreement
with its event table, the true dynamics, and the held-out regimen."""

from __future__ import annotations

import inspect
from pathlib import Path

import numpy as np
import torch
import yaml

from deepnlme.data.build import load_population
from deepnlme.data.population import Population
from deepnlme.data.sources import SPLIT_KEYS
from deepnlme.data.synthetic import (
    COVARIATES,
    DOSES,
    REGIMEN,
    REGIMEN_TIMES,
    TRUTH,
    michaelis_menten_conc,
    one_cmt_oral_conc,
    synthetic_pk,
    synthetic_pk_regimen,
    synthetic_pk_regimen_table,
    synthetic_pk_table,
    true_parameters,
)

ROOT = Path(__file__).resolve().parents[2]


def tensors(pop: Population) -> dict[str, torch.Tensor]:
    return {n: getattr(pop, n) for n in pop._tensor_fields()}


def test_same_seed_identical_other_seed_different():
    a, b = synthetic_pk(30, seed=3), synthetic_pk(30, seed=3)
    for name, t in tensors(a).items():
        assert torch.equal(t, getattr(b, name)), name
    assert a.ids == b.ids
    c = synthetic_pk(30, seed=4)
    assert not torch.equal(a.obs_dv, c.obs_dv)
    assert not torch.equal(a.covariates, c.covariates)


def test_shapes_and_layout():
    n, t = 12, 7
    pop = synthetic_pk(n, seed=1, n_obs=t, dtype=torch.float64)
    assert len(pop) == n and pop.n_obs == n * t
    assert pop.ids == [str(i + 1) for i in range(n)]
    assert pop.covariate_names == list(COVARIATES) and pop.source == "synthetic_pk"
    assert pop.obs_time.shape == (n, t) and pop.dose_time.shape == (n, 1)
    assert pop.obs_mask.all() and pop.dose_mask.all()
    assert (pop.obs_cmt == 2).all() and (pop.dose_cmt == 1).all()
    expected = torch.tensor([DOSES[i % 3] for i in range(n)], dtype=torch.float64)
    assert torch.equal(pop.dose_amt[:, 0], expected) and (pop.dose_time == 0).all()
    assert (pop.obs_time[:, 1:] >= pop.obs_time[:, :-1]).all()
    assert float(pop.obs_time.min()) > 0.3 and float(pop.obs_time.max()) < 70.0
    assert (pop.obs_dv > 0).all()
    assert synthetic_pk(2, dtype=torch.float32).obs_dv.dtype == torch.float32


def test_truth_in_meta_is_consistent():
    pop = synthetic_pk(30, seed=2, dtype=torch.float64)
    typ = true_parameters(pop.covariate("WT").numpy(), pop.covariate("CRCL").numpy())
    for j, k in enumerate(("ka", "vmax", "v")):
        np.testing.assert_allclose(pop.meta["true_typical"][k].numpy(), typ[k], rtol=1e-12)
        ind = pop.meta["true_typical"][k] * torch.exp(pop.meta["true_eta"][:, j])
        torch.testing.assert_close(pop.meta["true_individual"][k], ind)
    rel = (pop.obs_dv / pop.meta["true_conc"] - 1).flatten()
    assert abs(float(rel.std()) - TRUTH["SIGMA_PROP"]) < 0.03  # proportional error of 10%


def test_true_dynamics_reduce_to_the_linear_closed_form_without_saturation():
    """With VMAX = 0 the Michaelis–Menten model is linear (CL = CLL): RK4 = closed form."""
    t = np.array([[0.5, 2.0, 7.0, 30.0], [1.0, 3.0, 12.0, 48.0]])
    ka, v = np.array([0.8, 1.7]), np.array([35.0, 50.0])
    indiv = {"ka": ka, "vmax": np.zeros(2), "v": v, "km": 1.0, "cll": 2.5}
    conc = michaelis_menten_conc(t, np.zeros((2, 1)), np.full((2, 1), 100.0), indiv)
    np.testing.assert_allclose(conc, one_cmt_oral_conc(t, 100.0, ka, np.full(2, 2.5), v),
                               rtol=1e-9)


def test_exposure_grows_more_than_proportionally_with_the_dose():
    """Saturable elimination: dose-normalized concentrations rise with the dose."""
    t = np.tile(np.linspace(0.5, 48, 40), (3, 1))
    indiv = {"ka": np.ones(3), "vmax": np.full(3, 10.0), "v": np.full(3, 40.0),
             "km": TRUTH["KM"], "cll": TRUTH["CLL"]}
    doses = np.array(DOSES)[:, None]
    conc = michaelis_menten_conc(t, np.zeros((3, 1)), doses, indiv)
    auc_per_dose = conc.sum(1) / doses[:, 0]
    assert auc_per_dose[1] > 1.15 * auc_per_dose[0] and auc_per_dose[2] > 1.2 * auc_per_dose[1]


def test_table_through_the_data_layer(tmp_path):
    """Writing the tables as csv and reading them back gives the same Population tensors."""
    for make, table in ((lambda: synthetic_pk(6, seed=1, dtype=torch.float64),
                         synthetic_pk_table(6, seed=1)),
                        (lambda: synthetic_pk_regimen(4, seed=1, dtype=torch.float64),
                         synthetic_pk_regimen_table(4, seed=1))):
        path = tmp_path / "table.csv"
        table.to_csv(path, index=False, float_format="%.17g")
        loaded = load_population(path, covariates=list(COVARIATES), dtype=torch.float64)
        pop = make()
        for name in ("obs_time", "obs_dv", "obs_mask", "dose_time", "dose_amt", "covariates"):
            torch.testing.assert_close(getattr(loaded, name), getattr(pop, name), msg=name)
        assert torch.equal(loaded.obs_row, pop.obs_row) and loaded.ids == pop.ids


def test_heldout_regimen_is_repeated_dosing_of_new_subjects():
    pop = synthetic_pk_regimen(5, seed=0, dtype=torch.float64)
    fit = synthetic_pk(5, seed=0, dtype=torch.float64)
    assert pop.ids == ["R1", "R2", "R3", "R4", "R5"] and pop.source == "synthetic_pk_regimen"
    times = REGIMEN["ii"] * torch.arange(REGIMEN["addl"] + 1, dtype=torch.float64)
    assert torch.equal(pop.dose_time, times.expand(5, -1))
    assert (pop.dose_amt == REGIMEN["amt"]).all() and REGIMEN["amt"] not in DOSES
    assert torch.equal(pop.obs_time[0], torch.tensor(REGIMEN_TIMES, dtype=torch.float64))
    assert not torch.equal(pop.covariates, fit.covariates)  # a seed stream of its own
    conc = pop.meta["true_conc"]
    # accumulation: the trough before the 7th dose exceeds the one before the 2nd
    assert (conc[:, 7] > conc[:, 2]).all()


def test_data_config_keys_are_synthetic_pk_kwargs():
    cfg = yaml.safe_load((ROOT / "configs" / "data" / "synthetic_pk.yaml").read_text())
    assert cfg["name"] == "synthetic_pk" and cfg["path"] is None
    assert cfg["covariates"] == list(COVARIATES)
    extra = set(cfg) - {"name", "path", "covariates", *SPLIT_KEYS}
    assert extra <= set(inspect.signature(synthetic_pk).parameters) - {"dtype"}
    assert len(synthetic_pk(**{k: cfg[k] for k in extra})) == cfg["n_subjects"]
    assert set(cfg["heldout_regimen"]) <= set(inspect.signature(synthetic_pk_regimen).parameters)
