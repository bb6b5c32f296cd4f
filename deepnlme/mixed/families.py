"""Observation models of generalized and ordinal mixed models, per row of the linear
predictor η: log-likelihood (all constants included), its first and second derivatives in η
(closed forms), and the mean.

* ``binomial`` (logit): ``y`` successes of ``trials``; ``log C(n, y) + y log p + (n−y) log(1−p)``.
* ``poisson`` (log): ``y log μ − μ − log y!``.
* ``ordinal`` (cumulative ``logit`` or ``probit``, as ``ordinal::clmm``): ``P(Y ≤ j) =
  F(α_j − η)``; categories are coded 0..K−1 and ``alpha`` holds the K−1 increasing thresholds.
"""

from __future__ import annotations

import math

import torch

#: Stand-in for ±∞ thresholds (F is exactly 0 or 1 there in float64).
BIG = 1.0e6
FAMILIES = {"binomial": ("logit",), "poisson": ("log",), "ordinal": ("logit", "probit")}


def check_family(family: str, link: str | None) -> str:
    """The link to use (the family's default when ``link`` is None); raises ValueError."""
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; available: gaussian, {', '.join(FAMILIES)}")
    links = FAMILIES[family]
    if link is None:
        return links[0]
    if link not in links:
        raise ValueError(f"family {family} has no link {link!r}; available: {', '.join(links)}")
    return link


def _cdf_pdf_dpdf(x: torch.Tensor, link: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if link == "logit":
        F = torch.sigmoid(x)
        f = F * (1 - F)
        return F, f, f * (1 - 2 * F)
    F = torch.special.ndtr(x)
    f = torch.exp(-0.5 * x * x) / math.sqrt(2 * math.pi)
    return F, f, -x * f


def ordinal_bounds(
    y: torch.Tensor, alpha: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Upper and lower thresholds ``(N,)`` of each row's category (``±BIG`` at the ends)."""
    big = alpha.new_tensor([BIG])
    padded = torch.cat([-big, alpha, big])
    yi = y.long()
    return padded[yi + 1], padded[yi]


def row_terms(
    family: str,
    link: str,
    eta: torch.Tensor,
    y: torch.Tensor,
    trials: torch.Tensor | None = None,
    alpha: torch.Tensor | None = None,
    derivatives: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """``(log p(y_i | η_i), d/dη, d²/dη²)``, each ``(N,)``."""
    if family == "binomial":
        n = trials
        ll = (
            torch.lgamma(n + 1) - torch.lgamma(y + 1) - torch.lgamma(n - y + 1)
            + y * eta - n * torch.nn.functional.softplus(eta)
        )
        if not derivatives:
            return ll, None, None
        p = torch.sigmoid(eta)
        return ll, y - n * p, -n * p * (1 - p)
    if family == "poisson":
        mu = torch.exp(eta)
        ll = y * eta - mu - torch.lgamma(y + 1)
        return ll, y - mu, -mu
    if family == "ordinal":
        upper, lower = ordinal_bounds(y, alpha)
        Fu, fu, du = _cdf_pdf_dpdf(upper - eta, link)
        Fl, fl, dl = _cdf_pdf_dpdf(lower - eta, link)
        prob = (Fu - Fl).clamp_min(1e-300)
        ll = torch.log(prob)
        if not derivatives:
            return ll, None, None
        d1 = -(fu - fl) / prob
        d2 = (du - dl) / prob - d1 * d1
        return ll, d1, d2
    raise ValueError(f"unknown family {family!r}")


def mean(
    family: str, link: str, eta: torch.Tensor, trials: torch.Tensor | None = None,
    alpha: torch.Tensor | None = None,
) -> torch.Tensor:
    """Expected response ``(N,)``: ``n p``, ``μ``, or the expected category (0-based)."""
    if family == "binomial":
        p = torch.sigmoid(eta)
        return p if trials is None else trials * p
    if family == "poisson":
        return torch.exp(eta)
    if family == "ordinal":
        return category_probabilities(link, eta, alpha) @ torch.arange(
            len(alpha) + 1, dtype=eta.dtype, device=eta.device
        )
    return eta


def category_probabilities(link: str, eta: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """``(N, K)`` probabilities of the ordinal categories."""
    cum = _cdf_pdf_dpdf(alpha[None, :] - eta[:, None], link)[0]
    ones = torch.ones_like(eta)[:, None]
    cum = torch.cat([torch.zeros_like(ones), cum, ones], dim=1)
    return cum[:, 1:] - cum[:, :-1]
