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

The same first derivatives predict the values at other parameters without a solve
(:func:`predicting_solves`): each recorded solve (:class:`SolveTangent`) hands out its amounts
again, and ``value_p`` becomes ``value_p(amounts) + G_p · (φ_p' - φ_p)`` — exact in everything
after the solve, first order in the change of the solve's parameters.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor

_ACTIVE: list[SolveLinearization] = []
_PREDICTING: list[SolvePrediction] = []


@dataclass
class SolveTangent:
    """One solve as :meth:`SolveLinearization.attach` differentiated it: its amounts (detached,
    rows first), the individual parameters φ it was solved from (detached), and
    ``G_p = ∂value_p/∂φ_p`` of each row for each of them (``grads``, shaped like ``params``)."""

    amounts: Tensor
    params: dict[str, Tensor]
    grads: dict[str, Tensor]


class SolveLinearization:
    """The solves recorded in one :func:`linearizing_solves` block."""

    def __init__(self) -> None:
        # (solve output with its graph, the detached output handed out, the detached
        # individual parameters it was solved from, the originals) per recorded solve
        self.solves: list[tuple[Tensor, Tensor, dict[str, Tensor], dict[str, Tensor]]] = []
        self.tangents: list[SolveTangent] = []  # the solves attach differentiated

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
            # the cotangent as a product: autograd.grad with grad_outputs imports sympy on its
            # first call (a third of a second of every process's first fit)
            contracted = (out * c).sum()
            grads = torch.autograd.grad(contracted, [leaves[k] for k in keys], allow_unused=True)
            used = {}
            for k, g in zip(keys, grads, strict=True):
                if g is not None:
                    phi = originals[k]
                    extra = extra + (g * (phi - phi.detach())).reshape(len(values), -1).sum(-1)
                    used[k] = g
            params = {k: leaves[k].detach() for k in used}
            self.tangents.append(SolveTangent(out.detach(), params, used))
        self.solves = []
        return values + extra


@contextmanager
def _opened(blocks: list, block):
    """``block`` as the innermost of the open ``blocks`` while the context lasts."""
    blocks.append(block)
    try:
        yield block
    finally:
        blocks.pop()


@contextmanager
def linearizing_solves() -> Iterator[SolveLinearization]:
    """Within this block, solves of dynamics that support it are recorded (module
    docstring); yields the :class:`SolveLinearization` whose ``attach`` completes the
    values built on them."""
    with _opened(_ACTIVE, SolveLinearization()) as lin:
        yield lin


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


class SolvePrediction:
    """The recorded solves of one :func:`predicting_solves` block, handed out in order."""

    def __init__(self, tangents: list[SolveTangent]) -> None:
        self.tangents = tangents
        self.taken = 0
        self.correction: Tensor | float = 0.0  # (N,) Σ G_p · (φ_p' - φ_p) of the solves taken

    def take(self, indiv: Mapping[str, object], n: int, shape: tuple) -> Tensor | None:
        """The amounts of the next recorded solve in place of a solve of ``n`` rows at the
        individual parameters ``indiv`` with amounts of ``shape``, its first-order change
        added to :attr:`correction`; None where it does not match (then nothing is taken)."""
        if self.taken >= len(self.tangents):
            return None
        tangent = self.tangents[self.taken]
        if tuple(tangent.amounts.shape) != tuple(shape) or any(
            not isinstance(indiv.get(k), Tensor) or indiv[k].shape != v.shape
            for k, v in tangent.params.items()
        ):
            return None
        self.taken += 1
        for k, g in tangent.grads.items():
            change = (g * (indiv[k].detach() - tangent.params[k])).reshape(n, -1).sum(-1)
            self.correction = self.correction + change
        return tangent.amounts


@contextmanager
def predicting_solves(tangents: list[SolveTangent]) -> Iterator[SolvePrediction]:
    """Within this block, solves of dynamics that support it are not made: the recorded
    ``tangents`` (of the same rows, in the same order) hand out their amounts instead and the
    yielded :class:`SolvePrediction` accumulates the first-order changes of the values
    (module docstring), to be added to the values built on those amounts."""
    with _opened(_PREDICTING, SolvePrediction(tangents)) as pred:
        yield pred


def predicting() -> SolvePrediction | None:
    """The innermost open :func:`predicting_solves` block, else None."""
    return _PREDICTING[-1] if _PREDICTING else None
