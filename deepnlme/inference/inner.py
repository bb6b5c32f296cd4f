"""Batched mode-finding for the random effects: η̂_i = argmin_η l_i(η), all subjects at once.

Damped Newton (Levenberg–Marquardt) with per-subject damping: each iteration solves
``(|H| + λ·diag|H|) δ = -∇l`` where ``|H|`` is the exact Hessian with its eigenvalues
replaced by their absolute values (so steps always descend, also away from saddles and
maxima); a step is kept for a subject only if it lowers that subject's l, else its λ grows.
Near the mode this is Newton's method (quadratic convergence).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from deepnlme.data.population import Population
from deepnlme.inference.joint import NegLogJoint


@dataclass
class InnerOptions:
    """Settings of the inner (η) optimization."""

    max_iter: int = 100
    gtol: float = 1e-6  # converged when max_j |∂l_i/∂η_j| < gtol
    lambda_init: float = 1e-3
    lambda_max: float = 1e12


@dataclass
class InnerResult:
    eta: Tensor  # (N, K) modes
    n_iter: int
    converged: Tensor  # (N,) bool
    max_grad: float


def _damped_solve(hess: Tensor, grad: Tensor, lam: Tensor) -> Tensor:
    """Solve (|H| + λ diag|H|) δ = -g per subject; H (N, K, K), g (N, K), λ (N,) → δ (N, K)."""
    evals, evecs = torch.linalg.eigh(0.5 * (hess + hess.transpose(-1, -2)))
    scale = evals.abs().amax(-1, keepdim=True).clamp(min=1e-12)
    evals = evals.abs().clamp(min=1e-10 * scale)
    pd = evecs @ torch.diag_embed(evals) @ evecs.transpose(-1, -2)
    diag = torch.diagonal(pd, dim1=-2, dim2=-1)
    chol = torch.linalg.cholesky(pd + torch.diag_embed(lam[:, None] * diag))
    return -torch.cholesky_solve(grad.unsqueeze(-1), chol).squeeze(-1)


def find_modes(
    joint: NegLogJoint,
    eta0: Tensor,
    pop: Population,
    variance0: Tensor | None = None,
    options: InnerOptions | None = None,
) -> InnerResult:
    """Minimize l_i(η) for every subject from ``eta0`` ``(N, K)``; no graph is kept."""
    opts = options or InnerOptions()
    eta = eta0.detach().clone()
    n = eta.shape[0]
    lam = torch.full((n,), opts.lambda_init, dtype=eta.dtype, device=eta.device)
    max_grad = float("inf")
    converged = torch.zeros(n, dtype=torch.bool, device=eta.device)
    it = 0
    with torch.no_grad():
        v0 = None if variance0 is None else variance0.detach()
        for it in range(1, opts.max_iter + 1):
            with torch.enable_grad():
                nll, grad, matrix = joint.exact_hessian(eta, pop, v0)
            nll, grad, matrix = nll.detach(), grad.detach(), matrix.detach()
            gmax = grad.abs().amax(-1)
            converged = gmax < opts.gtol
            max_grad = float(gmax.max()) if n else 0.0
            if bool(converged.all()):
                break
            # Try damped steps until every unconverged subject improved or gave up.
            for _ in range(30):
                step = _damped_solve(matrix, grad, lam)
                trial = joint(eta + step, pop, v0).nll
                better = (trial <= nll) & torch.isfinite(trial) & ~converged
                eta = torch.where(better[:, None], eta + step, eta)
                lam = torch.where(better, lam / 3.0, (lam * 4.0).clamp(max=opts.lambda_max))
                lam = lam.clamp(min=1e-12)
                pending = ~better & ~converged & (lam < opts.lambda_max)
                if not bool(pending.any()):
                    break
                # Only subjects still waiting for an acceptable step try again.
                grad = torch.where(pending[:, None], grad, torch.zeros_like(grad))
                converged = converged | ~pending
    return InnerResult(eta, it, converged, max_grad)
