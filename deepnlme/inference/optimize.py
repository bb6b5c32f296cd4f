"""Full-batch quasi-Newton optimization of an estimator's objective over the fixed effects.

The same pieces serve the Lightning training loop (one L-BFGS ``step`` per epoch) and plain
scripts/tests (:func:`fit` runs to convergence directly).

Convergence (one rule for both): a fit is converged only when its objective is finite (not the
:data:`~deepnlme.inference.feasibility.INFEASIBLE_LOSS` barrier), the largest gradient entry is
below ``converged_gtol``, and it stopped for a reason of its own (gradient below ``gtol``, or
no progress) rather than a budget (``max_iter``, ``max_epochs``). A fit does not start where the
objective is not finite or there is nothing to fit (:func:`check_start`). A stochastic (VI)
fit is converged only when its bound has levelled off (:func:`still_rising`).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, replace

import torch
from torch import Tensor

from deepnlme.data.population import Population
from deepnlme.inference.feasibility import ObjectiveError, feasible, starting_problem

#: Stop reasons (``ConvergenceMonitor.stop_reason``, ``FitResult.stop_reason``).
STOP_GRADIENT = "gradient below gtol"
STOP_NO_PROGRESS = "no progress"
STOP_MAX_ITER = "max_iter reached"
STOP_MAX_EPOCHS = "max_epochs reached"
STOP_NOT_FINITE = "non-finite loss"
#: Not converged: the data do not determine the parameter.
STOP_BOUNDARY = "a parameter at a boundary of its domain"
#: Stops that end a fit at a point where the convergence criterion may hold.
OWN_STOPS = (STOP_GRADIENT, STOP_NO_PROGRESS)


#: A VI fit is still rising when the least-squares slope of its bound over the last epochs
#: (PLATEAU_SHARE of them, at least PLATEAU_MIN_EPOCHS) exceeds PLATEAU_Z standard errors
#: and the rise it makes over them exceeds PLATEAU_NATS and PLATEAU_RELATIVE of the bound.
PLATEAU_SHARE = 0.1
PLATEAU_MIN_EPOCHS = 10
PLATEAU_Z = 3.0
PLATEAU_NATS = 0.1
PLATEAU_RELATIVE = 1e-4
#: ``stop_reason`` of a stochastic fit whose bound was still rising at the end.
STOP_STILL_RISING = "schedule completed with the bound still rising"


def still_rising(bounds: list[float]) -> bool:
    """Whether the per-epoch bounds ``bounds`` (nats) were still rising at the end: a trend
    over the last epochs beyond its noise and worth more than a tenth of a nat (False with
    fewer than PLATEAU_MIN_EPOCHS epochs)."""
    n = max(PLATEAU_MIN_EPOCHS, math.ceil(PLATEAU_SHARE * len(bounds)))
    if len(bounds) < n:
        return False
    y = torch.tensor(bounds[-n:], dtype=torch.float64)
    x = torch.arange(n, dtype=torch.float64)
    x = x - x.mean()
    slope = float((x * (y - y.mean())).sum() / (x * x).sum())
    residual = y - y.mean() - slope * x
    se = math.sqrt(float((residual * residual).sum()) / (n - 2) / float((x * x).sum()))
    rise = slope * n
    return slope > PLATEAU_Z * se and rise > max(
        PLATEAU_NATS, PLATEAU_RELATIVE * abs(float(y.mean()))
    )


@dataclass
class OuterOptions:
    """L-BFGS settings: ``max_iter`` iterations in all, converged when max |∂loss| < ``gtol``."""

    max_iter: int = 500
    gtol: float = 1e-6  # L-BFGS stops when max |∂loss/∂raw| falls below this (or below the
    # precision of the gradient where that is coarser: stopping_gtol)
    converged_gtol: float = 1e-3  # a fit is reported converged when max |∂loss/∂raw| < this
    ftol: float = 1e-12  # relative change of the loss below which L-BFGS stops
    history_size: int = 20
    lr: float = 1.0


@dataclass
class FitResult:
    loss: float  # objective at the end (inf where it is not finite)
    n_iter: int
    n_evals: int
    grad_max: float
    converged: bool  # see :func:`is_converged`
    seconds: float
    stop_reason: str = ""


def is_converged(loss: float, grad_max: float, converged_gtol: float, stop_reason: str) -> bool:
    """The convergence rule: finite objective, max |gradient| < ``converged_gtol`` and a stop
    of the optimizer's own (not ``max_iter``/``max_epochs``, not a non-finite objective)."""
    return (
        feasible(loss)
        and math.isfinite(grad_max)
        and grad_max < converged_gtol
        and stop_reason in OWN_STOPS
    )


