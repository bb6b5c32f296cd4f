"""Generalized and ordinal mixed models by the Laplace approximation (glmer, ordinal::clmm).

For fixed effects β, thresholds α (ordinal) and relative covariance factors θ, the joint mode
``u*`` of all random effects maximises ``h(u) = Σ_i log p(y_i | η_i) − ½‖u‖²`` with
``η = Xβ + ZΛu``; crossed effects do not split by subject, so the Newton steps solve with the
joint Hessian ``H = Λ'Z'WZΛ + I`` (``W = −∂² log p/∂η²``) through the blocked factor of
:mod:`deepnlme.mixed.blocked`. The Laplace objective is

``F = −Σ log p(y | η(u*)) + ½‖u*‖² + ½ log|H(u*)|``  (``loglik = −F``).

Its gradient in (β, α, θ) comes from one differentiable Newton step from the converged mode
(``u₁ = u* + H⁻¹∇h``, which equals ``u*`` in value and has the implicit-function derivative),
with ``F`` evaluated at ``u₁``. Standard errors: inverse of the finite-difference Hessian of
``F`` (as lme4's default for glmer).
"""

from __future__ import annotations

import time

import numpy as np
import torch

from deepnlme.mixed import families
from deepnlme.mixed.covariance import RelativeCovariance
from deepnlme.mixed.design import MixedDesign
from deepnlme.mixed.optimizer import OptimResult, minimize_bounded
from deepnlme.mixed.random_effects import RandomDesign, natural_scale
from deepnlme.mixed.result import MixedFit, conditional_modes


def ordinal_codes(y: torch.Tensor) -> tuple[torch.Tensor, list[float]]:
    """Ordinal response as 0-based category codes and the sorted category values."""
    values = torch.unique(y).tolist()
    codes = torch.searchsorted(torch.as_tensor(values, dtype=y.dtype, device=y.device), y)
    return codes.to(y.dtype), values


