"""Declared model parameters (θ, Ω, σ) and random-effect blocks.

A :class:`Param` owns one unconstrained ``raw`` tensor and a :class:`Domain`; its
:meth:`value` is the parameter on its natural scale. A :class:`RandomEffects` block is a
covariance parameter Ω together with the names of the random effects η ~ MvNormal(0, Ω).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from deepnlme.model.domains import (
    DiagonalCovariance,
    Domain,
    FullCovariance,
    Positive,
    Real,
)


class Param(nn.Module):
    """A fixed-effect parameter: ``Param(Positive(), 0.5)``, ``Param(Bounded(0, 1), 0.3)``.

    ``value()`` returns the natural-scale tensor (scalar, vector or matrix as declared).
    ``fixed=True`` keeps it at its initial value (NONMEM's FIX).
    """

    def __init__(self, domain: Domain | None = None, init=0.0, fixed: bool = False):
        super().__init__()
        self.domain = domain or Real()
        value = torch.as_tensor(init, dtype=torch.get_default_dtype())
        self.domain.check("parameter", value)
        self.raw = nn.Parameter(self.domain.to_raw(value).clone(), requires_grad=not fixed)

    @property
    def fixed(self) -> bool:
        return not self.raw.requires_grad

    def fix(self, fixed: bool = True) -> None:
        self.raw.requires_grad_(not fixed)

    def value(self) -> Tensor:
        return self.domain.to_natural(self.raw)

    @torch.no_grad()
    def set_value(self, value, name: str = "parameter") -> None:
        value = torch.as_tensor(value, dtype=self.raw.dtype, device=self.raw.device)
        self.domain.check(name, value)
        self.raw.copy_(self.domain.to_raw(value).reshape(self.raw.shape))

    def n_free(self) -> int:
        """Number of free scalars (what counts for AIC/BIC)."""
        if self.fixed:
            return 0
        if isinstance(self.domain, FullCovariance):
            k = self.domain.k
            return k * (k + 1) // 2
        return self.raw.numel()


def positive(init, fixed: bool = False) -> Param:
    """Shorthand for ``Param(Positive(), init)``."""
    return Param(Positive(), init, fixed)


class RandomEffects(Param):
    """A block of random effects η ~ MvNormal(0, Ω), named ``names`` (order of η).

    ``init`` gives Ω's variances (a list) or the matrix; ``structure`` is ``"diagonal"`` or
    ``"full"``. The Param's value is Ω, ``(k, k)``.
    """

    def __init__(
        self,
        names: Sequence[str],
        init=None,
        structure: str = "diagonal",
        fixed: bool = False,
    ):
        k = len(names)
        if structure == "diagonal":
            domain: Domain = DiagonalCovariance(k)
        elif structure == "full":
            domain = FullCovariance(k)
        else:
            raise ValueError(f"structure must be 'diagonal' or 'full', got {structure!r}")
        init = [0.1] * k if init is None else init
        super().__init__(domain, init, fixed)
        self.names = list(names)

    @property
    def k(self) -> int:
        return len(self.names)

    def cholesky(self) -> Tensor:
        """Lower Cholesky factor of Ω, ``(k, k)``."""
        return self.domain.cholesky(self.raw)

    def log_prob(self, eta: Tensor) -> Tensor:
        """log N(η; 0, Ω) for η ``(N, k)``, returns ``(N,)``, constants included."""
        return self.domain.normal_log_prob(self.raw, eta)

    def precision(self) -> Tensor:
        """Ω⁻¹, ``(k, k)``."""
        return torch.cholesky_inverse(self.cholesky())
