"""Batched integration of every subject's event grid at once (private to :mod:`.ode`).

Subject ``i``'s ``k``-th segment, from real time ``a_ik`` over ``L_ik >= 0``, is mapped onto
the common pseudo-time interval ``[k, k + 1]``: with ``t = a_ik + s·L_ik`` the state obeys
``dx/ds = L_ik · (rhs(t, x) + r_ik)`` (``r_ik`` the constant infusion input of the segment),
so one integrator advances all subjects together, each on its own grid. Between segments the
state jumps (boluses, steady-state states) or restarts from zero (resets); the state at the
end of segment ``k`` is the state at the subject's ``k``-th event.

Solvers by name (:data:`SOLVERS`): fixed-step ``euler``, ``midpoint`` and ``rk4`` take, in
segment ``k``, ``n_k = max(min_steps, ceil(max_i L_ik / max_step))`` equal steps (the same
for all subjects, as pseudo-time is shared); adaptive ``dopri5`` (Dormand–Prince 5(4), error
per subject as the RMS of ``err / (atol + rtol·|x|)``, the step accepted when the worst
subject passes) steps through pseudo-time landing exactly on every integer. Any other
torchdiffeq method name integrates one batched ``odeint`` call per pseudo-time unit, as does
``adjoint=True`` (``odeint_adjoint``: memory independent of the number of steps).

Step sizes are not differentiated (the discrete solution is differentiated as computed).
"""

from __future__ import annotations

import math
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


def _weighted(coeffs, ks) -> Tensor | None:
    """``Σ c_j k_j`` over the nonzero coefficients (None if all are zero)."""
    acc = None
    for c, k in zip(coeffs, ks, strict=False):
        if c != 0.0:
            acc = c * k if acc is None else torch.add(acc, k, alpha=c)
    return acc


def _dopri5_step(g, x, time, s, h, hl, k1):
    """One Dormand–Prince step of pseudo-time length ``h`` from ``s``; ``time(s)`` gives the
    real times ``(N,)``, ``hl`` ``(N, 1)`` the step in time units. Returns
    ``(x_new, g(x_new), error estimate)``."""
    ks = [k1]
    for c, a in zip(_C[:5], _A[:5], strict=True):
        ks.append(g(time(s + c * h), torch.addcmul(x, hl, _weighted(a, ks))))
    x_new = torch.addcmul(x, hl, _weighted(_A[5], ks))
    k7 = g(time(s + h), x_new)
    ks.append(k7)
    with torch.no_grad():
        err = hl * _weighted(_E, [k.detach() for k in ks])
    return x_new, k7, err


def _error_ratio(err: Tensor, x0: Tensor, x1: Tensor, rtol: float, atol: float) -> float:
    """Largest per-subject RMS of the scaled error (subjects on the first axis)."""
    scale = atol + rtol * torch.maximum(x0.detach().abs(), x1.detach().abs())
    r = (err / scale).pow(2)
    return float(r.flatten(1).mean(1).sqrt().max()) if r.dim() > 1 else float(r.mean().sqrt())


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


def _torchdiffeq_segment(rhs, indiv, x, a, length, rate, options: SolverOptions) -> Tensor:
    """One pseudo-time unit by torchdiffeq (``odeint`` or ``odeint_adjoint``)."""
    from torchdiffeq import odeint, odeint_adjoint

    if rate is None:
        rate = torch.zeros_like(x)
    grid = torch.tensor([0.0, 1.0], dtype=x.dtype, device=x.device)
    kw = dict(rtol=options.rtol, atol=options.atol, options=dict(options.options or {}))
    if options.method in FIXED and "step_size" not in kw["options"]:
        kw["options"]["step_size"] = 1.0 / max(options.min_steps, 1)
    field = _AdjointField(rhs, indiv, a, length, rate)
    if options.adjoint:
        params = tuple(t for t in field.tensors if t.requires_grad)
        if isinstance(rhs, nn.Module):
            params += tuple(p for p in rhs.parameters() if p.requires_grad)
        kw["adjoint_options"] = {"norm": "seminorm"}
        return odeint_adjoint(field, x, grid, method=options.method, adjoint_params=params, **kw)[
            -1
        ]
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
    """
    n_seg = start.shape[1]
    needed = (length.detach() > 0).any(0).tolist() if length.numel() else [False] * n_seg
    method = options.method
    own = not options.adjoint and (method in FIXED or method == "dopri5")
    steps = fixed_steps(options, length) if method in FIXED and own else None
    x = x0
    states = []
    h_adapt: float | None = None
    for k in range(n_seg):
        if keep is not None:
            x = torch.where(keep[:, k, None], x, 0.0)
        if needed[k]:
            a, ln = start[:, k], length[:, k]
            r = None if rate is None else rate[:, k]
            if not own:
                x = _torchdiffeq_segment(rhs, indiv, x, a, ln, r, options)
            elif steps is not None:
                x = _fixed_segment(FIXED[method], _field(rhs, indiv, r), x, a, ln, steps[k])
            else:
                g = _field(rhs, indiv, r)
                x, h_adapt = _dopri5_segment(g, x, a, ln, options, h_adapt)
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


def _dopri5_segment(g, x, a, length, options: SolverOptions, h_time: float | None):
    """Adaptive Dormand–Prince over one pseudo-time unit. ``h_time`` is the step (in time
    units, for the longest segment) that the previous segment ended with, None at the start;
    returns the state and the step to carry into the next segment."""
    longest = float(length.detach().max())
    h_max = 1.0
    if options.max_step is not None and longest > 0:
        h_max = min(1.0, options.max_step / longest)

    def time(s: float) -> Tensor:
        return torch.add(a, length, alpha=s)

    col = length[:, None]
    k1 = g(a, x)
    if h_time is None:  # Hairer's initial step from the scale of x and its derivative
        with torch.no_grad():
            scale = options.atol + options.rtol * x.detach().abs()
            d0 = float((x.detach() / scale).pow(2).mean().sqrt())
            d1 = float((col * k1.detach() / scale).pow(2).mean().sqrt())
            h = 0.01 * d0 / d1 if d0 > 1e-5 and d1 > 1e-5 else 1e-3
    else:
        h = h_time / longest
    h = min(max(h, 1e-6), h_max)
    s = 0.0
    n = 0
    while s < 1.0:
        last = s + h >= 1.0 - 1e-12
        step = 1.0 - s if last else h
        x_new, k_new, err = _dopri5_step(g, x, time, s, step, step * col, k1)
        ratio = _error_ratio(err, x, x_new, options.rtol, options.atol)
        n += 1
        if n > options.max_steps:
            raise RuntimeError(f"dopri5: more than {options.max_steps} steps in one segment")
        if not math.isfinite(ratio):
            h = 0.2 * step
            if h < 1e-12:
                raise RuntimeError("dopri5: non-finite state; step size underflow")
            continue
        factor = 10.0 if ratio == 0 else min(10.0, max(0.2, 0.9 * ratio ** (-0.2)))
        if ratio <= 1.0:
            x, k1, s = x_new, k_new, (1.0 if last else s + step)
            if not last or factor < 1.0:  # a short last step says little about the next
                h = min(step * factor, h_max)
        else:
            h = step * factor
    return x, h * longest
