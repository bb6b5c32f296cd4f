"""Covariance step: R⁻¹ or the sandwich R⁻¹SR⁻¹, on the natural scale of the parameter table.

NONMEM's names: R is the Hessian of the objective (-log marginal likelihood) in the
parameters, S = Σ_i g_i g_iᵀ the sum over subjects of the outer products of each subject's
gradient g_i = ∂(-log p(y_i))/∂θ. ``method="r"`` gives Cov = R⁻¹ (``$COV MATRIX=R``, lme4,
nlme); ``method="sandwich"`` gives Cov = R⁻¹SR⁻¹ (NONMEM's default, Pumas' ``infer``), robust
to a misspecified residual model. Both are computed in the raw (unconstrained) parameters
and carried to the natural scale by the delta method through each domain transform.

R comes from central differences of the objective's analytic gradient
(:func:`deepnlme.inference.uncertainty.objective_hessian`); the subject gradients g_i from
central differences of the per-subject log-likelihoods (2P evaluations, all subjects at once).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

from deepnlme.data.population import Population
from deepnlme.inference.uncertainty import (
    _RawEntries,
    central_differences,
    free_raw_entries,
    objective_hessian,
)
from deepnlme.model.base import NLMEModel
from deepnlme.model.domains import FullCovariance
from deepnlme.model.params import Param, RandomEffects

#: Covariance-step methods (config key ``diagnostics.covariance``).
METHODS = ("r", "sandwich")


@dataclass
class CovarianceStep:
    """Result of the covariance step; Q = number of estimated entries of the parameter table.

    ``labels``/``estimates``/``covariance``/``correlation`` follow the rows of
    :func:`table_entries` (free parameters only), on the natural scale. When the step fails
    ``status`` says why and the matrices are NaN.
    """

    method: str  # "r" or "sandwich"
    status: str  # "ok", or "failed: <reason>"
    labels: list[str]  # (Q,) e.g. "tvcl", "omega[cl,cl]"
    parameters: list[str]  # (Q,) declared parameter of each entry
    estimates: Tensor  # (Q,) natural-scale estimates
    covariance: Tensor  # (Q, Q) covariance of the estimates, natural scale
    se: dict[str, Tensor | None] = field(default_factory=dict)  # by parameter, shaped as value
    r_eigenvalues: Tensor | None = None  # (P,) eigenvalues of R (raw scale)

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    @property
    def min_eigenvalue(self) -> float:
        """Smallest eigenvalue of R (raw scale); NaN when R was not finite."""
        return math.nan if self.r_eigenvalues is None else float(self.r_eigenvalues[0])

    @property
    def correlation(self) -> Tensor:
        """Correlation matrix of the estimates ``(Q, Q)``."""
        sd = torch.diagonal(self.covariance).clamp(min=0).sqrt()
        return self.covariance / (sd[:, None] * sd[None, :])

    @property
    def eigenvalues(self) -> Tensor:
        """Eigenvalues ``(Q,)`` of the correlation matrix of the estimates (ascending; as
        NONMEM's ``PRINT=E``)."""
        corr = self.correlation
        if not bool(torch.isfinite(corr).all()):
            return torch.full((corr.shape[0],), math.nan, dtype=corr.dtype)
        return torch.linalg.eigvalsh(corr)

    @property
    def condition_number(self) -> float:
        """Largest / smallest eigenvalue of the correlation matrix (NaN when failed)."""
        ev = self.eigenvalues
        if ev.numel() == 0 or not bool(torch.isfinite(ev).all()):
            return math.nan
        return float(ev[-1] / ev[0]) if float(ev[0]) > 0 else math.inf

    def se_json(self) -> dict[str, float | list | None]:
        """Standard errors by declared parameter for results.json (None where fixed)."""
        return {n: None if v is None else v.cpu().tolist() for n, v in self.se.items()}


def table_index(p: Param) -> list[tuple[int, ...]]:
    """Positions of a parameter's value that appear in the parameter table: every entry of a
    scalar or vector; the diagonal of a diagonal Ω, the lower triangle of a full one."""
    shape = tuple(p.value().shape)
    index = list(itertools.product(*map(range, shape)))
    if isinstance(p, RandomEffects):
        full = isinstance(p.domain, FullCovariance)
        index = [(i, j) for i, j in index if i == j or (j < i and full)]
    return index


def entry_label(name: str, p: Param, index: tuple[int, ...]) -> str:
    """``name``, ``name[i]``, ``name[i,j]`` or ``omega[ka,cl]`` (η names) for one entry."""
    if not index:
        return name
    if isinstance(p, RandomEffects):
        index = (p.names[index[0]], p.names[index[1]])
    return f"{name}[{','.join(map(str, index))}]"


def subject_gradients(
    estimator, pop: Population, entries: _RawEntries, step: float = 1e-4
) -> Tensor:
    """g_i = ∂(-log p(y_i))/∂(raw entries), ``(N, P)``, by central differences of the
    per-subject log-likelihoods (2P batched evaluations, modes warm-started). Restores the
    parameters."""
    try:
        return central_differences(
            entries, lambda: -estimator.subject_loglik(pop, warm_start=True).detach(), step
        )
    finally:
        estimator.subject_loglik(pop, warm_start=True)  # modes back at the estimates


def covariance_step(
    estimator, pop: Population, method: str = "r", step: float = 1e-4
) -> CovarianceStep:
    """The covariance step of a fit at the current parameters of ``estimator.model``.

    Args:
        estimator: e.g. :class:`~deepnlme.inference.laplace.LaplaceEstimator` (``loss``,
            ``subject_loglik``).
        method: ``"r"`` (R⁻¹) or ``"sandwich"`` (R⁻¹SR⁻¹).
    Raises ValueError for an unknown method or a model with network weights (no table).
    A failed step (R not positive definite, S singular, non-finite values) is reported in
    ``status`` with NaN matrices, never raised.
    """
    if method not in METHODS:
        raise ValueError(f"covariance method must be one of {list(METHODS)} (got {method!r})")
    model: NLMEModel = estimator.model
    free, jacobians, entries = free_raw_entries(model, "a covariance step needs")
    declared, positions = model.declared(), entries.positions
    dtype = entries.get().dtype
    n_raw = sum(int(i.numel()) for i in positions)

    # Natural-scale Jacobian of the table entries (Q x P), and of all entries per parameter.
    labels, owners, estimates, rows = [], [], [], []
    start = 0
    for name, p in free.items():
        jac, value = jacobians[name], p.value().detach().reshape(-1)
        shape = tuple(p.value().shape)
        for index in table_index(p):
            flat = int(torch.tensor(index).dot(_strides(shape))) if index else 0
            row = torch.zeros(n_raw, dtype=dtype)
            row[start : start + jac.shape[1]] = jac[flat]
            labels.append(entry_label(name, p, index))
            owners.append(name)
            estimates.append(float(value[flat]))
            rows.append(row)
        start += jac.shape[1]
    big_j = torch.stack(rows) if rows else torch.zeros(0, n_raw, dtype=dtype)

    status, r_evals = "ok", None
    raw_cov = torch.full((n_raw, n_raw), math.nan, dtype=dtype)
    if n_raw == 0:
        status = "failed: no free parameters"
    else:
        hess = objective_hessian(estimator, pop, entries, step)
        if not bool(torch.isfinite(hess).all()):
            status = "failed: the R matrix (Hessian of the objective) is not finite"
        else:
            r_evals = torch.linalg.eigvalsh(hess)
            if not bool(r_evals[0] > 0):
                status = (
                    "failed: the R matrix is not positive definite (smallest eigenvalue "
                    f"{float(r_evals[0]):.3g}): not a strict minimum, or a parameter at a "
                    "boundary or not identifiable"
                )
            else:
                r_inv = torch.cholesky_inverse(torch.linalg.cholesky(hess))
                raw_cov = r_inv
                if method == "sandwich":
                    g = subject_gradients(estimator, pop, entries, step)
                    s = g.T @ g
                    s_evals = torch.linalg.eigvalsh(s)
                    if not bool(torch.isfinite(s).all()) or not bool(
                        s_evals[0] > s_evals[-1] * 1e-12
                    ):
                        status = "failed: the S matrix is singular"
                        raw_cov = torch.full_like(hess, math.nan)
                    else:
                        raw_cov = r_inv @ s @ r_inv
                        raw_cov = 0.5 * (raw_cov + raw_cov.T)
    covariance = big_j @ raw_cov @ big_j.T
    se: dict[str, Tensor | None] = {name: None for name in declared}
    start = 0
    for name, p in free.items():
        jac = jacobians[name]
        block = raw_cov[start : start + jac.shape[1], start : start + jac.shape[1]]
        var = torch.einsum("ij,jk,ik->i", jac, block, jac)
        se[name] = var.clamp(min=0).sqrt().reshape(p.value().shape).detach()
        start += jac.shape[1]
    return CovarianceStep(
        method,
        status,
        labels,
        owners,
        torch.tensor(estimates, dtype=dtype),
        covariance.detach(),
        se,
        r_evals,
    )


def _strides(shape: tuple[int, ...]) -> Tensor:
    """Row-major strides of ``shape`` as a long tensor."""
    strides = [1] * len(shape)
    for i in range(len(shape) - 2, -1, -1):
        strides[i] = strides[i + 1] * shape[i + 1]
    return torch.tensor(strides)
