"""Solves differentiated once, however many gradients are taken of what is built on them.

An objective built from the values of many rows (e.g. the Laplace objective from differences
of each subject's l at the points of a stencil, ``inference.inner.value_derivatives``) is
differentiated several times: the log-determinant for η and θ, then the objective for θ.
Each such pass through an ODE solve's graph costs about as much as the solve. Where every
row's value depends on the solve only through its own row, and the solve only on per-row
individual parameters φ (no weights shared across rows), one pass suffices: with
``c_p = ∂value_p/∂amounts_p`` (from the cheap graph after the solve), one reverse pass with
cotangent ``c`` gives ``G_p = ∂value_p/∂φ_p`` for every row at once (the Jacobian of the
solve is block-diagonal over rows), and

    value_p + G_p · (φ_p - detach(φ_p))

has the value and the exact first derivatives of ``value_p`` for everything that φ depends
on (θ, η), with a graph that no longer contains the solve. First order only: its second
derivatives lack the solve's (objectives that need them differentiate the solve itself).

Use: inside :func:`linearizing_solves`, dynamics that support it
(:class:`deepnlme.dynamics.ode.OdeDynamics`) solve from detached copies of the individual
parameters and hand out detached amounts (:meth:`SolveLinearization.record`); the per-row
values built on them are then passed through :meth:`SolveLinearization.attach`.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager

import torch
from torch import Tensor

_ACTIVE: list[SolveLinearization] = []


class SolveLinearization:
    """The solves recorded in one :func:`linearizing_solves` block."""

    def __init__(self) -> None:
        # (solve output with its graph, the detached output handed out, the detached
        # individual parameters it was solved from, the originals) per recorded solve
        self.solves: list[tuple[Tensor, Tensor, dict[str, Tensor], dict[str, Tensor]]] = []

    @staticmethod
    def leaves(indiv: Mapping[str, object], n: int) -> dict[str, Tensor] | None:
        """Detached copies (requiring grad) of the tensors of ``indiv`` that require grad, or
        None unless all of them are per-row (``(n, ...)``) and there is at least one."""
        keys = [k for k, v in indiv.items() if isinstance(v, Tensor) and v.requires_grad]
        if not keys or any(indiv[k].dim() < 1 or indiv[k].shape[0] != n for k in keys):
            return None
        return {k: indiv[k].detach().requires_grad_(True) for k in keys}

    def record(self, out: Tensor, leaves: dict[str, Tensor], indiv: Mapping[str, Tensor]) -> Tensor:
        """Keep the solve ``out`` ``(N, ...)`` (a graph to ``leaves`` only) and return it
        detached, for the values that :meth:`attach` then completes."""
        handed = out.detach().requires_grad_(True)
        self.solves.append((out, handed, leaves, {k: indiv[k] for k in leaves}))
        return handed

    def attach(self, values: Tensor) -> Tensor:
        """``values`` ``(N,)`` (row ``p`` built on row ``p`` of the recorded solves) with the
        solves' first derivatives attached (module docstring): one reverse pass through each
        solve, whose graph is then released."""
        if not self.solves:
            return values
        handed = [s[1] for s in self.solves]
        cotangents = torch.autograd.grad(values.sum(), handed, retain_graph=True, allow_unused=True)
        extra = torch.zeros_like(values)
        for (out, _, leaves, originals), c in zip(self.solves, cotangents, strict=True):
            if c is None:
                continue
            keys = list(leaves)
            grads = torch.autograd.grad(out, [leaves[k] for k in keys], c, allow_unused=True)
            for k, g in zip(keys, grads, strict=True):
                if g is not None:
                    phi = originals[k]
                    extra = extra + (g * (phi - phi.detach())).reshape(len(values), -1).sum(-1)
        self.solves = []
        return values + extra


@contextmanager
def linearizing_solves() -> Iterator[SolveLinearization]:
    """Within this block, solves of dynamics that support it are recorded (module
    docstring); yields the :class:`SolveLinearization` whose ``attach`` completes the
    values built on them."""
    lin = SolveLinearization()
    _ACTIVE.append(lin)
    try:
        yield lin
    finally:
        _ACTIVE.pop()


def active() -> SolveLinearization | None:
    """The innermost open :func:`linearizing_solves` block where autograd records, else
    None."""
    return _ACTIVE[-1] if _ACTIVE and torch.is_grad_enabled() else None


def external_leaves(out: Tensor, leaves: list[Tensor]) -> bool:
    """Whether the graph of ``out`` reaches a tensor that requires grad other than
    ``leaves`` (e.g. weights that an ``rhs`` function uses directly): then the solve is not
    separable by rows."""
    own = {id(v) for v in leaves}
    seen, stack = set(), [out.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        variable = getattr(node, "variable", None)
        if variable is not None and id(variable) not in own:
            return True
        stack.extend(f for f, _ in node.next_functions)
    return False
