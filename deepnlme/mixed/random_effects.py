"""The random-effects part of a design as gathers: ``ZΛu`` per row, ``Λ'Z'r`` per level, and
the blocked factor of ``Λ'Z'WZΛ + I`` (:mod:`deepnlme.mixed.blocked`).

Random effects are handled in lme4's spherical form ``u`` (``b = Λu``): ``u_k`` is
``(n_k, p_k)`` for term ``k``; the blocked solver sees term 1 as ``(n1, p1)`` and the other
terms flattened into one vector of length ``q2``.
"""

from __future__ import annotations

import torch

from deepnlme.mixed.blocked import BlockedFactor, Structure, build_structure, factorize
from deepnlme.mixed.design import MixedDesign


class RandomDesign:
    """Gathers and blocked factor of the random terms of ``design``.

    Args:
        design: the model matrices (terms sorted, largest first).
        extra: ``(N, m_e)`` dense columns appended to block 2 (``[X y]`` for the profiled
            Gaussian deviance), or None.
    """

    def __init__(self, design: MixedDesign, extra: torch.Tensor | None = None) -> None:
        self.terms = design.terms
        self.sizes = [t.size for t in self.terms]
        self.n_levels = [t.n_levels for t in self.terms]
        self.extra = extra
        m_e = 0 if extra is None else int(extra.shape[1])
        self.structure: Structure = build_structure(
            [t.index for t in self.terms], self.sizes, self.n_levels, m_e
        )

    def row_values(self, factors: list[torch.Tensor]) -> list[torch.Tensor]:
        """``[x_ik' T_k]`` for every term: ``(N, p_k)`` row values of ``ZΛ``."""
        return [t.values @ T for t, T in zip(self.terms, factors, strict=True)]

    def factorize(
        self, factors: list[torch.Tensor], weights: torch.Tensor | None = None
    ) -> BlockedFactor:
        """Blocked Cholesky of ``Λ'Z'WZΛ + I`` (augmented by ``extra``)."""
        v = self.row_values(factors)
        parts = v[1:] + ([self.extra] if self.extra is not None else [])
        v2 = torch.cat(parts, dim=1) if parts else v[0][:, :0]
        return factorize(self.structure, v[0], v2, weights)

    def linear_predictor(self, factors: list[torch.Tensor], u: list[torch.Tensor]) -> torch.Tensor:
        """``(ZΛu)_i``, ``(N,)``."""
        out = 0.0
        for t, vk, uk in zip(self.terms, self.row_values(factors), u, strict=True):
            out = out + (vk * uk[t.index]).sum(-1)
        return out

    def crossprod(self, factors: list[torch.Tensor], r: torch.Tensor) -> list[torch.Tensor]:
        """``Λ'Z'r`` per term, ``[(n_k, p_k)]``, for a row vector ``r`` ``(N,)``."""
        out = []
        for t, vk in zip(self.terms, self.row_values(factors), strict=True):
            z = torch.zeros(t.n_levels, t.size, dtype=r.dtype, device=r.device)
            out.append(z.index_add(0, t.index, vk * r[:, None]))
        return out

    def join(self, u: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-term arrays -> the solver's ``(n1, p1)`` and ``(q2,)``."""
        rest = [uk.reshape(-1) for uk in u[1:]]
        x2 = torch.cat(rest) if rest else u[0].new_zeros(0)
        return u[0], x2

    def split(self, x1: torch.Tensor, x2: torch.Tensor) -> list[torch.Tensor]:
        """The solver's vectors -> per-term ``[(n_k, p_k)]``."""
        out, start = [x1], 0
        for n, p in zip(self.n_levels[1:], self.sizes[1:], strict=True):
            out.append(x2[start : start + n * p].reshape(n, p))
            start += n * p
        return out

    def solve(self, factor: BlockedFactor, rhs: list[torch.Tensor]) -> list[torch.Tensor]:
        """``(Λ'Z'WZΛ + I)⁻¹ rhs`` with per-term right-hand sides."""
        return self.split(*factor.solve(*self.join(rhs)))

    def conditional_variances(self, factor: BlockedFactor) -> list[torch.Tensor]:
        """Diagonal blocks of ``(Λ'Z'WZΛ + I)⁻¹`` per term and level, ``[(n_k, p_k, p_k)]``."""
        blocks1, S_inv = factor.inverse_diagonal_blocks()
        out, start = [blocks1], 0
        for n, p in zip(self.n_levels[1:], self.sizes[1:], strict=True):
            idx = start + torch.arange(n * p, device=S_inv.device).reshape(n, p)
            out.append(S_inv[idx[:, :, None], idx[:, None, :]])
            start += n * p
        return out


def natural_scale(
    factors: list[torch.Tensor], u: list[torch.Tensor], var_u: list[torch.Tensor], scale: float
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """``b = T u`` per level and the diagonal of ``scale² T Var(u) Tᵀ``: ``[(n_k, p_k)]`` each."""
    b = [uk @ T.T for uk, T in zip(u, factors, strict=True)]
    var_b = [
        scale**2 * torch.diagonal(T @ V @ T.T, dim1=-2, dim2=-1)
        for V, T in zip(var_u, factors, strict=True)
    ]
    return b, var_b
