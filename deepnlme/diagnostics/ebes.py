"""Empirical Bayes estimates (η̂) and individual parameters, one row per subject."""

from __future__ import annotations

import pandas as pd
import torch
from torch import Tensor

from deepnlme.data.population import Population
from deepnlme.model.base import NLMEModel


@torch.no_grad()
def ebe_table(
    model: NLMEModel,
    pop: Population,
    eta: Tensor,
    loglik: Tensor | None = None,
    split: str = "fit",
) -> pd.DataFrame:
    """Columns ID, split, [loglik], ``eta_<name>`` per random effect, individual parameters.

    Args:
        eta: η̂ ``(N, K)`` in the order of ``model.eta_names``.
        loglik: per-subject marginal log-likelihood ``(N,)`` (optional).
    Individual parameters are those of ``model.pre`` that are one value per subject ``(N,)``.
    """
    n = len(pop)
    table: dict[str, object] = {"ID": list(pop.ids), "split": [split] * n}
    if loglik is not None:
        table["loglik"] = loglik.detach().cpu().numpy()
    eta_cpu = eta.detach().cpu()
    for j, name in enumerate(model.eta_names):
        table[f"eta_{name}"] = eta_cpu[:, j].numpy()
    for name, value in model.individual_parameters(eta, pop).items():
        if torch.is_tensor(value) and value.shape == (n,):
            table[name] = value.detach().cpu().numpy()
    return pd.DataFrame(table)
