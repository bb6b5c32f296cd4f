"""Bundled datasets and the held-out split."""

from __future__ import annotations

import pytest
import torch

from deepnlme.data import dataset_path, load_dataset, split_heldout


def test_theophylline_counts_and_values():
    pop = load_dataset("theophylline")
    assert len(pop) == 12 and pop.n_obs == 132
    assert pop.ids == [str(i) for i in range(1, 13)]
    assert pop.source == "theophylline"
    assert pop.covariate_names == ["WT"]
    assert pop.dose_mask.sum(1).tolist() == [1] * 12
    assert pop.dose_time[:, 0].tolist() == [0.0] * 12
    assert pop.dose_cmt[:, 0].tolist() == [1] * 12
    # subject 1: Dose 4.02 mg/kg, Wt 79.6 kg, first concentration 0.74 at time 0
    assert pop.dose_amt[0, 0].item() == pytest.approx(4.02)
    assert pop.covariate("WT")[0].item() == pytest.approx(79.6)
    assert pop.obs_time[0, 0].item() == 0.0
    assert pop.obs_dv[0, 0].item() == pytest.approx(0.74)
    assert pop.obs_dv[0, 10].item() == pytest.approx(3.28)
    # the dose row precedes the time-0 observation
    assert pop.meta["dose_row"][0, 0].item() == 0 and pop.obs_row[0, 0].item() == 1
    assert pop.meta["n_rows"] == 144 and pop.meta["n_doses"] == 12


def test_phenobarbital_counts_and_values():
    pop = load_dataset("phenobarbital", dtype=torch.float64)
    assert len(pop) == 59 and pop.n_obs == 155
    assert pop.meta["n_doses"] == 589 and pop.meta["n_rows"] == 744
    assert pop.covariate_names == ["WT", "APGAR"]
    assert pop.covariates[0].tolist() == [1.4, 7.0]
    assert pop.dose_amt[0, :2].tolist() == [25.0, 3.5]
    assert pop.obs_time[0, :2].tolist() == [2.0, 112.5]
    assert pop.obs_dv[0, :2].tolist() == [17.3, 31.0]
    assert pop.obs_time.dtype == torch.float64


def test_dataset_covariate_override_and_unknown_name():
    assert load_dataset("phenobarbital", covariates=["APGAR"]).covariate_names == ["APGAR"]
    assert dataset_path("theophylline").is_file()
    with pytest.raises(ValueError, match="unknown dataset 'nope'"):
        dataset_path("nope")


def test_split_is_reproducible_and_disjoint():
    pop = load_dataset("phenobarbital")
    fit, held = split_heldout(pop, 0.2, seed=3)
    fit2, held2 = split_heldout(pop, 0.2, seed=3)
    assert held.ids == held2.ids and fit.ids == fit2.ids
    assert len(held) == 12 and len(fit) == 47
    assert set(fit.ids).isdisjoint(held.ids)
    assert sorted(fit.subject_index.tolist() + held.subject_index.tolist()) == list(range(59))
    assert held.ids == [pop.ids[i] for i in held.subject_index.tolist()]
    assert fit.n_obs + held.n_obs == pop.n_obs
    assert held.meta["split"] == "heldout" and fit.meta["split"] == "fit"
    _, other = split_heldout(pop, 0.2, seed=4)
    assert other.ids != held.ids


def test_split_edge_cases():
    pop = load_dataset("theophylline")
    fit, held = split_heldout(pop, 0.0, seed=0)
    assert len(fit) == 12 and len(held) == 0 and held.obs_time.shape[0] == 0
    _, held = split_heldout(pop, 0.01, seed=0)
    assert len(held) == 1
    fit, held = split_heldout(pop, 0.99, seed=0)
    assert len(fit) == 1 and len(held) == 11
    with pytest.raises(ValueError):
        split_heldout(pop, 1.0, seed=0)
