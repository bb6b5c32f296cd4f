"""The parameters of a formula model on their natural scale, for the estimators that sample or
integrate the random effects themselves (MCEM, VI), and the report of such a fit.

:class:`FormulaParameters` holds β, each random term's covariance as a log-Cholesky factor,
the residual SD (Gaussian, log scale) or the thresholds' unconstrained coordinates (ordinal),
as ``nn.Parameter`` s of one module (checkpointed with the fit). :class:`RowData` is the
family's view of the rows (ordinal: no intercept column, categories coded 0..K−1).
:func:`report_fit` evaluates the exact (Gaussian) or Laplace log-likelihood at the estimates,
so that every method is reported on the scale of ``method=ml`` / ``method=laplace``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from deepnlme.mixed import families
from deepnlme.mixed.design import MixedDesign
from deepnlme.mixed.glmm import LaplaceObjective, numerical_hessian
from deepnlme.mixed.lmm import ProfiledDeviance, fixef_covariance, gaussian_loglik
from deepnlme.mixed.result import MixedFit, conditional_modes


class RowData:
    """The rows of ``design`` as the family's likelihood reads them.

    Attributes:
        X: ``(N, p)`` fixed-effects design (ordinal: without the intercept, as clmm).
        y: ``(N,)`` response (ordinal: category codes 0..K−1).
        trials: ``(N,)`` binomial trials or None.
        names: fixed-effect names of X's columns.
        laplace: the family's Laplace objective (None for Gaussian models).
        scale: the Gaussian response is ``scale · y`` (``standardize``: y divided by its SD,
            so that every parameter is of order one for a stochastic optimizer); 1 otherwise.
    """

    def __init__(self, design: MixedDesign, family: str, link: str,
                 standardize: bool = False) -> None:
        self.design, self.family, self.link = design, family, link
        self.laplace = None if family == "gaussian" else LaplaceObjective(design, family, link)
        source = design if self.laplace is None else self.laplace
        self.X, self.y, self.names = source.X, source.y, list(
            design.fixef_names if self.laplace is None else self.laplace.names
        )
        self.scale = 1.0
        if standardize and self.laplace is None:
            self.scale = float(self.y.std()) or 1.0
            self.y = self.y / self.scale
        self.trials = design.trials
        self.categories = None if self.laplace is None else self.laplace.categories

    @property
    def n_alpha(self) -> int:
        return 0 if self.laplace is None else self.laplace.n_alpha

    def initial(self) -> dict[str, Any]:
        """Start: β by least squares (Gaussian) or the Laplace fit's start, covariance factors
        of SD half the residual SD (1 on the link scale), thresholds from the marginal
        category frequencies."""
        if self.laplace is None:
            X, y = self.X.cpu().numpy(), self.y.cpu().numpy()
            beta = np.linalg.lstsq(X, y, rcond=None)[0]
            scale = float(np.std(y - X @ beta))
            tau = np.zeros(0)
        else:
            phi = self.laplace.initial()
            p, k = self.laplace.p, self.laplace.n_alpha
            beta, tau, scale = phi[:p], phi[p : p + k], 1.0
        chol = []
        for t in self.design.terms:
            r, c = np.tril_indices(t.size)
            chol.append(np.where(r == c, math.log(0.5 * scale), 0.0))
        return {"beta": beta, "chol": chol, "log_sigma": math.log(scale), "tau": tau}


class FormulaParameters(nn.Module):
    """β ``(p,)``, term k's covariance factor by ``chol[k]`` (its lower triangle row-major,
    log of the diagonal), ``log_sigma`` (Gaussian) and ``tau`` (ordinal thresholds:
    ``α_1 = τ_1``, ``α_j = α_{j−1} + exp τ_j``)."""

    def __init__(self, rows: RowData, dtype: torch.dtype = torch.float64) -> None:
        super().__init__()
        self.family, self.link = rows.family, rows.link
        self.names = list(rows.names)
        self.sizes = [t.size for t in rows.design.terms]
        init = rows.initial()
        self.beta = nn.Parameter(torch.tensor(init["beta"], dtype=dtype))
        self.chol = nn.ParameterList(
            [nn.Parameter(torch.tensor(c, dtype=dtype)) for c in init["chol"]]
        )
        self.log_sigma = nn.Parameter(
            torch.tensor(init["log_sigma"], dtype=dtype), requires_grad=self.family == "gaussian"
        )
        tau = torch.tensor(init["tau"], dtype=dtype)
        self.tau = nn.Parameter(tau, requires_grad=bool(tau.numel()))
        for k, p in enumerate(self.sizes):
            self.register_buffer(f"tril_{k}", torch.tril_indices(p, p), persistent=False)

    @property
    def fitted(self) -> list[Tensor]:
        """The fitted tensors: β, the factors, log σ (Gaussian), τ (ordinal)."""
        out = [self.beta, *self.chol]
        if self.family == "gaussian":
            out.append(self.log_sigma)
        if self.tau.numel():
            out.append(self.tau)
        return out

    def factor(self, k: int, chol: Tensor | None = None) -> Tensor:
        """Term k's covariance Cholesky factor ``(p_k, p_k)`` (lower, positive diagonal)."""
        c = self.chol[k] if chol is None else chol
        p = self.sizes[k]
        r, s = getattr(self, f"tril_{k}")
        L = torch.zeros(p, p, dtype=c.dtype, device=c.device)
        return L.index_put((r, s), torch.where(r == s, torch.exp(c), c))

    def alpha(self, tau: Tensor | None = None) -> Tensor | None:
        """Increasing thresholds ``(K−1,)`` (ordinal) or None."""
        t = self.tau if tau is None else tau
        if not t.numel():
            return None
        return torch.cumsum(torch.cat([t[:1], torch.exp(t[1:])]), 0)

    def row_loglik(self, eta: Tensor, y: Tensor, trials: Tensor | None) -> Tensor:
        """``log p(y_i | η_i)`` ``(B,)``, all constants included."""
        if self.family == "gaussian":
            sigma2 = torch.exp(2 * self.log_sigma)
            r = y - eta
            return -0.5 * (torch.log(2 * math.pi * sigma2) + r * r / sigma2)
        return families.row_terms(
            self.family, self.link, eta, y, trials, self.alpha(), derivatives=False
        )[0]

    def prior_logpdf(self, b: Sequence[Tensor]) -> Tensor:
        """``Σ_k log N(b_k | 0, Σ_k)`` over all levels; ``b[k]`` is ``(n_k, p_k)``."""
        out = 0.0
        for k, bk in enumerate(b):
            L = self.factor(k)
            z = torch.linalg.solve_triangular(L, bk.T, upper=False)
            out = out - 0.5 * (z * z).sum() - bk.shape[0] * (
                torch.log(torch.diagonal(L)).sum() + 0.5 * bk.shape[1] * math.log(2 * math.pi)
            )
        return out


