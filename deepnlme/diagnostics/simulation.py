"""Simulation from a model: η ~ MvNormal(0, Ω) per block, observations from the residual model."""

from __future__ import annotations

import pandas as pd
import torch
from torch import Tensor

from deepnlme.data.population import Population
from deepnlme.diagnostics.predictions import observation_table, prediction_of
from deepnlme.model.base import NLMEModel


def sample_eta(model: NLMEModel, n: int, generator: torch.Generator | None = None) -> Tensor:
    """η ``(n, K)`` drawn from each random-effect block's MvNormal(0, Ω)."""
    parts = []
    for block in model.random_effects():
        chol = block.cholesky().detach()
        z = torch.randn((n, block.k), generator=generator, dtype=chol.dtype)
        parts.append(z.to(chol.device) @ chol.T)
    if not parts:
        return torch.zeros(n, 0)
    return torch.cat(parts, dim=-1)


@torch.no_grad()
def simulate(model: NLMEModel, pop: Population) -> pd.DataFrame:
    """One simulated replicate of ``pop``'s design (doses, observation times, covariates).

    Uses torch's global random state (seed it, or use :meth:`FittedModel.simulate`). Returns
    one row per observation slot of ``pop``: ID, TIME, DV (simulated), IPRED (at the sampled
    η), CMT, then ``eta_<name>`` of the subject.
    """
    eta = sample_eta(model, len(pop)).to(pop.obs_time.dtype)
    dist = model.observe(eta, pop)
    dv = dist.sample()
    table = observation_table(pop, {"IPRED": prediction_of(dist)})
    table["DV"] = dv.cpu()[pop.obs_mask.cpu()].numpy()
    subject, _ = pop.obs_mask.cpu().nonzero(as_tuple=True)
    for j, name in enumerate(model.eta_names):
        table[f"eta_{name}"] = eta.cpu()[subject, j].numpy()
    return table
