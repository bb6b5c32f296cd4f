"""Laplace / FOCEI / FOCE marginal likelihood of an NLME model.

For each subject, with l_i(η) = -log p(y_i|η) - log p(η) and its mode η̂_i,

    log p(y_i) ≈ -l_i(η̂_i) + (K/2)·log 2π - ½·log det H_i

``hessian="exact"`` takes H_i = ∇²l_i(η̂_i) (Laplace; "FOCEI with exact Hessian");
``hessian="expected"`` takes the expected information Ω⁻¹ + Σ_t [∂μ∂μᵀ/V + ½ ∂V∂Vᵀ/V²]
(NONMEM's FOCEI; with ``interaction=False`` the residual variance is taken at η = 0 and
this is NONMEM's FOCE). Gradients with respect to the fixed effects flow through the mode
by the implicit-function theorem (in adjoint form, see :meth:`LaplaceEstimator.subject_loglik`).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from deepnlme.data.population import Population
from deepnlme.inference.feasibility import INFEASIBLE_LOSS
from deepnlme.inference.inner import (
    InnerOptions,
    InnerResult,
    absolute_eigenvalues,
    find_modes,
    reusing_steps,
    use_differences,
)
from deepnlme.inference.joint import NegLogJoint
from deepnlme.model.base import NLMEModel
from deepnlme.model.domains import LOG_2PI


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
        self._hessian: Tensor | None = None  # (n_subjects, K, K) exact Hessians at the modes
        self._steps = None  # an ODE solver's steps, reused between evaluations (reusing_steps)
        self._rate: Tensor | None = None  # (n_subjects,) convergence constants of the searches
        self._tangent = None  # the last evaluation's solves at its modes, with derivatives
        self.last_inner = None

    # ----------------------------------------------------------- mode memory
    def _warm_start(self, pop: Population) -> Tensor:
        k = self.model.n_eta
        need = int(pop.subject_index.max()) + 1 if len(pop) else 0
        ref = pop.obs_time
        if self._eta_hat is None or self._eta_hat.shape[0] < need or self._eta_hat.shape[1] != k:
            self._eta_hat = ref.new_zeros(need, k)
            self._hessian = self._rate = None
        self._eta_hat = self._eta_hat.to(device=ref.device, dtype=ref.dtype)
        return self._eta_hat[pop.subject_index]

    def _stored_hessians(self, pop: Population) -> Tensor | None:
        """Exact Hessians ``(N, K, K)`` at the stored modes, if every subject of ``pop`` has one."""
        if self._hessian is None:
            return None
        h = self._hessian[pop.subject_index]
        return h if bool(torch.isfinite(h).all()) else None

    def _stored_rates(self, pop: Population) -> Tensor | None:
        """Convergence constants ``(N,)`` of the stored modes' searches (NaN: unknown)."""
        return None if self._rate is None else self._rate[pop.subject_index]

    def reset(self) -> None:
        """Forget the stored modes (the next evaluation starts from η = 0)."""
        self._eta_hat = None
        self._hessian = None
        self._steps = None
        self._rate = None
        self._tangent = None

    # ------------------------------------------------------------- the method
    def _terms(self, pop: Population, warm_start: bool) -> _LaplaceTerms:
        """Find the modes and build l, ∇_η l and log det H at them (with graphs)."""
        eta0 = self._warm_start(pop)
        hessian0 = self._stored_hessians(pop) if warm_start else None
        if not warm_start:
            eta0 = torch.zeros_like(eta0)
        variance0 = None if self.interaction else self.joint.population_variance(pop)
        exact = self.hessian == "exact"
        with reusing_steps(self.joint, self._steps) as memory:
            self._steps = memory
            result = find_modes(
                self.joint,
                eta0,
                pop,
                variance0,
                self.inner,
                True,
                hessian0,
                hessian_graph=exact,
                jacobians=not exact,
                rate0=self._stored_rates(pop) if hessian0 is not None else None,
                tangent0=self._tangent if hessian0 is not None else None,
            )
        self.last_inner = result
        chol = _pd_cholesky(result.hessian)
        if exact:
            leaf, logdet = result.leaf, _cholesky_logdet(chol)
        else:
            # Expected information at the modes: from the modes' own evaluation where it
            # provides the Jacobians, else one more evaluation with its own η leaf.
            leaf = result.eta.detach().requires_grad_(True)
            if result.gaussian is not None:  # from the modes' own evaluation (same points)
                leaf = result.leaf
                terms, d_mean, d_var = result.gaussian
            elif use_differences(self.joint, self.inner):
                terms, d_mean, d_var = self.joint.gaussian_jacobians_by_differences(
                    leaf, pop, variance0, self.inner.difference_step
                )
            else:
                terms, d_mean, d_var = self.joint.gaussian_jacobians(leaf, pop, variance0)
            curvature = self.joint.expected_information(d_mean, d_var, terms.variance, pop.obs_mask)
            logdet = _logdet(curvature)
        return _LaplaceTerms(leaf, logdet, chol.detach(), result)

    def _remember(self, pop: Population, result: InnerResult) -> None:
        """Store the modes and exact Hessians of ``pop``'s subjects for the next warm start."""
        self._eta_hat[pop.subject_index] = result.eta.detach()
        if self._hessian is None:
            k = result.eta.shape[-1]
            self._hessian = result.eta.new_full((self._eta_hat.shape[0], k, k), float("nan"))
        self._hessian[pop.subject_index] = result.hessian.detach()
        self._tangent = result.tangent
        if result.rate is not None:  # measured where it could be; else the last measurement
            if self._rate is None:
                self._rate = result.eta.new_full((self._eta_hat.shape[0],), float("nan"))
            known = torch.isfinite(result.rate)
            self._rate[pop.subject_index[known]] = result.rate[known]

    def _neg_loglik(self, t: _LaplaceTerms, dlogdet_deta: Tensor | None) -> Tensor:
        """-log p(y_i) ``(N,)`` from the terms at η̂, corrected to the exact mode η*.

        Returned without its ½ log det H term (added by the caller, ``t.logdet`` ``(N,)``).

        η̂ may miss η* by δ = -H⁻¹g (g = ∇_η l at η̂, below the inner tolerance); to second
        order in g, l(η*) = l(η̂) - ½ gᵀH⁻¹g and ½ log det H(η*) = ½ log det H(η̂) - vᵀg with
        v = H⁻¹ ½ ∂(log det H)/∂η. With H⁻¹ and v held fixed, the θ-gradient of these
        expressions is the implicit-function-theorem gradient through η*(θ): the -vᵀg term
        carries dη*/dθ = -H⁻¹ ∂g/∂θ into the log det (l itself needs none at a mode).
        """
        nll, grad = t.inner.nll, t.inner.grad
        h_inv_g = torch.cholesky_solve(grad.unsqueeze(-1), t.chol).squeeze(-1)
        if dlogdet_deta is None:  # log det H does not depend on η (models linear in η)
            dlogdet_deta = torch.zeros_like(grad)
        v = torch.cholesky_solve(0.5 * dlogdet_deta.detach().unsqueeze(-1), t.chol).squeeze(-1)
        k = grad.shape[-1]
        return nll - 0.5 * (grad * h_inv_g).sum(-1) - (v * grad).sum(-1) - 0.5 * k * LOG_2PI

    def subject_loglik(self, pop: Population, warm_start: bool = True) -> Tensor:
        """Approximate marginal log-likelihood of each subject ``(N,)``, differentiable in θ."""
        t = self._terms(pop, warm_start)
        self._remember(pop, t.inner)
        (grad,) = torch.autograd.grad(t.logdet.sum(), t.leaf, retain_graph=True, allow_unused=True)
        return -(self._neg_loglik(t, grad) + 0.5 * t.logdet)

    def loss(self, pop: Population) -> Tensor:
        """Objective to minimize: -Σ_i log p(y_i) - log prior(θ) (a scalar).

        One backward pass through the log-determinant graph (the costly, third-order part)
        gives its derivatives for η and for every trainable parameter at once; the latter are
        attached to the returned loss, so ``loss.backward()`` does not traverse it again.
        """
        t = self._terms(pop, warm_start=True)
        params = [p for p in self.model.parameters() if p.requires_grad]
        grads = torch.autograd.grad(
            t.logdet.sum(), [t.leaf, *params], retain_graph=True, allow_unused=True
        )
        light = self._neg_loglik(t, grads[0]).sum()
        value = light.detach() + 0.5 * t.logdet.detach().sum()
        # The logdet's gradient is attached as Σ ½ p·∂(log det)/∂p (value removed below).
        finite = torch.isfinite(value)
        for p, g in zip(params, grads[1:], strict=False):
            if g is not None:
                light = light + 0.5 * (p * g).sum()
                finite = finite & torch.isfinite(g).all()
        if not bool(finite):
            # Not finite (a far line-search trial, say): a finite barrier with zero gradient,
            # so that a line search backtracks (NaN or inf would poison its interpolation);
            # the modes found here are not kept as warm starts.
            return sum((0.0 * p).sum() for p in params) + INFEASIBLE_LOSS
        self._remember(pop, t.inner)
        return light - light.detach() + value - self.model.log_prior()

    def loglik(self, pop: Population, warm_start: bool = True) -> float:
        """Marginal log-likelihood of ``pop`` at the current parameters."""
        return float(self.subject_loglik(pop, warm_start).sum().detach())

    def modes(self, pop: Population, warm_start: bool = True) -> Tensor:
        """Empirical Bayes estimates η̂ ``(N, K)`` at the current parameters."""
        result = self._terms(pop, warm_start).inner
        self._remember(pop, result)
        return result.eta.detach().clone()


