"""Relative covariance factors θ of the random terms (lme4's parameterisation).

Term ``k`` has a lower-triangular ``p_k×p_k`` factor ``T_k`` (θ fills it column by column, as
lme4); its random effects are ``b = T_k u`` per level with ``u ~ N(0, I)`` (scaled by the
residual σ in Gaussian models), so ``Var(b) = σ² T_k T_kᵀ``. Diagonal entries of ``T_k`` are
bounded below by 0, off-diagonal ones are free.
"""

from __future__ import annotations

import numpy as np
import torch


class RelativeCovariance:
    """Maps θ ``(n_theta,)`` to the factors ``T_k`` of terms with ``sizes`` ``p_k``."""

    def __init__(self, sizes: list[int]) -> None:
        self.sizes = list(sizes)
        self.rows, self.cols, self.term_of = [], [], []
        for k, p in enumerate(self.sizes):
            r, c = np.tril_indices(p)
            order = np.lexsort((r, c))  # column-major
            self.rows.append(torch.as_tensor(r[order]))
            self.cols.append(torch.as_tensor(c[order]))
            self.term_of += [k] * len(order)
        self.starts = np.cumsum([0] + [len(r) for r in self.rows])

    @property
    def n_theta(self) -> int:
        return int(self.starts[-1])

    def initial(self) -> np.ndarray:
        """lme4's start: identity factors."""
        return np.concatenate(
            [(r == c).numpy().astype(float) for r, c in zip(self.rows, self.cols, strict=True)]
        )

    def lower_bounds(self) -> np.ndarray:
        return np.concatenate(
            [
                np.where((r == c).numpy(), 0.0, -np.inf)
                for r, c in zip(self.rows, self.cols, strict=True)
            ]
        )

    def factors(self, theta: torch.Tensor) -> list[torch.Tensor]:
        """``[T_k]``, each ``(p_k, p_k)`` lower triangular (differentiable in θ)."""
        out = []
        for k, p in enumerate(self.sizes):
            T = torch.zeros(p, p, dtype=theta.dtype, device=theta.device)
            index = (self.rows[k].to(theta.device), self.cols[k].to(theta.device))
            T = T.index_put(index, theta[self.starts[k] : self.starts[k + 1]])
            out.append(T)
        return out

    def names(self, term_names: list[str], term_columns: list[list[str]]) -> list[str]:
        """Readable θ names ``group.col1.col2`` (as lme4's ``getME(m, "theta")``)."""
        out = []
        for k, (g, cols) in enumerate(zip(term_names, term_columns, strict=True)):
            for r, c in zip(self.rows[k].tolist(), self.cols[k].tolist(), strict=True):
                out.append(f"{g}.{cols[r]}" if r == c else f"{g}.{cols[r]}.{cols[c]}")
        return out
