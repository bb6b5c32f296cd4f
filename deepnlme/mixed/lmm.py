"""Gaussian linear mixed models by the profiled deviance (lme4 / MixedModels.jl).

For relative covariance factors θ the penalised least-squares system of ``[ZΛ X y]`` is
factored blockwise (:mod:`deepnlme.mixed.blocked`, the ``[X y]`` columns appended to the dense
block). With ``L`` that factor, ``r² = L[y, y]²`` is the penalised residual sum of squares and

* ML:   ``-2 log L = log|L_Z|² + n (1 + log(2π r²/n))``
* REML: ``log|L_Z|² + log|R_X|² + (n-p)(1 + log(2π r²/(n-p)))``

(lme4's ``devfun``). β solves ``R_X β = r_Xy``, σ² = r²/n (ML) or r²/(n−p) (REML) and
``vcov(β) = σ² (R_Xᵀ R_X)⁻¹``. θ is found by bounded L-BFGS with autograd gradients.
"""

from __future__ import annotations

import math
import time

import numpy as np
import torch

from deepnlme.mixed.blocked import BlockedFactor, lower_gradient
from deepnlme.mixed.covariance import RelativeCovariance
from deepnlme.mixed.design import MixedDesign
from deepnlme.mixed.optimizer import OptimResult, minimize_bounded
from deepnlme.mixed.random_effects import RandomDesign, natural_scale
from deepnlme.mixed.result import MixedFit, conditional_modes


class ProfiledDense(torch.autograd.Function):
    """The dense block's part of the deviance from the lower triangle ``S_low`` of
    ``S = [[S_ZZ, S_ZX, s_Zy], [., S_XX, s_Xy], [., ., s_yy]]`` (``q2 + p + 1`` square) and its
    Cholesky factor ``L``: ML ``log|S_ZZ| + n log r²``, REML ``log|S_ZZ,XX| + (n−p) log r²``
    with ``r² = L[-1, -1]²``. Backward from one Cholesky inverse (``log r² = log|S| −
    log|S_{-y}|``; leading-block inverses by rank-p updates of ``S⁻¹``)."""

    @staticmethod
    def forward(ctx, S_low, L, q2: int, p: int, n: int, reml: bool):  # type: ignore[override]
        ctx.save_for_backward(L)
        ctx.q2, ctx.p, ctx.n, ctx.reml = q2, p, n, reml
        d = torch.log(torch.diagonal(L))
        k = q2 + p
        dof = n - p if reml else n
        head = 2 * d[: (k if reml else q2)].sum()
        return head + dof * 2 * d[k]

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        (L,) = ctx.saved_tensors
        q2, p, n, reml = ctx.q2, ctx.p, ctx.n, ctx.reml
        k = q2 + p
        size = L.shape[0]
        S_inv = torch.cholesky_inverse(L)
        v = S_inv[:k, k]
        Sm_inv = S_inv[:k, :k] - torch.outer(v, v) / S_inv[k, k]  # S_{-y}⁻¹
        dof = n - p if reml else n
        G = dof * S_inv
        G[:k, :k] -= dof * Sm_inv
        if reml:
            G[:k, :k] += Sm_inv
        elif q2:
            B, C = Sm_inv[:q2, q2:k], Sm_inv[q2:k, q2:k]
            G[:q2, :q2] += Sm_inv[:q2, :q2] - B @ torch.linalg.solve(C, B.T)
        assert G.shape[0] == size
        return grad * lower_gradient(G), None, None, None, None, None


class ProfiledDeviance:
    """``θ -> -2 log L`` (ML) or the REML criterion, profiled over β and σ."""

    def __init__(self, design: MixedDesign, reml: bool = False) -> None:
        self.design = design
        self.reml = reml
        self.n, self.p = design.n_obs, design.X.shape[1]
        extra = torch.cat([design.X, design.y[:, None]], dim=1)
        self.random = RandomDesign(design, extra)
        self.cov = RelativeCovariance(self.random.sizes)

    def parts(self, theta: torch.Tensor) -> tuple[torch.Tensor, BlockedFactor, torch.Tensor]:
        """``(deviance, factor, r²)`` at θ."""
        factors = self.cov.factors(theta)
        factor = self.random.factorize(factors)
        q2, p = self.random.structure.q2, self.p
        L1 = torch.diagonal(factor.L11, dim1=-2, dim2=-1)
        dense = ProfiledDense.apply(factor.S_low, factor.L22, q2, p, self.n, self.reml)
        dof = self.n - p if self.reml else self.n
        dev = 2 * torch.log(L1).sum() + dense + dof * (1 + math.log(2 * math.pi / dof))
        r2 = factor.L22[-1, -1] ** 2
        return dev, factor, r2

    def __call__(self, theta: torch.Tensor) -> torch.Tensor:
        return self.parts(theta)[0]

    def initial(self) -> np.ndarray:
        return self.cov.initial()

    def lower_bounds(self) -> np.ndarray:
        return self.cov.lower_bounds()


