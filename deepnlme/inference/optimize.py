"""Full-batch quasi-Newton optimization of an estimator's objective over the fixed effects.

The same pieces serve the Lightning training loop (one L-BFGS ``step`` per epoch) and plain
scripts/tests (:func:`fit` runs to convergence directly).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import Tensor

from deepnlme.data.population import Population


@dataclass
class OuterOptions:
    """L-BFGS settings: ``max_iter`` iterations in all, converged when max |∂loss| < ``gtol``."""

    max_iter: int = 500
    gtol: float = 1e-6  # L-BFGS stops when max |∂loss/∂raw| falls below this
    converged_gtol: float = 1e-3  # a fit is reported converged when max |∂loss/∂raw| < this
    ftol: float = 1e-12  # relative change of the loss below which L-BFGS stops
    history_size: int = 20
    lr: float = 1.0


@dataclass
class FitResult:
    loss: float
    n_iter: int
    n_evals: int
    grad_max: float
    converged: bool
    seconds: float


def trainable(module: torch.nn.Module) -> list[Tensor]:
    return [p for p in module.parameters() if p.requires_grad]


def make_lbfgs(params: list[Tensor], options: OuterOptions, max_iter: int | None = None):
    """L-BFGS with strong-Wolfe line search (``max_iter`` iterations per ``step`` call)."""
    return torch.optim.LBFGS(
        params,
        lr=options.lr,
        max_iter=max_iter or options.max_iter,
        max_eval=None,
        tolerance_grad=options.gtol,
        tolerance_change=options.ftol,
        history_size=options.history_size,
        line_search_fn="strong_wolfe",
    )


def grad_max(params: list[Tensor]) -> float:
    """Largest absolute gradient entry (the convergence criterion)."""
    grads = [p.grad.abs().max() for p in params if p.grad is not None and p.grad.numel()]
    return float(torch.stack(grads).max()) if grads else 0.0


def _lbfgs_count(optimizer: torch.optim.LBFGS, key: str) -> int:
    state = optimizer.state[optimizer.param_groups[0]["params"][0]]
    return int(state.get(key, 0))


def lbfgs_iterations(optimizer: torch.optim.LBFGS) -> int:
    """Iterations L-BFGS has taken so far (over all ``step`` calls)."""
    return _lbfgs_count(optimizer, "n_iter")


def lbfgs_evaluations(optimizer: torch.optim.LBFGS) -> int:
    """Objective evaluations L-BFGS has made so far (over all ``step`` calls)."""
    return _lbfgs_count(optimizer, "func_evals")


def objective_and_gradient(estimator, pop: Population) -> tuple[float, float, float]:
    """``(loss, loglik, max |∂loss/∂raw|)`` at the current parameters (fills ``.grad``);
    ``loglik`` is the objective without the log prior of the fixed effects."""
    model = estimator.model
    params = trainable(model)
    with torch.enable_grad():
        for p in params:
            p.grad = None
        loss = estimator.loss(pop)
        loss.backward()
    value = float(loss.detach())
    return value, -value - float(model.log_prior().detach()), grad_max(params)


def fit(estimator, pop: Population, options: OuterOptions | None = None) -> FitResult:
    """Maximize the estimator's objective over the model's trainable parameters."""
    opts = options or OuterOptions()
    params = trainable(estimator.model)
    optimizer = make_lbfgs(params, opts)
    n_evals = 0

    def closure() -> Tensor:
        nonlocal n_evals
        optimizer.zero_grad()
        loss = estimator.loss(pop)
        loss.backward()
        n_evals += 1
        return loss

    start = time.perf_counter()
    optimizer.step(closure)
    seconds = time.perf_counter() - start
    loss = closure()
    g = grad_max(params)
    return FitResult(
        loss.item(), lbfgs_iterations(optimizer), n_evals, g, g < opts.converged_gtol, seconds
    )
