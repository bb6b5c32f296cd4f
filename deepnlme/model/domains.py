"""Parameter domains: maps between an unconstrained raw tensor and a parameter's natural scale.

Positive parameters live on the log scale, bounded ones on the logit scale, covariance
matrices by their (log-)Cholesky factor. Every domain maps ``raw -> natural`` with
:meth:`Domain.to_natural` and back with :meth:`Domain.to_raw`.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


class Domain:
    """Base domain: the identity map on the real line (Pumas ``RealDomain``)."""

    def to_natural(self, raw: Tensor) -> Tensor:
        return raw

    def to_raw(self, value: Tensor) -> Tensor:
        return value

    def check(self, name: str, value: Tensor) -> None:
        if not torch.isfinite(value).all():
            raise ValueError(f"initial value of {name} must be finite, got {value.tolist()}")

    def describe(self) -> str:
        return "real"


class Real(Domain):
    pass


class Positive(Domain):
    """``x > 0``, optimized as ``log x``."""

    def to_natural(self, raw: Tensor) -> Tensor:
        return torch.exp(raw)

    def to_raw(self, value: Tensor) -> Tensor:
        return torch.log(value)

    def check(self, name: str, value: Tensor) -> None:
        super().check(name, value)
        if (value <= 0).any():
            raise ValueError(f"initial value of {name} must be > 0, got {value.tolist()}")

    def describe(self) -> str:
        return "positive"


class Bounded(Domain):
    """``lower < x < upper``, optimized on the logit scale."""

    def __init__(self, lower: float, upper: float):
        if not lower < upper:
            raise ValueError(f"Bounded domain needs lower < upper, got {lower}, {upper}")
        self.lower, self.upper = float(lower), float(upper)

    def to_natural(self, raw: Tensor) -> Tensor:
        return self.lower + (self.upper - self.lower) * torch.sigmoid(raw)

    def to_raw(self, value: Tensor) -> Tensor:
        u = (value - self.lower) / (self.upper - self.lower)
        return torch.log(u) - torch.log1p(-u)

    def check(self, name: str, value: Tensor) -> None:
        super().check(name, value)
        if ((value <= self.lower) | (value >= self.upper)).any():
            raise ValueError(
                f"initial value of {name} must lie in ({self.lower}, {self.upper}), "
                f"got {value.tolist()}"
            )

    def describe(self) -> str:
        return f"bounded({self.lower}, {self.upper})"


class DiagonalCovariance(Domain):
    """Diagonal covariance matrix ``(k, k)``; raw holds the log variances ``(k,)``.

    Natural scale is the full ``(k, k)`` matrix; initial values may be given as the
    ``k`` variances or as a ``(k, k)`` matrix (its diagonal is used).
    """

    def __init__(self, k: int):
        self.k = k

    def to_natural(self, raw: Tensor) -> Tensor:
        return torch.diag_embed(torch.exp(raw))

    def to_raw(self, value: Tensor) -> Tensor:
        value = torch.as_tensor(value)
        var = torch.diagonal(value) if value.dim() == 2 else value
        return torch.log(var)

    def cholesky(self, raw: Tensor) -> Tensor:
        return torch.diag_embed(torch.exp(0.5 * raw))

    def normal_log_prob(self, raw: Tensor, x: Tensor) -> Tensor:
        """log N(x; 0, Σ) for x ``(N, k)`` → ``(N,)``: elementwise (raw = log variances)."""
        quad = (x * x * torch.exp(-raw)).sum(-1)
        return -0.5 * (quad + raw.sum() + self.k * LOG_2PI)

    def check(self, name: str, value: Tensor) -> None:
        super().check(name, value)
        var = torch.diagonal(value) if value.dim() == 2 else value
        if var.shape != (self.k,) or (var <= 0).any():
            raise ValueError(
                f"initial {name} must be {self.k} positive variances, got {value.tolist()}"
            )

    def describe(self) -> str:
        return f"diagonal covariance ({self.k}x{self.k})"


class FullCovariance(Domain):
    """Full covariance matrix ``(k, k)`` by log-Cholesky: raw is ``(k, k)`` lower-triangular
    with the log of the Cholesky diagonal on its diagonal (upper triangle unused)."""

    def __init__(self, k: int):
        self.k = k

    def cholesky(self, raw: Tensor) -> Tensor:
        low = torch.tril(raw, diagonal=-1)
        return low + torch.diag_embed(torch.exp(torch.diagonal(raw)))

    def normal_log_prob(self, raw: Tensor, x: Tensor) -> Tensor:
        """log N(x; 0, Σ) for x ``(N, k)`` → ``(N,)``, by a triangular solve with Σ's factor."""
        chol = self.cholesky(raw)
        z = torch.linalg.solve_triangular(chol, x.unsqueeze(-1), upper=False).squeeze(-1)
        half_logdet = torch.log(torch.diagonal(chol)).sum()
        return -0.5 * (z * z).sum(-1) - half_logdet - 0.5 * self.k * LOG_2PI

    def to_natural(self, raw: Tensor) -> Tensor:
        chol = self.cholesky(raw)
        return chol @ chol.T

    def to_raw(self, value: Tensor) -> Tensor:
        value = torch.as_tensor(value)
        if value.dim() == 1:
            value = torch.diag(value)
        chol = torch.linalg.cholesky(value)
        return torch.tril(chol, diagonal=-1) + torch.diag(torch.log(torch.diagonal(chol)))

    def check(self, name: str, value: Tensor) -> None:
        super().check(name, value)
        m = torch.diag(value) if value.dim() == 1 else value
        if m.shape != (self.k, self.k) or torch.linalg.cholesky_ex(m).info != 0:
            raise ValueError(
                f"initial {name} must be a {self.k}x{self.k} positive-definite matrix "
                f"(or {self.k} variances), got {value.tolist()}"
            )

    def describe(self) -> str:
        return f"full covariance ({self.k}x{self.k})"


LOG_2PI = math.log(2 * math.pi)
