"""Standard errors of the declared parameters from the observed information of the objective.

The covariance of the raw (unconstrained) parameters is the inverse Hessian of the objective
(-log marginal likelihood, as in lme4/nlme and NONMEM's ``$COV MATRIX=R``). The Hessian is
taken by central differences of the analytic gradient (each gradient re-finds the modes from
warm starts), then symmetrized. Natural-scale standard errors follow by the delta method
through each parameter's domain transform: ``Cov(value) = J Cov(raw) Jᵀ``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from deepnlme.data.population import Population
from deepnlme.model.base import NLMEModel


@dataclass
class ParameterCovariance:
    """Covariance of the free raw parameters and natural-scale standard errors by name."""

    names: list[str]  # declared parameter of each free raw scalar, (P,)
    raw_covariance: Tensor  # (P, P) inverse Hessian of the objective in the raw parameters
    se: dict[str, Tensor | None]  # natural-scale SE, shaped like each value; None when fixed
    min_eigenvalue: float  # of the Hessian: <= 0 means the fit is not at a strict minimum


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


def objective_hessian(estimator, pop: Population, entries: _RawEntries, step: float) -> Tensor:
    """Hessian ``(P, P)`` of the objective in the raw ``entries`` by central differences of
    its gradient (2P gradient evaluations), symmetrized. Restores the parameters."""
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
                sides.append(entries.gradient(estimator, pop))
            columns.append((sides[0] - sides[1]) / (2 * h))
    finally:
        entries.set(flat)
    hess = torch.stack(columns, -1)
    return 0.5 * (hess + hess.T)


def parameter_covariance(estimator, pop: Population, step: float = 1e-4) -> ParameterCovariance:
    """Inverse observed information of the declared parameters of ``estimator.model``.

    Only models whose free parameters are all declared (θ, Ω, σ; no network weights) are
    supported: raises ValueError otherwise. Where the Hessian is not positive definite the
    standard errors are NaN (a saddle or a boundary: no quadratic approximation there).
    """
    model: NLMEModel = estimator.model
    extra = model.n_undeclared_parameters()
    if extra:
        raise ValueError(
            "standard errors need a model whose free parameters are all declared "
            f"(θ, Ω, σ); {type(model).__name__} has {extra} others"
        )
    declared = model.declared()
    free = {name: p for name, p in declared.items() if not p.fixed}
    jacobians, positions = {}, []
    for name, p in free.items():
        jac = torch.autograd.functional.jacobian(p.domain.to_natural, p.raw.detach())
        jac = jac.reshape(-1, p.raw.numel())  # (natural entries, raw entries)
        used = (jac != 0).any(0).nonzero().squeeze(-1)
        jacobians[name] = jac[:, used]
        positions.append(used)
    entries = _RawEntries([p.raw for p in free.values()], positions)
    names = [name for name, i in zip(free, positions, strict=True) for _ in range(i.numel())]
    hess = objective_hessian(estimator, pop, entries, step)
    evals = torch.linalg.eigvalsh(hess)
    if bool(evals.min() > 0):
        raw_cov = torch.cholesky_inverse(torch.linalg.cholesky(hess))
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
    return ParameterCovariance(names, raw_cov, se, float(evals.min()))
