"""Bounded quasi-Newton minimisation of a torch objective (scipy's L-BFGS-B, autograd gradient).

The objective is evaluated in float64 on the design's device; scipy only sees numpy vectors.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from scipy.optimize import minimize


@dataclass
class OptimResult:
    """Minimiser ``x``, value ``fun``, projected gradient max, iterations and evaluations."""

    x: np.ndarray
    fun: float
    grad_max: float
    n_iter: int
    n_eval: int
    success: bool
    message: str


def projected_grad_max(x: np.ndarray, grad: np.ndarray, lower: np.ndarray) -> float:
    """Largest gradient component not pushing against an active lower bound."""
    active = (x <= lower + 1e-10) & (grad > 0)
    return float(np.max(np.abs(np.where(active, 0.0, grad)), initial=0.0))


def minimize_bounded(
    objective: Callable[[torch.Tensor], torch.Tensor],
    x0: np.ndarray,
    lower: np.ndarray,
    device: torch.device | str = "cpu",
    max_iter: int = 500,
    gtol: float = 1e-6,
    ftol: float = 1e-12,
) -> OptimResult:
    """Minimise ``objective(x)`` (a float64 torch scalar) subject to ``x >= lower``."""
    evals = [0]

    def fun(x: np.ndarray) -> tuple[float, np.ndarray]:
        evals[0] += 1
        xt = torch.tensor(x, dtype=torch.float64, device=device, requires_grad=True)
        value = objective(xt)
        (grad,) = torch.autograd.grad(value, xt)
        f = float(value.detach())
        g = grad.detach().cpu().numpy()
        if not np.isfinite(f) or not np.all(np.isfinite(g)):
            return np.inf, np.zeros_like(x)
        return f, g

    bounds = [(None if not np.isfinite(lo) else lo, None) for lo in lower]
    res = minimize(
        fun, np.asarray(x0, float), jac=True, method="L-BFGS-B", bounds=bounds,
        options={"maxiter": max_iter, "gtol": gtol, "ftol": ftol, "maxcor": 20},
    )
    _, g = fun(res.x)
    evals[0] -= 1
    return OptimResult(
        res.x, float(res.fun), projected_grad_max(res.x, g, lower), int(res.nit), evals[0],
        bool(res.success), str(res.message),
    )