def fit_lmm(
    design: MixedDesign, reml: bool = False, max_iter: int = 500, gtol: float = 1e-5
) -> MixedFit:
    """Fit a Gaussian LMM by ML or REML; returns a :class:`MixedFit` with lme4's quantities."""
    start = time.perf_counter()
    objective = ProfiledDeviance(design, reml)
    opt = minimize_bounded(objective, objective.initial(), objective.lower_bounds(),
                           design.y.device, max_iter=max_iter, gtol=gtol)
    return lmm_result(design, objective, opt, time.perf_counter() - start)


def lmm_result(
    design: MixedDesign, objective: ProfiledDeviance, opt: OptimResult, fit_seconds: float
) -> MixedFit:
    """The fit at the minimiser ``opt.x`` (θ) of ``objective``: β, σ, vcov, modes."""
    reml, device = objective.reml, design.y.device
    with torch.no_grad():
        theta = torch.as_tensor(opt.x, dtype=torch.float64, device=device)
        dev, factor, r2 = objective.parts(theta)
        n, p = objective.n, objective.p
        beta, Lx = gls_fixef(objective, factor)
        sigma2 = r2 / (n - p if reml else n)
        vcov = _vcov(Lx, sigma2)
        factors = objective.cov.factors(theta)
        rd = objective.random
        resid = design.y - design.X @ beta
        u = rd.solve(factor, rd.crossprod(factors, resid))
        var_u = rd.conditional_variances(factor)
        sigma = float(torch.sqrt(sigma2))
        b, var_b = natural_scale(factors, u, var_u, sigma)
        covariances = [(sigma2 * T @ T.T).cpu().numpy() for T in factors]
    names = design.fixef_names
    loglik = -0.5 * float(dev)
    return MixedFit(
        family="gaussian",
        link="identity",
        method="reml" if reml else "ml",
        n_obs=n,
        loglik=loglik,
        n_params=p + objective.cov.n_theta + 1,
        fixef=dict(zip(names, beta.cpu().tolist(), strict=True)),
        se_fixef=dict(zip(names, torch.sqrt(torch.diagonal(vcov)).cpu().tolist(), strict=True)),
        covariances=covariances,
        sigma=sigma,
        theta=np.asarray(opt.x),
        modes=conditional_modes(design, b, var_b),
        converged=bool(opt.success or opt.grad_max < 1e-3) and opt.grad_max < 1e-2,
        grad_max=opt.grad_max,
        n_iter=opt.n_iter,
        n_eval=opt.n_eval,
        message=opt.message,
        extra={"fit_seconds": fit_seconds, "vcov": vcov.cpu().tolist()},
    )


def gls_fixef(
    objective: ProfiledDeviance, factor: BlockedFactor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(β̂_θ (p,), R_X (p, p) lower)``: the GLS fixed effects at the factor's θ."""
    q2, p = objective.random.structure.q2, objective.p
    L = factor.L22
    Lx, ly = L[q2 : q2 + p, q2 : q2 + p], L[-1, q2 : q2 + p]
    return torch.linalg.solve_triangular(Lx.T, ly[:, None], upper=True).squeeze(-1), Lx


def _vcov(Lx: torch.Tensor, sigma2: torch.Tensor | float) -> torch.Tensor:
    eye = torch.eye(Lx.shape[0], dtype=Lx.dtype, device=Lx.device)
    Lx_inv = torch.linalg.solve_triangular(Lx, eye, upper=False)
    return sigma2 * (Lx_inv.T @ Lx_inv)


@torch.no_grad()
def fixef_covariance(
    objective: ProfiledDeviance, theta: torch.Tensor, sigma2: float
) -> torch.Tensor:
    """``vcov(β) = σ² (R_Xᵀ R_X)⁻¹`` ``(p, p)`` at any (θ, σ²) (lme4's ``vcov``)."""
    _, factor, _ = objective.parts(theta)
    return _vcov(gls_fixef(objective, factor)[1], sigma2)


def gaussian_loglik(
    design: MixedDesign, beta: torch.Tensor, sigma: float, theta: torch.Tensor
) -> float:
    """Exact log-likelihood of a Gaussian LMM at any (β, σ, θ) (not profiled), as lme4:
    ``-2 log L = log|L_θ|² + n log(2πσ²) + (r²_θ + ‖R_X(β − β̂_θ)‖²) / σ²``."""
    with torch.no_grad():
        objective = ProfiledDeviance(design)
        _, factor, r2 = objective.parts(theta)
        q2, n = objective.random.structure.q2, objective.n
        L = factor.L22
        beta_hat, Lx = gls_fixef(objective, factor)
        d1 = torch.diagonal(factor.L11, dim1=-2, dim2=-1)
        logdet = 2 * torch.log(d1).sum() + 2 * torch.log(torch.diagonal(L)[:q2]).sum()
        dev = logdet + n * math.log(2 * math.pi * sigma**2) + (
            r2 + ((Lx.T @ (beta - beta_hat)) ** 2).sum()
        ) / sigma**2
    return -0.5 * float(dev)
