"""Declared parameters on their natural scale: for results.json and the estimates table."""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping
from typing import Any

import pandas as pd
import torch

from deepnlme.data.population import Population
from deepnlme.diagnostics.covariance import covariance_step
from deepnlme.model.base import NLMEModel
from deepnlme.model.domains import FullCovariance
from deepnlme.model.params import RandomEffects


def param_values(model: NLMEModel) -> dict[str, float | list]:
    """Every declared parameter by name: scalars, lists (vectors), nested lists (matrices)."""
    return {name: value.detach().cpu().tolist() for name, value in model.param_values().items()}


def omega_blocks(model: NLMEModel) -> dict[str, dict[str, list]]:
    """``{block name: {"names": [η names], "cov": Ω (k x k nested list)}}`` per block."""
    return {
        name: {"names": list(p.names), "cov": p.value().detach().cpu().tolist()}
        for name, p in model.declared().items()
        if isinstance(p, RandomEffects)
    }


def standard_errors(
    estimator, pop: Population, method: str = "r"
) -> dict[str, float | list | None] | None:
    """Natural-scale standard errors of every declared parameter (None where fixed; NaN where
    the covariance step fails), or None for models with network weights; ``method``: "r"
    (R⁻¹) or "sandwich" (see :func:`deepnlme.diagnostics.covariance.covariance_step`)."""
    if estimator.model.n_undeclared_parameters():
        return None
    return covariance_step(estimator, pop, method).se_json()


def estimates_table(model: NLMEModel, se: Mapping[str, Any] | None = None) -> pd.DataFrame:
    """One row per estimated scalar: name, value, domain, fixed (and se when given).

    Vectors are written ``name[i]``, other matrices ``name[i,j]``; random-effect covariances
    ``omega[ka,cl]`` by η names: the diagonal, or the lower triangle of a full block.
    """
    rows = []
    for name, p in model.declared().items():
        value = p.value().detach().cpu()
        errors = None
        if se is not None and se.get(name) is not None:
            errors = torch.tensor(se[name], dtype=torch.float64)
        full = isinstance(p.domain, FullCovariance)
        for index in itertools.product(*map(range, value.shape)):
            label_index: tuple = index
            if isinstance(p, RandomEffects):
                i, j = index
                if j > i or (j < i and not full):
                    continue
                label_index = (p.names[i], p.names[j])
            label = f"{name}[{','.join(map(str, label_index))}]" if index else name
            rows.append(
                {
                    "name": label,
                    "value": float(value[index]),
                    "se": math.nan if errors is None else float(errors[index]),
                    "domain": p.domain.describe(),
                    "fixed": p.fixed,
                }
            )
    columns = ["name", "value", "se", "domain", "fixed"]
    return pd.DataFrame(rows, columns=columns if se is not None else columns[:2] + columns[3:])