def stop_reason(
    loss: float, grad_max: float, gtol: float, n_iter: int, max_iter: int, stopped_itself: bool
) -> str:
    """Why an L-BFGS run ends here ("" when it should go on): a non-finite objective, the
    gradient below ``gtol``, ``max_iter`` iterations in all, or L-BFGS stopping on its own
    (``stopped_itself``: its tolerance on the change of loss or parameters fired)."""
    if not feasible(loss):
        return STOP_NOT_FINITE
    if grad_max < gtol:
        return STOP_GRADIENT
    if n_iter >= max_iter:
        return STOP_MAX_ITER
    if stopped_itself:
        return STOP_NO_PROGRESS
    return ""


def convergence_warning(
    converged: bool, stop_reason: str, grad_max: float, converged_gtol: float
) -> str | None:
    """One line for the log and results.json when a fit is not converged (else None)."""
    if converged:
        return None
    return (
        f"the fit did not converge: it stopped with {stop_reason or 'no stop reason'}, max "
        f"|gradient| {grad_max:.3g} (converged needs a finite objective, max |gradient| < "
        f"{converged_gtol:g} and a stop of the optimizer's own); the estimates may not be an "
        "optimum" + ("; raise method.max_iter to go on" if stop_reason == STOP_MAX_ITER else "")
    )


def check_start(estimator, pop: Population) -> None:
    """Raise :class:`ObjectiveError` (one line) when a fit cannot start on ``pop`` at the
    current parameters: no observations, or an objective that is not finite."""
    problem = starting_problem(estimator, pop)
    if problem is not None:
        raise ObjectiveError(problem)


def stopping_gtol(estimator, gtol: float) -> float:
    """The max |gradient| below which L-BFGS stops: ``gtol``, or the precision of the
    objective's gradient where that is coarser (dynamics integrated with adaptive steps:
    :attr:`OdeDynamics.gradient_precision`). Below it the gradient is the solver's noise:
    L-BFGS would spend its line searches on it (Theophylline's ODE fits: a fifth of their
    evaluations)."""
    dynamics = getattr(estimator.model, "dynamics", None)
    return max(gtol, float(getattr(dynamics, "gradient_precision", 0.0)))


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
    ``loglik`` is the objective without the log prior of the fixed effects. Where the objective
    is not finite (or the estimator's barrier), ``loss`` is inf and ``loglik`` NaN."""
    model = estimator.model
    params = trainable(model)
    with torch.enable_grad():
        for p in params:
            p.grad = None
        loss = estimator.loss(pop)
        loss.backward()
    value = float(loss.detach())
    if not feasible(value):
        return math.inf, math.nan, grad_max(params)
    return value, -value - float(model.log_prior().detach()), grad_max(params)


def boundary_stop(model, reason: str) -> str:
    """:data:`STOP_BOUNDARY` in place of ``reason`` when a free parameter of ``model`` has run
    off to a boundary of its domain (not converged, whatever else stopped the fit), else
    ``reason``; a non-finite loss stays what it is."""
    from deepnlme.inference.uncertainty import boundary_warnings

    if reason != STOP_NOT_FINITE and hasattr(model, "declared") and boundary_warnings(model):
        return STOP_BOUNDARY
    return reason


def fit(estimator, pop: Population, options: OuterOptions | None = None) -> FitResult:
    """Maximize the estimator's objective over the model's trainable parameters.

    Raises:
        ObjectiveError: nothing to fit, or the objective is not finite at the start.
    """
    opts = options or OuterOptions()
    opts = replace(opts, gtol=stopping_gtol(estimator, opts.gtol))
    check_start(estimator, pop)
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
    value = float(closure().detach())
    value = value if feasible(value) else math.inf
    g = grad_max(params)
    n_iter = lbfgs_iterations(optimizer)
    # L-BFGS also stops when its evaluation budget (1.25 per iteration) is spent: a budget too.
    own = lbfgs_evaluations(optimizer) < optimizer.param_groups[0]["max_eval"]
    reason = stop_reason(value, g, opts.gtol, n_iter, opts.max_iter, own) or STOP_MAX_ITER
    reason = boundary_stop(estimator.model, reason)
    converged = is_converged(value, g, opts.converged_gtol, reason)
    return FitResult(value, n_iter, n_evals, g, converged, seconds, reason)
