"""The synthetic PK population: determinism, layout, agreement with its event table, and the
nonlinearity of its true covariate effects."""

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
    TRUTH,
    one_cmt_oral_conc,
    synthetic_pk,
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


def test_pinned_values_for_seed_zero():
    """Pins the data set: numpy's default_rng (PCG64) streams are the same on every machine."""
    pop = synthetic_pk(3, seed=0, dtype=torch.float64)
    expected_cov = [
        [76.90986546037998, 19.10735158041145, 0.0, 200.0],
        [73.04437556240809, 72.48910602641826, 0.0, 94.65101264777765],
        [85.24868097628364, 79.15462367760736, 0.0, 78.89665087247079],
    ]
    torch.testing.assert_close(pop.covariates, torch.tensor(expected_cov, dtype=torch.float64))
    expected_dv = [
        [0.4839642180500294, 0.004901843758052044],
        [0.5470227923264526, 0.057719391625802835],
        [1.2323536030715958, 0.009780668786873838],
    ]
    torch.testing.assert_close(
        pop.obs_dv[:, [0, -1]], torch.tensor(expected_dv, dtype=torch.float64)
    )


def test_shapes_and_layout():
    n, t = 12, 7
    pop = synthetic_pk(n, seed=1, n_obs=t, dtype=torch.float64)
    assert len(pop) == n and pop.n_obs == n * t
    assert pop.ids == [str(i + 1) for i in range(n)]
    assert pop.covariate_names == list(COVARIATES)
    assert pop.source == "synthetic_pk"
    assert pop.obs_time.shape == (n, t) and pop.obs_time.dtype == torch.float64
    assert pop.dose_time.shape == (n, 1)
    assert pop.covariates.shape == (n, len(COVARIATES))
    assert pop.obs_covariates.shape == (n, t, len(COVARIATES))
    assert torch.equal(pop.obs_covariates, pop.covariates[:, None, :].expand(n, t, -1))
    assert pop.obs_mask.all() and pop.dose_mask.all()
    assert torch.equal(pop.subject_index, torch.arange(n))
    assert (pop.obs_cmt == 2).all() and (pop.dose_cmt == 1).all()
    assert (pop.dose_amt == TRUTH["DOSE"]).all() and (pop.dose_time == 0).all()
    assert (pop.dose_rate == 0).all() and (pop.dose_ss == 0).all()
    assert (pop.obs_epoch == 0).all() and (pop.dose_epoch == 0).all()
    assert (pop.obs_time > 0).all() and (pop.obs_time[:, 1:] >= pop.obs_time[:, :-1]).all()
    assert float(pop.obs_time.max()) < 48.0 and float(pop.obs_time.min()) > 0.1
    assert (pop.obs_dv > 0).all()
    assert synthetic_pk(2, dtype=torch.float32).obs_dv.dtype == torch.float32


def test_covariate_ranges():
    pop = synthetic_pk(200, seed=0, dtype=torch.float64)
    wt, age, sex, crcl = (pop.covariate(n) for n in COVARIATES)
    assert 40 <= float(wt.min()) and float(wt.max()) <= 140
    assert 18 <= float(age.min()) and float(age.max()) <= 85
    assert set(sex.tolist()) == {0.0, 1.0}
    assert 10 <= float(crcl.min()) and float(crcl.max()) <= 200


def test_truth_in_meta_is_consistent():
    pop = synthetic_pk(50, seed=2, dtype=torch.float64)
    typ = true_parameters(*(pop.covariate(n).numpy() for n in ("WT", "AGE", "CRCL")))
    for j, k in enumerate(("ka", "cl", "v")):
        np.testing.assert_allclose(pop.meta["true_typical"][k].numpy(), typ[k], rtol=1e-12)
        ind = pop.meta["true_typical"][k] * torch.exp(pop.meta["true_eta"][:, j])
        torch.testing.assert_close(pop.meta["true_individual"][k], ind)
    ind = {k: v.numpy() for k, v in pop.meta["true_individual"].items()}
    conc = one_cmt_oral_conc(pop.obs_time.numpy(), TRUTH["DOSE"], **ind)
    np.testing.assert_allclose(pop.meta["true_conc"].numpy(), conc, rtol=1e-12)
    rel = (pop.obs_dv / pop.meta["true_conc"] - 1).flatten()
    assert abs(float(rel.std()) - TRUTH["SIGMA_PROP"]) < 0.02  # proportional error of 10%
    # Tensor and numpy evaluation of the true model agree.
    typ_t = true_parameters(*(pop.covariate(n) for n in ("WT", "AGE", "CRCL")))
    np.testing.assert_allclose(typ_t["cl"].numpy(), typ["cl"], rtol=1e-12)


def test_truth_survives_subsetting():
    pop = synthetic_pk(20, seed=0, dtype=torch.float64)
    sub = pop.subset([3, 7, 11])
    ind = pop.meta["true_individual"]["cl"][sub.subject_index]
    torch.testing.assert_close(ind, pop.meta["true_individual"]["cl"][[3, 7, 11]])


