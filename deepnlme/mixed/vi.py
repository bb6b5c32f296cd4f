"""Stochastic variational inference for formula models (Pyro; no Lightning, no param store).

The model as a Pyro program: every random term k has its levels' effects
``b_k ~ N(0, Σ_k)`` in ``pyro.plate("levels_k", n_k)``; the rows' log-likelihoods are
factors in ``pyro.plate("rows", N, subsample=index)``, so a minibatch of B rows is scaled by
N/B. The guide q(b) is Gaussian, independent across terms and levels, with a full covariance
within a level (``(x|g)``: intercept and slope of a level correlated). With crossed factors a
row touches several levels, so all levels are drawn at every step (they are the model's global
latents; 4,114 for InstEval) and only the rows are subsampled: the cost of a step is the
batch's rows plus the levels. β, the covariance factors, σ and the thresholds are
``nn.Parameter`` s of :class:`~deepnlme.mixed.parameters.FormulaParameters` (point estimates:
variational EM), the guide's are in its own module; any torch optimizer fits both.

Reparameterization noise comes from a generator seeded by (seed, step, particle): every
process and every resumed run draws the same effects at a step, so data-parallel runs (each
rank its own rows) average to the single-process gradient.
"""

from __future__ import annotations

import math
from types import SimpleNamespace
from typing import NamedTuple

import pyro
import pyro.distributions as dist
import torch
from torch import Tensor, nn

from deepnlme.inference.pyro.guides import SubjectGuide
from deepnlme.inference.pyro.program import SubjectBatch
from deepnlme.mixed.design import MixedDesign
from deepnlme.mixed.parameters import FormulaParameters, RowData, report_fit
from deepnlme.mixed.result import MixedFit

#: The guides' posterior() reads ``batch.index``: all levels.
ALL_LEVELS = SimpleNamespace(index=slice(None))


class RowBatch(NamedTuple):
    """B rows of the fitted table: the model's inputs for them.

    ``X`` ``(B, p)``, ``y`` ``(B,)``, ``trials`` ``(B,)`` or None, and per random term the
    rows' levels ``levels[k]`` ``(B,)`` and column values ``values[k]`` ``(B, p_k)``."""

    X: Tensor
    y: Tensor
    trials: Tensor | None
    levels: list[Tensor]
    values: list[Tensor]

    def to(self, device=None, dtype: torch.dtype | None = None) -> RowBatch:
        def move(x: Tensor | None) -> Tensor | None:
            if x is None:
                return None
            return x.to(device, dtype=dtype if x.is_floating_point() else None)

        return RowBatch(move(self.X), move(self.y), move(self.trials),
                        [i.to(device) for i in self.levels], [move(v) for v in self.values])


class RowTable:
    """The rows of a fit as a sequence for minibatches: ``len`` rows, ``subset(index)`` a
    :class:`RowBatch` (stays on the CPU until the training loop moves a batch)."""

    def __init__(self, rows: RowData) -> None:
        self.rows = rows
        self.terms = rows.design.terms

    def __len__(self) -> int:
        return int(self.rows.y.shape[0])

    def subset(self, index: Tensor) -> RowBatch:
        i = index.to(self.rows.y.device)
        trials = None if self.rows.trials is None else self.rows.trials[i]
        return RowBatch(self.rows.X[i], self.rows.y[i], trials,
                        [t.index[i] for t in self.terms], [t.values[i] for t in self.terms])


