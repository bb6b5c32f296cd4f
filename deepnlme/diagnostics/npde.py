"""Simulation-based residuals: NPD and NPDE (Brendel et al. 2006; Comets et al. 2008).

For each subject, K replicates of its design are simulated from the model (η ~ N(0, Ω), then
the residual error). On the DV scale:

- pd_ij = share of the K simulated y_ij below the observed one; NPD = Φ⁻¹(pd) (correlated
  within a subject);
- NPDE decorrelates first, as the npde R package, Pumas and nlmixr2 do: with E_i and C_i the
  empirical mean and covariance of the K simulated vectors, and C_i = L_i L_iᵀ (Cholesky),
  observed and simulated vectors are mapped to L_i⁻¹(y − E_i); pde_ij and NPDE = Φ⁻¹(pde)
  are computed from those.

The share of simulated values below the observation is taken as (count + ½)/(K + 1), which
keeps it inside (0, 1) and is symmetric about ½: under the model NPD and NPDE are N(0, 1)
up to the discreteness of K.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from deepnlme.data.population import Population
from deepnlme.diagnostics.simulation import sample_eta
from deepnlme.likelihood.residual import GaussianResidual
from deepnlme.model.base import NLMEModel


@dataclass
class SimulationResiduals:
    """NPD and NPDE ``(N, T)`` (0 in padding) and the simulated DVs ``(K, N, T)``."""

    npd: Tensor
    npde: Tensor
    simulated: Tensor


@torch.no_grad()
def simulate_dv(
    model: NLMEModel,
    pop: Population,
    n_sim: int,
    generator: torch.Generator | None = None,
    batch_subjects: int = 20000,
) -> Tensor:
    """``n_sim`` replicates of ``pop``'s design: simulated DV ``(K, N, T)`` (padding slots
    hold simulated values too; mask them with ``pop.obs_mask``). Replicates are stacked along
    the subject axis, about ``batch_subjects`` subjects per model evaluation."""
    n = len(pop)
    per_batch = max(1, min(n_sim, batch_subjects // max(n, 1)))
    parts = []
    for start in range(0, n_sim, per_batch):
        copies = min(per_batch, n_sim - start)
        stacked = pop.subset(torch.arange(n).repeat(copies))
        eta = sample_eta(model, len(stacked), generator).to(pop.obs_time)
        dist = model.observe(eta, stacked)
        dv = dist.sample(generator) if isinstance(dist, GaussianResidual) else dist.sample()
        parts.append(dv.reshape(copies, n, -1))
    return torch.cat(parts)


def _normal_scores(below: Tensor, n_sim: int) -> Tensor:
    """Φ⁻¹((count + ½)/(K + 1)) of the counts ``below``."""
    p = (below.to(torch.float64) + 0.5) / (n_sim + 1)
    return torch.special.ndtri(p)


def npde(
    model: NLMEModel,
    pop: Population,
    n_sim: int = 500,
    generator: torch.Generator | None = None,
    simulated: Tensor | None = None,
) -> SimulationResiduals:
    """NPD and NPDE of ``pop``'s observations under ``model`` from ``n_sim`` simulations
    (or the given ``simulated`` DVs ``(K, N, T)``). K must exceed the largest number of
    observations of a subject for the decorrelation; otherwise NPDE are NaN."""
    if simulated is None:
        if n_sim < 1:
            raise ValueError(f"the number of NPDE simulations must be >= 1 (got {n_sim})")
        simulated = simulate_dv(model, pop, n_sim, generator)
    sims = simulated.to(torch.float64)
    k = sims.shape[0]
    mask = pop.obs_mask
    y = pop.obs_dv.to(torch.float64)
    zero = torch.zeros_like(y)
    npd = torch.where(mask, _normal_scores((sims < y).sum(0), k), zero)

    mean = sims.mean(0)  # (N, T)
    centred = torch.where(mask, sims - mean, torch.zeros_like(sims))  # (K, N, T)
    cov = torch.einsum("knt,kns->nts", centred, centred) / max(k - 1, 1)
    cov = cov + torch.diag_embed((~mask).to(cov.dtype))  # padding: identity
    chol, info = torch.linalg.cholesky_ex(cov)
    nan = torch.full_like(y, float("nan"))
    if mask.numel() and int(mask.sum(-1).max()) >= k:
        return SimulationResiduals(npd.to(pop.obs_dv.dtype), nan, simulated)
    obs_d = torch.linalg.solve_triangular(
        chol, torch.where(mask, y - mean, zero).unsqueeze(-1), upper=False
    ).squeeze(-1)  # (N, T)
    sim_d = torch.linalg.solve_triangular(
        chol, centred.permute(1, 2, 0), upper=False
    )  # (N, T, K)
    below = (sim_d < obs_d.unsqueeze(-1)).sum(-1)
    scores = _normal_scores(below, k)
    ok = (info == 0)[:, None] & mask
    out = torch.where(ok, scores, torch.where(mask, nan, zero))
    return SimulationResiduals(npd.to(pop.obs_dv.dtype), out.to(pop.obs_dv.dtype), simulated)
