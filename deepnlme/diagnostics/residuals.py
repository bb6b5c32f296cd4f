"""Conditional residuals (NONMEM's FOCE definitions), ETABAR and shrinkage.

With f_i(η) the mean and V_i(η) the residual variance of subject i's observations on the
scale where the error is Gaussian (DV, or log DV for log-normal error), η̂_i the mode and
G_i = ∂f_i/∂η at η̂_i (the FOCE linearization around η̂_i):

- CPRED_i = f_i(η̂_i) − G_i η̂_i, the linearized population mean;
- C_i = G_i Ω G_iᵀ + diag V_i, its covariance;
- CWRES_i = C_i^{-1/2} (y_i − CPRED_i), with the symmetric (eigenvalue) square root, NONMEM's
  default (``WRESCHOL`` off) (Hooker, Staatz & Karlsson 2007);
- CIWRES_i = (y_i − f_i(η̂_i)) / √V_i (the individual residual of the conditional estimates).

V is taken at η̂ when the estimator has η–ε interaction (FOCEI, Laplace) and at η = 0 when not
(FOCE), as the estimator does. Models whose ``derived`` returns a general Distribution
(no Gaussian scale) get NaN.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pandas as pd
import torch
from torch import Tensor

from deepnlme.data.population import Population
from deepnlme.inference.joint import NegLogJoint
from deepnlme.likelihood.residual import GaussianResidual
from deepnlme.model.base import NLMEModel


@dataclass
class ConditionalResiduals:
    """CPRED, CWRES and CIWRES ``(N, T)`` on the Gaussian scale (0 in padding)."""

    cpred: Tensor
    cwres: Tensor
    ciwres: Tensor


def omega_matrix(model: NLMEModel) -> Tensor:
    """Block-diagonal Ω ``(K, K)`` of all random-effect blocks."""
    return torch.block_diag(*[b.value() for b in model.random_effects()])


def foce_linearization(
    model: NLMEModel, pop: Population, eta: Tensor, interaction: bool = True
) -> tuple[Tensor, Tensor, Tensor, Tensor] | None:
    """``(y, f, G, V)`` at η̂ ``(N, K)``: g(DV), f(η̂) and V ``(N, T)``, G = ∂f/∂η
    ``(N, T, K)``; padding slots hold y = f and V = 1. None for non-Gaussian models."""
    joint = NegLogJoint(model, interaction)
    with torch.no_grad():
        dist = model.observe(eta.detach(), pop)
    if not isinstance(dist, GaussianResidual):
        return None
    variance0 = None if interaction else joint.population_variance(pop)
    with torch.enable_grad():
        terms, d_mean, _ = joint.gaussian_jacobians(eta.detach(), pop, variance0)
    y = dist.transform(pop.obs_dv_filled)
    mask = pop.obs_mask
    f = terms.mean.detach()
    y = torch.where(mask, y, f)
    return y, f, d_mean.detach() * mask[..., None], terms.variance.detach()


def conditional_residuals(
    model: NLMEModel, pop: Population, eta: Tensor, interaction: bool = True
) -> ConditionalResiduals:
    """CPRED, CWRES, CIWRES of every observation at the modes ``eta`` ``(N, K)`` (see the
    module docstring); all NaN for non-Gaussian residual models."""
    lin = foce_linearization(model, pop, eta, interaction)
    mask = pop.obs_mask
    if lin is None:
        nan = torch.full(mask.shape, math.nan, dtype=pop.obs_time.dtype)
        return ConditionalResiduals(nan, nan, nan)
    y, f, g, v = lin
    omega = omega_matrix(model).detach().to(y.dtype)
    eta = eta.detach()
    cpred = f - torch.einsum("ntk,nk->nt", g, eta)
    cov = g @ omega @ g.transpose(-1, -2) + torch.diag_embed(v)
    # padding: identity rows/columns, zero residual (the real block is unaffected)
    pad = ~mask
    cov = torch.where(pad[:, :, None] | pad[:, None, :], torch.zeros_like(cov), cov)
    cov = cov + torch.diag_embed(pad.to(cov.dtype))
    evals, evecs = torch.linalg.eigh(cov)
    inv_sqrt = evecs @ torch.diag_embed(evals.rsqrt()) @ evecs.transpose(-1, -2)
    r = torch.where(mask, y - cpred, torch.zeros_like(y))
    cwres = (inv_sqrt @ r.unsqueeze(-1)).squeeze(-1)
    ciwres = torch.where(mask, (y - f) / v.sqrt(), torch.zeros_like(y))
    return ConditionalResiduals(torch.where(mask, cpred, torch.zeros_like(y)), cwres, ciwres)


def etabar(model: NLMEModel, eta: Tensor) -> pd.DataFrame:
    """NONMEM's ETABAR test: per η, the mean of η̂, its SE (SD/√N, N in the SD, as NONMEM)
    and the two-sided p-value of the null hypothesis that the true mean is 0 (normal approximation,
    as NONMEM prints)."""
    eta = eta.detach().cpu().to(torch.float64)
    n = eta.shape[0]
    mean = eta.mean(0)
    se = eta.std(0, correction=0) / math.sqrt(n) if n > 1 else torch.full_like(mean, math.nan)
    z = mean / se
    p = torch.erfc(z.abs() / math.sqrt(2.0))
    return pd.DataFrame(
        {"eta": model.eta_names, "etabar": mean.numpy(), "se": se.numpy(),
         "n": n, "p_value": p.numpy()}
    )


def eta_shrinkage(model: NLMEModel, eta: Tensor) -> dict[str, float]:
    """SD-based η-shrinkage per η: 1 − SD(η̂)/ω (SD about the mean, N − 1; ω = √Ω_kk)."""
    eta = eta.detach().cpu().to(torch.float64)
    if eta.shape[0] < 2:
        return {name: math.nan for name in model.eta_names}
    sd = eta.std(0, correction=1)
    omega_sd = model.eta_sd().detach().cpu().to(torch.float64)
    return {n: float(1 - s / w) for n, s, w in zip(model.eta_names, sd, omega_sd, strict=True)}


def eps_shrinkage(iwres: Tensor, mask: Tensor) -> float:
    """SD-based ε-shrinkage: 1 − SD(IWRES) over all observations, the SD taken about 0
    (root mean square), as NONMEM's EPSSHRINKSD."""
    values = iwres.detach()[mask].to(torch.float64)
    return float(1 - values.pow(2).mean().sqrt()) if values.numel() > 0 else math.nan