def report_fit(
    design: MixedDesign,
    rows: RowData,
    params: FormulaParameters,
    values: Sequence[Tensor],
    method: str,
    means: Sequence[Tensor],
    sds: Sequence[Tensor],
    se: bool,
    **fields: Any,
) -> MixedFit:
    """A :class:`MixedFit` of estimates ``values`` (:attr:`FormulaParameters.fitted` order)
    with the random effects' posterior ``means`` and ``sds`` (``[(n_k, p_k)]``).

    ``loglik`` is the exact (Gaussian) or Laplace log-likelihood at the estimates; ``se``:
    standard errors of β from the exact GLS covariance at (θ, σ) (Gaussian) or from the
    finite-difference Hessian of the Laplace objective at the estimates (the others).
    ``fields`` fill the remaining :class:`MixedFit` fields (converged, n_iter, message, ...).
    Estimates of a standardized response (``rows.scale``) are reported on the data's scale.
    """
    n_terms, c = len(design.terms), rows.scale
    beta = values[0].detach() * c
    factors = [c * params.factor(k, values[1 + k].detach()) for k in range(n_terms)]
    means, sds = [c * m for m in means], [c * s for s in sds]
    covariances = [(L @ L.T).cpu().numpy() for L in factors]
    se_beta = {n: float("nan") for n in rows.names}
    sigma, alpha, se_alpha = None, None, None
    with torch.no_grad():
        if rows.family == "gaussian":
            sigma = c * float(torch.exp(values[1 + n_terms]))
            theta = column_major(factors, sigma)
            loglik = gaussian_loglik(design, beta, sigma, theta)
            if se:
                vcov = fixef_covariance(ProfiledDeviance(design), theta, sigma**2)
                se_beta = dict(zip(rows.names, torch.sqrt(torch.diagonal(vcov)).tolist(),
                                   strict=True))
        else:
            tau = values[-1].detach() if rows.n_alpha else beta.new_zeros(0)
            theta = column_major(factors, 1.0)
            phi = torch.cat([beta, tau, theta])
            loglik = -float(rows.laplace(phi))
            alpha = rows.laplace.unpack(phi)[1]
    if se and rows.laplace is not None:
        phi_np = phi.cpu().numpy()
        try:
            cov_phi = np.linalg.inv(numerical_hessian(rows.laplace, phi_np, beta.device))
            p = rows.laplace.p
            se_beta = dict(zip(rows.names, np.sqrt(np.diag(cov_phi)[:p]).tolist(), strict=True))
            if alpha is not None:
                se_alpha = rows.laplace.threshold_se(phi_np, cov_phi).tolist()
        except np.linalg.LinAlgError:
            pass
    n_theta = sum(p * (p + 1) // 2 for p in params.sizes)
    n_params = len(rows.names) + n_theta + (1 if sigma is not None else 0) + rows.n_alpha
    extra = dict(fields.pop("extra", {}))
    if rows.categories:
        extra["categories"] = rows.categories
    return MixedFit(
        family=rows.family,
        link=rows.link,
        method=method,
        n_obs=design.n_obs,
        loglik=float(loglik),
        n_params=int(n_params),
        fixef=dict(zip(rows.names, beta.tolist(), strict=True)),
        se_fixef=se_beta,
        covariances=covariances,
        sigma=sigma,
        theta=theta.cpu().numpy(),
        modes=conditional_modes(design, list(means), [s * s for s in sds]),
        thresholds=None if alpha is None else alpha.tolist(),
        se_thresholds=se_alpha,
        extra=extra,
        **fields,
    )


def column_major(factors: Sequence[Tensor], scale: float) -> Tensor:
    """θ in lme4's order (each factor's lower triangle column by column) of ``L / scale``."""
    out = []
    for L in factors:
        p = L.shape[0]
        for c in range(p):
            for r in range(c, p):
                out.append(L[r, c] / scale)
    return torch.stack(out)
