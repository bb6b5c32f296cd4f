"""Model predictions on a fine time grid per subject (smooth lines of individual-fit plots)."""

from __future__ import annotations

from dataclasses import replace

import pandas as pd
import torch
from torch import Tensor

from deepnlme.data.population import Population
from deepnlme.diagnostics.predictions import prediction_of
from deepnlme.model.base import NLMEModel


def grid_population(pop: Population, n_points: int = 120) -> Population:
    """``pop`` with its observation slots replaced by ``n_points`` times from 0 to each
    subject's last observation (or dose) time. Each grid time takes the CMT, reset epoch and
    covariates of the subject's last observation at or before it (the first one before any);
    DV is 0 (the grid is for predictions only)."""
    n = len(pop)
    obs_end = torch.where(pop.obs_mask, pop.obs_time, torch.zeros_like(pop.obs_time)).amax(-1)
    dose_end = torch.where(pop.dose_mask, pop.dose_time, torch.zeros_like(pop.dose_time))
    end = torch.maximum(obs_end, dose_end.amax(-1) if dose_end.shape[-1] else obs_end)
    end = torch.where(end > 0, end, torch.ones_like(end))
    frac = torch.linspace(0.0, 1.0, n_points, dtype=pop.obs_time.dtype, device=pop.device)
    grid = end[:, None] * frac[None, :]  # (N, G)
    # index of the last real observation at or before each grid time (else the first one)
    before = pop.obs_mask[:, None, :] & (pop.obs_time[:, None, :] <= grid[:, :, None])
    count = before.sum(-1)  # (N, G): observations up to the grid time (in time order)
    source = (count - 1).clamp(min=0)
    take = lambda t: t.gather(1, source)  # noqa: E731
    cov = pop.obs_covariates.gather(
        1, source[..., None].expand(-1, -1, pop.obs_covariates.shape[-1])
    )
    mask = torch.ones(n, n_points, dtype=torch.bool, device=pop.device)
    return replace(
        pop,
        obs_time=grid,
        obs_dv=torch.zeros_like(grid),
        obs_cmt=take(pop.obs_cmt),
        obs_mask=mask,
        obs_epoch=take(pop.obs_epoch),
        obs_row=torch.full_like(source, -1),
        obs_covariates=cov,
    )


@torch.no_grad()
def individual_curves(
    model: NLMEModel, pop: Population, eta: Tensor, n_points: int = 120
) -> pd.DataFrame:
    """Columns ID, TIME, IPRED (at η̂ ``(N, K)``), PRED (η = 0) on :func:`grid_population`."""
    grid = grid_population(pop, n_points)
    ipred = prediction_of(model.observe(eta, grid))
    pred = prediction_of(model.observe(torch.zeros_like(eta), grid))
    return pd.DataFrame(
        {
            "ID": [sid for sid in pop.ids for _ in range(n_points)],
            "TIME": grid.obs_time.cpu().reshape(-1).numpy(),
            "IPRED": ipred.cpu().reshape(-1).numpy(),
            "PRED": pred.cpu().reshape(-1).numpy(),
        }
    )
