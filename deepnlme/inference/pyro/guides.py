"""Variational families q(η_i) = MvNormal(loc_i, L_i L_iᵀ) for the subjects of a population.

* :class:`SubjectGuide`: free parameters per subject (loc ``(N, K)``, full lower Cholesky
  ``(N, K, K)``); only the fitted subjects have one.
* :class:`AmortizedGuide`: an encoder reads a subject's whole record — observation times and
  values, doses, baseline covariates; any number of each, padding masked (a DeepSets
  encoder: per-element networks, masked mean pooling, a head) — and outputs loc and Cholesky
  factor in one forward pass, for any subject, fitted or new.

Both are plain ``nn.Module`` s: ``guide.posterior(batch)`` returns ``(loc (B, K),
scale_tril (B, K, K))``; :class:`~deepnlme.inference.pyro.vi.VariationalEstimator` turns it
into the Pyro guide.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from deepnlme.data.population import Population
from deepnlme.inference.pyro.program import SubjectBatch

#: Floor of the diagonal of L (keeps q proper whatever the raw parameters).
MIN_SCALE = 1e-5


def _lower(diag_raw: Tensor, offdiag: Tensor, k: int) -> Tensor:
    """Lower-triangular ``(..., K, K)``: softplus(diag_raw) + floor on the diagonal, ``offdiag``
    ``(..., K(K-1)/2)`` below it (row-major)."""
    scale = nn.functional.softplus(diag_raw) + MIN_SCALE
    out = torch.diag_embed(scale)
    if k > 1:
        rows, cols = torch.tril_indices(k, k, -1, device=diag_raw.device)
        out = out.clone()
        out[..., rows, cols] = offdiag
    return out


def _softplus_inverse(x: float) -> float:
    return x + math.log(-math.expm1(-x))


class SubjectGuide(nn.Module):
    """Gaussian q(η_i) with its own mean and full Cholesky factor for each of N subjects."""

    def __init__(self, n_subjects: int, k: int, init_scale: float = 0.1):
        super().__init__()
        self.k = int(k)
        self.loc = nn.Parameter(torch.zeros(n_subjects, k))
        self.diag_raw = nn.Parameter(torch.full((n_subjects, k), _softplus_inverse(init_scale)))
        self.offdiag = nn.Parameter(torch.zeros(n_subjects, k * (k - 1) // 2))

    @property
    def n_subjects(self) -> int:
        return self.loc.shape[0]

    def posterior(self, batch: SubjectBatch) -> tuple[Tensor, Tensor]:
        """``(loc (B, K), scale_tril (B, K, K))`` of the batch's subjects (by plate index)."""
        i = batch.index
        return self.loc[i], _lower(self.diag_raw[i], self.offdiag[i], self.k)


class _ElementNet(nn.Sequential):
    """One layer per set element (observation or dose): its cost grows with N·T, so the
    depth sits in the head, which runs once per subject."""

    def __init__(self, n_in: int, hidden: int):
        super().__init__(nn.Linear(n_in, hidden), nn.SiLU())


class AmortizedGuide(nn.Module):
    """DeepSets encoder of a subject's record → q(η_i) (mean and full Cholesky factor).

    Inputs per subject (normalized by constants set from the *fitting* population with
    :meth:`fit_normalization`, saved as buffers): observations ``(t, DV)`` ``(T, 2)``, doses
    ``(t, AMT)`` ``(D, 2)`` (padding masked out of the pooling), baseline covariates ``(C,)``
    and log(1 + number of observations). Output layer starts at zero: q starts at
    N(0, init_scale² I).

    Args:
        k: number of random effects K.
        n_covariates: C.
        hidden: width of every hidden layer.
        init_scale: initial SD of q.
    """

    def __init__(self, k: int, n_covariates: int, hidden: int = 64, init_scale: float = 0.1):
        super().__init__()
        self.k, self.n_covariates, self.hidden = int(k), int(n_covariates), int(hidden)
        self.obs_net = _ElementNet(2, hidden)
        self.dose_net = _ElementNet(2, hidden)
        n_out = k + k * (k + 1) // 2
        self.head = nn.Sequential(
            nn.Linear(2 * hidden + n_covariates + 1, hidden),
            nn.SiLU(),
            nn.Linear(hidden, hidden),
            nn.SiLU(),
            nn.Linear(hidden, n_out),
        )
        last = self.head[-1]
        nn.init.zeros_(last.weight)
        with torch.no_grad():
            last.bias.zero_()
            last.bias[k : 2 * k] = _softplus_inverse(init_scale)
        # normalization constants: time, DV, AMT scales; covariate centre and scale
        self.register_buffer("scales", torch.ones(3))
        self.register_buffer("cov_center", torch.zeros(n_covariates))
        self.register_buffer("cov_scale", torch.ones(n_covariates))

    @torch.no_grad()
    def fit_normalization(self, pop: Population) -> None:
        """Set the input scales from the fitting population (never from held-out data)."""
        def typical(x: Tensor, mask: Tensor) -> float:
            values = x[mask].abs()
            return float(values.mean()) if values.numel() and float(values.mean()) > 0 else 1.0

        self.scales.copy_(
            torch.tensor(
                [
                    typical(pop.obs_time, pop.obs_mask),
                    typical(pop.obs_dv, pop.obs_mask),
                    typical(pop.dose_amt, pop.dose_mask),
                ]
            )
        )
        if self.n_covariates:
            cov = pop.covariates
            sd = cov.std(0, unbiased=False) if len(pop) > 1 else torch.ones(self.n_covariates)
            self.cov_center.copy_(cov.mean(0))
            self.cov_scale.copy_(torch.where(sd > 1e-8, sd, torch.ones_like(sd)))

    @staticmethod
    def _pool(features: Tensor, mask: Tensor) -> Tensor:
        """Masked mean over the set dimension: ``(B, S, H)``, ``(B, S)`` → ``(B, H)``."""
        w = mask.to(features.dtype).unsqueeze(-1)
        return (features * w).sum(-2) / w.sum(-2).clamp(min=1.0)

    def encode(self, pop: Population) -> tuple[Tensor, Tensor]:
        """``(loc (N, K), scale_tril (N, K, K))`` for every subject of ``pop``."""
        t_scale, dv_scale, amt_scale = self.scales.to(pop.obs_time.dtype)
        obs = torch.stack([pop.obs_time / t_scale, pop.obs_dv / dv_scale], -1)
        dose = torch.stack([pop.dose_time / t_scale, pop.dose_amt / amt_scale], -1)
        cov = (pop.covariates - self.cov_center) / self.cov_scale
        count = torch.log1p(pop.obs_mask.sum(-1, keepdim=True).to(obs.dtype))
        summary = torch.cat(
            [
                self._pool(self.obs_net(obs), pop.obs_mask),
                self._pool(self.dose_net(dose), pop.dose_mask),
                cov,
                count,
            ],
            -1,
        )
        out = self.head(summary)
        k = self.k
        return out[:, :k], _lower(out[:, k : 2 * k], out[:, 2 * k :], k)

    def posterior(self, batch: SubjectBatch) -> tuple[Tensor, Tensor]:
        """``(loc (B, K), scale_tril (B, K, K))`` of the batch's subjects (from their data)."""
        return self.encode(batch.pop)
