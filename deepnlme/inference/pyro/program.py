"""Any :class:`~deepnlme.model.base.NLMEModel` as a Pyro program.

θ, Ω, σ and network weights stay the model's own torch parameters (module-local: nothing goes
to Pyro's global param store); η is sampled per subject inside
``pyro.plate("subjects", N, subsample=index)``, so the likelihood of a minibatch of B subjects
is scaled by N / B; observations are masked by the padding mask. The program knows nothing of
Lightning or of guides.

Shapes: a :class:`SubjectBatch` holds B subjects; η is ``(..., B, K)`` (leading particle
dimensions allowed), observation slots ``(B, T)``.
"""

from __future__ import annotations

from typing import NamedTuple

import pyro
import pyro.distributions as dist
import torch
from torch import Tensor

from deepnlme.data.population import Population
from deepnlme.likelihood.residual import GaussianResidual
from deepnlme.model.base import NLMEModel

#: Plate dimension of the subjects (particles, when vectorized, sit left of it).
SUBJECT_DIM = -1


class SubjectBatch(NamedTuple):
    """B subjects of the fitted population and their positions in it (the plate indices)."""

    index: Tensor  # (B,) long, positions 0..N-1 in the population being fitted
    pop: Population  # the B subjects (padded to their own longest record)

    def to(self, device=None, dtype: torch.dtype | None = None) -> SubjectBatch:
        return SubjectBatch(self.index.to(device), self.pop.to(device, dtype=dtype))


def whole(pop: Population) -> SubjectBatch:
    """All subjects of ``pop`` as one batch."""
    return SubjectBatch(torch.arange(len(pop), device=pop.device), pop)


def eta_scale_tril(model: NLMEModel) -> Tensor:
    """Lower Cholesky factor ``(K, K)`` of the block-diagonal Ω (prior of η)."""
    return torch.block_diag(*[block.cholesky() for block in model.random_effects()])


def repeat_subjects(pop: Population, times: int) -> Population:
    """``pop``'s subjects ``times`` times over (row r is subject r mod N)."""
    if times == 1:
        return pop
    return pop.subset(torch.arange(len(pop), device=pop.device).repeat(times))


def conditional_loglik_sites(model: NLMEModel, eta: Tensor, pop: Population) -> None:
    """Pyro observation sites of log p(y_i | η_i) for η ``(..., B, K)`` (inside the plate)."""
    lead = eta.shape[:-2]
    b, k = eta.shape[-2], eta.shape[-1]
    copies = eta[..., 0, 0].numel() if lead else 1
    rows = repeat_subjects(pop, copies)
    obs = model.observe(eta.reshape(copies * b, k), rows)
    mask = pop.obs_mask
    dv = pop.obs_dv_filled  # padding holds real DVs: finite densities, masked below
    if isinstance(obs, GaussianResidual):
        y = obs.transform(dv)
        shape = (*lead, b, -1)
        mean, var = obs.mean.reshape(shape), obs.variance.expand_as(obs.mean).reshape(shape)
        if not pop.fully_observed:
            var = torch.where(mask, var, torch.ones_like(var))
            mean = torch.where(mask, mean, y)
        pyro.sample("y", dist.Normal(mean, var.sqrt()).mask(mask).to_event(1), obs=y)
        if obs.log_scale:  # density of DV, not of log DV (a constant of the data)
            pyro.factor("y_jacobian", (obs.log_jacobian(dv) * mask).sum(-1))
        return
    logp = obs.log_prob(rows.obs_dv_filled).reshape(*lead, b, -1)
    pyro.factor("y", torch.where(mask, logp, torch.zeros_like(logp)).sum(-1))


class NLMEProgram:
    """``program(batch)`` runs ``model`` as a Pyro model on a :class:`SubjectBatch`.

    Args:
        model: any NLMEModel with at least one random effect.
        n_subjects: N, size of the population the batches come from (the plate size).
    """

    def __init__(self, model: NLMEModel, n_subjects: int):
        if model.n_eta == 0:
            raise ValueError(f"{type(model).__name__} has no random effects")
        self.model = model
        self.n_subjects = int(n_subjects)

    def __call__(self, batch: SubjectBatch) -> Tensor:
        model = self.model
        scale_tril = eta_scale_tril(model)
        prior = dist.MultivariateNormal(scale_tril.new_zeros(model.n_eta), scale_tril=scale_tril)
        with pyro.plate("subjects", self.n_subjects, subsample=batch.index, dim=SUBJECT_DIM):
            eta = pyro.sample("eta", prior)
            conditional_loglik_sites(model, eta, batch.pop)
        pyro.factor("log_prior", model.log_prior())  # penalties on the fixed effects
        return eta
