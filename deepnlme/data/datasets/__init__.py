"""Bundled example datasets (exported from R by ``scripts/export_datasets.R``).

* ``theophylline``: R ``datasets::Theoph``. 12 subjects, one oral dose at TIME 0 (AMT = Dose,
  mg/kg) into the depot (CMT 1), 132 serum concentrations (mg/L, hours), covariate WT (kg).
* ``phenobarbital``: R ``nlme::Phenobarb`` (NONMEM's pheno). 59 neonates, repeated IV bolus
  doses (CMT 1), 155 serum concentrations, covariates WT (kg) and APGAR (score 1-10).

Observation rows carry CMT 0 (the model's default observed compartment).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from deepnlme.data.build import load_population
from deepnlme.data.population import Population

#: Dataset name -> covariate columns loaded by default.
DATASETS: dict[str, tuple[str, ...]] = {
    "theophylline": ("WT",),
    "phenobarbital": ("WT", "APGAR"),
}


def dataset_path(name: str) -> Path:
    """Path of the bundled CSV for ``name``; unknown names raise ``ValueError``."""
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; available: {', '.join(sorted(DATASETS))}")
    return Path(__file__).with_name(f"{name}.csv")


def load_dataset(
    name: str, dtype: torch.dtype | None = None, covariates: Sequence[str] | None = None
) -> Population:
    """A bundled dataset as a :class:`Population` (``source`` = ``name``).

    Args:
        name: one of :data:`DATASETS`.
        dtype: floating dtype; torch's default when None.
        covariates: covariate columns; all of the dataset's covariates when None.
    """
    path = dataset_path(name)
    covs = DATASETS[name] if covariates is None else covariates
    pop = load_population(path, covariates=covs, dtype=dtype)
    pop.source = name
    return pop
