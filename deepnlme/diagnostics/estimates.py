"""Declared parameters on their natural scale: for results.json and the estimates table."""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping
from typing import Any

import pandas as pd
import torch

from deepnlme.data.population import Population
from deepnlme.inference.uncertainty import identifiability_warnings, parameter_covariance
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


def standard_errors(estimator, pop: Population) -> dict[str, float | list | None] | None:
    """Natural-scale standard errors of every declared parameter (None where fixed; NaN where
    the objective's Hessian is not positive definite), or None for models with network
    weights (see :func:`deepnlme.inference.uncertainty.parameter_covariance`)."""
    if estimator.model.n_undeclared_parameters():
        return None
    cov = parameter_covariance(estimator, pop)
    return {name: None if se is None else se.cpu().tolist() for name, se in cov.se.items()}


def covariance_step(
    estimator, pop: Population, compute_se: bool = True
) -> tuple[dict[str, float | list | None] | None, list[str]]:
    """``(standard errors as in :func:`standard_errors` or None, identifiability warnings)``.

    The warnings (:func:`~deepnlme.inference.uncertainty.identifiability_warnings`) name
    parameters at a boundary always, and, when standard errors are computed (``compute_se`` and
    a model without network weights), a Hessian that is not positive definite, a large
    condition number and large relative standard errors.
    """
    model = estimator.model
    if not compute_se or model.n_undeclared_parameters():
        return None, identifiability_warnings(model)
    cov = parameter_covariance(estimator, pop)
    se = {name: None if v is None else v.cpu().tolist() for name, v in cov.se.items()}
    return se, identifiability_warnings(model, cov)


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
