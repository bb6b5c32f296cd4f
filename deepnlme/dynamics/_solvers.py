"""Batched integration of every subject's event grid at once (private to :mod:`.ode`).

Segment ``k`` of subject ``i`` runs from real time ``a_ik`` over ``L_ik >= 0`` between its
events ``k-1`` and ``k``; between segments the state jumps (boluses, steady-state states) or
restarts from zero (resets); the state at the end of segment ``k`` is the state at the
subject's ``k``-th event.

Solvers by name: adaptive ``dopri5`` (Dormand–Prince 5(4), the default; error per subject
as the RMS of ``err / (atol + rtol·|x|)``) advances every subject with its own steps in its
own time; it steps only to the ends of the smooth pieces of the grid (doses, infusion starts
and ends, resets) and reads the states at the other events (observations) from the 4th-order
dense output of the step that covers them (:func:`_dopri5_grid`). Fixed-step ``euler``,
``midpoint`` and ``rk4`` map segment ``k`` onto the common pseudo-time interval
``[k, k + 1]`` (``t = a_ik + s·L_ik``, ``dx/ds = L_ik · (rhs(t, x) + r_ik)``, ``r_ik`` the
segment's constant infusion input) and take ``n_k = max(min_steps, ceil(max_i L_ik /
max_step))`` equal steps in it (the same for all subjects). Any other torchdiffeq method
name integrates one batched ``odeint`` call per pseudo-time unit, as does ``adjoint=True``
(``odeint_adjoint``: memory independent of the number of steps).

Step sizes are not differentiated (the discrete solution is differentiated as computed).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from torch import Tensor, nn

Rhs = Callable[[Tensor, Tensor, Mapping[str, Tensor]], Tensor]


@dataclass(frozen=True)
class SolverOptions:
    """How to integrate: the solver's name and its settings.

    ``max_step`` (time units) and ``min_steps`` set the steps of the fixed-step solvers;
    ``rtol``/``atol`` the adaptive error control (``max_step`` also caps adaptive steps when
    given); ``options`` go to torchdiffeq for the methods it provides.
    """

    method: str = "dopri5"
    rtol: float = 1e-6
    atol: float = 1e-9
    max_step: float | None = None
    min_steps: int = 1
    max_steps: int = 100_000
    adjoint: bool = False
    options: Mapping | None = None


# --------------------------------------------------------------------------- fixed step
# Each step function takes the field ``g(t, x)`` (rhs plus input, per time unit), the state
# ``x`` ``(N, C)``, the times ``t0``/``t1`` ``(N,)`` at the ends of the step and a function
# ``tm()`` giving its midpoint times, and the step length ``hl`` ``(N, 1)`` in time units.
# Fused operations (addcmul, add with alpha) keep the autograd graph short: the fitting
# loops differentiate it up to third order.
def _euler(g, x, t0, t1, tm, hl):
    return torch.addcmul(x, hl, g(t0, x))


def _midpoint(g, x, t0, t1, tm, hl):
    return torch.addcmul(x, hl, g(tm(), torch.addcmul(x, 0.5 * hl, g(t0, x))))


def _rk4(g, x, t0, t1, tm, hl):
    half = 0.5 * hl
    t_mid = tm()
    k1 = g(t0, x)
    k2 = g(t_mid, torch.addcmul(x, half, k1))
    k3 = g(t_mid, torch.addcmul(x, half, k2))
    k4 = g(t1, torch.addcmul(x, hl, k3))
    total = torch.add(torch.add(k1, k2 + k3, alpha=2.0), k4)
    return torch.addcmul(x, hl / 6.0, total)


FIXED = {"euler": _euler, "midpoint": _midpoint, "rk4": _rk4}

# --------------------------------------------------------------------------- dopri5
_C = (0.2, 0.3, 0.8, 8.0 / 9.0, 1.0, 1.0)
_A = (
    (0.2,),
    (3.0 / 40.0, 9.0 / 40.0),
    (44.0 / 45.0, -56.0 / 15.0, 32.0 / 9.0),
    (19372.0 / 6561.0, -25360.0 / 2187.0, 64448.0 / 6561.0, -212.0 / 729.0),
    (9017.0 / 3168.0, -355.0 / 33.0, 46732.0 / 5247.0, 49.0 / 176.0, -5103.0 / 18656.0),
    (35.0 / 384.0, 0.0, 500.0 / 1113.0, 125.0 / 192.0, -2187.0 / 6784.0, 11.0 / 84.0),
)
# 5th-order weights minus the embedded 4th-order ones (error estimate)
_E = (
    35.0 / 384.0 - 5179.0 / 57600.0,
    0.0,
    500.0 / 1113.0 - 7571.0 / 16695.0,
    125.0 / 192.0 - 393.0 / 640.0,
    -2187.0 / 6784.0 + 92097.0 / 339200.0,
    11.0 / 84.0 - 187.0 / 2100.0,
    -1.0 / 40.0,
)


# The nonzero coefficients ``((a_ij, j), ...)`` of each row of :data:`_A`.
_A_NONZERO = tuple(tuple((a, j) for j, a in enumerate(row) if a != 0.0) for row in _A)


def _combination(terms: list[tuple[float, Tensor]]) -> tuple[Tensor, float]:
    """``(k_0 + Σ (c_j/c_0) k_j, c_0)`` for nonzero ``terms`` ``((c_j, k_j), ...)``, so that
    ``Σ c_j k_j = c_0·(...)``: one operation per term (the solves of a fit are dominated by
    the number of operations, forwards and backwards, not their size)."""
    (c0, acc), *rest = terms
    for c, k in rest:
        acc = torch.add(acc, k, alpha=c / c0)
    return acc, c0


def _stage_sum(coeffs, ks: list[Tensor]) -> Tensor:
    """``Σ c_j k_j`` over the nonzero coefficients ``coeffs``."""
    acc, c0 = _combination([(c, k) for c, k in zip(coeffs, ks, strict=True) if c != 0.0])
    return acc * c0


def _stage_state(x: Tensor, hl: Tensor, row, ks: list[Tensor]) -> Tensor:
    """``x + hl·Σ a_j k_j`` over the nonzero coefficients ``row`` (of :data:`_A_NONZERO`)."""
    acc, a0 = _combination([(a, ks[j]) for a, j in row])
    return torch.addcmul(x, hl, acc, value=a0)


# Dense output of Dormand–Prince (Hairer, Nørsett & Wanner, DOPRI5's CONTD5): the state at
# θ ∈ [0, 1] of a step is x0 + θ(r2 + (1-θ)(r3 + θ(r4 + (1-θ) r5))), 4th order, from the
# step's seven stages.
_D = (
    -12715105075.0 / 11282082432.0,
    0.0,
    87487479700.0 / 32700410799.0,
    -10690763975.0 / 1880347072.0,
    701980252875.0 / 199316789632.0,
    -1453857185.0 / 822651844.0,
    69997945.0 / 29380423.0,
)


def _dense_coefficients(x0: Tensor, x1: Tensor, k1: Tensor, k7: Tensor, dense: Tensor, step):
    """``(M, 5, C)``: the coefficients ``[x0, r2, r3, r4, r5]`` of the dense output of steps
    from ``x0`` to ``x1`` (``(M, C)``) over ``step`` ``(M,)`` with first and last stages
    ``k1``, ``k7`` and ``dense`` = Σ_j d_j k_j (:data:`_D`), all ``(M, C)``."""
    hl = step[:, None]
    r2 = x1 - x0
    r3 = torch.addcmul(-r2, hl, k1)
    r4 = torch.addcmul(r2 - r3, hl, k7, value=-1.0)
    return torch.stack([x0, r2, r3, r4, hl * dense], 1)


def _dense_states(coefficients: Tensor, theta: Tensor) -> Tensor:
    """States ``(M, C)`` at the fractions ``theta`` ``(M,)`` of the steps whose dense-output
    coefficients are ``coefficients`` ``(M, 5, C)``."""
    x0, r2, r3, r4, r5 = coefficients.unbind(1)
    th = theta[:, None]
    rest = 1.0 - th
    inner = torch.addcmul(r4, rest, r5)
    inner = torch.addcmul(r3, th, inner)
    inner = torch.addcmul(r2, rest, inner)
    return torch.addcmul(x0, th, inner)


def _scaled_rms(v: Tensor, x: Tensor, rtol: float, atol: float) -> Tensor:
    """Per-row RMS ``(N,)`` of ``v / (atol + rtol·|x|)`` (``v``, ``x`` ``(N, C)``)."""
    return (v / (atol + rtol * x.abs())).pow(2).mean(-1).sqrt()


# --------------------------------------------------------------------------- driver
def _field(rhs: Rhs, indiv, rate: Tensor | None):
    """``g(t, x) = rhs(t, x) + r`` (``r`` ``(N, C)`` the segment's input, None for none)."""
    if rate is None:
        return lambda t, x: rhs(t, x, indiv)
    return lambda t, x: rhs(t, x, indiv) + rate


def fixed_steps(options: SolverOptions, length: Tensor) -> list[int]:
    """Steps per segment ``(K,)`` of a fixed-step solver from the longest segment lengths."""
    if options.max_step is None or not length.shape[0]:
        return [options.min_steps] * length.shape[1]
    longest = length.detach().amax(0)
    n = torch.ceil(longest / options.max_step).clamp(min=options.min_steps)
    return [int(v) for v in n.tolist()]


class _AdjointField(nn.Module):
    """torchdiffeq ``odeint_adjoint`` needs a module whose tensors it can differentiate."""

    def __init__(self, rhs: Rhs, indiv: Mapping[str, Tensor], a, length, rate):
        super().__init__()
        self.rhs = rhs
        self.keys = [k for k, v in indiv.items() if isinstance(v, Tensor)]
        self.others = {k: v for k, v in indiv.items() if not isinstance(v, Tensor)}
        self.tensors = [indiv[k] for k in self.keys] + [a, length, rate]

    def forward(self, s: Tensor, x: Tensor) -> Tensor:
        *values, a, length, rate = self.tensors
        indiv = {**dict(zip(self.keys, values, strict=True)), **self.others}
        return length[:, None] * (self.rhs(a + s * length, x, indiv) + rate)


#: The error of ``adjoint=True`` when the backward pass fails (see
#: :func:`_torchdiffeq_segment`).
ADJOINT_DIVERGED = (
    "OdeDynamics(adjoint=True): the state, integrated backwards in time for the adjoint "
    "gradient, ran away (strongly damped dynamics, e.g. fast absorption over a long "
    "interval, are unstable in reverse) and the step size underflowed; use adjoint=False"
)


class _AdjointGuard(torch.autograd.Function):
    """Identity on a solve's result whose backward runs the solve's own backward (torchdiffeq's
    adjoint pass) and reports its step-size underflow as :data:`ADJOINT_DIVERGED` (one line)
    instead of torchdiffeq's bare assertion."""

    @staticmethod
    def forward(ctx, solve, n_args: int, *inputs: Tensor) -> Tensor:
        """``solve(*inputs[:n_args])``; the other inputs are parameters ``solve`` uses
        directly (an ``rhs`` module's), passed so that their gradients are routed here."""
        with torch.enable_grad():
            args = [v.detach().requires_grad_(v.requires_grad) for v in inputs[:n_args]]
            out = solve(*args)
        ctx.graph = (out, [*args, *inputs[n_args:]])
        return out.detach()

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        out, leaves = ctx.graph
        wanted = [v for v in leaves if v.requires_grad]
        try:
            grads = iter(torch.autograd.grad(out, wanted, grad_out, allow_unused=True))
        except AssertionError as err:
            if "underflow in dt" in str(err):
                raise RuntimeError(ADJOINT_DIVERGED) from None
            raise
        return None, None, *(next(grads) if v.requires_grad else None for v in leaves)


def _adjoint_seminorm(state_norm: Callable[[Tensor], Tensor] | None):
    """Error norm of torchdiffeq's adjoint pass over its state ``(t, y, adj_y, *adj_params)``:
    the forward norm of ``y`` and of ``adj_y`` only (torchdiffeq's ``"seminorm"`` also
    controls the adjoint of the integration time, a sum over every subject of the batch; no
    gradient with respect to the fixed pseudo-time grid is needed)."""

    def rms(x: Tensor) -> Tensor:
        return x.pow(2).mean().sqrt()

    norm = state_norm or rms

    def seminorm(tensors: tuple[Tensor, ...]) -> Tensor:
        _, y, adj_y, *_ = tensors
        return torch.maximum(norm(y), norm(adj_y))

    return seminorm


def _torchdiffeq_segment(rhs, indiv, x, a, length, rate, options: SolverOptions) -> Tensor:
    """One pseudo-time unit by torchdiffeq (``odeint`` or ``odeint_adjoint``).

    ``odeint_adjoint`` recovers the state in its backward pass by integrating it backwards
    in time. Where the dynamics are strongly damped (a depot emptied at rate ka over a
    segment of length L keeps ~e^(-ka·L) of its dose, and the backward integration
    multiplies the forward solution's error, ~atol, by e^(ka·L)), that recovered state runs
    away (into the pole C = -km of Michaelis–Menten elimination, say) and torchdiffeq's
    step size underflows. The larger the population, the likelier a subject with a large
    ka·L: the benchmark's Michaelis–Menten model failed from about 1,000 subjects. A
    underflow there is reported as :data:`ADJOINT_DIVERGED` (:class:`_AdjointGuard`).
    """
    from torchdiffeq import odeint, odeint_adjoint

    if rate is None:
        rate = torch.zeros_like(x)
    grid = torch.tensor([0.0, 1.0], dtype=x.dtype, device=x.device)
    kw = dict(rtol=options.rtol, atol=options.atol, options=dict(options.options or {}))
    if options.method in FIXED and "step_size" not in kw["options"]:
        kw["options"]["step_size"] = 1.0 / max(options.min_steps, 1)
    if options.adjoint:
        keys = [k for k, v in indiv.items() if isinstance(v, Tensor)]
        tensors = [indiv[k] for k in keys] + [a, length, rate]
        module_params = list(rhs.parameters()) if isinstance(rhs, nn.Module) else []
        kw["adjoint_options"] = {"norm": _adjoint_seminorm(kw["options"].get("norm"))}

        def solve(x0: Tensor, *leaves: Tensor) -> Tensor:
            ind = {**indiv, **dict(zip(keys, leaves[: len(keys)], strict=True))}
            field = _AdjointField(rhs, ind, *leaves[len(keys) : len(keys) + 3])
            params = tuple(t for t in field.tensors if t.requires_grad)
            params += tuple(p for p in module_params if p.requires_grad)
            out = odeint_adjoint(
                field, x0, grid, method=options.method, adjoint_params=params, **kw
            )
            return out[-1]

        inputs = [x, *tensors]
        if not torch.is_grad_enabled() or not any(
            v.requires_grad for v in [*inputs, *module_params]
        ):
            return solve(*inputs)
        return _AdjointGuard.apply(solve, len(inputs), *inputs, *module_params)
    field = _AdjointField(rhs, indiv, a, length, rate)
    return odeint(field, x, grid, method=options.method, **kw)[-1]


def integrate(
    rhs: Rhs,
    indiv: Mapping[str, Tensor],
    x0: Tensor,
    start: Tensor,
    length: Tensor,
    rate: Tensor | None,
    options: SolverOptions,
    keep: Tensor | None = None,
    jump: Tensor | None = None,
    groups: Tensor | None = None,
    plan: StepPlan | None = None,
    record: list | None = None,
) -> Tensor:
    """States ``(N, K, C)`` at the end of each of the ``K`` segments, all subjects at once.

    Args:
        rhs: ``rhs(t, x, indiv)``, ``t`` ``(N,)``, ``x`` ``(N, C)`` -> ``(N, C)`` per time unit.
        indiv: individual parameters, subjects on the first axis.
        x0: ``(N, C)`` state before the first segment.
        start, length: ``(N, K)`` real start time and duration (>= 0) of each segment.
        rate: ``(N, K, C)`` constant input (amount per time unit) during each segment, or
            None for none.
        keep: ``(N, K)`` bool, False where a segment starts from zero (a reset); default all.
        jump: ``(N, K, C)`` added to the state at the end of each segment; default none.
        groups: ``(N,)`` group index (0, 1, ...) of each row for ``dopri5``: rows of a group
            (copies of one subject at nearby parameters, e.g. the points of a difference
            quotient) take the steps of its first row, so that differences between them are
            smooth. Default: every row its own steps.
        plan: ``dopri5`` only: take these steps (:class:`StepPlan`, from an earlier solve of
            the same event grids) instead of choosing them.
        record: ``dopri5`` only: a list that receives the :class:`StepPlan` of this solve.
    """
    n_seg = start.shape[1]
    method = options.method
    if method == "dopri5" and not options.adjoint:
        return _dopri5_grid(
            rhs, indiv, x0, start, length, rate, options, keep, jump, groups, plan, record
        )
    needed = (length.detach() > 0).any(0).tolist() if length.numel() else [False] * n_seg
    own = not options.adjoint and method in FIXED
    steps = fixed_steps(options, length) if method in FIXED and own else None
    x = x0
    states = []
    for k in range(n_seg):
        if keep is not None:
            x = torch.where(keep[:, k, None], x, 0.0)
        if needed[k]:
            a, ln = start[:, k], length[:, k]
            r = None if rate is None else rate[:, k]
            if not own:
                x = _torchdiffeq_segment(rhs, indiv, x, a, ln, r, options)
            else:
                x = _fixed_segment(FIXED[method], _field(rhs, indiv, r), x, a, ln, steps[k])
        if jump is not None:
            x = x + jump[:, k]
        states.append(x)
    return torch.stack(states, 1) if states else x0.new_zeros(x0.shape[0], 0, x0.shape[1])


def _fixed_segment(step, g, x: Tensor, a: Tensor, length: Tensor, n: int) -> Tensor:
    """``n`` equal steps of ``step`` over one segment (``a``, ``length`` ``(N,)``)."""
    h = 1.0 / n
    hl = (h * length)[:, None]
    t0 = a
    for j in range(n):
        t1 = torch.add(a, length, alpha=(j + 1) * h) if j + 1 < n else a + length
        s_mid = (j + 0.5) * h
        x = step(g, x, t0, t1, lambda s=s_mid: torch.add(a, length, alpha=s), hl)
        t0 = t1
    return x


# --------------------------------------------------------------------------- adaptive
def _pieces(start: Tensor, end: Tensor, rate: Tensor | None, keep, jump) -> Tensor:
    """``(N, K)`` index of the last segment of the smooth piece that holds each segment.

    A piece ends after segment ``k`` where the state or the field is discontinuous: a jump at
    its end, a reset or a new input on segment ``k + 1``, or a gap in time (a new epoch);
    everything else (observation times) lies inside a piece, read by dense output.
    """
    n, n_seg = start.shape
    brk = torch.zeros(n, n_seg, dtype=torch.bool, device=start.device)
    brk[:, -1] = True
    if n_seg > 1:
        brk[:, :-1] |= start[:, 1:] != end[:, :-1]
        if keep is not None:
            brk[:, :-1] |= ~keep[:, 1:]
        if rate is not None:
            brk[:, :-1] |= (rate[:, 1:] != rate[:, :-1]).any(-1)
    if jump is not None:
        brk |= (jump != 0).any(-1)
    index = torch.arange(n_seg, device=start.device).expand(n, n_seg)
    marks = torch.where(brk, index, n_seg)
    return marks.flip(1).cummin(1).values.flip(1)


def _initial_step(g, t: Tensor, x: Tensor, f0: Tensor, left: Tensor, options) -> Tensor:
    """Hairer's starting step ``(N,)`` per subject (time units), at most ``left``; the whole
    of ``left`` where the field vanishes (no error to control)."""
    rtol, atol = options.rtol, options.atol
    d0 = _scaled_rms(x, x, rtol, atol)
    d1 = _scaled_rms(f0, x, rtol, atol)
    h0 = torch.where((d0 < 1e-5) | (d1 < 1e-5), 1e-6, 0.01 * d0 / d1.clamp(min=1e-300))
    h0 = torch.minimum(h0, left.clamp(min=1e-300))
    f1 = g(t + h0, torch.addcmul(x, h0[:, None], f0))
    d2 = _scaled_rms(f1 - f0, x, rtol, atol) / h0
    top = torch.maximum(d1, d2)
    h1 = torch.where(
        top <= 1e-15, torch.clamp(h0 * 1e-3, min=1e-6), (0.01 / top.clamp(min=1e-300)) ** 0.2
    )
    h = torch.minimum(100.0 * h0, h1)
    h = torch.where(top <= 1e-15, left, h)
    if options.max_step is not None:
        h = h.clamp(max=options.max_step)
    return torch.where(torch.isfinite(h) & (h > 0), h, left).clamp(min=1e-12)


def _direct(rhs: Rhs) -> Rhs:
    """``rhs`` itself, or for an ``nn.Module`` without hooks its ``forward`` (a module call's
    hook machinery costs about as much as a small operation, seven times a step)."""
    if not isinstance(rhs, nn.Module):
        return rhs
    hooks = (
        rhs._forward_hooks,
        rhs._forward_pre_hooks,
        nn.modules.module._global_forward_hooks,
        nn.modules.module._global_forward_pre_hooks,
    )
    return rhs if any(hooks) else rhs.forward


@dataclass(frozen=True)
class StepPlan:
    """The accepted steps of an adaptive solve, per row, to be taken again: ``step`` ``(N, J)``
    step sizes (time units) in order, ``last`` ``(N, J)`` True where a step ends its piece
    (and on the padding after a row's last step)."""

    step: Tensor
    last: Tensor


def _dopri5_grid(
    rhs: Rhs,
    indiv: Mapping[str, Tensor],
    x0: Tensor,
    start: Tensor,
    length: Tensor,
    rate: Tensor | None,
    options: SolverOptions,
    keep: Tensor | None,
    jump: Tensor | None,
    groups: Tensor | None = None,
    plan: StepPlan | None = None,
    record: list | None = None,
) -> Tensor:
    """:func:`integrate` by adaptive Dormand–Prince 5(4) with step control per subject.

    Each subject steps through its own real time; a step is accepted for a subject when its
    error (RMS of ``err / (atol + rtol·|x|)``) is at most 1. Steps stop only at the ends of
    the smooth pieces (:func:`_pieces`: doses, infusion starts and ends, resets); the states
    at the other segment ends (observations) come from the 4th-order dense output of the step
    that covers them, computed a window of steps at a time (:class:`_StepRecord`).
    All subjects advance together, one step each per iteration, until the last one is done.
    Rows of one of ``groups`` take the steps of the group's first row (which are those it
    takes alone: a value does not depend on the batch it is evaluated in). Step sizes are not
    differentiated; the last step of a piece ends at its end time (differentiable where event
    times are, e.g. lag times). With a ``plan`` the rows take its steps instead (no error
    estimate, no step control: for solves of nearby parameters on the same event grids, e.g.
    the iterations of a mode search); ``record`` receives this solve's plan.
    """
    n, n_seg = start.shape
    n_cmt = x0.shape[-1]
    if n_seg == 0:
        return x0.new_zeros(n, 0, n_cmt)
    end = start + length
    timed = end.requires_grad  # event times depend on parameters: differentiate the last steps
    rows = torch.arange(n, device=x0.device)
    e_d = torch.tensor([_E, _D], dtype=x0.dtype, device=x0.device)  # error, dense output
    c_vec = torch.tensor(_C[:5], dtype=x0.dtype, device=x0.device)
    rtol, atol = options.rtol, options.atol
    with torch.no_grad():
        end_d = end.detach()
        last_of = _pieces(start.detach(), end_d, rate, keep, jump)
    rate_now = [None if rate is None else rate[:, 0]]
    if groups is not None and groups.numel():  # each row follows its group's first row
        first = torch.full((int(groups.max()) + 1,), n, dtype=torch.long, device=x0.device)
        lead = first.scatter_reduce_(0, groups, rows, "amin")[groups]
    else:
        lead = None

    def shared(v: Tensor) -> Tensor:
        """``v`` ``(N,)`` with every row's value replaced by its group's first row's."""
        return v if lead is None else v[lead]

    rhs = _direct(rhs)
    if rate is None:  # the field is the right-hand side

        def g(t: Tensor, x: Tensor) -> Tensor:
            return rhs(t, x, indiv)

    else:  # plus the current segment's input

        def g(t: Tensor, x: Tensor) -> Tensor:
            return rhs(t, x, indiv) + rate_now[0]

    def g_at(idx: Tensor):
        """The field of the rows ``idx`` only (``t``, ``x`` of those rows)."""
        sub = {
            k: v[idx] if isinstance(v, Tensor) and v.dim() and len(v) == n else v
            for k, v in indiv.items()
        }

        def g_sub(t: Tensor, x: Tensor) -> Tensor:
            f = rhs(t, x, sub)
            return f if rate_now[0] is None else f + rate_now[0][idx]

        return g_sub

    piece_last = last_of[:, 0]
    x = x0 if keep is None else torch.where(keep[:, 0, None], x0, 0.0)
    t = start[:, 0] if timed else start[:, 0].detach()
    t_end = end[rows, piece_last] if timed else end_d[rows, piece_last]
    k1 = g(t, x)
    with torch.no_grad():
        td, t_end_d = t.detach(), t_end.detach()
        if plan is None:
            h = shared(_initial_step(g, td, x.detach(), k1.detach(), t_end_d - td, options))
        else:
            all_rows = torch.ones(n, dtype=torch.bool, device=x0.device)
    done = torch.zeros(n, dtype=torch.bool, device=x0.device)
    out_rows, out_cols, out_vals = [], [], []  # piece ends: exact states
    window = max(DENSE_WINDOW, DENSE_BUDGET // (5 * n * n_cmt))
    steps = _StepRecord(end, end_d, last_of, timed, window)  # dense output inside the pieces
    for it in range(options.max_steps):
        with torch.no_grad():
            left = t_end_d - td
            if plan is None:
                last = h >= left * (1.0 - 1e-12)
                step_d = torch.where(last, left, h)
            else:  # the planned step; a piece's last step ends exactly at its end
                j = min(it, plan.step.shape[1] - 1)
                last = plan.last[:, j]
                step_d = torch.where(last, left, plan.step[:, j])
        step = torch.where(last, t_end - t, step_d) if timed else step_d
        hl = step[:, None]
        # (N,) each: the times of stages 2-6 (the last one t + step), in one operation
        times = torch.addcmul(t[:, None], hl, c_vec).unbind(1)
        ks = [k1]
        for j, row in enumerate(_A_NONZERO[:5]):
            ks.append(g(times[j], _stage_state(x, hl, row, ks)))
        x_new = _stage_state(x, hl, _A_NONZERO[5], ks)
        t_new = times[4]
        ks.append(g(t_new, x_new))
        with torch.no_grad():
            td_new = td + step_d
            dense = None
            if plan is None:
                err, mixed = (e_d @ torch.stack(ks).reshape(7, -1)).view(2, *x_new.shape)
                if not x_new.requires_grad:  # else from the stages, with their graph
                    dense = mixed
                q = err.div_(torch.maximum(x.abs(), x_new.abs()).mul_(rtol).add_(atol))
                ratio = shared(torch.linalg.vector_norm(q, dim=-1).mul_(step_d / n_cmt**0.5))
                ok = ratio <= 1.0  # False where not finite
            else:
                ok = all_rows
        steps.add(t, td, step, step_d, ok, last, piece_last, x, x_new, ks, dense)
        all_ok = plan is not None or bool(ok.all())
        if all_ok:  # the common case: no selection needed
            x, k1, td = x_new, ks[6], td_new
            t = t_new if timed else td
        else:
            accept = ok[:, None]
            x = torch.where(accept, x_new, x)
            k1 = torch.where(accept, ks[6], k1)
            td = torch.where(ok, td_new, td)
            t = torch.where(ok, t_new, t) if timed else td
        with torch.no_grad():  # per-subject step control
            if plan is None:
                factor = ratio.clamp(min=1e-10).pow_(-0.2).mul_(0.9)
                factor = factor.nan_to_num_(0.2).clamp_(0.2, 10.0)
                h = torch.where(ok & last & (factor >= 1.0), h, step_d * factor)
                if options.max_step is not None:
                    h = h.clamp(max=options.max_step)
            crossed = ok & last & ~done
            if not all_ok and bool((~ok & (h < 1e-12 * (1.0 + td.abs()))).any()):
                raise RuntimeError("dopri5: non-finite state; step size underflow")
        if not bool(crossed.any()):
            continue
        # the end of a piece: output (after its jump), then the next piece's start
        cross_rows = crossed.nonzero().squeeze(-1)
        if jump is not None:
            x = x + torch.where(crossed[:, None], jump[rows, piece_last], 0.0)
        out_rows.append(cross_rows)
        out_cols.append(piece_last[cross_rows])
        out_vals.append(x[cross_rows])
        with torch.no_grad():
            nxt = piece_last + 1
            done = done | (crossed & (nxt >= n_seg))
            if bool(done.all()):
                break
            first = nxt.clamp(max=n_seg - 1)
            moved = crossed & ~done
            piece_last = torch.where(moved, last_of[rows, first], piece_last)
        if keep is not None:
            x = torch.where((moved & ~keep[rows, first])[:, None], 0.0, x)
        t = torch.where(moved, start[rows, first] if timed else start[rows, first].detach(), t)
        t_end = end[rows, piece_last] if timed else end_d[rows, piece_last]
        if rate is not None:
            rate_now[0] = torch.where(moved[:, None], rate[rows, first], rate_now[0])
        # the new pieces' first derivatives and starting steps: the rows that moved only
        idx = moved.nonzero().squeeze(-1)
        g_moved = g_at(idx)
        k1_moved = g_moved(t[idx], x[idx])
        k1 = k1.index_put((idx,), k1_moved)
        with torch.no_grad():
            td, t_end_d = t.detach(), t_end.detach()
            if plan is None:
                left = t_end_d[idx] - td[idx]
                x_m, k1_m = x[idx].detach(), k1_moved.detach()
                h0 = _initial_step(g_moved, td[idx], x_m, k1_m, left, options)
                h = shared(h.index_put((idx,), h0))
    else:
        raise RuntimeError(f"dopri5: more than {options.max_steps} steps")
    if record is not None:
        record.append(steps.plan())
    rows_all, cols_all, vals = out_rows, out_cols, out_vals
    dense = steps.outputs()
    if dense is not None:
        rows_all, cols_all = [*rows_all, dense[0]], [*cols_all, dense[1]]
        vals = [*vals, dense[2]]
    states = x0.new_zeros(n, n_seg, n_cmt)
    return states.index_put((torch.cat(rows_all), torch.cat(cols_all)), torch.cat(vals))


#: Fewest steps whose states are kept at a time for the dense output (:class:`_StepRecord`);
#: more while they hold at most :data:`DENSE_BUDGET` numbers (small batches: one window).
DENSE_WINDOW = 16
DENSE_BUDGET = 2**22


class _StepRecord:
    """The steps of :func:`_dopri5_grid`, one entry per iteration (all rows, accepted or not),
    from which the states at the segment ends inside the pieces (``last_of`` ``(N, K)``
    differs from the segment's index: observations) are read by dense output, each from the
    first accepted step of its piece that reaches its end time (or is the piece's last step).
    The states of the steps are kept for a window of ``window`` iterations at a time: the
    outputs that the window's steps cover are computed together when it is full, so that
    memory does not grow with the number of steps where no graph keeps them anyway.

    Keys that increase along each row's steps find the covering steps by one search:
    piece·W + time since the row's first event (W above any row's time span), the piece's
    last step W/2 into its piece, rejected steps -inf, carried forward by a running maximum.
    """

    def __init__(self, end: Tensor, end_d: Tensor, last_of: Tensor, timed: bool, window=16):
        self.end, self.end_d, self.last_of, self.timed, self.window = (
            end,
            end_d,
            last_of,
            timed,
            window,
        )
        n, n_seg = last_of.shape
        with torch.no_grad():
            self.pending = last_of != torch.arange(n_seg, device=last_of.device)  # (N, K)
            self.t0 = end_d.amin(1, keepdim=True)
            self.width = 2.0 * float((end_d - self.t0).max()) + 2.0 if n else 2.0
            self.wanted = last_of * self.width + (end_d - self.t0)  # (N, K)
            self.carry = end_d.new_full((n, 1), -torch.inf)
        self.td, self.step_d, self.ok, self.last, self.piece = [], [], [], [], []  # all steps
        self.t, self.step, self.states = [], [], []  # the current window's steps
        self.rows, self.cols, self.vals = [], [], []  # the outputs so far

    def add(self, t, td, step, step_d, ok, last, piece, x, x_new, ks, dense=None) -> None:
        """One iteration: start times ``t`` (``td`` detached), step sizes ``step``
        (``step_d`` detached), ``ok`` accepted, ``last`` the last step of its piece,
        ``piece`` index of the piece's last segment (all ``(N,)``), start and end states
        ``x``, ``x_new`` ``(N, C)``, the seven stages ``ks`` ``(N, C)`` and, if computed,
        ``dense`` ``(N, C)`` = Σ_j d_j k_j (:data:`_D`; else taken from ``ks``)."""
        for store, v in zip(
            (self.td, self.step_d, self.ok, self.last, self.piece, self.t, self.step),
            (td, step_d, ok, last, piece, t, step),
            strict=True,
        ):
            store.append(v)
        self.states.append((x, x_new, ks[0], ks[6], ks if dense is None else dense))
        if len(self.states) >= self.window:
            self._flush()

    def _flush(self) -> None:
        """The outputs covered by the window's steps; then the window is emptied."""
        size = len(self.states)
        if not size:
            return
        first = len(self.td) - size
        with torch.no_grad():
            td = torch.stack(self.td[first:], 1)  # (N, J)
            step_d = torch.stack(self.step_d[first:], 1)
            last = torch.stack(self.last[first:], 1)
            reach = torch.where(last, 0.5 * self.width, td + step_d - self.t0)
            key = torch.stack(self.piece[first:], 1) * self.width + reach
            key = torch.where(torch.stack(self.ok[first:], 1), key, -torch.inf)
            key = torch.cat([self.carry, key], 1).cummax(1).values
            self.carry = key[:, -1:]
            covered = self.pending & (self.wanted <= self.carry)
            r_i, c_i = covered.nonzero(as_tuple=True)
            self.pending = self.pending & ~covered
            if r_i.numel():
                j_i = torch.searchsorted(key, self.wanted)[r_i, c_i] - 1  # in the window
                s_i = step_d[r_i, j_i]
                safe = torch.where(s_i > 0, s_i, 1.0)
                theta = ((self.end_d[r_i, c_i] - td[r_i, j_i]) / safe).clamp_(0, 1)
        if r_i.numel():
            step = s_i
            if self.timed:  # θ carries the derivative of the observation time
                t = torch.stack(self.t)[j_i, r_i]
                step = torch.stack(self.step)[j_i, r_i]
                theta = (self.end[r_i, c_i] - t) / torch.where(s_i > 0, step, 1.0)
            x0, x1, k1, k7 = (
                torch.stack([st[m] for st in self.states])[j_i, r_i] for m in range(4)
            )
            dense = self._dense_term(j_i, r_i)
            coef = _dense_coefficients(x0, x1, k1, k7, dense, step)
            self.rows.append(r_i)
            self.cols.append(c_i)
            self.vals.append(_dense_states(coef, theta))
        self.t, self.step, self.states = [], [], []

    def _dense_term(self, j_i: Tensor, r_i: Tensor) -> Tensor:
        """Σ_j d_j k_j ``(M, C)`` of the window's steps ``j_i`` for rows ``r_i``."""
        if not isinstance(self.states[0][4], list):
            return torch.stack([st[4] for st in self.states])[j_i, r_i]
        ks = [torch.stack([st[4][s] for st in self.states])[j_i, r_i] for s in range(7)]
        return _stage_sum(_D, ks)

    def outputs(self):
        """``(rows, cols, states)`` of all outputs (``(M,)``, ``(M,)``, ``(M, C)``), None if
        there are none."""
        self._flush()
        if not self.rows:
            return None
        return torch.cat(self.rows), torch.cat(self.cols), torch.cat(self.vals)

    def plan(self) -> StepPlan:
        """The accepted steps of every row, in order (:class:`StepPlan`)."""
        with torch.no_grad():
            ok = torch.stack(self.ok, 1)  # (N, J)
            r_i, j_i = ok.nonzero(as_tuple=True)
            pos = (ok.cumsum(1) - 1)[r_i, j_i]
            width = int(pos.max()) + 2 if pos.numel() else 1  # one padding step at least
            step = ok.new_zeros(ok.shape[0], width, dtype=self.step_d[0].dtype)
            last = ok.new_ones(ok.shape[0], width)
            step[r_i, pos] = torch.stack(self.step_d, 1)[r_i, j_i]
            last[r_i, pos] = torch.stack(self.last, 1)[r_i, j_i]
        return StepPlan(step, last)
