"""Per-subject negative log joint density  l_i(η) = -log p(y_i | η_i) - log p(η_i).

Everything is batched over subjects: η is ``(N, K)``, the per-subject terms are ``(N,)``.
For Gaussian residual models the pieces the FOCE-type Hessian needs (mean and variance of
each observation on the Gaussian scale) are kept alongside.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from deepnlme.data.population import Population
from deepnlme.likelihood.residual import GaussianResidual
from deepnlme.model.base import NLMEModel
from deepnlme.model.domains import LOG_2PI


@dataclass
class JointTerms:
    """l_i(η) and, for Gaussian residuals, the observation mean/variance ``(N, T)``."""

    nll: Tensor  # (N,) negative log joint density, all constants included
    mean: Tensor | None = None  # (N, T) mean of g(DV)
    variance: Tensor | None = None  # (N, T) variance of g(DV)


class NegLogJoint:
    """Computes l_i(η) for a model and population.

    ``interaction=False`` evaluates the residual variance at η = 0 (NONMEM's FOCE without
    η–ε interaction): the variance then depends on θ but not on η.
    """

    def __init__(self, model: NLMEModel, interaction: bool = True):
        self.model = model
        self.interaction = interaction

    def population_variance(self, pop: Population) -> Tensor | None:
        """Residual variance at η = 0, ``(N, T)`` (None for non-Gaussian models)."""
        zeros = pop.obs_time.new_zeros(len(pop), self.model.n_eta)
        dist = self.model.observe(zeros, pop)
        return dist.variance if isinstance(dist, GaussianResidual) else None

    def __call__(self, eta: Tensor, pop: Population, variance0: Tensor | None = None) -> JointTerms:
        """l(η) for η ``(N, K)``; ``variance0`` is the η = 0 variance when interaction is off."""
        dist = self.model.observe(eta, pop)
        mask = pop.obs_mask
        prior = -self.model.eta_log_prior(eta)
        if isinstance(dist, GaussianResidual):
            var = dist.variance if self.interaction or variance0 is None else variance0
            mean = dist.mean
            dv = pop.obs_dv_filled  # padding holds real DVs: finite transforms
            y = dist.transform(dv)
            if not pop.fully_observed:  # padding: harmless mean and variance (weight 0 below)
                var = torch.where(mask, var, torch.ones_like(var))
                mean = torch.where(mask, mean, y)
            r = y - mean
            point = torch.log(var) + r * r / var
            if not pop.fully_observed:
                point = point * mask
            # constants: ½ log 2π per observation and the Jacobian of g(DV) (data only)
            const = (0.5 * LOG_2PI) * mask.sum(-1).to(dv.dtype)
            if dist.log_scale:
                const = const - (dist.log_jacobian(dv) * mask).sum(-1)
            return JointTerms(0.5 * point.sum(-1) + const + prior, mean, var)
        if self.interaction is False:
            raise ValueError("FOCE without interaction needs a Gaussian residual model")
        logp = dist.log_prob(pop.obs_dv_filled)  # padding holds real DVs: finite log_prob
        logp = torch.where(mask, logp, torch.zeros_like(logp))
        return JointTerms(-logp.sum(-1) + prior)

    def gaussian_jacobians(
        self, eta: Tensor, pop: Population, variance0: Tensor | None = None
    ) -> tuple[JointTerms, Tensor, Tensor]:
        """Derivatives of the observation mean and variance with respect to η.

        Returns ``(terms, d_mean, d_var)`` with ∂mean/∂η and ∂variance/∂η ``(N, T, K)``
        (the latter zero when interaction is off), differentiable with respect to the model's
        parameters and to ``eta``. Uses K+1 reverse passes (a vector-Jacobian product
        differentiated with respect to its vector), much cheaper than forward mode here.
        """
        e = eta if eta.requires_grad else eta.detach().requires_grad_(True)
        terms = self(e, pop, variance0)
        u = torch.zeros_like(terms.mean, requires_grad=True)
        w = torch.zeros_like(terms.variance, requires_grad=True)
        outputs = [terms.mean, terms.variance] if self.interaction else [terms.mean]
        cotangents = [u, w] if self.interaction else [u]
        (vjp,) = torch.autograd.grad(outputs, e, cotangents, create_graph=True)
        d_mean, d_var = [], []
        for j in range(e.shape[-1]):
            dm, dv = torch.autograd.grad(
                vjp[:, j].sum(), [u, w], create_graph=True, retain_graph=True, allow_unused=True
            )
            d_mean.append(dm if dm is not None else torch.zeros_like(u))
            d_var.append(dv if dv is not None else torch.zeros_like(w))
        return terms, torch.stack(d_mean, -1), torch.stack(d_var, -1)

    def gaussian_jacobians_by_differences(
        self, eta: Tensor, pop: Population, variance0: Tensor | None, step: float
    ) -> tuple[JointTerms, Tensor, Tensor]:
        """:meth:`gaussian_jacobians` by central differences in η (step ``step``): the 2K+1
        points evaluated as one batch of (2K+1)·N subjects, differentiable with respect to
        the model's parameters and ``eta``. One batched forward instead of K+1 reverse passes
        (for e.g. an ODE solve: the expected-information objective then needs first
        derivatives only); relative error ~1e-8 in float64."""
        n, k = eta.shape
        eye = torch.eye(k, dtype=eta.dtype, device=eta.device)
        shifts = torch.cat([eta.new_zeros(1, k), step * eye, -step * eye])  # (2K+1, K)
        points = (eta[None] + shifts[:, None, :]).reshape(-1, k)
        index = torch.arange(n, device=eta.device).repeat(2 * k + 1)
        batch = pop.subset(index)
        v0 = None if variance0 is None else variance0[index][:, : batch.obs_time.shape[1]]
        return self.jacobians_from_points(self(points, batch, v0), n, k, step)

    def jacobians_from_points(
        self, every: JointTerms, n: int, k: int, step: float
    ) -> tuple[JointTerms, Tensor, Tensor]:
        """:meth:`gaussian_jacobians_by_differences` from the terms ``every`` of a batch whose
        first (2K+1)·N rows are η, η + step·e_j and η - step·e_j (j = 1..K) of N subjects
        (more rows may follow)."""
        t = every.mean.shape[-1]
        rows = (2 * k + 1) * n
        mean = every.mean[:rows].reshape(2 * k + 1, n, t)
        var = every.variance[:rows].reshape(2 * k + 1, n, t)

        def slope(x: Tensor) -> Tensor:  # (2K+1, N, T) -> (N, T, K)
            return ((x[1 : k + 1] - x[k + 1 :]) / (2 * step)).permute(1, 2, 0)

        d_var = slope(var) if self.interaction else torch.zeros_like(slope(mean))
        return JointTerms(every.nll[:n], mean[0], var[0]), slope(mean), d_var

    def expected_information(
        self, d_mean: Tensor, d_var: Tensor, var: Tensor, mask: Tensor
    ) -> Tensor:
        """Ω⁻¹ + Σ_t [∂μ ∂μᵀ / V + ½ ∂V ∂Vᵀ / V²] (the FOCEI Hessian), ``(N, K, K)``."""
        w = mask.to(var.dtype) / var
        info = torch.einsum("nt,ntj,ntk->njk", w, d_mean, d_mean)
        if self.interaction:
            info = info + 0.5 * torch.einsum("nt,ntj,ntk->njk", w * w, d_var, d_var)
        return info + self.model.eta_precision()

    def value_and_grad(
        self,
        eta: Tensor,
        pop: Population,
        variance0: Tensor | None = None,
        create_graph: bool = False,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """``(leaf, l, ∂l/∂η)`` at η ``(N, K)``: the η leaf they refer to, ``(N,)``, ``(N, K)``.

        ``l`` keeps its graph (to the parameters and ``leaf``) only with ``create_graph``, as
        does the gradient (then :meth:`hessian` can differentiate it); else both are detached.
        """
        leaf = eta if eta.requires_grad else eta.detach().requires_grad_(True)
        with torch.enable_grad():
            nll = self(leaf, pop, variance0).nll
            (grad,) = torch.autograd.grad(nll.sum(), leaf, create_graph=create_graph)
        return leaf, nll if create_graph else nll.detach(), grad

    @staticmethod
    def hessian(grad: Tensor, leaf: Tensor, create_graph: bool = False) -> Tensor:
        """∂²l/∂η² ``(N, K, K)`` by reverse mode from a gradient ``(N, K)`` with its graph to
        ``leaf`` (from :meth:`value_and_grad` with ``create_graph``); without a graph unless
        ``create_graph``."""
        with torch.enable_grad():
            rows = [
                torch.autograd.grad(
                    grad[:, j].sum(), leaf, create_graph=create_graph, retain_graph=True
                )[0]
                for j in range(leaf.shape[-1])
            ]
        return torch.stack(rows, -2)

    def exact_hessian(
        self,
        eta: Tensor,
        pop: Population,
        variance0: Tensor | None = None,
        create_graph: bool = False,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """(l, ∂l/∂η, ∂²l/∂η²) at η: ``(N,)``, ``(N, K)``, ``(N, K, K)`` by reverse mode; l and
        ∂l/∂η always keep their graph, ∂²l/∂η² only with ``create_graph``."""
        leaf, nll, grad = self.value_and_grad(eta, pop, variance0, create_graph=True)
        return nll, grad, self.hessian(grad, leaf, create_graph)
