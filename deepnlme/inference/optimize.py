"""Full-batch quasi-Newton optimization of an estimator's objective over the fixed effects.

The same pieces serve the Lightning training loop (one L-BFGS ``step`` per epoch) and plain
scripts/tests (:func:`fit` runs to convergence directly).

Convergence (one rule for both): a fit is converged only when its objective is finite (not the
:data:`~deepnlme.inference.feasibility.INFEASIBLE_LOSS` barrier), the largest gradient entry is
below ``converged_gtol``, and it stopped for a reason of its own (gradient below ``gtol``, or
no progress) rather than a budget (``max_iter``, ``max_epochs``). A fit does not start where the
objective is not finite or there is nothing to fit (:func:`check_start`). A fit stops, not
converged, where a parameter has run off to a boundary of its domain or is running off to one
on an objective too flat to determine it (:class:`RunawayWatch`, checked every few
iterations). A stochastic (VI) fit is converged only when its bound has levelled off
(:func:`still_rising`). No point is evaluated twice (:class:`MemoizedObjective`).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field, replace

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
#: Not converged: a parameter moves towards a boundary of its domain on a flat objective.
STOP_RUNAWAY = "a parameter running off to a boundary of its domain"
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


#: A free parameter runs off to a boundary of its domain (:class:`RunawayWatch`) when, between
#: two checks of a fit, the magnitude of its raw (unconstrained) value grew by at least
#: RUNAWAY_MOVE (a factor e of a positive parameter, towards 0 or infinity) while the objective
#: fell by less than RUNAWAY_GAIN nats per unit of that growth: its profile towards the
#: boundary is too flat for the data to determine it (a likelihood-ratio statistic of 0.02
#: per factor e).
RUNAWAY_MOVE = 1.0
RUNAWAY_GAIN = 0.01
#: L-BFGS iterations between two checks of :func:`fit` (the Lightning fit checks every epoch).
CHECK_EVERY = 5


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
    n_evals: int  # evaluations of the objective (none repeated: MemoizedObjective)
    grad_max: float
    converged: bool  # see :func:`is_converged`
    seconds: float
    stop_reason: str = ""
    warnings: list[str] = field(default_factory=list)  # parameters that ran off (RunawayWatch)


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


@dataclass
class _Evaluation:
    pop: Population
    at: list[Tensor]  # the trainable parameters' values
    value: Tensor  # () the objective, detached
    grads: list[Tensor | None] | None  # its gradient for each parameter (None: not taken)


class MemoizedObjective:
    """An estimator's objective that remembers its last ``size`` evaluations: at parameters
    evaluated before (exactly, on the same population) the value and gradient come back
    without a new evaluation.

    A fit evaluates some points twice: L-BFGS evaluates again, at the start of each ``step``
    call, the point where its last line search ended; the start check (:func:`check_start`),
    the monitor of a Lightning fit and the end of :func:`fit` evaluate points already
    evaluated. Each such evaluation costs a whole objective (for an ODE model, a mode search
    and a solve with its gradient).

    Stands for the estimator in a fit (``model``, ``loss``): :meth:`loss` returns a tensor
    with the objective's value whose backward pass gives the objective's gradient for the
    model's trainable parameters, and for nothing else. ``evaluations`` counts the
    evaluations of the estimator's objective.
    """

    def __init__(self, estimator, size: int = 4) -> None:
        self.estimator = estimator
        self.model = estimator.model
        self.size = size
        self.evaluations = 0
        self._kept: list[_Evaluation] = []

    def _find(self, pop: Population, params: list[Tensor], grads: bool) -> _Evaluation | None:
        for kept in reversed(self._kept):
            if (
                kept.pop is pop
                and (kept.grads is not None or not grads)
                and len(kept.at) == len(params)
                and all(torch.equal(a, p.detach()) for a, p in zip(kept.at, params, strict=True))
            ):
                return kept
        return None

    def loss(self, pop: Population) -> Tensor:
        """The estimator's ``loss(pop)`` (a scalar): remembered, or evaluated (with its
        gradient where autograd records) and remembered."""
        params = trainable(self.model)
        grads = torch.is_grad_enabled()
        kept = self._find(pop, params, grads)
        if kept is None:
            loss = self.estimator.loss(pop)
            self.evaluations += 1
            taken = None
            if grads:
                taken = [None] * len(params)
                if loss.requires_grad:
                    taken = list(torch.autograd.grad(loss, params, allow_unused=True))
            kept = _Evaluation(pop, [p.detach().clone() for p in params], loss.detach(), taken)
            self._kept = [*self._kept[-(self.size - 1) :], kept]
        if not grads or kept.grads is None:
            return kept.value
        # the value, and exactly the kept gradient for every parameter (p·g - detach(p·g))
        linear = [(p * g).sum() for p, g in zip(params, kept.grads, strict=True) if g is not None]
        if not linear:
            return kept.value
        total = torch.stack(linear).sum()
        return kept.value + (total - total.detach())


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


def lbfgs_step_counts(
    optimizer: torch.optim.LBFGS, n_iter: int, n_evals: int
) -> tuple[int, int, bool]:
    """After a ``step`` call that started at ``n_iter`` iterations and ``n_evals``
    evaluations: ``(iterations, evaluations, stopped_itself)``, the last True where L-BFGS
    used fewer of both than the step allowed (a tolerance of its own fired)."""
    group = optimizer.param_groups[0]
    now_iter, now_evals = lbfgs_iterations(optimizer), lbfgs_evaluations(optimizer)
    stopped = now_iter - n_iter < group["max_iter"] and now_evals - n_evals < group["max_eval"]
    return now_iter, now_evals, stopped


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


class RunawayWatch:
    """Notices free parameters of a model running off to a boundary of their domain while a
    fit goes on, long before they reach it: each :meth:`check` compares the constrained
    parameters' raw values and the objective with those of the previous check
    (:data:`RUNAWAY_MOVE`, :data:`RUNAWAY_GAIN`). Walking such a parameter out takes an
    optimizer many iterations (the objective approaches its limit like ``exp(-raw)``), and
    where its gradient happens to fall below ``gtol`` on the way, the fit would end
    "converged" at an arbitrary value."""

    def __init__(self, model) -> None:
        self.model = model
        self._last: tuple[dict[str, Tensor], float, int] | None = None

    def start(self, objective, pop: Population, n_iter: int) -> None:
        """Record the starting point of a fit (or of a resumed fit) after ``n_iter``
        iterations: the objective there (of a :class:`MemoizedObjective`: remembered)."""
        with torch.no_grad():
            self.check(float(objective.loss(pop)), n_iter)

    def check(self, loss: float, n_iter: int) -> list[str]:
        """One line per parameter that ran off since the previous check (empty: none), at the
        objective ``loss`` after ``n_iter`` iterations; remembers this point for the next."""
        from deepnlme.inference.uncertainty import free_constrained

        free = free_constrained(self.model)
        now = {name: p.raw.detach().clone() for name, p in free.items()}
        last, self._last = self._last, (now, loss, n_iter)
        if last is None or not (feasible(loss) and feasible(last[1])):
            return []
        before, loss_before, iter_before = last
        gain = loss_before - loss
        out = []
        for name, raw in now.items():
            old = before.get(name)
            if old is None or old.shape != raw.shape or not raw.numel():
                continue
            moved = float((raw.abs() - old.abs()).max())
            if moved < RUNAWAY_MOVE or gain >= RUNAWAY_GAIN * moved:
                continue
            p = free[name]
            with torch.no_grad():
                now_value, old_value = p.value().detach(), p.domain.to_natural(old)
            what, now_shown, old_shown = _changed_entries(name, p, now_value, old_value)
            out.append(
                f"{what} = {now_shown} is running off to a boundary of its domain "
                f"({p.domain.describe()}): from {old_shown} over the last "
                f"{n_iter - iter_before} iterations, while the objective fell by only "
                f"{max(gain, 0.0):.2g}; the data may not determine it: fix it or simplify "
                "the model"
            )
        return out


def _changed_entries(name: str, p, now: Tensor, old: Tensor) -> tuple[str, str, str]:
    """``(what, now, before)`` for a message: a scalar parameter whole; of a matrix of random
    effects' covariances the variances that changed by a factor e or more (by η name);
    otherwise the whole value."""
    from deepnlme.inference.uncertainty import shown
    from deepnlme.model.params import RandomEffects

    def text(value: Tensor) -> str:
        got = shown(value)
        return got if isinstance(got, str) else "(" + ", ".join(got) + ")"

    if isinstance(p, RandomEffects) and now.dim() == 2:
        var_now, var_old = now.diagonal(), old.diagonal()
        moved = (torch.log(var_now / var_old).abs() >= RUNAWAY_MOVE).nonzero()[:, 0].tolist()
        if moved:
            names = ", ".join(p.names[i] for i in moved)
            return f"{name} (variance of η {names})", text(var_now[moved]), text(var_old[moved])
    return name, text(now), text(old)


def stop_after_step(
    model,
    watch: RunawayWatch,
    loss: float,
    grad: float,
    gtol: float,
    n_iter: int,
    max_iter: int,
    stopped_itself: bool,
) -> tuple[str, list[str]]:
    """Every stop rule after an L-BFGS step (:func:`fit` and the Lightning monitor alike), at
    the objective ``loss`` with max |gradient| ``grad`` after ``n_iter`` iterations:
    ``(stop reason or "", warnings naming parameters running off)``. The rules of
    :func:`stop_reason`; a parameter running off (``watch``) overrides them, and one at a
    boundary of its domain (:func:`boundary_stop`) overrides all but a non-finite loss."""
    reason = stop_reason(loss, grad, gtol, n_iter, max_iter, stopped_itself)
    running = watch.check(loss, n_iter)
    reason = STOP_RUNAWAY if running else reason
    return boundary_stop(model, reason), running


def fit(estimator, pop: Population, options: OuterOptions | None = None) -> FitResult:
    """Maximize the estimator's objective over the model's trainable parameters: L-BFGS,
    :data:`CHECK_EVERY` iterations at a time, with the stop rules, the boundary check and the
    :class:`RunawayWatch` in between (``FitResult.warnings`` names a parameter running off).

    Raises:
        ObjectiveError: nothing to fit, or the objective is not finite at the start.
    """
    opts = options or OuterOptions()
    opts = replace(opts, gtol=stopping_gtol(estimator, opts.gtol))
    objective = MemoizedObjective(estimator)
    check_start(objective, pop)
    params = trainable(estimator.model)
    optimizer = make_lbfgs(params, opts, max_iter=min(CHECK_EVERY, opts.max_iter))
    group = optimizer.param_groups[0]
    watch = RunawayWatch(estimator.model)

    def closure() -> Tensor:
        optimizer.zero_grad()
        loss = objective.loss(pop)
        loss.backward()
        return loss

    # L-BFGS CHECK_EVERY iterations at a time (its state carries over; the point where a step
    # ended is not evaluated again): stop rules, runaway and boundary checks in between
    start = time.perf_counter()
    n_iter = n_lbfgs_evals = 0
    reason, running = "", []
    watch.start(objective, pop, 0)
    while not reason:
        group["max_iter"] = min(CHECK_EVERY, opts.max_iter - n_iter)
        group["max_eval"] = group["max_iter"] * 5 // 4
        optimizer.step(closure)
        n_iter, n_lbfgs_evals, own = lbfgs_step_counts(optimizer, n_iter, n_lbfgs_evals)
        value = float(closure().detach())
        value = value if feasible(value) else math.inf
        g = grad_max(params)
        reason, running = stop_after_step(
            estimator.model, watch, value, g, opts.gtol, n_iter, opts.max_iter, own
        )
    seconds = time.perf_counter() - start
    converged = is_converged(value, g, opts.converged_gtol, reason)
    return FitResult(
        value, n_iter, objective.evaluations, g, converged, seconds, reason, running
    )
