"""Declared parameters on their natural scale: for results.json and the estimates table."""

from __future__ import annotations

import itertools

import pandas as pd

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


def estimates_table(model: NLMEModel) -> pd.DataFrame:
    """One row per estimated scalar: name, value, domain, fixed.

    Vectors are written ``name[i]``, other matrices ``name[i,j]``; random-effect covariances
    ``omega[ka,cl]`` by η names: the diagonal, or the lower triangle of a full block.
    """
    rows = []
    for name, p in model.declared().items():
        value = p.value().detach().cpu()
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
                    "domain": p.domain.describe(),
                    "fixed": p.fixed,
                }
            )
    return pd.DataFrame(rows, columns=["name", "value", "domain", "fixed"])