class _LaplaceTerms(NamedTuple):
    leaf: Tensor  # (N, K) η input of the graphs below
    logdet: Tensor  # (N,) log det of the Hessian (exact or expected) at η̂
    chol: Tensor  # (N, K, K) Cholesky factor of the exact Hessian (detached)
    inner: InnerResult  # modes; l, ∇_η l (with graphs) and exact Hessians there


def _pd_cholesky(h: Tensor) -> Tensor:
    """Cholesky factors ``(N, K, K)`` of H, or of |H| (absolute eigenvalues) where H is not
    positive definite (a subject stopped short of its mode); differentiable."""
    return torch.linalg.cholesky(absolute_eigenvalues(h))


def _logdet(h: Tensor) -> Tensor:
    """log det ``(N,)`` of each ``(N, K, K)`` Hessian; log |det| where it is not positive
    definite (see :func:`_pd_cholesky`), so that the objective stays finite."""
    return _cholesky_logdet(_pd_cholesky(h))


def _cholesky_logdet(chol: Tensor) -> Tensor:
    """log det ``(N,)`` of the matrices whose Cholesky factors are ``chol`` ``(N, K, K)``."""
    return 2.0 * torch.log(torch.diagonal(chol, dim1=-2, dim2=-1)).sum(-1)


def Laplace(model: NLMEModel, **kw) -> LaplaceEstimator:  # noqa: N802 (estimator name)
    """Laplace approximation with the exact Hessian of the conditional log-density."""
    return LaplaceEstimator(model, hessian="exact", interaction=True, name="laplace", **kw)


def FOCEI(model: NLMEModel, **kw) -> LaplaceEstimator:  # noqa: N802
    """NONMEM's FOCE with interaction (expected-information Hessian)."""
    return LaplaceEstimator(model, hessian="expected", interaction=True, name="focei", **kw)


def FOCE(model: NLMEModel, **kw) -> LaplaceEstimator:  # noqa: N802
    """NONMEM's FOCE without η–ε interaction."""
    return LaplaceEstimator(model, hessian="expected", interaction=False, name="foce", **kw)
