"""Batched mode-finding for the random effects: η̂_i = argmin_η l_i(η), all subjects at once.

Damped Newton (Levenberg–Marquardt) with per-subject damping: each iteration solves
``(|H| + λ·diag|H|) δ = -∇l`` where ``|H|`` is the exact Hessian with its eigenvalues
replaced by their absolute values (so steps always descend, also away from saddles and
maxima); a step is kept for a subject only if it lowers that subject's l, else its λ grows.
Near the mode this is Newton's method (quadratic convergence). Subjects that have
converged drop out: later iterations evaluate only the subjects still moving.
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
    gtol: float = 1e-4  # converged when max_j |∂l_i/∂η_j| < gtol (the objective adds the
    # second-order correction to the exact mode, so errors are O(gtol²))
    lambda_first: float = 1e-3  # damping after the first rejected (undamped Newton) step
    lambda_max: float = 1e12


@dataclass
class InnerResult:
    """Modes and the last evaluation at them.

    ``nll``, ``grad`` and ``hessian`` belong to the modes ``eta``; with ``keep_graph`` they
    keep their graph to the model's parameters and to ``leaves`` (the η tensors of the
    evaluations they came from: subjects converge at different iterations), otherwise they
    are detached. :meth:`leaf_grad` maps gradients with respect to ``leaves`` to ``(N, K)``.
    """

    eta: Tensor  # (N, K) modes (detached)
    nll: Tensor  # (N,) l_i at eta
    grad: Tensor  # (N, K) ∂l/∂η at eta
    hessian: Tensor  # (N, K, K) exact Hessian of l at eta
    leaves: list[Tensor]  # η inputs of the evaluations, each (n_j, K)
    rows: list[Tensor]  # for each leaf, the positions (into the leaf) of the subjects it finished
    order: Tensor  # (N,) position of each subject in the concatenation of finished rows
    n_iter: int  # Hessian evaluations
    converged: Tensor  # (N,) bool: gradient below gtol (or within 1000·gtol at the precision limit)
    max_grad: float

    def leaf_grad(self, grads: list[Tensor | None]) -> Tensor:
        """Gradients w.r.t. ``leaves`` (None = unused) → gradient w.r.t. η, ``(N, K)``."""
        parts = [
            torch.zeros_like(leaf[rows]) if g is None else g[rows]
            for leaf, rows, g in zip(self.leaves, self.rows, grads, strict=False)
        ]
        return torch.cat(parts)[self.order]


def absolute_eigenvalues(hess: Tensor) -> Tensor:
    """|H|: each symmetric ``(K, K)`` matrix of ``(N, K, K)`` with its eigenvalues replaced by
    their absolute values (floored at 1e-10 of the largest): positive definite, equal to H
    where H already is. Non-finite matrices become the identity; where the eigensolver
    fails (extreme entries), ``diag(|H_jj|)`` stands in."""
    finite = torch.isfinite(hess).all(-1).all(-1)
    eye = torch.eye(hess.shape[-1], dtype=hess.dtype, device=hess.device)
    hess = torch.where(finite[:, None, None], 0.5 * (hess + hess.transpose(-1, -2)), eye)
    scale = hess.abs().amax((-1, -2), keepdim=True).clamp(min=1e-300)
    try:
        evals, evecs = torch.linalg.eigh(hess / scale)
    except RuntimeError:  # torch.linalg.LinAlgError: fall back to the absolute diagonal
        diag = torch.diagonal(hess, dim1=-2, dim2=-1).abs()
        return torch.diag_embed(diag.clamp(min=1e-10 * scale[..., 0].clamp(max=1e300)))
    top = evals.abs().amax(-1, keepdim=True).clamp(min=1e-12)
    evals = evals.abs().clamp(min=1e-10 * top) * scale[..., 0]
    return evecs @ torch.diag_embed(evals) @ evecs.transpose(-1, -2)


def _damped_solve(hess: Tensor, grad: Tensor, lam: Tensor) -> Tensor:
    """Solve (|H| + λ diag|H|) δ = -g per subject; H (N, K, K), g (N, K), λ (N,) → δ (N, K).

    Subjects with a non-finite gradient get δ = 0."""
    pd = absolute_eigenvalues(hess)
    diag = torch.diagonal(pd, dim1=-2, dim2=-1)
    chol = torch.linalg.cholesky(pd + torch.diag_embed(lam[:, None] * diag))
    grad = torch.where(torch.isfinite(grad), grad, 0.0)
    return -torch.cholesky_solve(grad.unsqueeze(-1), chol).squeeze(-1)


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
    lam = eta.new_zeros(n)  # 0: plain Newton step (on the absolute-eigenvalue Hessian)
    stalled = torch.zeros(n, dtype=torch.bool, device=eta.device)  # at the precision limit
    v0 = variance0 if variance0 is None or keep_graph else variance0.detach()
    if n == 0:
        empty = eta.new_zeros(0)
        return InnerResult(
            eta,
            empty,
            eta,
            eta.new_zeros(0, eta.shape[-1], eta.shape[-1]),
            [eta],
            [torch.zeros(0, dtype=torch.long, device=eta.device)],
            torch.zeros(0, dtype=torch.long, device=eta.device),
            0,
            torch.zeros(0, dtype=torch.bool, device=eta.device),
            0.0,
        )
    active = torch.arange(n, device=eta.device)  # subjects not finished yet
    sub, sub_v0 = pop, v0  # their data (and η = 0 variances)
    done_idx, leaves, rows, pieces, converged_parts = [], [], [], [], []
    it, max_grad = 0, 0.0
    while active.numel():
        it += 1
        leaf = eta[active].detach().requires_grad_(True)
        with torch.enable_grad():
            nll, grad, hess = joint.exact_hessian(leaf, sub, sub_v0, create_graph=keep_graph)
        if not keep_graph:
            nll, grad, hess = nll.detach(), grad.detach(), hess.detach()
        g, h, f = grad.detach(), hess.detach(), nll.detach()
        gmax = g.abs().amax(-1)
        converged = gmax < opts.gtol
        finished = converged | stalled[active] | (it > opts.max_iter)
        if bool(finished.any()):
            pos = finished.nonzero().squeeze(-1)
            done_idx.append(active[pos])
            leaves.append(leaf)
            rows.append(pos)
            pieces.append((nll[pos], grad[pos], hess[pos]))
            ok = converged | (stalled[active] & (gmax < opts.gtol * 1e3))
            converged_parts.append(ok[pos])
            max_grad = max(max_grad, float(gmax[pos].max()))
        moving = ~finished
        if not bool(moving.any()):
            break
        idx = active[moving]
        if idx.numel() < active.numel():  # later iterations see only these subjects
            sub = pop.subset(idx)  # (outside no_grad: sub_v0 keeps its graph to θ)
            sub_v0 = None if v0 is None else v0[idx][:, : sub.obs_time.shape[1]]
        # Damped steps until each moving subject found a lower l or its λ hit the cap.
        with torch.no_grad():
            v_trial = None if sub_v0 is None else sub_v0.detach()
            g_m, h_m, f_m, e_m, lam_m = g[moving], h[moving], f[moving], eta[idx], lam[idx]
            noise = 1e-13 * (1.0 + f_m.abs())  # rounding level of l: no real change below it
            trying = torch.ones_like(f_m, dtype=torch.bool)
            while bool(trying.any()):
                step = _damped_solve(h_m, g_m, lam_m)
                trial = joint(e_m + step, sub, v_trial).nll
                better = trying & (trial <= f_m + noise) & torch.isfinite(trial)
                e_m = torch.where(better[:, None], e_m + step, e_m)
                lam_m = torch.where(better, lam_m / 3.0, lam_m)
                lam_m = torch.where(lam_m < 1e-9, 0.0, lam_m)
                failed = trying & ~better
                grown = torch.where(lam_m == 0, opts.lambda_first, lam_m * 4.0)
                lam_m = torch.where(failed, grown, lam_m)
                trying = failed & (lam_m <= opts.lambda_max)
            eta[idx] = e_m
            lam[idx] = lam_m
            stalled[idx] = lam_m > opts.lambda_max
        active = idx
    order = torch.argsort(torch.cat(done_idx))
    nll, grad, hess = (torch.cat(parts)[order] for parts in zip(*pieces, strict=False))
    converged = torch.cat(converged_parts)[order]
    return InnerResult(eta, nll, grad, hess, leaves, rows, order, it, converged, max_grad)
