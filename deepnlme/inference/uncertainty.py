"""Standard errors of the declared parameters from the observed information of the objective.

The covariance of the raw (unconstrained) parameters is the inverse Hessian of the objective
(-log marginal likelihood, as in lme4/nlme and NONMEM's ``$COV MATRIX=R``). The Hessian is
taken by central differences of the analytic gradient (each gradient re-finds the modes from
warm starts), then symmetrized. Natural-scale standard errors follow by the delta method
through each parameter's domain transform: ``Cov(value) = J Cov(raw) Jᵀ``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from deepnlme.data.population import Population
from deepnlme.model.base import NLMEModel
from deepnlme.model.domains import Domain, Real
from deepnlme.model.params import Param

#: Condition number of the estimates' correlation matrix above which a warning is given
#: (NONMEM's rule of thumb: above 1000 the estimates are ill-conditioned).
MAX_CONDITION_NUMBER = 1e3
#: Relative standard error (SE / |estimate|) above which a warning is given.
MAX_RELATIVE_SE = 1.0
#: |raw value| beyond which a constrained parameter is reported at a boundary of its domain:
#: a log-scale value beyond 1e±8, a logit-scale value within 1e-8 of a bound.
BOUNDARY_RAW = math.log(1e8)


@dataclass
class ParameterCovariance:
    """Covariance of the free raw parameters and natural-scale standard errors by name."""

    names: list[str]  # declared parameter of each free raw scalar, (P,)
    raw_covariance: Tensor  # (P, P) inverse Hessian of the objective in the raw parameters
    se: dict[str, Tensor | None]  # natural-scale SE, shaped like each value; None when fixed
    min_eigenvalue: float  # of the Hessian: <= 0 means the fit is not at a strict minimum
    condition_number: float = math.nan  # of the raw estimates' correlation matrix (inf: not PD)


class _RawEntries:
    """The raw scalars that move the model: ``(raw tensor, flat positions)`` per parameter
    (a full covariance's raw upper triangle is unused and left out)."""

    def __init__(self, raws: list[Tensor], positions: list[Tensor]):
        self.raws, self.positions = raws, positions

    def get(self) -> Tensor:
        return torch.cat(
            [r.detach().reshape(-1)[i] for r, i in zip(self.raws, self.positions, strict=True)]
        )

    def set(self, flat: Tensor) -> None:
        start = 0
        with torch.no_grad():
            for r, i in zip(self.raws, self.positions, strict=True):
                r.view(-1)[i] = flat[start : start + i.numel()]
                start += i.numel()

    def gradient(self, estimator, pop: Population) -> Tensor:
        """∂ objective / ∂ (these entries) ``(P,)`` at the current parameters."""
        with torch.enable_grad():
            loss = estimator.loss(pop)
            grads = torch.autograd.grad(loss, self.raws, allow_unused=True)
        parts = [
            torch.zeros(i.numel(), dtype=r.dtype, device=r.device)
            if g is None
            else g.reshape(-1)[i]
            for r, i, g in zip(self.raws, self.positions, grads, strict=True)
        ]
        return torch.cat(parts)


def natural_jacobian(p: Param) -> tuple[Tensor, Tensor]:
    """``(J, used)``: J ``(value.numel(), len(used))`` = ∂ natural value / ∂ raw entries that
    move it; ``used`` their flat positions in ``p.raw``."""
    jac = torch.autograd.functional.jacobian(p.domain.to_natural, p.raw.detach())
    jac = jac.reshape(-1, p.raw.numel())  # (natural entries, raw entries)
    used = (jac != 0).any(0).nonzero().squeeze(-1)
    return jac[:, used], used


def free_raw_entries(
    model: NLMEModel, needs: str
) -> tuple[dict[str, Param], dict[str, Tensor], _RawEntries]:
    """``(free declared parameters, their natural Jacobians, their raw entries)``.

    Raises ValueError (``needs``, e.g. "standard errors need", starts the message) for a model
    with trainable weights besides its declared parameters.
    """
    extra = model.n_undeclared_parameters()
    if extra:
        raise ValueError(
            f"{needs} a model whose free parameters are all declared "
            f"(θ, Ω, σ); {type(model).__name__} has {extra} others"
        )
    free = {name: p for name, p in model.declared().items() if not p.fixed}
    jacobians, positions = {}, []
    for name, p in free.items():
        jacobians[name], used = natural_jacobian(p)
        positions.append(used)
    return free, jacobians, _RawEntries([p.raw for p in free.values()], positions)


def central_differences(entries: _RawEntries, fn: Callable[[], Tensor], step: float) -> Tensor:
    """∂ fn() / ∂ (raw entries) ``(*fn().shape, P)`` by central differences (2P calls of
    ``fn`` at shifted parameters, relative step ``step``). Restores the parameters."""
    flat = entries.get()
    columns = []
    try:
        for i in range(flat.numel()):
            h = step * max(1.0, abs(float(flat[i])))
            sides = []
            for sign in (1.0, -1.0):
                shifted = flat.clone()
                shifted[i] += sign * h
                entries.set(shifted)
                sides.append(fn())
            columns.append((sides[0] - sides[1]) / (2 * h))
    finally:
        entries.set(flat)
    return torch.stack(columns, -1)


def objective_hessian(estimator, pop: Population, entries: _RawEntries, step: float) -> Tensor:
    """Hessian ``(P, P)`` of the objective in the raw ``entries`` by central differences of
    its gradient (2P gradient evaluations), symmetrized. Restores the parameters."""
    hess = central_differences(entries, lambda: entries.gradient(estimator, pop), step)
    return 0.5 * (hess + hess.T)


def parameter_covariance(estimator, pop: Population, step: float = 1e-4) -> ParameterCovariance:
    """Inverse observed information of the declared parameters of ``estimator.model``.

    Only models whose free parameters are all declared (θ, Ω, σ; no network weights) are
    supported: raises ValueError otherwise. Where the Hessian is not positive definite the
    standard errors are NaN (a saddle or a boundary: no quadratic approximation there).
    """
    model: NLMEModel = estimator.model
    free, jacobians, entries = free_raw_entries(model, "standard errors need")
    declared, positions = model.declared(), entries.positions
    names = [name for name, i in zip(free, positions, strict=True) for _ in range(i.numel())]
    hess = objective_hessian(estimator, pop, entries, step)
    evals = torch.linalg.eigvalsh(hess)
    condition = math.inf
    if bool(evals.min() > 0):
        raw_cov = torch.cholesky_inverse(torch.linalg.cholesky(hess))
        scale = raw_cov.diagonal().rsqrt()
        corr_evals = torch.linalg.eigvalsh(scale[:, None] * raw_cov * scale[None, :])
        condition = float(corr_evals.max() / corr_evals.min())
    else:
        raw_cov = torch.full_like(hess, float("nan"))
    se: dict[str, Tensor | None] = {name: None for name in declared}
    start = 0
    for name, p in free.items():
        jac = jacobians[name]
        n = jac.shape[1]
        block = raw_cov[start : start + n, start : start + n]
        var = torch.einsum("ij,jk,ik->i", jac, block, jac)
        se[name] = var.clamp(min=0).sqrt().reshape(p.value().shape).detach()
        start += n
    return ParameterCovariance(names, raw_cov, se, float(evals.min()), condition)


def _num(value: float) -> str:
    return format(float(value), ".3g")


def shown(value: Tensor) -> str | list[str]:
    """A parameter's value for a message: 3 significant digits, a list for several."""
    value = value.detach()
    return _num(value) if value.numel() == 1 else [_num(v) for v in value.reshape(-1)]


def free_constrained(model: NLMEModel) -> dict[str, Param]:
    """The declared parameters of ``model`` that are fitted (not fixed) on a constrained
    domain (positive, bounded, covariance): those that can run off to a boundary."""
    if not hasattr(model, "declared"):
        return {}
    return {
        name: p
        for name, p in model.declared().items()
        if not p.fixed and type(p.domain) not in (Domain, Real)
    }


def boundary_warnings(model: NLMEModel) -> list[str]:
    """Free constrained parameters whose raw value has run beyond ±:data:`BOUNDARY_RAW`
    (estimates running off to a boundary of their domain: 0, infinity or a bound)."""
    out = []
    for name, p in free_constrained(model).items():
        raw = p.raw.detach()
        if bool((raw.abs() > BOUNDARY_RAW).any()):
            out.append(
                f"{name} = {shown(p.value())} has run off to a boundary of its domain "
                f"({p.domain.describe()}): the data may not determine it; fix it or simplify "
                "the model"
            )
    return out


def identifiability_warnings(
    model: NLMEModel, cov: ParameterCovariance | None = None
) -> list[str]:
    """Signs that the estimates are not identified: parameters at a boundary, and (from the
    covariance step ``cov`` when given) a Hessian that is not positive definite, a condition
    number above :data:`MAX_CONDITION_NUMBER`, or relative SEs above :data:`MAX_RELATIVE_SE`."""
    out = boundary_warnings(model)
    if cov is None:
        return out
    if not cov.min_eigenvalue > 0:
        out.append(
            "covariance step: the Hessian of the objective is not positive definite (smallest "
            f"eigenvalue {_num(cov.min_eigenvalue)}): the estimates are not at a strict minimum "
            "and have no standard errors"
        )
        return out
    if cov.condition_number > MAX_CONDITION_NUMBER:
        out.append(
            f"covariance step: condition number {_num(cov.condition_number)} of the estimates' "
            f"correlation matrix (above {MAX_CONDITION_NUMBER:.0f}): some parameters are "
            "nearly confounded"
        )
    values = model.param_values()
    for name, se in cov.se.items():
        if se is None:
            continue
        value = values[name].detach().reshape(-1)
        rse = se.reshape(-1) / value.abs()
        worst = rse.nan_to_num(nan=0.0).argmax()  # entries at 0 (off-diagonals) have none
        if float(value[worst]) != 0 and float(rse[worst]) > MAX_RELATIVE_SE:
            out.append(
                f"covariance step: {name} = {_num(value[worst])} has standard error "
                f"{_num(se.reshape(-1)[worst])} ({_num(100 * rse[worst])}% of the estimate): "
                "the data hardly determine it"
            )
    return out
