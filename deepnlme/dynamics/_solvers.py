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
def _euler(f, x, s, h):
    return x + h * f(s, x)


def _midpoint(f, x, s, h):
    return x + h * f(s + 0.5 * h, x + (0.5 * h) * f(s, x))


def _rk4(f, x, s, h):
    k1 = f(s, x)
    k2 = f(s + 0.5 * h, x + (0.5 * h) * k1)
    k3 = f(s + 0.5 * h, x + (0.5 * h) * k2)
    k4 = f(s + h, x + h * k3)
    return x + (h / 6.0) * (k1 + 2.0 * (k2 + k3) + k4)


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


def _combine(x: Tensor, h: float, coeffs, ks) -> Tensor:
    acc = None
    for c, k in zip(coeffs, ks, strict=False):
        if c != 0.0:
            acc = c * k if acc is None else acc + c * k
    return x if acc is None else x + h * acc


def _dopri5_step(f, x, s, h, k1):
    """One Dormand–Prince step: (x_new, f(s + h, x_new), error estimate)."""
    ks = [k1]
    for c, a in zip(_C[:5], _A[:5], strict=True):
        ks.append(f(s + c * h, _combine(x, h, a, ks)))
    x_new = _combine(x, h, _A[5], ks)
    k7 = f(s + h, x_new)
    ks.append(k7)
    with torch.no_grad():
        err = h * sum(e * k.detach() for e, k in zip(_E, ks, strict=True) if e != 0.0)
    return x_new, k7, err


def _error_ratio(err: Tensor, x0: Tensor, x1: Tensor, rtol: float, atol: float) -> float:
    """Largest per-subject RMS of the scaled error (subjects on the first axis)."""
    scale = atol + rtol * torch.maximum(x0.detach().abs(), x1.detach().abs())
    r = (err / scale).pow(2)
    return float(r.flatten(1).mean(1).sqrt().max()) if r.dim() > 1 else float(r.mean().sqrt())


# --------------------------------------------------------------------------- driver
def _segment_field(rhs: Rhs, indiv, a: Tensor, length: Tensor, rate: Tensor):
    """``f(s, x) = L·(rhs(a + s·L, x) + r)`` for one segment; ``a``, ``length`` ``(N,)``,
    ``rate`` ``(N, C)``, ``s`` a float in [0, 1]."""
    col = length[:, None]

    def f(s: float, x: Tensor) -> Tensor:
        return col * (rhs(a + s * length, x, indiv) + rate)

    return f


def fixed_steps(options: SolverOptions, length: Tensor) -> list[int]:
    """Steps per segment ``(K,)`` of a fixed-step solver from the longest segment lengths."""
    longest = length.detach().amax(0) if length.shape[0] else length.new_zeros(length.shape[1])
    if options.max_step is None:
        return [options.min_steps] * length.shape[1]
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
    from torchdiffeq import odeint, odeint_adjoint

    grid = torch.tensor([0.0, 1.0], dtype=x.dtype, device=x.device)
    kw = dict(rtol=options.rtol, atol=options.atol, options=dict(options.options or {}))
    method = options.method
    if method in FIXED and "step_size" not in kw["options"]:
        kw["options"]["step_size"] = 1.0 / max(options.min_steps, 1)
    if options.adjoint:
        field = _AdjointField(rhs, indiv, a, length, rate)
        params = tuple(t for t in field.tensors if t.requires_grad)
        if isinstance(rhs, nn.Module):
            params += tuple(p for p in rhs.parameters() if p.requires_grad)
        kw["adjoint_options"] = {"norm": "seminorm"}
        return odeint_adjoint(field, x, grid, method=method, adjoint_params=params, **kw)[-1]
    f = _segment_field(rhs, indiv, a, length, rate)
    return odeint(lambda s, y: f(s, y), x, grid, method=method, **kw)[-1]


def integrate(
    rhs: Rhs,
    indiv: Mapping[str, Tensor],
    x0: Tensor,
    start: Tensor,
    length: Tensor,
    rate: Tensor,
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
        rate: ``(N, K, C)`` constant input (amount per time unit) during each segment.
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
            a, ln, r = start[:, k], length[:, k], rate[:, k]
            if not own:
                x = _torchdiffeq_segment(rhs, indiv, x, a, ln, r, options)
            elif steps is not None:
                f = _segment_field(rhs, indiv, a, ln, r)
                n = steps[k]
                h = 1.0 / n
                step = FIXED[method]
                for j in range(n):
                    x = step(f, x, j * h, h)
            else:
                x, h_adapt = _dopri5_segment(rhs, indiv, x, a, ln, r, options, h_adapt)
        if jump is not None:
            x = x + jump[:, k]
        states.append(x)
    return torch.stack(states, 1) if states else x0.new_zeros(x0.shape[0], 0, x0.shape[1])


def _dopri5_segment(rhs, indiv, x, a, length, rate, options: SolverOptions, h: float | None):
    """Adaptive Dormand–Prince over one pseudo-time unit; returns the state and the next step
    size to try (carried into the next segment)."""
    f = _segment_field(rhs, indiv, a, length, rate)
    h_max = 1.0
    if options.max_step is not None:
        longest = float(length.detach().max())
        if longest > 0:
            h_max = min(1.0, options.max_step / longest)
    k1 = f(0.0, x)
    if h is None:  # Hairer's initial step from the scale of x and its derivative
        with torch.no_grad():
            scale = options.atol + options.rtol * x.detach().abs()
            d0 = float((x.detach() / scale).pow(2).mean().sqrt())
            d1 = float((k1.detach() / scale).pow(2).mean().sqrt())
            h = 0.01 * d0 / d1 if d0 > 1e-5 and d1 > 1e-5 else 1e-3
    h = min(max(h, 1e-6), h_max)
    s = 0.0
    n = 0
    while s < 1.0:
        last = s + h >= 1.0 - 1e-12
        step = 1.0 - s if last else h
        x_new, k_new, err = _dopri5_step(f, x, s, step, k1)
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
            h = min(step * factor, h_max) if not last or factor < 1 else min(h, h_max)
        else:
            h = step * factor
    return x, h
