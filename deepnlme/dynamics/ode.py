"""General dynamics by numerical integration, batched over subjects.

``OdeDynamics(rhs, compartments, ...)`` integrates ``dA/dt = rhs(t, A, indiv) + infusions``
with doses applied as in NONMEM (see :mod:`deepnlme.dynamics.dosing`):

* every subject is integrated over its own sorted sequence of events (dose starts, infusion
  ends, steady-state starts, observations), all subjects at once by one integrator
  (:mod:`deepnlme.dynamics._solvers`; no loop over subjects, no solver call per segment),
  and no dose discontinuity is smoothed over;
* solvers by name: ``dopri5`` (adaptive, the default: every subject with its own step
  control in its own time, steps ending only at discontinuities — doses, infusion starts
  and ends, resets — and observations read from the dense output of the step that covers
  them), fixed-step ``rk4`` / ``midpoint`` / ``euler`` (segment ``k`` between events
  ``k-1`` and ``k`` of every subject mapped onto the pseudo-time interval ``[k, k+1]``,
  ``ceil(length / max_step)`` steps per segment), any other torchdiffeq method, and
  ``adjoint=True`` (torchdiffeq's ``odeint_adjoint`` per pseudo-time unit, for memory);
  the code is device- and dtype-agnostic (tensors are created on the inputs' device, dtype);
* boluses are jumps added at their (lagged) time; infusions add a constant rate input on the
  segments they cover; observations at a dose time see the dose;
* a new epoch (reset) sets the state to zero at the first event of the epoch (exact for
  systems whose state stays at zero without input, e.g. all linear models);
* a steady-state dose (SS 1 or 2, interval II) adds, at its record time, the state of the
  periodic orbit of its infinite dose train (same lag, duration and amount every II). The
  orbit is the fixed point of the map "integrate one dosing interval", found by Newton
  iterations from zero (Jacobian of the map by autograd; one step is exact for a linear
  ``rhs``, a few for a nonlinear one) until the Newton step is below
  ``ss_atol + ss_rtol·|A|``. SS=2 adds this state to the current one (superposition, as
  NONMEM). Doses of the train that are still infusing at the record time continue after it.
  Lag >= II is not supported here (the closed forms support it).

Gradients flow through the solver by ordinary autograd (``rhs`` may be an ``nn.Module``); the
steady state's gradient follows the implicit function theorem (exact for a linear ``rhs``,
first-order exact otherwise). An ``rhs`` may define ``prepare(indiv) -> dict`` to compute
per-subject quantities once per forward (e.g. a rate matrix); the returned dict (tensors with
subjects on the first axis) is what ``rhs`` then receives as ``indiv``.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from deepnlme.data.population import Population
from deepnlme.dynamics import _solvers, linearized
from deepnlme.dynamics.base import Dynamics
from deepnlme.dynamics.closed_form import (
    LinearCompartmentModel,
)
from deepnlme.dynamics.dosing import Doses, resolve_doses

__all__ = ["LinearRhs", "OdeDynamics"]

Rhs = Callable[[Tensor, Tensor, Mapping[str, Tensor]], Tensor]


def _row_max_rms(x: Tensor) -> Tensor:
    """Error norm for batched subjects: the largest per-subject RMS (rows = subjects).

    Detached: step sizes are not differentiated (and a zero error gives no NaN gradient).
    Used by the torchdiffeq methods.
    """
    x = x.detach()
    if x.dim() < 2:
        return x.pow(2).mean().sqrt()
    return x.pow(2).flatten(1).mean(1).sqrt().max()


def _copies(subject_index: Tensor) -> Tensor | None:
    """Group index ``(N,)`` of rows that are copies of one subject (the same
    ``subject_index``, e.g. the points of a difference quotient in η), None if all differ:
    the adaptive solver gives each group one step sequence."""
    groups, inverse = torch.unique(subject_index, return_inverse=True)
    return None if groups.numel() == subject_index.numel() else inverse


class _StepMemory:
    """The dopri5 steps (:class:`deepnlme.dynamics._solvers.StepPlan`) last chosen for each
    subject (by its position in the dataset, ``Population.subject_index``), with the event grid
    and the individual parameters they were chosen for (:meth:`OdeDynamics.reusing_steps`).

    A solve takes the remembered steps when every row's subject has some, on the same event
    grid, with individual parameters within ``spread`` (relative) of those they were chosen
    for. The local error of a step grows as (rate·step)⁵, which a few percent hardly change;
    but where the steps sit at the stability limit (fast absorption, long after the dose) a
    rate a few percent faster makes them unstable: with 9% the states of such a subject ran
    away. Otherwise the solve chooses its own steps and they are remembered.
    """

    def __init__(self, spread: float = 0.02):
        self.spread = spread
        self.known: Tensor | None = None  # (S,) bool
        self.step: Tensor | None = None  # (S, J)
        self.last: Tensor | None = None  # (S, J) bool
        self.grid: Tensor | None = None  # (S, 3, K): start, length, piece of each segment
        self.params: Tensor | None = None  # (S, P) individual parameters
        self.rhs_state: tuple = ()  # versions of the rhs module's parameters

    @staticmethod
    def _params(indiv: Mapping[str, Tensor], n: int) -> Tensor:
        """``(N, P)``: every tensor of ``indiv`` with rows on the first axis, flattened."""
        parts = [
            v.detach().reshape(n, -1)
            for _, v in sorted(indiv.items())
            if isinstance(v, Tensor) and v.dim() and v.shape[0] == n
        ]
        return torch.cat(parts, 1) if parts else torch.zeros(n, 0)

    def check_rhs(self, rhs) -> None:
        """Forget every step if the parameters of ``rhs`` (an ``nn.Module``'s, e.g. a
        network's weights) are not those the steps were chosen with (an optimizer's update
        changes their version)."""
        state = (
            tuple((id(w), w._version) for w in rhs.parameters())
            if isinstance(rhs, nn.Module)
            else ()
        )
        if state != self.rhs_state:
            self.known = None
            self.rhs_state = state

    def plan(self, subjects: Tensor, indiv, grid: Tensor) -> _solvers.StepPlan | None:
        """The remembered steps of the rows of ``subjects`` ``(N,)`` on ``grid``
        ``(N, 3, K)``, or None where they do not serve."""
        if self.known is None or self.grid.shape[1:] != grid.shape[1:]:
            return None
        if int(subjects.max()) >= len(self.known) or not bool(self.known[subjects].all()):
            return None
        if not torch.equal(self.grid[subjects], grid):
            return None
        params, ref = self._params(indiv, len(subjects)), self.params[subjects]
        if params.shape != ref.shape:
            return None
        off = (params - ref).abs() > self.spread * torch.maximum(params.abs(), ref.abs())
        if bool(off.any()):
            return None
        return _solvers.StepPlan(self.step[subjects], self.last[subjects])

    def store(self, subjects: Tensor, indiv, grid: Tensor, plan: _solvers.StepPlan) -> None:
        """Remember the steps of the first row of each subject in ``subjects`` ``(N,)``."""
        n = len(subjects)
        rows = torch.arange(n, device=subjects.device)
        ids, inverse = torch.unique(subjects, return_inverse=True)
        first = torch.full_like(ids, n).scatter_reduce_(0, inverse, rows, "amin")
        params = self._params(indiv, n)[first]
        size = int(ids.max()) + 1
        if (
            self.known is None
            or self.grid.shape[1:] != grid.shape[1:]
            or (self.params.shape[1] != params.shape[1])
        ):
            self.known = torch.zeros(size, dtype=torch.bool, device=subjects.device)
            self.step = plan.step.new_zeros(size, 1)
            self.last = torch.ones(size, 1, dtype=torch.bool, device=subjects.device)
            self.grid = grid.new_zeros(size, *grid.shape[1:])
            self.params = params.new_zeros(size, params.shape[1])
        if size > len(self.known):  # more subjects
            more = size - len(self.known)
            self.known = torch.cat([self.known, self.known.new_zeros(more)])
            self.step = torch.cat([self.step, self.step.new_zeros(more, self.step.shape[1])])
            self.last = torch.cat([self.last, self.last.new_ones(more, self.last.shape[1])])
            self.grid = torch.cat([self.grid, self.grid.new_zeros(more, *grid.shape[1:])])
            self.params = torch.cat([self.params, self.params.new_zeros(more, params.shape[1])])
        width = max(self.step.shape[1], plan.step.shape[1])
        self.step = F.pad(self.step, (0, width - self.step.shape[1]))
        self.last = F.pad(self.last, (0, width - self.last.shape[1]), value=True)
        self.step[ids] = F.pad(plan.step[first], (0, width - plan.step.shape[1]))
        self.last[ids] = F.pad(plan.last[first], (0, width - plan.last.shape[1]), value=True)
        self.grid[ids] = grid[first]
        self.params[ids] = params
        self.known[ids] = True


class LinearRhs(nn.Module):
    """``rhs(t, A, indiv) = K(indiv) A`` for a closed-form linear model's rate matrix."""

    def __init__(self, model: LinearCompartmentModel):
        super().__init__()
        self.model = model

    def prepare(self, indiv: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """``indiv`` plus its rate matrix ``"_rate_matrix"`` ``(N, C, C)``, built once."""
        return {**indiv, "_rate_matrix": self.model.rate_matrix(indiv)}

    def forward(self, t: Tensor, amounts: Tensor, indiv: Mapping[str, Tensor]) -> Tensor:
        """``t`` ``(N,)``, ``amounts`` ``(N, C)`` -> ``dA/dt`` ``(N, C)`` (amount/time)."""
        k = indiv["_rate_matrix"] if "_rate_matrix" in indiv else self.model.rate_matrix(indiv)
        if k.dim() == 3 and amounts.dim() == 2:  # one small batched product: the fastest
            return torch.bmm(k, amounts.unsqueeze(-1)).squeeze(-1)
        return torch.matmul(k, amounts.unsqueeze(-1)).squeeze(-1)


class OdeDynamics(Dynamics):
    """Dynamics defined by a right-hand side, integrated numerically with doses as events.

    ``difference_hessians``: the estimators' mode searches take η-Hessians by differences of
    gradients (one batched gradient instead of K reverse passes through the solve).

    Args:
        rhs: ``rhs(t, amounts, indiv) -> dA/dt``; ``t`` ``(N,)`` per-subject times,
            ``amounts`` ``(N, C)``, ``indiv`` dict of ``(N, ...)`` tensors; returns ``(N, C)``
            in amount/time, excluding dosing inputs. A callable or an ``nn.Module``.
        compartments: compartment names (CMT numbering is 1-based in this order).
        default_dose_cmt, default_obs_cmt: 1-based CMT used where the data says 0.
        required: individual parameters ``rhs`` needs.
        method: solver by name: ``"dopri5"`` (adaptive, the default), ``"rk4"``,
            ``"midpoint"``, ``"euler"`` (fixed step), or any other torchdiffeq method.
        rtol, atol: error tolerances of the adaptive solvers (per-subject RMS norm; dopri5
            controls each subject's steps, torchdiffeq's methods take the worst subject's).
        max_step: longest step in time units (fixed-step solvers: each segment of the event
            grid takes ``ceil(length / max_step)`` equal steps; adaptive: a cap).
        min_steps: fewest steps per segment for the fixed-step solvers (default 1).
        adjoint: integrate by torchdiffeq's ``odeint_adjoint`` (memory independent of the
            number of steps, at about twice the time of a gradient). It recovers the state
            by integrating backwards in time, which is unstable for strongly damped dynamics
            (fast absorption over long intervals): then the gradient fails with a clear
            error (:data:`deepnlme.dynamics._solvers.ADJOINT_DIVERGED`).
        options: torchdiffeq options for its methods; ``{"step_size": h}`` with a fixed-step
            solver means ``min_steps = ceil(1 / h)`` (h as a share of each segment).
        ss_rtol, ss_atol: steady-state tolerance on the Newton step (default 10× rtol / atol).
        ss_max_iter: most Newton steps towards steady state.
    """

    difference_hessians = True

    def __init__(
        self,
        rhs: Rhs,
        compartments: Sequence[str],
        default_dose_cmt: int = 1,
        default_obs_cmt: int = 1,
        required: Sequence[str] = (),
        *,
        method: str = "dopri5",
        rtol: float = 1e-6,
        atol: float = 1e-9,
        options: dict | None = None,
        max_step: float | None = None,
        min_steps: int = 1,
        adjoint: bool = False,
        ss_rtol: float | None = None,
        ss_atol: float | None = None,
        ss_max_iter: int = 50,
    ):
        super().__init__()
        self.rhs = rhs
        self.compartments = tuple(compartments)
        self.default_dose_cmt = int(default_dose_cmt)
        self.default_obs_cmt = int(default_obs_cmt)
        self.required = tuple(required)
        self.method = method
        self.rtol = rtol
        self.atol = atol
        self.options = {"norm": _row_max_rms, **(options or {})}
        if "step_size" in self.options and method in _solvers.FIXED:
            min_steps = max(min_steps, math.ceil(1.0 / float(self.options["step_size"]) - 1e-9))
        self.max_step = max_step
        self.min_steps = int(min_steps)
        self.adjoint = bool(adjoint)
        self.ss_rtol = 10 * rtol if ss_rtol is None else ss_rtol
        self.ss_atol = 10 * atol if ss_atol is None else ss_atol
        self.ss_max_iter = ss_max_iter

    @property
    def gradient_precision(self) -> float:
        """Precision of the parameter gradients of an objective built on these solves: with
        adaptive steps 300·rtol (the steps, chosen anew as the parameters move, leave the
        Laplace gradient of Theophylline's 12 subjects near its optimum between 3e-5 and
        1.5e-4 at rtol 1e-6, however long L-BFGS goes on: twice the largest); 0 for the
        fixed-step solvers, whose solution is smooth in the parameters."""
        return 0.0 if self.method in _solvers.FIXED else 300.0 * self.rtol

    # ------------------------------------------------------------------ linear models
    @classmethod
    def linear(cls, model: LinearCompartmentModel | type, **kwargs) -> OdeDynamics:
        """ODE version of a closed-form linear model (instance or class); ``kwargs`` go to
        the constructor (solver options)."""
        model = model() if isinstance(model, type) else model
        return cls(
            LinearRhs(model),
            model.compartments,
            model.default_dose_cmt,
            model.default_obs_cmt,
            model.required,
            **kwargs,
        )

    # ------------------------------------------------------------------ integration
    @contextmanager
    def reusing_steps(self, memory: _StepMemory | None = None) -> Iterator[_StepMemory]:
        """Within this block, a ``dopri5`` solve of subjects solved before in it, on the same
        event grids and at nearby individual parameters (within 2%), takes the steps chosen
        then instead of choosing them again (no error estimate, no step control): for the
        many solves of a mode search, in which only the random effects move, and the solve
        with a graph at its modes. Values then change smoothly with the parameters between
        solves (the same discretization), with errors of the order of the tolerance.

        Yields the memory of steps. ``memory`` (yielded by an earlier block) carries the
        steps over from that block: an estimator's successive evaluations, whose parameters
        move little near the optimum. Without it, a block nested in another shares the outer
        block's memory; otherwise it starts empty and is forgotten at its end. A memory
        serves only while the parameters of an ``rhs`` module stay as they were.
        """
        previous = getattr(self, "_step_memory", None)
        if memory is None:
            memory = previous if previous is not None else _StepMemory()
        self._step_memory = memory
        try:
            yield memory
        finally:
            self._step_memory = previous

    @property
    def solver(self) -> _solvers.SolverOptions:
        """The solver settings (:class:`deepnlme.dynamics._solvers.SolverOptions`)."""
        opts = {k: v for k, v in self.options.items() if k != "step_size"}
        return _solvers.SolverOptions(
            method=self.method,
            rtol=self.rtol,
            atol=self.atol,
            max_step=self.max_step,
            min_steps=self.min_steps,
            adjoint=self.adjoint,
            options=opts,
        )

    def _integrate(
        self, x: Tensor, start: Tensor, length: Tensor, rate: Tensor, indiv: Mapping[str, Tensor]
    ) -> Tensor:
        """State after integrating rows of ``x`` ``(B, C)`` from ``start`` over ``length``
        (both ``(B,)``, time units) with the constant input ``rate`` ``(B, C)``."""
        out = _solvers.integrate(
            self.rhs, indiv, x, start[:, None], length[:, None], rate[:, None], self.solver
        )
        return out[:, -1]

    @staticmethod
    def _newton_step(
        interval: Callable[[Tensor], Tensor], x: Tensor, create_graph: bool
    ) -> tuple[Tensor, Tensor]:
        """One Newton step towards the fixed point of the one-interval map ``interval``.

        ``x`` ``(B, C)`` is a constant (detached) guess. Returns ``x + step`` and ``step``,
        ``step = (I - J)^{-1} (interval(x) - x)`` with ``J = d interval / dx`` per row. With
        ``create_graph`` the result carries the dependence on the parameters through
        ``interval(x)`` and ``J`` (implicit-function-theorem gradients: exact to all orders for
        a linear ``rhs``); otherwise it is detached.
        """
        n_cmt = x.shape[-1]
        eye = torch.eye(n_cmt, dtype=x.dtype, device=x.device)
        with torch.enable_grad():
            xr = x.detach().requires_grad_(True)
            y = interval(xr)
            # rows of J for all subjects at once: one vectorised backward per compartment
            basis = eye[:, None, :].expand(n_cmt, *y.shape)
            (jac,) = torch.autograd.grad(
                y, xr, basis, create_graph=create_graph, is_grads_batched=True
            )
        jac = jac.transpose(0, 1)  # (B, C, C): jac[b, j, i] = dy_j / dx_i
        step = torch.linalg.solve(eye - jac, (y - x)[..., None])[..., 0]
        if not create_graph:
            step = step.detach()
        return x + step, step

    def _steady_states(
        self, indiv: Mapping[str, Tensor], doses: Doses, bolus: Tensor, rate: Tensor
    ) -> Tensor:
        """State ``(N, D, C)`` at the record time of each SS dose (zero for other doses)
        on the periodic orbit of its infinite dose train."""
        n_idx, d_idx = doses.ss.nonzero(as_tuple=True)
        lag = doses.lag[n_idx, d_idx]
        ii = doses.ii[n_idx, d_idx]
        dur = doses.duration[n_idx, d_idx]
        if bool((lag >= ii).any()):
            raise ValueError("OdeDynamics: steady-state doses with lag time >= II not supported")
        t0 = doses.record_time[n_idx, d_idx] - ii  # one interval before the record time
        b = bolus[n_idx, d_idx]
        r = rate[n_idx, d_idx]
        zero_rate = torch.zeros_like(r)
        ind = {
            k: v[n_idx] if isinstance(v, Tensor) and v.dim() >= 1 else v for k, v in indiv.items()
        }
        # one interval in phase [0, II): tail of the previous infusion on [0, w), bolus or
        # infusion start at the lag, infusion until e1
        w = torch.clamp(lag + dur - ii, min=0.0)
        e1 = torch.minimum(lag + dur, ii)
        zero = torch.zeros_like(lag)
        segments = [(zero, w, r), (w, lag, zero_rate), (lag, e1, r), (e1, ii, zero_rate)]
        needed = torch.stack([(hi - lo > 0).any() for lo, hi, _ in segments]).tolist()

        def one_interval(x: Tensor) -> Tensor:
            for j, (lo, hi, rt) in enumerate(segments):
                if needed[j]:
                    x = self._integrate(x, t0 + lo, hi - lo, rt, ind)
                if j == 1:
                    x = x + b
            return x

        x = torch.zeros_like(b).detach()
        err_prev = float("inf")
        inputs = [b, r, lag, ii, dur, t0, *(v for v in ind.values() if isinstance(v, Tensor))]
        if isinstance(self.rhs, nn.Module):
            inputs += list(self.rhs.parameters())
        graph = torch.is_grad_enabled() and any(v.requires_grad for v in inputs)
        for it in range(self.ss_max_iter):
            # the first step (from zero) is never the last: no graph needed
            fixed, step = self._newton_step(one_interval, x, graph and it > 0)
            scale = self.ss_atol + self.ss_rtol * fixed.detach().abs()
            err = float((step.detach().abs() / scale).max()) if step.numel() else 0.0
            if err <= 1.0 or err > 0.5 * err_prev:  # converged, or at the solver's noise floor
                if err > 100.0:
                    warnings.warn(
                        f"OdeDynamics: steady state stalled at {err:.3g}x the SS tolerance",
                        stacklevel=3,
                    )
                if graph and it == 0:  # keep the parameters' graph
                    fixed, step = self._newton_step(one_interval, x, True)
                break
            err_prev = err
            x = fixed.detach()
        else:
            warnings.warn(
                f"OdeDynamics: steady state not reached in {self.ss_max_iter} Newton steps",
                stacklevel=3,
            )
        x = fixed
        out = torch.zeros(*doses.ss.shape, b.shape[-1], dtype=x.dtype, device=x.device)
        return out.index_put((n_idx, d_idx), x)

    def _integrate_grid(
        self,
        indiv: Mapping[str, Tensor],
        x0: Tensor,
        start: Tensor,
        length: Tensor,
        rate: Tensor | None,
        keep: Tensor,
        jump: Tensor,
    ) -> Tensor:
        """States ``(N, K, C)`` at the end of every segment of the event grid: segments
        ``start``/``length`` ``(N, K)``, constant inputs ``rate`` ``(N, K, C)`` or None, ``keep``
        False where a segment starts a new epoch (state reset), ``jump`` ``(N, K, C)`` added at
        each segment's end. Subclasses with their own integrator override this one method."""
        groups = getattr(self, "_step_groups", None)
        memory = getattr(self, "_step_memory", None)
        subjects = getattr(self, "_subjects", None)
        solver = self.solver
        if (
            memory is None
            or subjects is None
            or solver.method != "dopri5"
            or solver.adjoint
            or not start.numel()
        ):
            return _solvers.integrate(
                self.rhs, indiv, x0, start, length, rate, solver, keep, jump, groups
            )
        pieces = _solvers._pieces(start, start + length, rate, keep, jump)
        grid = torch.stack([start, length, pieces.to(start.dtype)], 1)  # (N, 3, K)
        memory.check_rhs(self.rhs)
        plan = memory.plan(subjects, indiv, grid)
        record = [] if plan is None else None
        states = _solvers.integrate(
            self.rhs, indiv, x0, start, length, rate, solver, keep, jump, groups, plan, record
        )
        if record:
            memory.store(subjects, indiv, grid, record[0])
        return states

    def forward(self, indiv: dict[str, Tensor], pop: Population) -> Tensor:
        """Amounts ``(N, T, n_compartments)`` at ``pop.obs_time`` (0 in padding slots).

        Inside a :func:`deepnlme.dynamics.linearized.linearizing_solves` block, a solve that
        depends on nothing trainable but per-row individual parameters is recorded there and
        handed out detached (its gradients then take one reverse pass); inside a
        :func:`~deepnlme.dynamics.linearized.predicting_solves` block, a recorded solve of the
        same rows stands in for the solve.
        """
        self.check_params(indiv)
        pred = linearized.predicting()
        if pred is not None:
            shape = (len(pop), pop.obs_time.shape[1], len(self.compartments))
            amounts = pred.take(indiv, len(pop), shape)
            if amounts is not None:
                return amounts
        lin = linearized.active()
        if lin is not None:
            leaves = lin.leaves(indiv, len(pop))
            if leaves is not None and self._separable_by_rows(indiv, leaves):
                return lin.record(self._solve({**indiv, **leaves}, pop), leaves, indiv)
        return self._solve(indiv, pop)

    def _separable_by_rows(self, indiv: dict[str, Tensor], leaves: dict[str, Tensor]) -> bool:
        """Whether a solve depends on nothing that requires grad but the per-row ``leaves``:
        no weights of its own, and none that ``rhs`` (or its ``prepare``) uses directly, as
        the graph of one evaluation of ``rhs`` shows."""
        if any(w.requires_grad for w in self.parameters()):
            return False
        like = next(iter(leaves.values()))
        n = like.shape[0]
        try:
            ind = self._rhs_indiv({**indiv, **leaves})
            out = self.rhs(like.new_zeros(n), like.new_ones(n, len(self.compartments)), ind)
        except Exception:  # noqa: BLE001 (any failure: take the general path)
            return False
        return not linearized.external_leaves(out, list(leaves.values()))

    def _rhs_indiv(self, indiv: dict[str, Tensor]) -> dict[str, Tensor]:
        """What ``rhs`` receives for ``indiv``: its ``prepare`` of them where it has one."""
        prepare = getattr(self.rhs, "prepare", None)
        return prepare(indiv) if prepare is not None else indiv

    def _solve(self, indiv: dict[str, Tensor], pop: Population) -> Tensor:
        """The solve of :meth:`forward`: every row's event grid at once."""
        doses = resolve_doses(indiv, pop, self.compartments, self.default_dose_cmt)
        rhs_indiv = self._rhs_indiv(indiv)
        n_cmt = len(self.compartments)
        dtype = torch.promote_types(doses.amount.dtype, pop.obs_time.dtype)
        onehot = F.one_hot(doses.cmt, n_cmt).to(dtype)  # (N, D, C)
        is_inf = doses.duration > 0
        bolus = onehot * torch.where(is_inf, 0.0, doses.amount)[..., None]
        rate = onehot * doses.rate[..., None]
        start = doses.time
        end = start + doses.duration
        no_jump = torch.zeros_like(bolus)

        # events: (time, valid, epoch, jump); ties keep this order, observations last
        events = [(start, doses.mask, doses.epoch, bolus), (end, is_inf, doses.epoch, no_jump)]
        inputs = [(start, end, is_inf, doses.epoch, rate)]  # infusions: start, end, valid, ...
        if doses.flags.ss:
            x_ss = self._steady_states(rhs_indiv, doses, bolus, rate)
            tail_end = start - doses.ii + doses.duration
            tail = doses.ss & is_inf & (tail_end > doses.record_time)
            events += [
                (doses.record_time, doses.ss, doses.epoch, x_ss),
                (tail_end, tail, doses.epoch, no_jump),
            ]
            inputs.append((doses.record_time, tail_end, tail, doses.epoch, rate))
        n_dose_events = sum(e[0].shape[1] for e in events)
        obs_jump = bolus.new_zeros(*pop.obs_time.shape, n_cmt)
        events.append((pop.obs_time, pop.obs_mask, pop.obs_epoch, obs_jump))

        times = torch.cat([e[0].to(dtype) for e in events], 1)  # (N, K)
        valid = torch.cat([e[1] for e in events], 1)
        epochs = torch.cat([e[2] for e in events], 1)
        jumps = torch.cat([e[3] for e in events], 1)  # (N, K, C)

        # sort every subject's events by (epoch, time), stable
        key_t = torch.where(valid, times, torch.inf).detach()
        key_e = torch.where(valid, epochs, torch.iinfo(epochs.dtype).max)
        o1 = torch.argsort(key_t, dim=1, stable=True)
        order = o1.gather(1, torch.argsort(key_e.gather(1, o1), dim=1, stable=True))
        n_events = max(int(valid.sum(1).max()), 1) if valid.numel() else 1
        order_k = order[:, :n_events]
        g = times.gather(1, order_k)
        v = valid.gather(1, order_k)
        e = epochs.gather(1, order_k)
        jumps = jumps.gather(1, order_k[..., None].expand(-1, -1, n_cmt))
        g = torch.where(v, g, 0.0)

        # segment k runs from event k-1 to event k within one epoch
        g_prev = torch.cat([g[:, :1], g[:, :-1]], 1)
        v_prev = torch.cat([torch.zeros_like(v[:, :1]), v[:, :-1]], 1)
        e_prev = torch.cat([e[:, :1], e[:, :-1]], 1)
        same = v_prev & (e == e_prev)
        seg = same & v
        length = torch.where(seg, g - g_prev, 0.0)
        seg_start = torch.where(seg, g_prev, 0.0)

        # constant infusion input on each segment (N, K, C)
        i_start, i_end, i_valid, i_epoch, i_rate = (
            torch.cat(z, 1) for z in zip(*inputs, strict=True)
        )
        covers = (
            i_valid[:, None, :]
            & (i_start[:, None, :] <= g_prev[:, :, None])
            & (i_end[:, None, :] >= g[:, :, None])
            & (i_epoch[:, None, :] == e[:, :, None])
        )
        seg_rate = torch.einsum("nkj,njc->nkc", covers.to(dtype), i_rate)

        x0 = jumps.new_zeros(jumps.shape[0], n_cmt)
        inputs_rate = seg_rate if doses.flags.infusion else None
        self._step_groups = _copies(pop.subject_index)
        self._subjects = pop.subject_index
        try:  # (N, K', C): one batched solve over every event grid
            states = self._integrate_grid(
                rhs_indiv, x0, seg_start, length, inputs_rate, same, jumps
            )
        finally:
            self._step_groups = self._subjects = None

        inverse = torch.empty_like(order).scatter_(
            1, order, torch.arange(order.shape[1], device=order.device).expand_as(order)
        )
        pos = inverse[:, n_dose_events:].clamp(max=n_events - 1)  # (N, T)
        amounts = states.gather(1, pos[..., None].expand(-1, -1, n_cmt))
        return torch.where(pop.obs_mask[..., None], amounts, 0.0)
