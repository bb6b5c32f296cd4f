"""Fits at published estimates: NONMEM's pheno FOCEI run and the Theophylline Laplace fit."""

from __future__ import annotations

import math

import pytest
import torch

from deepnlme.data import load_dataset
from deepnlme.fitted import default_dtype
from deepnlme.inference import FOCEI, Laplace
from deepnlme.model.zoo.pk import OneCmtOralModel, PhenoModel

#: NONMEM 7.4 final estimates of pheno (FOCE with interaction; experiments/phenobarbital_focei).
PHENO_ESTIMATES = {
    "tvcl": 0.0046956,
    "tvv": 0.98426,
    "apgar_v": 0.15892,
    "omega": [0.029351, 0.027906],
    "sigma_prop": math.sqrt(0.013241),
}
#: This project's Theophylline Laplace estimates (experiments/theophylline_laplace).
THEO_ESTIMATES = {
    "tvka": 1.5789,
    "tvcl": 0.04004,
    "tvv": 0.4575,
    "omega": [0.6526**2, 0.2652**2, 0.1339**2],
    "sigma_add": 0.6912,
}


@pytest.fixture(scope="module")
def pheno():
    """``(model, FOCEI estimator, population, η̂)`` at NONMEM's estimates."""
    with default_dtype(torch.float64):
        pop = load_dataset("phenobarbital")
        model = PhenoModel(init=PHENO_ESTIMATES)
        est = FOCEI(model)
        return model, est, pop, est.modes(pop, warm_start=False)


@pytest.fixture(scope="module")
def theo():
    """``(model, Laplace estimator, population, η̂)`` at the Theophylline estimates."""
    with default_dtype(torch.float64):
        pop = load_dataset("theophylline")
        model = OneCmtOralModel(init=THEO_ESTIMATES)
        est = Laplace(model)
        return model, est, pop, est.modes(pop, warm_start=False)
