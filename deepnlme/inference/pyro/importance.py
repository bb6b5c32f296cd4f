"""Marginal log-likelihood by importance sampling, for any NLME model at fixed parameters.

For each subject i, with a proposal q_i(η) (a multivariate Student-t centred on the mode η̂_i
with scale from the Hessian there, or on a guide's q(η_i) — then mixed half and half with the
former, a defensive component),

    p(y_i) = E_q[ p(y_i | η) p(η) / q_i(η) ]  ≈  (1/S) Σ_s w_is,

and the log of the mean is reported with its Monte Carlo standard error (delta method:
SE(log mean w) ≈ sd(w) / (mean(w) · √S); subjects are independent so variances add).
All subjects are evaluated at once: each chunk of samples is a batch of S_c·N rows.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from deepnlme.data.population import Population
from deepnlme.inference.inner import InnerOptions, absolute_eigenvalues, find_modes
from deepnlme.inference.joint import NegLogJoint
from deepnlme.model.base import NLMEModel

#: At most this many (sample, subject) rows per model evaluation.
MAX_ROWS = 100_000


@dataclass
class ImportanceResult:
    """Importance-sampling estimate of the marginal log-likelihood."""

    loglik: float  # Σ_i log p̂(y_i)
    se: float  # its Monte Carlo standard error
    subject_loglik: Tensor  # (N,) log p̂(y_i)
    subject_se: Tensor  # (N,) Monte Carlo SE of each log p̂(y_i)
    ess: Tensor  # (N,) effective sample size of each subject's weights

    def summary(self) -> dict[str, float]:
        """``loglik_is``, ``loglik_is_se`` (results.json keys)."""
        return {"loglik_is": self.loglik, "loglik_is_se": self.se}


def mode_proposal(
    model: NLMEModel, pop: Population, eta: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """``(loc, scale_tril)`` ``(N, K)``, ``(N, K, K)``: each subject's mode η̂ and the
    Cholesky factor of the inverse Hessian of l_i there (the Laplace approximation of the
    posterior of η_i). Modes are searched from ``eta`` (default η = 0)."""
    joint = NegLogJoint(model)
    start = pop.obs_time.new_zeros(len(pop), model.n_eta) if eta is None else eta.detach()
    with torch.no_grad():
        result = find_modes(joint, start, pop, options=InnerOptions(gtol=1e-6))
    hess = absolute_eigenvalues(result.hessian.detach())
    cov = torch.cholesky_inverse(torch.linalg.cholesky(hess))
    return result.eta.detach(), torch.linalg.cholesky(0.5 * (cov + cov.transpose(-1, -2)))


def _student_t(
    loc: Tensor, scale_tril: Tensor, df: float, n: int, generator: torch.Generator
) -> tuple[Tensor, Tensor]:
    """``n`` draws ``(n, N, K)`` of multivariate t(df, loc, scale_tril Lᵀ) and their log
    densities ``(n, N)``."""
    z = torch.randn((n, *loc.shape), generator=generator, dtype=loc.dtype)
    chi2 = 2.0 * torch._standard_gamma(
        torch.full((n, loc.shape[0], 1), df / 2.0, dtype=loc.dtype), generator=generator
    )
    z, chi2 = z.to(loc.device), chi2.to(loc.device)
    eta = loc + torch.einsum("nkj,snj->snk", scale_tril, z) * torch.sqrt(df / chi2)
    # log density of the standardized point u = L⁻¹(η - loc): t with identity scale
    maha = (z * z).sum(-1) * (df / chi2[..., 0])
    return eta, _t_log_density(maha, scale_tril, df)


def _t_log_density(maha: Tensor, scale_tril: Tensor, df: float) -> Tensor:
    """Log density of multivariate t(df, loc, scale_tril Lᵀ) at points whose squared
    Mahalanobis distance ``|L⁻¹(η - loc)|²`` is ``maha`` ``(S, N)``; ``scale_tril``
    ``(N, K, K)``."""
    k = scale_tril.shape[-1]
    logdet = torch.log(torch.diagonal(scale_tril, dim1=-2, dim2=-1)).sum(-1)
    return (
        math.lgamma((df + k) / 2.0)
        - math.lgamma(df / 2.0)
        - 0.5 * k * math.log(df * math.pi)
        - logdet
        - 0.5 * (df + k) * torch.log1p(maha / df)
    )


def _student_t_log_prob(eta: Tensor, loc: Tensor, scale_tril: Tensor, df: float) -> Tensor:
    """Log density ``(S, N)`` of draws ``eta`` ``(S, N, K)`` under the multivariate t(df,
    loc ``(N, K)``, scale_tril ``(N, K, K)``) of each subject."""
    diff = (eta - loc).unsqueeze(-1)  # (S, N, K, 1)
    u = torch.linalg.solve_triangular(scale_tril.expand(eta.shape[0], -1, -1, -1), diff,
                                      upper=False)[..., 0]
    return _t_log_density((u * u).sum(-1), scale_tril, df)


def _mixture_draws(
    components: list[tuple[Tensor, Tensor]], df: float, n: int, generator: torch.Generator
) -> tuple[Tensor, Tensor]:
    """``n`` draws ``(n, N, K)``, an equal share from each t component (stratified), and
    their log density under the equal-weight mixture ``(n, N)`` (the balance heuristic of
    multiple importance sampling: unbiased whichever component a draw came from)."""
    if len(components) == 1:
        loc, scale_tril = components[0]
        return _student_t(loc, scale_tril, df, n, generator)
    counts = [n // len(components) + (c < n % len(components)) for c in range(len(components))]
    eta = torch.cat([
        _student_t(loc, scale_tril, df, m, generator)[0]
        for (loc, scale_tril), m in zip(components, counts, strict=True) if m
    ])
    log_q = torch.stack([_student_t_log_prob(eta, loc, tril, df) for loc, tril in components])
    return eta, torch.logsumexp(log_q, 0) - math.log(len(components))


@torch.no_grad()
def importance_loglik(
    model: NLMEModel,
    pop: Population,
    loc: Tensor,
    scale_tril: Tensor,
    n_samples: int = 2000,
    df: float = 5.0,
    seed: int = 0,
    defensive: tuple[Tensor, Tensor] | None = None,
) -> ImportanceResult:
    """log p(y) of ``pop`` by importance sampling from per-subject multivariate t proposals.

    Args:
        loc, scale_tril: proposal centre ``(N, K)`` and scale (lower Cholesky) ``(N, K, K)``,
            e.g. from :func:`mode_proposal` or a variational guide's q(η_i).
        n_samples: draws per subject.
        df: degrees of freedom of the Student-t proposal (heavy tails keep the weights'
            variance finite when q is narrower than the posterior).
        seed: the draws are reproducible for a seed (torch's global state is untouched).
        defensive: a second ``(loc, scale_tril)`` (e.g. the Laplace approximation beside a
            guide's q): half the draws come from each, weighted by their equal mixture, so
            that a proposal that misses the posterior cannot ruin the estimate.
    """
    if n_samples < 2:
        raise ValueError(f"importance sampling needs n_samples >= 2, got {n_samples}")
    n, k = len(pop), model.n_eta
    joint = NegLogJoint(model)
    if k == 0:  # no random effects: the likelihood is exact
        ll = -joint(pop.obs_time.new_zeros(n, 0), pop).nll
        zeros = torch.zeros_like(ll)
        return ImportanceResult(float(ll.sum()), 0.0, ll, zeros, zeros + n_samples)
    generator = torch.Generator().manual_seed(int(seed))
    chunk = max(1, min(n_samples, MAX_ROWS // max(n, 1)))
    log_w = []
    components = [(loc.detach(), scale_tril.detach())]
    if defensive is not None:
        components.append((defensive[0].detach(), defensive[1].detach()))
    done = 0
    while done < n_samples:
        s = min(chunk, n_samples - done)
        eta, log_q = _mixture_draws(components, df, s, generator)
        rows = pop.subset(torch.arange(n, device=pop.device).repeat(s)) if s > 1 else pop
        nll = joint(eta.reshape(s * n, k), rows).nll.reshape(s, n)
        log_w.append(-nll - log_q)
        done += s
    log_w = torch.cat(log_w)  # (S, N)
    log_w = torch.where(torch.isfinite(log_w), log_w, torch.full_like(log_w, -math.inf))
    top = log_w.amax(0)
    w = torch.exp(log_w - top)  # (S, N), scaled by exp(top)
    mean = w.mean(0)
    subject_loglik = top + torch.log(mean)
    rel_var = w.var(0) / (mean * mean) / n_samples
    ess = w.sum(0) ** 2 / (w * w).sum(0)
    subject_se = rel_var.sqrt()
    return ImportanceResult(
        float(subject_loglik.sum()),
        float(rel_var.sum().sqrt()),
        subject_loglik,
        subject_se,
        ess,
    )


def proposal(
    model: NLMEModel, estimator, pop: Population, eta: Tensor | None = None
) -> tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor] | None]:
    """The importance proposal for ``pop``: ``(main, defensive)``, each ``(loc, scale_tril)``.

    With a posterior approximation of the estimator's own (``estimator.posterior(pop)``,
    e.g. a variational guide): q(η_i), with the Laplace approximation at the modes searched
    from q's means as the defensive half (an encoder's q can miss a posterior by far). Else
    the Laplace approximation at the modes searched from ``eta`` (:func:`mode_proposal`),
    and no defensive component."""
    posterior = getattr(estimator, "posterior", None)
    if posterior is not None:
        with torch.no_grad():
            loc, scale_tril = posterior(pop)
        return (loc.detach(), scale_tril.detach()), mode_proposal(model, pop, loc)
    return mode_proposal(model, pop, eta), None


def importance_summary(model: NLMEModel, estimator, evaluation, cfg) -> dict[str, float]:
    """``{"loglik_is", "loglik_is_se"}`` of an evaluation's subjects at the model's current
    parameters (proposal: :func:`proposal`, modes searched from the evaluation's η̂), with
    ``cfg.loglik_is_samples`` draws per subject, ``cfg.loglik_is_df`` degrees of freedom and
    ``cfg.seed`` (run-config keys)."""
    pop = evaluation.population
    (loc, scale_tril), defensive = proposal(model, estimator, pop, evaluation.eta)
    n_samples = int(cfg.get("loglik_is_samples", 2000))
    df = float(cfg.get("loglik_is_df", 5.0))
    seed = int(cfg.get("seed", 0) or 0)
    return importance_loglik(
        model, pop, loc, scale_tril, n_samples, df, seed, defensive
    ).summary()