class LevelGuide(nn.Module):
    """q(b) over every level of every term: a Gaussian of each level's effects with its own
    mean and full covariance (one :class:`~deepnlme.inference.pyro.guides.SubjectGuide` per
    term), plus, with ``rank`` > 0, a shared low-rank part ``W z`` (``W`` ``(D, rank)``,
    ``z ~ N(0, I)``) that correlates effects across levels and terms — e.g. a department's
    effect with its instructors', which a guide independent across levels cannot represent
    (variational EM then shrinks the smaller variance towards 0).

    Args:
        sizes: ``(n_k, p_k)`` of each term.
        init_scale: initial SD of every effect.
        rank: columns of ``W`` (0: levels independent).
        seed: seed of W's small random start (W = 0 is a stationary point).
    """

    def __init__(self, sizes: list[tuple[int, int]], init_scale: float, rank: int = 0,
                 seed: int = 0) -> None:
        super().__init__()
        self.sizes = list(sizes)
        self.terms = nn.ModuleList([SubjectGuide(n, p, init_scale) for n, p in sizes])
        self.rank = int(rank)
        if self.rank:
            g = torch.Generator().manual_seed(seed)
            D = sum(n * p for n, p in sizes)
            self.factor = nn.Parameter(0.01 * init_scale * torch.randn(D, self.rank, generator=g))

    def posterior(self) -> list[tuple[Tensor, Tensor]]:
        """Each level's own part: ``[(loc (n_k, p_k), scale_tril (n_k, p_k, p_k))]``."""
        return [g.posterior(ALL_LEVELS) for g in self.terms]

    def _factors(self) -> list[Tensor]:
        parts = torch.split(self.factor, [n * p for n, p in self.sizes])
        return [w.reshape(n, p, self.rank) for w, (n, p) in zip(parts, self.sizes, strict=True)]

    def sample(self, eps: list[Tensor], z: Tensor | None) -> tuple[list[Tensor], Tensor]:
        """Draws ``b_k = loc_k + L_k ε_k (+ W_k z)`` ``[(n_k, p_k)]`` and their log density:
        per level ``[(n_k,)]`` summed over terms (rank 0), or the joint one (a scalar; by
        the Woodbury identity and the determinant lemma, O(D · rank²))."""
        own = self.posterior()
        b = [loc + (L @ e[..., None]).squeeze(-1) for (loc, L), e in zip(own, eps, strict=True)]
        if not self.rank:
            log_q = [dist.MultivariateNormal(loc, scale_tril=L).log_prob(bk)
                     for (loc, L), bk in zip(own, b, strict=True)]
            return b, torch.cat(log_q).sum()
        W = self._factors()
        b = [bk + wk @ z for bk, wk in zip(b, W, strict=True)]
        quad, logdet, D = 0.0, 0.0, 0
        capacitance = torch.eye(self.rank, dtype=z.dtype, device=z.device)
        proj = torch.zeros_like(z)
        for (loc, L), bk, wk in zip(own, b, W, strict=True):
            v = torch.linalg.solve_triangular(L, (bk - loc)[..., None], upper=False)[..., 0]
            A = torch.linalg.solve_triangular(L, wk, upper=False)  # (n, p, rank)
            quad = quad + (v * v).sum()
            logdet = logdet + 2 * torch.log(torch.diagonal(L, dim1=-2, dim2=-1)).sum()
            capacitance = capacitance + torch.einsum("npr,nps->rs", A, A)
            proj = proj + torch.einsum("npr,np->r", A, v)
            D += v.numel()
        chol = torch.linalg.cholesky(capacitance)
        w = torch.linalg.solve_triangular(chol, proj[:, None], upper=False)[:, 0]
        quad = quad - (w * w).sum()
        logdet = logdet + 2 * torch.log(torch.diagonal(chol)).sum()
        return b, -0.5 * (quad + logdet + D * math.log(2 * math.pi))

    def marginal_sd(self) -> list[Tensor]:
        """SD of every effect under q ``[(n_k, p_k)]``."""
        var = [(L * L).sum(-1) for _, L in self.posterior()]
        if self.rank:
            var = [v + (w * w).sum(-1) for v, w in zip(var, self._factors(), strict=True)]
        return [torch.sqrt(v) for v in var]


