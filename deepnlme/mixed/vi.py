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
    """q(b_k,j) = N(loc, L Lᵀ) for every level j of every term k (one
    :class:`~deepnlme.inference.pyro.guides.SubjectGuide` per term)."""

    def __init__(self, sizes: list[tuple[int, int]], init_scale: float) -> None:
        super().__init__()
        self.terms = nn.ModuleList([SubjectGuide(n, p, init_scale) for n, p in sizes])

    def posterior(self) -> list[tuple[Tensor, Tensor]]:
        """``[(loc (n_k, p_k), scale_tril (n_k, p_k, p_k))]``."""
        return [g.posterior(ALL_LEVELS) for g in self.terms]


class FormulaVI:
    """Variational fit of a formula model: ``loss(batch)`` to minimize (-ELBO of a minibatch of
    rows, scaled to all rows), :meth:`result` for the report.

    Args:
        design: the fit's rows.
        family, link: the observation model.
        num_particles: draws of all random effects per step.
        init_scale: initial SD of q(b).
        seed: seed of the reparameterization noise.
    """

    fit_style = "stochastic"
    name = "vi"

    def __init__(self, design: MixedDesign, family: str, link: str, num_particles: int = 1,
                 init_scale: float = 0.1, seed: int = 0,
                 dtype: torch.dtype = torch.float64) -> None:
        if int(num_particles) < 1:
            raise ValueError(f"method.num_particles must be >= 1, got {num_particles}")
        self.design = design
        self.rows = RowData(design, family, link, standardize=True)
        self.table = RowTable(self.rows)
        self.model = FormulaParameters(self.rows, dtype)
        sizes = [(t.n_levels, t.size) for t in design.terms]
        self.guide = LevelGuide(sizes, init_scale).to(dtype)
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
        """q(b): ``b = loc + L ε`` with the step's noise ε at each term's site."""
        for k, (loc, L) in enumerate(self.guide.posterior()):
            eps = self._noise(k, loc.shape, loc)
            b = loc + (L @ eps[..., None]).squeeze(-1)
            log_q = dist.MultivariateNormal(loc, scale_tril=L).log_prob(b)
            with pyro.plate(f"levels_{k}", loc.shape[0]):
                pyro.sample(f"b_{k}", dist.Delta(b, log_density=log_q, event_dim=1))
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
        posterior = [(loc.detach(), L.detach()) for loc, L in self.guide.posterior()]
        means = [loc for loc, _ in posterior]
        sds = [torch.sqrt((L * L).sum(-1)) for _, L in posterior]
        values = [v.detach() for v in params.fitted]
        for key, value in (("converged", True), ("grad_max", float("nan")),
                           ("n_iter", self.step + 1), ("n_eval", self.step + 1),
                           ("message", f"VI: {self.step + 1} steps")):
            fields.setdefault(key, value)
        return report_fit(self.design, self.rows, params, values, "vi", means, sds, se, **fields)
