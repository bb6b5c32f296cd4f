"""Blocked Cholesky factor of ``Λ'Z'WZΛ + I`` (optionally augmented by dense columns ``[X y]``).

The random effects are ordered as lme4/MixedModels.jl do, the term with most levels first.
Because every row belongs to exactly one level of that first term, its diagonal block ``A11``
is block diagonal (``n1`` blocks of ``p1×p1``) and is eliminated first. The remaining terms
and the extra columns form a small dense block whose Schur complement
``S = A22 − A21 A11⁻¹ A12`` is factored densely. With ``M = A21 L11⁻ᵀ`` stored only on its
nonzero pattern (pairs (column c of block 2, level l of term 1)), ``M Mᵀ`` is a sum over pairs
of pattern entries that share a level: precomputed gather indices, one ``index_add``.

Everything is built from gathers and ``index_add`` over rows (no dense N×q matrix, no Python
loop over levels), differentiable by autograd and device-agnostic.

Shapes: N rows; term k has ``n_k`` levels and ``p_k`` columns; ``q2 = Σ_{k≥2} n_k p_k``;
``m_e`` extra dense columns; ``Q2 = q2 + m_e``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class Structure:
    """Index arrays of the sparsity pattern (computed once per design).

    Attributes:
        n1, p1: levels and columns of the first term.
        q2: random-effect columns in block 2; ``Q2 = q2 + m_extra``.
        index1: ``(N,)`` level of term 1 of every row.
        cols: ``(N, m)`` block-2 columns a row touches (increasing along the row).
        entry: ``(N, m)`` position of (cols, index1) in the pattern of ``A21``.
        entry_col, entry_level: ``(E,)`` column and level of each pattern entry.
        pair_a, pair_b: ``(P,)`` pattern entries sharing a level, ``col[a] >= col[b]``.
        pair_target: ``(P,)`` flat index ``col[a] * Q2 + col[b]`` into S.
        row_j, row_k: ``(R,)`` positions in a row with ``cols[j] >= cols[k]``.
        row_target: ``(N, R)`` flat index into S of each row's products.
    """

    n1: int
    p1: int
    q2: int
    Q2: int
    index1: torch.Tensor
    cols: torch.Tensor
    entry: torch.Tensor
    entry_col: torch.Tensor
    entry_level: torch.Tensor
    pair_a: torch.Tensor
    pair_b: torch.Tensor
    pair_target: torch.Tensor
    row_j: torch.Tensor
    row_k: torch.Tensor
    row_target: torch.Tensor

    @property
    def n_entries(self) -> int:
        return int(self.entry_col.shape[0])


def build_structure(
    indices: list[torch.Tensor], sizes: list[int], n_levels: list[int], m_extra: int
) -> Structure:
    """Pattern of the blocked factor for random terms given by level ``indices`` ((N,) each),
    column counts ``sizes`` and level counts ``n_levels`` (term 1 first), plus ``m_extra``
    dense columns."""
    device = indices[0].device
    idx = [i.cpu().numpy().astype(np.int64) for i in indices]
    n = idx[0].shape[0]
    n1, p1 = n_levels[0], sizes[0]
    offsets = np.cumsum([0] + [nk * pk for nk, pk in zip(n_levels[1:], sizes[1:], strict=True)])
    q2 = int(offsets[-1])
    Q2 = q2 + m_extra
    col_blocks = []
    for k in range(1, len(idx)):
        pk = sizes[k]
        col_blocks.append(offsets[k - 1] + idx[k][:, None] * pk + np.arange(pk)[None, :])
    if m_extra:
        col_blocks.append(np.broadcast_to(q2 + np.arange(m_extra), (n, m_extra)))
    cols = np.concatenate(col_blocks, axis=1) if col_blocks else np.zeros((n, 0), np.int64)
    m = cols.shape[1]
    keys = cols * n1 + idx[0][:, None]
    uniq, entry = np.unique(keys.reshape(-1), return_inverse=True)
    entry_col, entry_level = uniq // n1, uniq % n1
    # pattern entries sorted by (level, column): pairs within each level, lower triangle
    order = np.lexsort((entry_col, entry_level))
    lev_sorted = entry_level[order]
    counts = np.bincount(lev_sorted, minlength=n1)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    pos = np.arange(len(order)) - starts[lev_sorted]
    reps = pos + 1
    a_sorted = np.repeat(np.arange(len(order)), reps)
    within = np.arange(reps.sum()) - np.repeat(np.cumsum(reps) - reps, reps)
    b_sorted = starts[lev_sorted][a_sorted] + within
    pair_a, pair_b = order[a_sorted], order[b_sorted]
    pair_target = entry_col[pair_a] * Q2 + entry_col[pair_b]
    jj, kk = np.tril_indices(m)
    row_target = cols[:, jj] * Q2 + cols[:, kk]

    def t(x: np.ndarray) -> torch.Tensor:
        return torch.as_tensor(np.ascontiguousarray(x), dtype=torch.long, device=device)

    return Structure(
        n1,
        p1,
        q2,
        Q2,
        t(idx[0]),
        t(cols),
        t(entry.reshape(n, m)),
        t(entry_col),
        t(entry_level),
        t(pair_a),
        t(pair_b),
        t(pair_target),
        t(jj),
        t(kk),
        t(row_target),
    )


def lower_gradient(G: torch.Tensor) -> torch.Tensor:
    """Gradient with respect to the lower triangle that stores a symmetric matrix, from the
    gradient ``G`` (symmetric) with respect to the full matrix."""
    return 2 * torch.tril(G, -1) + torch.diag(torch.diagonal(G))


def padded(block: torch.Tensor, size: int) -> torch.Tensor:
    """``block`` in the leading corner of a ``size×size`` zero matrix."""
    out = block.new_zeros(size, size)
    k = block.shape[0]
    out[:k, :k] = block
    return out


class DenseLogdet(torch.autograd.Function):
    """``log|S[:k, :k]|`` of the dense SPD block stored as its lower triangle ``S_low``, with
    Cholesky factor ``L``; backward ``S⁻¹`` by one Cholesky inverse (no autograd through the
    factorisation)."""

    @staticmethod
    def forward(ctx, S_low: torch.Tensor, L: torch.Tensor, k: int) -> torch.Tensor:  # type: ignore[override]
        ctx.save_for_backward(L)
        ctx.k = k
        return 2 * torch.log(torch.diagonal(L)[:k]).sum()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        (L,) = ctx.saved_tensors
        k = ctx.k
        G = padded(torch.cholesky_inverse(L[:k, :k]), L.shape[0])
        return grad * lower_gradient(G), None, None


class DenseSolve(torch.autograd.Function):
    """``S[:k, :k]⁻¹ t`` for the dense SPD block stored as its lower triangle ``S_low`` with
    Cholesky factor ``L``; backward by two triangular solves."""

    @staticmethod
    def forward(ctx, S_low: torch.Tensor, L: torch.Tensor, k: int, t: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        x = torch.cholesky_solve(t.unsqueeze(-1), L[:k, :k]).squeeze(-1)
        ctx.save_for_backward(L, x)
        ctx.k = k
        return x

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        L, x = ctx.saved_tensors
        k = ctx.k
        lam = torch.cholesky_solve(grad.unsqueeze(-1), L[:k, :k]).squeeze(-1)
        G = padded(-0.5 * (torch.outer(lam, x) + torch.outer(x, lam)), L.shape[0])
        return lower_gradient(G), None, None, lam


@dataclass
class BlockedFactor:
    """``L`` with ``L Lᵀ = [[A11, A12], [A21, A22]]`` in blocks.

    Attributes:
        L11: ``(n1, p1, p1)`` Cholesky factors of the first term's diagonal blocks.
        M: ``(E, p1)`` values of ``L21 = A21 L11⁻ᵀ`` on the pattern.
        S_low: ``(Q2, Q2)`` lower triangle of the Schur complement ``A22 − L21 L21ᵀ``
            (differentiable; the upper triangle is zero).
        L22: its Cholesky factor (no autograd graph: the dense part is differentiated by
            :class:`DenseLogdet` and :class:`DenseSolve`).
    """

    structure: Structure
    L11: torch.Tensor
    M: torch.Tensor
    S_low: torch.Tensor
    L22: torch.Tensor

    def logdet_random(self) -> torch.Tensor:
        """``log |Λ'Z'WZΛ + I|`` (the random-effect part, extra columns excluded)."""
        q2 = self.structure.q2
        d1 = torch.diagonal(self.L11, dim1=-2, dim2=-1)
        out = 2 * torch.log(d1).sum()
        if q2:
            out = out + self.dense_logdet(q2)
        return out

    def dense_logdet(self, k: int) -> torch.Tensor:
        """``log|S[:k, :k]|`` (differentiable)."""
        return DenseLogdet.apply(self.S_low, self.L22, k)

    def dense_solve(self, k: int, t: torch.Tensor) -> torch.Tensor:
        """``S[:k, :k]⁻¹ t`` (differentiable)."""
        return DenseSolve.apply(self.S_low, self.L22, k, t)

    def solve(self, rhs1: torch.Tensor, rhs2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Solve the random-effect system (extra columns excluded) for a right-hand side
        ``rhs1`` ``(n1, p1)``, ``rhs2`` ``(q2,)``; returns ``(x1, x2)`` (differentiable)."""
        s = self.structure
        keep = s.entry_col < s.q2
        col, lev, M = s.entry_col[keep], s.entry_level[keep], self.M[keep]
        y1 = torch.linalg.solve_triangular(self.L11, rhs1.unsqueeze(-1), upper=False).squeeze(-1)
        t2 = rhs2.index_add(0, col, -(M * y1[lev]).sum(-1))
        x2 = self.dense_solve(s.q2, t2) if s.q2 else t2
        t1 = y1.index_add(0, lev, -M * x2[col].unsqueeze(-1))
        x1 = torch.linalg.solve_triangular(
            self.L11.transpose(-1, -2), t1.unsqueeze(-1), upper=True
        ).squeeze(-1)
        return x1, x2

    def inverse_diagonal_blocks(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Diagonal of the inverse of the random-effect system: ``(n1, p1, p1)`` blocks of the
        first term and the ``(q2, q2)`` dense inverse of block 2 (no autograd)."""
        s = self.structure
        L11, M = self.L11.detach(), self.M.detach()
        S_inv = torch.cholesky_inverse(self.L22[: s.q2, : s.q2])
        c = s.entry_col
        use = (c[s.pair_a] < s.q2) & (c[s.pair_b] < s.q2)
        a, b = s.pair_a[use], s.pair_b[use]
        weight = S_inv[c[a], c[b]]
        outer = M[a].unsqueeze(-1) * M[b].unsqueeze(-2) * weight[:, None, None]
        outer = outer + torch.where((a != b)[:, None, None], outer.transpose(-1, -2), 0.0)
        inner = torch.zeros_like(L11).index_add(0, s.entry_level[a], outer)
        eye1 = torch.eye(s.p1, dtype=L11.dtype, device=L11.device).expand_as(L11)
        L11inv = torch.linalg.solve_triangular(L11, eye1, upper=False)
        blocks = L11inv.transpose(-1, -2) @ (eye1 + inner) @ L11inv
        return blocks, S_inv


def factorize(
    s: Structure,
    v1: torch.Tensor,
    v2: torch.Tensor,
    weights: torch.Tensor | None = None,
) -> BlockedFactor:
    """Blocked Cholesky of ``Λ'Z'WZΛ + I`` augmented by extra columns.

    Args:
        s: the pattern (:func:`build_structure`).
        v1: ``(N, p1)`` row values of ``ZΛ`` in the first term's columns.
        v2: ``(N, m)`` row values of ``[ZΛ, extra]`` in block 2 at ``s.cols``.
        weights: ``(N,)`` row weights W (ones when None).

    The identity is added to the random-effect diagonal only (not to the extra columns).
    """
    dtype, device = v1.dtype, v1.device
    w1 = v1 if weights is None else v1 * weights[:, None]
    w2 = v2 if weights is None else v2 * weights[:, None]
    p1 = s.p1
    A11 = torch.zeros(s.n1, p1, p1, dtype=dtype, device=device)
    A11 = A11.index_add(0, s.index1, w1.unsqueeze(-1) * v1.unsqueeze(-2))
    A11 = A11 + torch.eye(p1, dtype=dtype, device=device)
    L11 = torch.linalg.cholesky(A11)
    m = v2.shape[1]
    A21 = torch.zeros(s.n_entries, p1, dtype=dtype, device=device)
    A21 = A21.index_add(
        0, s.entry.reshape(-1), (w2.unsqueeze(-1) * v1.unsqueeze(-2)).reshape(-1, p1)
    )
    if p1 == 1:
        M = A21 / L11[s.entry_level, 0]
    else:
        M = torch.linalg.solve_triangular(
            L11[s.entry_level], A21.unsqueeze(-1), upper=False
        ).squeeze(-1)
    S = torch.zeros(s.Q2 * s.Q2, dtype=dtype, device=device)
    if m:
        S = S.index_add(0, s.row_target.reshape(-1), (w2[:, s.row_j] * v2[:, s.row_k]).reshape(-1))
    S = S.index_add(0, s.pair_target, -(M[s.pair_a] * M[s.pair_b]).sum(-1))
    diag_z = torch.arange(s.q2, device=device) * (s.Q2 + 1)
    S = S.index_add(0, diag_z, torch.ones(s.q2, dtype=dtype, device=device))
    S_low = S.reshape(s.Q2, s.Q2)
    with torch.no_grad():
        full = S_low + S_low.T - torch.diag(torch.diagonal(S_low))
        L22 = torch.linalg.cholesky(full) if s.Q2 else full
    return BlockedFactor(s, L11, M, S_low, L22)
