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
    """Modes and the last evaluation at them.

    ``nll``, ``grad`` and ``hessian`` belong to the returned ``eta`` (a leaf that requires
    grad); with ``keep_graph`` they keep their graph to ``eta`` and to the model's
    parameters, otherwise they are detached.
    """

    eta: Tensor  # (N, K) modes
    nll: Tensor  # (N,) l_i at eta
    grad: Tensor  # (N, K) ∂l/∂η at eta
    hessian: Tensor  # (N, K, K) exact Hessian of l at eta
    n_iter: int  # Hessian evaluations
    converged: Tensor  # (N,) bool: gradient below gtol (or within 1000·gtol at the precision limit)
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


def _evaluate_subjects(
    joint: NegLogJoint, eta: Tensor, pop: Population, v0: Tensor | None, which: Tensor
) -> Tensor:
    """l_i(η_i) ``(N,)`` for the subjects flagged in ``which`` (others +inf).

    Evaluates only those subjects when they are few, the whole batch otherwise.
    """
    n = eta.shape[0]
    count = int(which.sum())
    if count > n // 4:
        return torch.where(which, joint(eta, pop, v0).nll, torch.inf)
    idx = which.nonzero().squeeze(-1)
    sub_v0 = None if v0 is None else v0[idx]
    sub = pop.subset(idx)
    if sub_v0 is not None:
        sub_v0 = sub_v0[:, : sub.obs_time.shape[1]]
    out = eta.new_full((n,), torch.inf)
    out[idx] = joint(eta[idx], sub, sub_v0).nll
    return out


def find_modes(
    joint: NegLogJoint,
    eta0: Tensor,
    pop: Population,
    variance0: Tensor | None = None,
    options: InnerOptions | None = None,
    keep_graph: bool = False,
) -> InnerResult:
    """Minimize l_i(η) for every subject from ``eta0`` ``(N, K)``.

    With ``keep_graph`` the derivatives at the returned modes keep their graph (the Laplace
    objective and its implicit gradient are built from them without evaluating again).
    """
    opts = options or InnerOptions()
    eta = eta0.detach().clone()
    n = eta.shape[0]
    lam = torch.full((n,), opts.lambda_init, dtype=eta.dtype, device=eta.device)
    stalled = torch.zeros(n, dtype=torch.bool, device=eta.device)  # at the precision limit
    v0 = variance0 if variance0 is None or keep_graph else variance0.detach()
    it = 0
    while True:
        it += 1
        leaf = eta.detach().requires_grad_(True)
        with torch.enable_grad():
            nll, grad, hess = joint.exact_hessian(leaf, pop, v0, create_graph=keep_graph)
        if not keep_graph:
            nll, grad, hess = nll.detach(), grad.detach(), hess.detach()
        g, h, f = grad.detach(), hess.detach(), nll.detach()
        gmax = g.abs().amax(-1)
        converged = gmax < opts.gtol
        if bool((converged | stalled).all()) or it > opts.max_iter:
            break
        # Damped steps until each moving subject found a lower l or its λ hit the cap.
        with torch.no_grad():
            moving = ~converged & ~stalled
            v_trial = None if v0 is None else v0.detach()
            noise = 1e-13 * (1.0 + f.abs())  # rounding level of l: no real change below it
            while bool(moving.any()):
                step = _damped_solve(h, g, lam)
                trial = _evaluate_subjects(joint, eta + step, pop, v_trial, moving)
                better = moving & (trial <= f + noise) & torch.isfinite(trial)
                eta = torch.where(better[:, None], eta + step, eta)
                lam = torch.where(better, (lam / 3.0).clamp(min=1e-12), lam)
                failed = moving & ~better
                lam = torch.where(failed, lam * 4.0, lam)
                stalled = stalled | (failed & (lam > opts.lambda_max))
                moving = failed & ~stalled
    converged = converged | (stalled & (gmax < opts.gtol * 1e3))
    max_grad = float(gmax.max()) if n else 0.0
    return InnerResult(leaf, nll, grad, hess, it, converged, max_grad)
