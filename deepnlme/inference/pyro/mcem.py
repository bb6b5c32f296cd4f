"""Monte Carlo EM with an HMC E-step for NLME models (:func:`deepnlme.inference.mcem.mcem`,
the algorithm the formula mixed models use, on the NLME log joint).

The latents are the random effects of every subject and chain at once, one flat vector
``(C·N·K,)`` sampled by one HMC chain (the subjects are independent given the parameters, so
this is N·C independent chains sharing a step size). An η whose typical value is
mu-referenced (``tvcl·exp(η_cl)``, :func:`~deepnlme.inference.pyro.saem.mu_referenced`) is
sampled as ψ = log tvcl + η, which the data pin whatever the typical value: the typical value
and Ω then have closed-form M-steps (the mean of ψ, the second moments of η) on sufficient
statistics that are the sample's own until the averaging share of the iterations and their
running average over it; variances shrink by at most ``anneal`` per warm-up iteration
(simulated annealing, as in SAEM, so that the chains keep exploring). Every other parameter
(σ, other θ) takes one Adam step per iteration on log p(y, η; θ) at the sample (Fisher's
identity), Polyak-averaged over the averaging share.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from deepnlme.data.population import Population
from deepnlme.inference.joint import NegLogJoint
from deepnlme.inference.mcem import MCEMOptions, MCEMResult, mcem
from deepnlme.inference.pyro.program import repeat_subjects
from deepnlme.inference.pyro.saem import ImportanceReports, mu_referenced
from deepnlme.inference.pyro.vi import NonFiniteObjective
from deepnlme.model.base import NLMEModel
from deepnlme.model.domains import DiagonalCovariance


class MCEMEstimator(ImportanceReports):
    """MCEM-HMC fit of an NLME model (no training loop: :meth:`fit` runs every iteration).

    Args:
        model: an NLMEModel with random effects.
        n_iter, n_leapfrog, step_size, target_accept, lr, warmup_fraction, average_fraction:
            :class:`~deepnlme.inference.mcem.MCEMOptions`.
        n_chains: chains per subject (the E-step's sample is their average).
        anneal: largest factor by which a variance may shrink per warm-up iteration.
        is_samples: importance samples per subject for :meth:`subject_loglik`.
        seed: seed of the HMC chains.
        name: method name in reports.
    """

    fit_style = "mcem"

    def __init__(
        self,
        model: NLMEModel,
        n_iter: int = 1000,
        n_leapfrog: int = 10,
        step_size: float = 0.1,
        target_accept: float = 0.75,
        lr: float = 0.02,
        warmup_fraction: float = 0.3,
        average_fraction: float = 0.5,
        n_chains: int = 4,
        anneal: float = 0.95,
        is_samples: int = 2000,
        seed: int = 0,
        name: str = "mcem",
    ):
        if model.n_eta == 0:
            raise ValueError(f"method={name} needs random effects; {type(model).__name__} has none")
        self.model = model
        self.options = MCEMOptions(
            n_iter=int(n_iter), n_leapfrog=int(n_leapfrog), step_size=float(step_size),
            target_accept=float(target_accept), lr=float(lr),
            warmup_fraction=float(warmup_fraction), average_fraction=float(average_fraction),
            seed=int(seed),
        )
        self.n_chains, self.anneal = int(n_chains), float(anneal)
        self.is_samples, self.seed, self.name = int(is_samples), int(seed), name
        self.joint = NegLogJoint(model)
        self.result: MCEMResult | None = None
        self._mu: dict[int, Tensor] = {}
        self._sum1: Tensor | None = None
        self._sum2: Tensor | None = None

    @property
    def n_iterations(self) -> int:
        return self.options.n_iter

    # ------------------------------------------------------------------------ the density
    def _offset(self, like: Tensor) -> Tensor:
        """``(K,)``: the raw typical value of each mu-referenced η (0 for the others)."""
        out = like.new_zeros(self.model.n_eta)
        for j, raw in self._mu.items():
            out[j] = raw.reshape(())
        return out

    def log_joint(self, psi: Tensor, rows: Population) -> Tensor:
        """log p(y, η; θ) summed over subjects and chains (each chain is a draw from its
        subject's own posterior) for the flat latents ``psi`` ``(C·N·K,)`` (ψ = raw typical
        value + η for mu-referenced η); the fixed effects' log prior counts once per chain."""
        eta = psi.reshape(len(rows), self.model.n_eta) - self._offset(psi)
        return -self.joint(eta, rows).nll.sum() + self.n_chains * self.model.log_prior()

    def _params(self) -> list[Tensor]:
        """Parameters of the gradient M-step: all trainable ones but Ω and the mu-referenced
        typical values."""
        skip = {id(b.raw) for b in self.model.random_effects()}
        skip |= {id(raw) for raw in self._mu.values()}
        return [p for p in self.model.parameters() if p.requires_grad and id(p) not in skip]

    # ------------------------------------------------------------- closed-form M-step
    @torch.no_grad()
    def closed_form(self, psi: Tensor, gamma: float, warming_up: bool) -> None:
        """Typical values (mean of ψ) and Ω (second moments of η about them) from the
        sufficient statistics smoothed with weight ``gamma``; annealed during warm-up."""
        model = self.model
        x = psi.reshape(-1, model.n_eta)
        s1, s2 = x.mean(0), x.T @ x / x.shape[0]
        if self._sum1 is None or gamma >= 1.0:
            self._sum1, self._sum2 = s1, s2
        else:
            self._sum1 = self._sum1 + gamma * (s1 - self._sum1)
            self._sum2 = self._sum2 + gamma * (s2 - self._sum2)
        for j, raw in self._mu.items():
            raw.fill_(self._sum1[j])
        o = self._offset(x)
        second = (
            self._sum2 - torch.outer(o, self._sum1) - torch.outer(self._sum1, o) + torch.outer(o, o)
        )
        start = 0
        for block in model.random_effects():
            if not block.fixed:
                omega = second[start : start + block.k, start : start + block.k]
                if isinstance(block.domain, DiagonalCovariance):
                    omega = torch.diag(torch.diagonal(omega))
                if warming_up:
                    d_new = torch.diagonal(omega)
                    d = torch.maximum(d_new, self.anneal * torch.diagonal(block.value()))
                    r = (d / d_new.clamp_min(torch.finfo(d.dtype).tiny)).sqrt()
                    omega = omega * r[:, None] * r[None, :]
                    omega = omega - torch.diag(torch.diagonal(omega)) + torch.diag(d)
                block.set_value(0.5 * (omega + omega.T))
            start += block.k

    # ----------------------------------------------------------------------- the fit
    def fit(
        self, pop: Population, callback: Callable[[int, float], None] | None = None
    ) -> MCEMResult:
        """Every iteration on ``pop``; leaves the model at the estimates."""
        model = self.model
        self._mu = mu_referenced(model, pop)
        self._sum1 = self._sum2 = None
        rows = repeat_subjects(pop, self.n_chains)
        start = pop.obs_time.new_zeros(len(rows), model.n_eta)
        with torch.no_grad():
            latents = (start + self._offset(start)).flatten()
        params = self._params()
        result = mcem(
            self.log_joint, latents, params, rows, self.options, callback,
            closed_form=self.closed_form,
        )
        if not math.isfinite(result.trace[-1]):
            raise NonFiniteObjective("MCEM: the complete-data log-likelihood is not finite")
        with torch.no_grad():
            for p, value in zip(params, result.params, strict=True):
                p.copy_(value)
        self.result = result
        return result