class FormulaVI:
    """Variational fit of a formula model: ``loss(batch)`` to minimize (-ELBO of a minibatch of
    rows, scaled to all rows), :meth:`result` for the report.

    Args:
        design: the fit's rows.
        family, link: the observation model.
        num_particles: draws of all random effects per step.
        init_scale: initial SD of q(b).
        seed: seed of the reparameterization noise.
        dtype: of the parameters.
        rank: columns of the guide's low-rank part across levels (:class:`LevelGuide`).
    """

    fit_style = "stochastic"
    name = "vi"

    def __init__(self, design: MixedDesign, family: str, link: str, num_particles: int = 1,
                 init_scale: float = 0.1, seed: int = 0,
                 dtype: torch.dtype = torch.float64, rank: int = 0) -> None:
        if int(num_particles) < 1:
            raise ValueError(f"method.num_particles must be >= 1, got {num_particles}")
        self.design = design
        self.rows = RowData(design, family, link, standardize=True)
        self.table = RowTable(self.rows)
        self.model = FormulaParameters(self.rows, dtype)
        sizes = [(t.n_levels, t.size) for t in design.terms]
        self.guide = LevelGuide(sizes, init_scale, rank, seed).to(dtype)
        self.num_particles, self.seed = int(num_particles), int(seed)
        self.step = 0  # set by the training loop: selects the noise
        self._particle = 0

    def setup(self, table: RowTable) -> nn.Module:
        """Nothing to build (the guide exists); returns it (the training loop's interface)."""
        return self.guide

    # --------------------------------------------------------------------- Pyro program
    def program(self, index: Tensor, batch: RowBatch) -> None:
        """The model: random effects of all levels, the batch's rows scaled by N/B."""
        params = self.model
        b = []
        for k, t in enumerate(self.design.terms):
            L = params.factor(k)
            with pyro.plate(f"levels_{k}", t.n_levels):
                zero = L.new_zeros(t.size)
                b.append(pyro.sample(f"b_{k}", dist.MultivariateNormal(zero, scale_tril=L)))
        eta = batch.X @ params.beta
        for bk, lev, val in zip(b, batch.levels, batch.values, strict=True):
            eta = eta + (val * bk[lev]).sum(-1)
        with pyro.plate("rows", len(self.table), subsample=index):
            pyro.factor("y", params.row_loglik(eta, batch.y, batch.trials))

    def _noise(self, k: int, shape: torch.Size, like: Tensor) -> Tensor:
        g = torch.Generator().manual_seed(
            ((self.seed * 1_000_003 + self.step) * 101 + self._particle) * 31 + k
        )
        return torch.randn(shape, generator=g, dtype=like.dtype).to(like.device)

    def pyro_guide(self, index: Tensor, batch: RowBatch) -> None:
        """q(b) with the step's noise at each term's site (the joint log density is spread
        evenly over the levels of all sites: only its sum enters the ELBO)."""
        guide = self.guide
        eps = [self._noise(k, torch.Size(size), guide.terms[k].loc)
               for k, size in enumerate(guide.sizes)]
        z = self._noise(len(eps), torch.Size([guide.rank]), eps[0]) if guide.rank else None
        b, log_q = guide.sample(eps, z)
        share = log_q / sum(n for n, _ in guide.sizes)
        for k, bk in enumerate(b):
            with pyro.plate(f"levels_{k}", bk.shape[0]):
                density = share.expand(bk.shape[0])
                pyro.sample(f"b_{k}", dist.Delta(bk, log_density=density, event_dim=1))
        self._particle += 1

    def loss(self, batch) -> Tensor:
        """-ELBO of a minibatch (``batch.index``: row positions; ``batch.pop``: a
        :class:`RowBatch`), the rows' part scaled N/B."""
        self._particle = 0
        elbo = pyro.infer.Trace_ELBO(num_particles=self.num_particles, max_plate_nesting=1)
        with pyro.validation_enabled(False):
            value = elbo.differentiable_loss(self.program, self.pyro_guide, batch.index,
                                             batch.pop)
        if not bool(torch.isfinite(value)):
            from deepnlme.inference.pyro.vi import NonFiniteObjective

            raise NonFiniteObjective(
                f"the ELBO is not finite at step {self.step} (lower method.lr)"
            )
        return value

    @torch.no_grad()
    def elbo_value(self, particles: int = 16, seed: int = 1) -> float:
        """ELBO of all rows (``particles`` draws of all effects, fixed noise)."""
        step, self.step = self.step, -1 - seed
        num, self.num_particles = self.num_particles, particles
        try:
            index = torch.arange(len(self.table))
            batch = self.table.subset(index)
            p = self.model.beta
            value = -float(self.loss(SubjectBatch(index.to(p.device), batch.to(p.device, p.dtype))))
            # the standardized response's density: back to the data's scale
            return value - len(self.table) * math.log(self.rows.scale)
        finally:
            self.step, self.num_particles = step, num

    # ------------------------------------------------------------------------ report
    def result(self, se: bool = True, **fields) -> MixedFit:
        """The fit at the current parameters: posterior means and SDs of q(b) as conditional
        modes, exact/Laplace log-likelihood at the estimates (design's device)."""
        device, dtype = self.design.X.device, self.design.X.dtype
        params = self.model.to(device, dtype)
        self.guide.to(device, dtype)
        with torch.no_grad():
            means = [loc for loc, _ in self.guide.posterior()]
            sds = self.guide.marginal_sd()
        values = [v.detach() for v in params.fitted]
        for key, value in (("converged", True), ("grad_max", float("nan")),
                           ("n_iter", self.step + 1), ("n_eval", self.step + 1),
                           ("message", f"VI: {self.step + 1} steps")):
            fields.setdefault(key, value)
        return report_fit(self.design, self.rows, params, values, "vi", means, sds, se, **fields)
