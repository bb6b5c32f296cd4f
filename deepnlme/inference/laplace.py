"""Laplace / FOCEI / FOCE marginal likelihood of an NLME model.

For each subject, with l_i(η) = -log p(y_i|η) - log p(η) and its mode η̂_i,

    log p(y_i) ≈ -l_i(η̂_i) + (K/2)·log 2π - ½·log det H_i

``hessian="exact"`` takes H_i = ∇²l_i(η̂_i) (Laplace; "FOCEI with exact Hessian");
``hessian="expected"`` takes the expected information Ω⁻¹ + Σ_t [∂μ∂μᵀ/V + ½ ∂V∂Vᵀ/V²]
(NONMEM's FOCEI; with ``interaction=False`` the residual variance is taken at η = 0 and
this is NONMEM's FOCE). Gradients with respect to the fixed effects flow through the mode
by the implicit-function theorem: one differentiable Newton step from the converged mode.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from deepnlme.data.population import Population
from deepnlme.inference.inner import InnerOptions, find_modes
from deepnlme.inference.joint import NegLogJoint
from deepnlme.model.base import NLMEModel


class LaplaceEstimator:
    """Marginal likelihood by a Gaussian approximation around each subject's mode.

    Keeps the last modes ``(n_subjects, K)`` to warm-start the next evaluation.
    """

    def __init__(
        self,
        model: NLMEModel,
        hessian: str = "exact",
        interaction: bool = True,
        inner: InnerOptions | dict | None = None,
        name: str | None = None,
    ):
        if hessian not in ("exact", "expected"):
            raise ValueError(f"hessian must be 'exact' or 'expected', got {hessian!r}")
        if hessian == "exact" and not interaction:
            raise ValueError("interaction=False is only defined for hessian='expected' (FOCE)")
        self.model = model
        self.hessian = hessian
        self.interaction = interaction
        self.inner = InnerOptions(**inner) if isinstance(inner, dict) else inner or InnerOptions()
        self.name = name or {"exact": "laplace"}.get(hessian, "focei" if interaction else "foce")
        self.joint = NegLogJoint(model, interaction)
        self._eta_hat: Tensor | None = None
        self.last_inner = None

    # ----------------------------------------------------------- mode memory
    def _warm_start(self, pop: Population) -> Tensor:
        k = self.model.n_eta
        need = int(pop.subject_index.max()) + 1 if len(pop) else 0
        ref = pop.obs_time
        if self._eta_hat is None or self._eta_hat.shape[0] < need or self._eta_hat.shape[1] != k:
            self._eta_hat = ref.new_zeros(need, k)
        self._eta_hat = self._eta_hat.to(device=ref.device, dtype=ref.dtype)
        return self._eta_hat[pop.subject_index]

    def reset(self) -> None:
        """Forget the stored modes (the next evaluation starts from η = 0)."""
        self._eta_hat = None

    # ------------------------------------------------------------- the method
    def subject_loglik(self, pop: Population, warm_start: bool = True) -> Tensor:
        """Approximate marginal log-likelihood of each subject ``(N,)``, differentiable in θ."""
        k = self.model.n_eta
        eta0 = self._warm_start(pop)
        if not warm_start:
            eta0 = torch.zeros_like(eta0)
        variance0 = None if self.interaction else self.joint.population_variance(pop)
        result = find_modes(self.joint, eta0, pop, variance0, self.inner)
        self.last_inner = result
        # Implicit differentiation: one Newton step from the (detached) mode, whose value is
        # the mode and whose derivative is dη̂/dθ = -H⁻¹ ∂²l/∂η∂θ.
        _, grad, hess = self.joint.exact_hessian(result.eta, pop, variance0)
        chol, _ = torch.linalg.cholesky_ex(_regularized(hess.detach()))
        eta = result.eta - torch.cholesky_solve(grad.unsqueeze(-1), chol).squeeze(-1)
        if self.hessian == "exact":
            nll, _, h = self.joint.exact_hessian(eta, pop, variance0, create_graph=True)
        else:
            terms, d_mean, d_var = self.joint.gaussian_jacobians(eta, pop, variance0)
            nll = terms.nll
            h = self.joint.expected_information(d_mean, d_var, terms.variance, pop.obs_mask)
        logdet = 2.0 * torch.log(torch.diagonal(torch.linalg.cholesky(_regularized(h)), dim1=-2, dim2=-1)).sum(-1)
        self._eta_hat[pop.subject_index] = eta.detach()
        return -nll - 0.5 * logdet + 0.5 * k * math.log(2 * math.pi)

    def loss(self, pop: Population) -> Tensor:
        """Objective to minimize: -Σ_i log p(y_i) - log prior(θ) (a scalar)."""
        return -self.subject_loglik(pop).sum() - self.model.log_prior()

    def loglik(self, pop: Population, warm_start: bool = True) -> float:
        """Marginal log-likelihood of ``pop`` at the current parameters."""
        return float(self.subject_loglik(pop, warm_start).sum().detach())

    def modes(self, pop: Population, warm_start: bool = True) -> Tensor:
        """Empirical Bayes estimates η̂ ``(N, K)`` at the current parameters."""
        self.subject_loglik(pop, warm_start)
        return self._eta_hat[pop.subject_index].clone()


def _regularized(h: Tensor) -> Tensor:
    """Symmetrize a batch of Hessians ``(N, K, K)``."""
    return 0.5 * (h + h.transpose(-1, -2))


def Laplace(model: NLMEModel, **kw) -> LaplaceEstimator:  # noqa: N802 (estimator name)
    """Laplace approximation with the exact Hessian of the conditional log-density."""
    return LaplaceEstimator(model, hessian="exact", interaction=True, name="laplace", **kw)


def FOCEI(model: NLMEModel, **kw) -> LaplaceEstimator:  # noqa: N802
    """NONMEM's FOCE with interaction (expected-information Hessian)."""
    return LaplaceEstimator(model, hessian="expected", interaction=True, name="focei", **kw)


def FOCE(model: NLMEModel, **kw) -> LaplaceEstimator:  # noqa: N802
    """NONMEM's FOCE without η–ε interaction."""
    return LaplaceEstimator(model, hessian="expected", interaction=False, name="foce", **kw)
