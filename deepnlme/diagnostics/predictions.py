"""Population and individual predictions, weighted residuals and their per-observation table.

All tensors are ``(N, T)`` (subjects x observation slots); only slots where ``pop.obs_mask``
is True are real observations and appear in tables.
"""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd
import torch
from torch import Tensor

from deepnlme.data.population import Population
from deepnlme.likelihood.residual import GaussianResidual
from deepnlme.model.base import NLMEModel


def prediction_of(dist) -> Tensor:
    """Model prediction on the DV scale ``(N, T)`` of a residual model or a Distribution."""
    return dist.prediction if isinstance(dist, GaussianResidual) else dist.mean


def weighted_residual(dist, dv: Tensor) -> Tensor:
    """(DV - mean) / sd on the scale where the error is Gaussian, ``(N, T)``."""
    if isinstance(dist, GaussianResidual):
        return dist.weighted_residual(dv)
    return (dv - dist.mean) / dist.stddev


@dataclass
class Predictions:
    """PRED (η = 0), IPRED (η = η̂) and IWRES (at η̂), each ``(N, T)`` in DV units."""

    pred: Tensor
    ipred: Tensor
    iwres: Tensor


@torch.no_grad()
def predict(model: NLMEModel, pop: Population, eta: Tensor) -> Predictions:
    """Predictions of ``model`` for ``pop`` at the random effects ``eta`` ``(N, K)``."""
    dv = pop.obs_dv_filled
    individual = model.observe(eta, pop)
    population = model.observe(torch.zeros_like(eta), pop)
    iwres = weighted_residual(individual, dv)
    return Predictions(
        pred=prediction_of(population),
        ipred=prediction_of(individual),
        iwres=torch.where(pop.obs_mask, iwres, torch.zeros_like(iwres)),
    )


def observation_table(pop: Population, columns: dict[str, Tensor]) -> pd.DataFrame:
    """One row per real observation: ID, TIME, DV, then ``columns`` (each ``(N, T)``), CMT."""
    mask = pop.obs_mask.cpu()
    subject, _ = mask.nonzero(as_tuple=True)

    def flat(t: Tensor):
        return t.detach().cpu()[mask].numpy()

    table = {
        "ID": [pop.ids[i] for i in subject.tolist()],
        "TIME": flat(pop.obs_time),
        "DV": flat(pop.obs_dv),
    }
    table.update({name: flat(values) for name, values in columns.items()})
    table["CMT"] = flat(pop.obs_cmt)
    return pd.DataFrame(table)


def prediction_table(pop: Population, preds: Predictions, split: str = "fit") -> pd.DataFrame:
    """Columns ID, TIME, DV, PRED, IPRED, IWRES, CMT, split (one row per observation)."""
    table = observation_table(
        pop, {"PRED": preds.pred, "IPRED": preds.ipred, "IWRES": preds.iwres}
    )
    table["split"] = split
    return table


def rmse(prediction: Tensor, pop: Population) -> float:
    """Root mean squared error of ``prediction`` ``(N, T)`` against DV over real observations."""
    r = (prediction - pop.obs_dv)[pop.obs_mask]
    return float(torch.sqrt((r * r).mean())) if r.numel() else float("nan")