class LaplaceObjective:
    """``φ = [β, τ, θ] -> F`` (the negative Laplace log-likelihood), differentiable.

    For ordinal models τ are the thresholds' unconstrained coordinates (``α_1 = τ_1``,
    ``α_j = α_{j−1} + exp τ_j``) and X has no intercept column (as clmm).
    """

    def __init__(
        self,
        design: MixedDesign,
        family: str,
        link: str,
        inner_tol: float = 1e-10,
        inner_max_iter: int = 50,
    ) -> None:
        self.design, self.family, self.link = design, family, link
        self.random = RandomDesign(design)
        self.cov = RelativeCovariance(self.random.sizes)
        self.X, self.names = design.X, list(design.fixef_names)
        self.y, self.trials = design.y, design.trials
        self.categories: list[float] | None = None
        if family == "ordinal":
            keep = [i for i, n in enumerate(self.names) if n != "(Intercept)"]
            self.X, self.names = self.X[:, keep], [self.names[i] for i in keep]
            self.y, self.categories = ordinal_codes(design.y)
        self.p = self.X.shape[1]
        self.n_alpha = 0 if self.categories is None else len(self.categories) - 1
        self.inner_tol, self.inner_max_iter = inner_tol, inner_max_iter
        self.u = [
            torch.zeros(t.n_levels, t.size, dtype=self.X.dtype, device=self.X.device)
            for t in design.terms
        ]
        self.inner_failures = 0

    # ---------------------------------------------------------------------- parameters
    @property
    def n_phi(self) -> int:
        return self.p + self.n_alpha + self.cov.n_theta

    def unpack(self, phi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        beta = phi[: self.p]
        alpha = None
        if self.n_alpha:
            tau = phi[self.p : self.p + self.n_alpha]
            alpha = torch.cumsum(torch.cat([tau[:1], torch.exp(tau[1:])]), 0)
        return beta, alpha, phi[self.p + self.n_alpha :]

    def initial(self) -> np.ndarray:
        beta = np.zeros(self.p)
        tau = np.zeros(0)
        y = self.y.detach().cpu().numpy()
        if self.family == "ordinal":
            counts = np.bincount(y.astype(int), minlength=self.n_alpha + 1)
            cum = np.cumsum(counts)[:-1] / counts.sum()
            cum = np.clip(cum, 1e-4, 1 - 1e-4)
            alpha = np.log(cum / (1 - cum)) if self.link == "logit" else _probit(cum)
            tau = np.concatenate([alpha[:1], np.log(np.maximum(np.diff(alpha), 1e-3))])
        elif "(Intercept)" in self.names:
            if self.family == "binomial":
                p = np.clip(y.sum() / self.trials.cpu().numpy().sum(), 1e-3, 1 - 1e-3)
                beta[self.names.index("(Intercept)")] = np.log(p / (1 - p))
            else:
                beta[self.names.index("(Intercept)")] = np.log(max(y.mean(), 1e-3))
        return np.concatenate([beta, tau, self.cov.initial()])

    def lower_bounds(self) -> np.ndarray:
        return np.concatenate([np.full(self.p + self.n_alpha, -np.inf), self.cov.lower_bounds()])

    def threshold_se(self, phi: np.ndarray, cov_phi: np.ndarray) -> np.ndarray:
        """Standard errors ``(K−1,)`` of the thresholds α from the covariance of φ (delta
        method through ``α(τ)``: invariant to the parameterisation at the optimum, so they
        equal ``ordinal::clmm``'s, which are taken over α directly)."""
        p, k = self.p, self.n_alpha
        tau = torch.as_tensor(phi[p : p + k], dtype=torch.float64)
        J = torch.autograd.functional.jacobian(
            lambda t: torch.cumsum(torch.cat([t[:1], torch.exp(t[1:])]), 0), tau
        ).numpy()
        cov_alpha = J @ cov_phi[p : p + k, p : p + k] @ J.T
        return np.sqrt(np.clip(np.diag(cov_alpha), 0.0, None))

    # --------------------------------------------------------------------------- pieces
    def _rows(self, eta: torch.Tensor, alpha: torch.Tensor | None, derivatives: bool = True):
        return families.row_terms(
            self.family, self.link, eta, self.y, self.trials, alpha, derivatives
        )

    def _penalised(self, beta, alpha, factors, u) -> torch.Tensor:
        eta = self.X @ beta + self.random.linear_predictor(factors, u)
        ll = self._rows(eta, alpha, derivatives=False)[0]
        return -(ll.sum() - 0.5 * sum((uk * uk).sum() for uk in u))

    def newton_step(self, beta, alpha, factors, u):
        """``(Newton step, factor, h)`` at ``u`` (one factorisation)."""
        eta = self.X @ beta + self.random.linear_predictor(factors, u)
        ll, d1, d2 = self._rows(eta, alpha)
        grad = [g - uk for g, uk in zip(self.random.crossprod(factors, d1), u, strict=True)]
        factor = self.random.factorize(factors, weights=-d2)
        step = self.random.solve(factor, grad)
        value = -(ll.sum() - 0.5 * sum((uk * uk).sum() for uk in u))
        return step, factor, value

    @torch.no_grad()
    def mode(self, beta, alpha, factors) -> list[torch.Tensor]:
        """Joint conditional mode ``u*`` by damped Newton from the previous mode."""
        u = [uk.clone() for uk in self.u]
        for _ in range(self.inner_max_iter):
            step, _, value = self.newton_step(beta, alpha, factors, u)
            size = max(float(s.abs().max()) for s in step)
            t = 1.0
            while True:
                trial = [uk + t * sk for uk, sk in zip(u, step, strict=True)]
                new = self._penalised(beta, alpha, factors, trial)
                if torch.isfinite(new) and new <= value + 1e-10 * abs(float(value)):
                    break
                t *= 0.5
                if t < 1e-8:
                    trial = u
                    break
            u = trial
            if size * t < self.inner_tol or t < 1e-8:
                break
        else:
            self.inner_failures += 1
        if all(torch.isfinite(uk).all() for uk in u):
            self.u = u
        return u

    def __call__(self, phi: torch.Tensor) -> torch.Tensor:
        beta, alpha, theta = self.unpack(phi)
        factors = self.cov.factors(theta)
        u_star = self.mode(
            beta.detach(), None if alpha is None else alpha.detach(), [T.detach() for T in factors]
        )
        step, _, _ = self.newton_step(beta, alpha, factors, u_star)
        u1 = [uk + sk for uk, sk in zip(u_star, step, strict=True)]
        eta = self.X @ beta + self.random.linear_predictor(factors, u1)
        ll, _, d2 = self._rows(eta, alpha)
        factor = self.random.factorize(factors, weights=-d2)
        penalty = 0.5 * sum((uk * uk).sum() for uk in u1)
        return -ll.sum() + penalty + 0.5 * factor.logdet_random()


def _probit(p: np.ndarray) -> np.ndarray:
    from scipy.stats import norm

    return norm.ppf(p)


def numerical_hessian(objective, x: np.ndarray, device, rel_step: float = 1e-4) -> np.ndarray:
    """Central differences of the autograd gradient, symmetrised."""

    def grad(v: np.ndarray) -> np.ndarray:
        t = torch.tensor(v, dtype=torch.float64, device=device, requires_grad=True)
        (g,) = torch.autograd.grad(objective(t), t)
        return g.detach().cpu().numpy()

    n = len(x)
    H = np.zeros((n, n))
    for i in range(n):
        h = rel_step * max(1.0, abs(x[i]))
        e = np.zeros(n)
        e[i] = h
        H[:, i] = (grad(x + e) - grad(x - e)) / (2 * h)
    return 0.5 * (H + H.T)


def fit_glmm(
    design: MixedDesign,
    family: str,
    link: str | None = None,
    max_iter: int = 500,
    gtol: float = 1e-5,
    se: bool = True,
) -> MixedFit:
    """Fit a binomial, Poisson or ordinal mixed model by Laplace; a :class:`MixedFit`."""
    link = families.check_family(family, link)
    start = time.perf_counter()
    objective = LaplaceObjective(design, family, link)
    opt = minimize_bounded(objective, objective.initial(), objective.lower_bounds(),
                           design.y.device, max_iter=max_iter, gtol=gtol)
    return glmm_result(design, objective, opt, se, time.perf_counter() - start)


def glmm_result(
    design: MixedDesign, objective: LaplaceObjective, opt: OptimResult, se: bool,
    fit_seconds: float,
) -> MixedFit:
    """The fit at the minimiser ``opt.x`` (φ) of ``objective``: modes, standard errors."""
    family, link, device = objective.family, objective.link, design.y.device
    phi = torch.as_tensor(opt.x, dtype=torch.float64, device=device)
    with torch.no_grad():
        beta, alpha, theta = objective.unpack(phi)
        factors = objective.cov.factors(theta)
        u = objective.mode(beta, alpha, factors)
        _, factor, _ = objective.newton_step(beta, alpha, factors, u)
        F = float(objective(phi))
        var_u = objective.random.conditional_variances(factor)
        b, var_b = natural_scale(factors, u, var_u, 1.0)
        covariances = [(T @ T.T).cpu().numpy() for T in factors]
    se_beta = {n: float("nan") for n in objective.names}
    se_alpha = None if alpha is None else [float("nan")] * len(alpha)
    if se:
        H = numerical_hessian(objective, opt.x, device)
        try:
            cov_phi = np.linalg.inv(H)
        except np.linalg.LinAlgError:
            cov_phi = None
        if cov_phi is not None:
            se_beta = dict(
                zip(objective.names, np.sqrt(np.diag(cov_phi)[: objective.p]).tolist(), strict=True)
            )
            if alpha is not None:
                se_alpha = objective.threshold_se(opt.x, cov_phi).tolist()
    return MixedFit(
        family=family,
        link=link,
        method="laplace",
        n_obs=design.n_obs,
        loglik=-F,
        n_params=objective.n_phi,
        fixef=dict(zip(objective.names, beta.cpu().tolist(), strict=True)),
        se_fixef=se_beta,
        covariances=covariances,
        sigma=None,
        theta=opt.x[objective.p + objective.n_alpha :],
        modes=conditional_modes(design, b, var_b),
        converged=bool(opt.success or opt.grad_max < 1e-3)
        and opt.grad_max < 1e-2
        and objective.inner_failures == 0,
        grad_max=opt.grad_max,
        n_iter=opt.n_iter,
        n_eval=opt.n_eval,
        message=opt.message,
        thresholds=None if alpha is None else alpha.cpu().tolist(),
        se_thresholds=se_alpha,
        extra={"fit_seconds": fit_seconds, "categories": objective.categories}
        if objective.categories
        else {"fit_seconds": fit_seconds},
    )