def test_table_matches_population():
    n, t = 9, 10
    pop = synthetic_pk(n, seed=5, n_obs=t, dtype=torch.float64)
    table = synthetic_pk_table(n, seed=5, n_obs=t)
    assert list(table.columns) == ["ID", "TIME", "AMT", "DV", "EVID", "MDV", "CMT", *COVARIATES]
    assert len(table) == n * (t + 1)
    obs = table[table.EVID == 0]
    doses = table[table.EVID == 1]
    assert len(doses) == n and (doses.AMT == TRUTH["DOSE"]).all() and (doses.CMT == 1).all()
    assert (obs.MDV == 0).all() and (obs.CMT == 2).all() and (doses.MDV == 1).all()
    rows = pop.obs_row.flatten().numpy()
    np.testing.assert_array_equal(table.DV.to_numpy()[rows], pop.obs_dv.flatten().numpy())
    np.testing.assert_array_equal(table.TIME.to_numpy()[rows], pop.obs_time.flatten().numpy())
    np.testing.assert_array_equal(table.ID.to_numpy()[rows], np.repeat(np.arange(1, n + 1), t))
    for j, name in enumerate(COVARIATES):
        np.testing.assert_array_equal(doses[name].to_numpy(), pop.covariates[:, j].numpy())


def test_table_through_the_data_layer(tmp_path):
    """Writing the table as a csv and reading it back gives the same Population tensors."""
    n = 6
    path = tmp_path / "synthetic_pk.csv"
    synthetic_pk_table(n, seed=1).to_csv(path, index=False, float_format="%.17g")
    loaded = load_population(path, covariates=list(COVARIATES), dtype=torch.float64)
    pop = synthetic_pk(n, seed=1, dtype=torch.float64)
    for name in ("obs_time", "obs_dv", "obs_mask", "dose_time", "dose_amt", "covariates"):
        torch.testing.assert_close(getattr(loaded, name), getattr(pop, name), msg=name)
    assert torch.equal(loaded.obs_row, pop.obs_row)
    assert loaded.ids == pop.ids


def _lstsq_rss(design: np.ndarray, y: np.ndarray) -> float:
    coef, *_ = np.linalg.lstsq(design, y, rcond=None)
    r = y - design @ coef
    return float(r @ r)


def test_clearance_is_not_a_power_law_of_crcl():
    crcl = np.linspace(15.0, 200.0, 200)
    cl = true_parameters(np.full_like(crcl, 70.0), np.full_like(crcl, 40.0), crcl)["cl"]
    x, y = np.log(crcl), np.log(cl)
    ones = np.ones_like(x)
    rss_power = _lstsq_rss(np.stack([ones, x], 1), y)
    rss_quad = _lstsq_rss(np.stack([ones, x, x * x], 1), y)
    # log CL is strongly concave in log CRCL (saturation): a power law leaves large errors.
    assert rss_quad < 0.1 * rss_power
    coef, *_ = np.linalg.lstsq(np.stack([ones, x, x * x], 1), y, rcond=None)
    assert coef[2] < -0.1
    # Also on the simulated subjects, the best power law misses by more than 10% somewhere.
    pop = synthetic_pk(200, seed=0, dtype=torch.float64)
    c, cl_i = pop.covariate("CRCL").numpy(), pop.meta["true_typical"]["cl"].numpy()
    coef, *_ = np.linalg.lstsq(np.stack([np.ones_like(c), np.log(c)], 1), np.log(cl_i), rcond=None)
    fitted = np.exp(coef[0] + coef[1] * np.log(c))
    assert np.max(np.abs(fitted / cl_i - 1)) > 0.10


def test_volume_age_effect_is_bell_shaped():
    age = np.linspace(18.0, 85.0, 135)
    v = true_parameters(np.full_like(age, 70.0), age, np.full_like(age, 90.0))["v"]
    peak = int(np.argmax(v))
    assert 0 < peak < len(age) - 1  # non-monotone: rises then falls
    assert abs(age[peak] - TRUTH["AGE_PEAK"]) < 1.0
    assert v[peak] / v[0] > 1.5 and v[peak] / v[-1] > 1.5


def test_ka_has_a_weight_age_interaction():
    wt = np.array([55.0, 95.0, 55.0, 95.0])
    age = np.array([25.0, 25.0, 75.0, 75.0])
    ka = true_parameters(wt, age, np.full(4, 90.0))["ka"]
    # The log WT effect has opposite signs in the young and the old.
    assert np.log(ka[1] / ka[0]) < -0.3 and np.log(ka[3] / ka[2]) > 0.3


def test_data_config_keys_are_synthetic_pk_kwargs():
    cfg = yaml.safe_load((ROOT / "configs" / "data" / "synthetic_pk.yaml").read_text())
    assert cfg["name"] == "synthetic_pk" and cfg["path"] is None
    assert cfg["covariates"] == list(COVARIATES)
    extra = set(cfg) - {"name", "path", "covariates", *SPLIT_KEYS}
    assert extra <= set(inspect.signature(synthetic_pk).parameters) - {"dtype"}
    pop = synthetic_pk(**{k: cfg[k] for k in extra})
    assert len(pop) == cfg["n_subjects"]
