"""Formula mixed models by MCEM with an HMC E-step (:mod:`deepnlme.inference.mcem`).

The latents are the random effects on their natural scale, all terms concatenated; after each
E-step the sampled mean of every random column that is also a fixed effect is moved into that
fixed effect (parameter expansion, PX-EM: EM alone barely moves the intercept against the
mean of a few well-measured group effects, such as InstEval's 14 departments); the
parameters are β, each term's covariance by log-Cholesky, the residual SD (Gaussian, on the
log scale: estimated, not fixed at 1) or the thresholds (ordinal). The fit is reported with the
exact (Gaussian) or Laplace log-likelihood at the MCEM estimates, so that it compares with
``method=ml`` / ``method=laplace`` on one scale; conditional modes are the posterior means of
the sampled effects and their SDs the posterior SDs.
"""

from __future__ import annotations

import math
import time

import numpy as np
import torch

from deepnlme.inference.mcem import MCEMOptions, mcem
from deepnlme.mixed import families
from deepnlme.mixed.design import MixedDesign
from deepnlme.mixed.glmm import LaplaceObjective
from deepnlme.mixed.lmm import gaussian_loglik
from deepnlme.mixed.result import MixedFit, conditional_modes


class FormulaLogJoint:
    """``log p(y, b | params)`` of a formula model; ``b`` is ``(D,)`` (terms concatenated)."""

    def __init__(self, design: MixedDesign, family: str, link: str) -> None:
        self.design, self.family, self.link = design, family, link
        dtype, device = design.X.dtype, design.X.device
        self.laplace = None if family == "gaussian" else LaplaceObjective(design, family, link)
        self.X = design.X if self.laplace is None else self.laplace.X
        self.y = design.y if self.laplace is None else self.laplace.y
        self.names = design.fixef_names if self.laplace is None else self.laplace.names
        init = self._initial()
        self.beta = torch.tensor(init["beta"], dtype=dtype, device=device, requires_grad=True)
        self.chol = [
            torch.tensor(c, dtype=dtype, device=device, requires_grad=True) for c in init["chol"]
        ]
        self.log_sigma = torch.tensor(
            init["log_sigma"], dtype=dtype, device=device, requires_grad=family == "gaussian"
        )
        self.tau = torch.tensor(init["tau"], dtype=dtype, device=device, requires_grad=True)
        self.tril = [torch.tril_indices(t.size, t.size, device=device) for t in design.terms]
        self.sizes = [t.n_levels * t.size for t in design.terms]
        self._means: dict[tuple[int, int], float] = {}

    def _initial(self) -> dict:
        if self.laplace is None:
            X, y = self.X.cpu().numpy(), self.y.cpu().numpy()
            beta = np.linalg.lstsq(X, y, rcond=None)[0]
            scale = float(np.std(y - X @ beta))
            tau = np.zeros(0)
        else:
            phi = self.laplace.initial()
            beta, tau = (
                phi[: self.laplace.p],
                phi[self.laplace.p : self.laplace.p + self.laplace.n_alpha],
            )
            scale = 1.0
        chol = []
        for t in self.design.terms:
            r, c = np.tril_indices(t.size)
            chol.append(np.where(r == c, math.log(0.5 * scale), 0.0))
        return {"beta": beta, "chol": chol, "log_sigma": math.log(scale), "tau": tau}

    @property
    def params(self) -> list[torch.Tensor]:
        out = [self.beta, *self.chol]
        if self.family == "gaussian":
            out.append(self.log_sigma)
        if self.tau.numel():
            out.append(self.tau)
        return out

    def factor(self, k: int, chol: torch.Tensor | None = None) -> torch.Tensor:
        """Term k's covariance Cholesky factor (lower, positive diagonal)."""
        t = self.design.terms[k]
        c = self.chol[k] if chol is None else chol
        L = torch.zeros(t.size, t.size, dtype=c.dtype, device=c.device)
        r, s = self.tril[k]
        return L.index_put((r, s), torch.where(r == s, torch.exp(c), c))

    def split(self, b: torch.Tensor) -> list[torch.Tensor]:
        return [
            x.reshape(t.n_levels, t.size)
            for x, t in zip(torch.split(b, self.sizes), self.design.terms, strict=True)
        ]

    #: Smoothing of the sampled group means, and the share of the smoothed mean moved per
    #: iteration: small, so that the chain's spread along the moved direction (part of the
    #: variance estimate) is kept while the drift that EM alone is slow to remove goes.
    recenter_smoothing = 0.05
    recenter_gain = 0.05

    def recenter(self, b: torch.Tensor) -> torch.Tensor:
        """PX-EM step: each random-effect column that is also a fixed effect (``(Intercept)``,
        a random slope's covariate) has a share of its smoothed sampled mean moved into that
        fixed effect (the likelihood is unchanged)."""
        parts = []
        for k, (t, bk) in enumerate(zip(self.design.terms, self.split(b), strict=True)):
            bk = bk.clone()
            for j, name in enumerate(t.names):
                if name in self.names:
                    key = (k, j)
                    ema = self._means.get(key, 0.0)
                    ema = (1 - self.recenter_smoothing) * ema + self.recenter_smoothing * float(
                        bk[:, j].mean()
                    )
                    shift = self.recenter_gain * ema
                    self._means[key] = ema - shift
                    bk[:, j] -= shift
                    self.beta[self.names.index(name)] += shift
            parts.append(bk.reshape(-1))
        return torch.cat(parts)

    def __call__(self, b: torch.Tensor, batch=None) -> torch.Tensor:
        eta = self.X @ self.beta
        prior = 0.0
        for k, (t, bk) in enumerate(zip(self.design.terms, self.split(b), strict=True)):
            eta = eta + (t.values * bk[t.index]).sum(-1)
            L = self.factor(k)
            z = torch.linalg.solve_triangular(L, bk.T, upper=False)
            prior = (
                prior
                - 0.5 * (z * z).sum()
                - t.n_levels
                * (torch.log(torch.diagonal(L)).sum() + 0.5 * t.size * math.log(2 * math.pi))
            )
        if self.family == "gaussian":
            sigma2 = torch.exp(2 * self.log_sigma)
            r = self.y - eta
            ll = -0.5 * (len(r) * torch.log(2 * math.pi * sigma2) + (r * r).sum() / sigma2)
        else:
            alpha = (
                self.laplace.unpack(torch.cat([self.beta, self.tau]))[1]
                if self.tau.numel()
                else None
            )
            ll = families.row_terms(
                self.family, self.link, eta, self.y, self.design.trials, alpha, derivatives=False
            )[0].sum()
        return ll + prior


