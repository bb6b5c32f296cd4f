"""Predictions of a fitted model under a new dosing regimen, with prediction intervals.

For each subject (its covariates on the regimen's design, see
:func:`deepnlme.data.regimen.regimen_population`): PRED (η = 0), IPRED at given η̂ (the
fitted subjects' empirical Bayes estimates, when known) and the quantiles of simulated
observations, η ~ N(0, Ω) and residual error, over ``n_replicates`` replicates (a
prediction interval for a new subject with these covariates).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from deepnlme.data.population import Population
from deepnlme.diagnostics.predictions import observation_table, prediction_of
from deepnlme.diagnostics.simulation import sample_eta
from deepnlme.model.base import NLMEModel


@torch.no_grad()
def regimen_predictions(
    model: NLMEModel,
    pop: Population,
    eta_hat: Tensor | None = None,
    n_replicates: int = 200,
    seed: int = 1,
    interval: float = 0.9,
    batch_subjects: int = 20000,
) -> pd.DataFrame:
    """One row per subject and time: ID, TIME, CMT, PRED, [IPRED], P_LO, P_MEDIAN, P_HI.

    Args:
        pop: subjects on the regimen (observation slots = prediction times).
        eta_hat: η̂ ``(N, K)`` of the subjects (IPRED column), or None.
        n_replicates: simulated replicates per subject (η and residual error drawn anew).
        seed: seed of the draws (torch's global random state is left untouched).
        interval: central probability of the prediction interval (P_LO, P_HI).
        batch_subjects: most subjects (replicates × N) simulated in one batch.
    """
    if n_replicates < 1:
        raise ValueError(f"n_replicates must be >= 1, got {n_replicates}")
    if not 0.0 < interval < 1.0:
        raise ValueError(f"interval must be in (0, 1), got {interval}")
    n = len(pop)
    zeros = pop.obs_time.new_zeros(n, model.n_eta)
    columns = {"PRED": prediction_of(model.observe(zeros, pop))}
    if eta_hat is not None:
        columns["IPRED"] = prediction_of(model.observe(eta_hat.to(zeros), pop))
    table = observation_table(pop, columns).drop(columns="DV")
    per_batch = max(1, min(n_replicates, batch_subjects // max(n, 1)))
    draws = []
    generator = torch.Generator().manual_seed(int(seed))
    for start in range(0, n_replicates, per_batch):
        copies = min(per_batch, n_replicates - start)
        stacked = pop.subset(torch.arange(n).repeat(copies))
        eta = sample_eta(model, len(stacked), generator).to(zeros)
        dist = model.observe(eta, stacked)
        with torch.random.fork_rng():
            torch.manual_seed(int(torch.randint(2**62, (1,), generator=generator)))
            dv = dist.sample()
        draws.append(dv.reshape(copies, n, -1))
    sims = torch.cat(draws, 0)  # (R, N, T)
    lo, hi = (1 - interval) / 2, 1 - (1 - interval) / 2
    q = torch.quantile(sims, torch.tensor([lo, 0.5, hi], dtype=sims.dtype), dim=0)  # (3, N, T)
    mask = pop.obs_mask
    for name, values in zip(("P_LO", "P_MEDIAN", "P_HI"), q, strict=True):
        table[name] = values[mask].cpu().numpy()
    return table


def save_regimen_plot(table: pd.DataFrame, path: str | Path, max_subjects: int = 6) -> Path:
    """PRED, IPRED and the prediction interval against TIME for the first subjects (one
    panel each, at most ``max_subjects``)."""
    from matplotlib.figure import Figure

    ids = list(dict.fromkeys(table["ID"]))[:max_subjects]
    cols = min(3, len(ids))
    rows = int(np.ceil(len(ids) / cols))
    fig = Figure(figsize=(4.2 * cols, 3.2 * rows), layout="constrained")
    axes = np.atleast_1d(fig.subplots(rows, cols, squeeze=False)).ravel()
    for ax, subject in zip(axes, ids, strict=False):
        part = table[table["ID"] == subject]
        ax.fill_between(part["TIME"], part["P_LO"], part["P_HI"], alpha=0.25,
                        label="prediction interval")
        ax.plot(part["TIME"], part["P_MEDIAN"], lw=1, ls=":", label="median")
        ax.plot(part["TIME"], part["PRED"], lw=1.5, label="PRED (η = 0)")
        if "IPRED" in part:
            ax.plot(part["TIME"], part["IPRED"], lw=1.5, label="IPRED (η̂)")
        ax.set_title(f"ID {subject}")
        ax.set_xlabel("TIME")
        ax.set_ylabel("DV")
    for ax in axes[len(ids):]:
        ax.set_visible(False)
    axes[0].legend(fontsize=7)
    fig.savefig(path, dpi=110)
    return Path(path)
