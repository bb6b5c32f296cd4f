"""Data configs -> Population: csv, bundled datasets (restricted covariates), synthetic."""

from __future__ import annotations

import pytest
import torch

from deepnlme.data import DataValidationError
from deepnlme.data.datasets import dataset_path
from deepnlme.data.sources import load_from_config, load_source, select_covariates, source_names


def test_bundled_dataset_keeps_only_listed_covariates():
    pop = load_source("phenobarbital", covariates=["APGAR"], dtype=torch.float64)
    assert pop.covariate_names == ["APGAR"]
    assert pop.covariates.shape == (59, 1)
    assert pop.obs_covariates.shape[-1] == 1
    assert pop.obs_dv.dtype == torch.float64
    assert load_source("theophylline", covariates=[]).covariate_names == []


def test_csv_source_reads_the_file_with_its_covariates():
    pop = load_source("csv", path=str(dataset_path("theophylline")), covariates=["WT"])
    assert (len(pop), pop.n_obs, pop.covariate_names) == (12, 132, ["WT"])


def test_config_mapping_ignores_split_keys():
    config = {
        "name": "theophylline", "path": None, "covariates": ["WT"],
        "heldout_fraction": 0.25, "split_seed": 3,
    }
    assert len(load_from_config(config)) == 12


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"name": "csv"}, "needs a file"),
        ({"name": "nope"}, "unknown data source 'nope'"),
        ({"name": "theophylline", "n_subjects": 3}, "takes no options"),
    ],
)
def test_bad_source_configs(kwargs, match):
    with pytest.raises(ValueError, match=match):
        load_source(**kwargs)


def test_missing_covariate_column_is_a_data_error():
    with pytest.raises(DataValidationError, match="AGE"):
        load_source("theophylline", covariates=["AGE"])


def test_select_covariates_reorders_and_rejects_unknown():
    pop = load_source("phenobarbital", covariates=["WT", "APGAR"])
    swapped = select_covariates(pop, ["APGAR", "WT"])
    assert torch.equal(swapped.covariates[:, 0], pop.covariates[:, 1])
    with pytest.raises(ValueError, match="no covariate"):
        select_covariates(pop, ["AGE"])


def test_synthetic_source_passes_extra_keys():
    pytest.importorskip("deepnlme.data.synthetic", reason="synthetic data not written yet")
    pop = load_source("synthetic_pk", n_subjects=7, seed=1, dtype=torch.float64)
    assert len(pop) == 7
    assert "synthetic_pk" in source_names()
    only_wt = load_source("synthetic_pk", covariates=["WT"], n_subjects=4, seed=1)
    assert only_wt.covariate_names == ["WT"]


def test_csv_table_read_first_is_built_without_reading_the_file_again(tmp_path):
    from deepnlme.data.sources import read_from_config

    path = tmp_path / "theo.csv"
    path.write_bytes(dataset_path("theophylline").read_bytes())
    config = {"name": "csv", "path": str(path), "covariates": ["WT"], "heldout_fraction": 0.0}
    table = read_from_config(config)
    path.unlink()
    pop = load_from_config(config, dtype=torch.float64, table=table)
    assert (len(pop), pop.n_obs, pop.covariate_names) == (12, 132, ["WT"])
    assert read_from_config({"name": "theophylline", "covariates": []}) is None