def fit_mcem(design: MixedDesign, family: str, link: str | None, options: MCEMOptions) -> MixedFit:
    """MCEM-HMC fit of a formula model, reported with the exact/Laplace log-likelihood."""
    link = "identity" if family == "gaussian" else families.check_family(family, link)
    start = time.perf_counter()
    joint = FormulaLogJoint(design, family, link)
    latents = torch.zeros(sum(joint.sizes), dtype=design.X.dtype, device=design.X.device)
    result = mcem(joint, latents, joint.params, options=options, recenter=joint.recenter)
    fit_seconds = time.perf_counter() - start
    avg = result.params
    beta = avg[0]
    factors = [joint.factor(k, avg[1 + k]) for k in range(len(design.terms))]
    covariances = [L @ L.T for L in factors]
    sigma = None
    with torch.no_grad():
        if family == "gaussian":
            sigma = float(torch.exp(avg[1 + len(factors)]))
            theta = _column_major(factors, sigma)
            loglik = gaussian_loglik(design, beta, sigma, theta)
            alpha = None
        else:
            tau = avg[-1] if joint.tau.numel() else beta.new_zeros(0)
            theta = _column_major(factors, 1.0)
            phi = torch.cat([beta, tau, theta])
            loglik = -float(joint.laplace(phi))
            alpha = joint.laplace.unpack(phi)[1]
    modes, sds = joint.split(result.latent_mean), joint.split(result.latent_sd)
    n_theta = sum(t.size * (t.size + 1) // 2 for t in design.terms)
    n_params = len(joint.names) + n_theta + (1 if family == "gaussian" else 0) + joint.tau.numel()
    return MixedFit(
        family=family,
        link=link,
        method="mcem",
        n_obs=design.n_obs,
        loglik=float(loglik),
        n_params=int(n_params),
        fixef=dict(zip(joint.names, beta.tolist(), strict=True)),
        se_fixef={n: float("nan") for n in joint.names},
        covariances=[c.detach().cpu().numpy() for c in covariances],
        sigma=sigma,
        theta=theta.cpu().numpy(),
        modes=conditional_modes(design, modes, [s * s for s in sds]),
        converged=bool(np.isfinite(result.trace[-1])),
        grad_max=float("nan"),
        n_iter=options.n_iter,
        n_eval=options.n_iter * (options.n_leapfrog + 2),
        message=(
            f"MCEM-HMC: {options.n_iter} iterations, acceptance {result.accept_rate:.2f}, "
            f"step size {result.step_size:.4g}"
        ),
        thresholds=None if alpha is None else alpha.tolist(),
        extra={"fit_seconds": fit_seconds, "hmc_accept_rate": result.accept_rate},
    )


def _column_major(factors: list[torch.Tensor], scale: float) -> torch.Tensor:
    """θ in lme4's order (each factor's lower triangle column by column) of ``L / scale``."""
    out = []
    for L in factors:
        p = L.shape[0]
        for c in range(p):
            for r in range(c, p):
                out.append(L[r, c] / scale)
    return torch.stack(out)
