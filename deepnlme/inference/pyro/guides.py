"""Variational families q(η_i) = MvNormal(loc_i, L_i L_iᵀ) for the subjects of a population.

* :class:`SubjectGuide`: free parameters per subject (loc ``(N, K)``, full lower Cholesky
  ``(N, K, K)``); only the fitted subjects have one.
* :class:`AmortizedGuide`: an encoder reads a subject's whole record — observation times and
  values, the doses before each observation, baseline covariates; any number of
  observations, padding masked (a DeepSets encoder: a per-observation layer, masked mean
  pooling, a head) — and outputs loc and Cholesky factor in one forward pass, for any
  subject, fitted or new.

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
#: Bound of the encoder's means in prior SDs (a soft one, MAX_LOC·tanh(raw / MAX_LOC)): keeps a
#: fit's first steps from sending η where the model overflows.
MAX_LOC = 6.0
#: Soft upper bound of the raw diagonal of the encoder's L (softplus(3) ≈ 3 prior SDs): q is
#: never wider than a few prior SDs, and an early wide q cannot draw η where the model
#: overflows.
MAX_SCALE_RAW = 3.0
#: Precision of the encoder's arithmetic, whatever the dtype of its parameters and of the data:
#: q(η) is an approximation and a proposal, float64 would add nothing to it but doubles the
#: cost of the per-observation layer (the encoder's whole cost); loc and L come back in the
#: data's dtype.
ENCODER_DTYPE = torch.float32


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


def _forward(layers: nn.Sequential, x: Tensor) -> Tensor:
    """``layers(x)`` for ``x`` ``(M, n_in)`` in ``x``'s dtype: linear layers use their
    parameters cast to it (the casts stay differentiable, gradients reach the parameters in
    their own dtype); SiLU in place when no gradient is taken (no second M × width buffer)."""
    inplace = not torch.is_grad_enabled()
    for layer in layers:
        if isinstance(layer, nn.Linear):
            x = nn.functional.linear(x, layer.weight.to(x.dtype), layer.bias.to(x.dtype))
        elif isinstance(layer, nn.SiLU):
            x = nn.functional.silu(x, inplace=inplace)
        else:
            x = layer(x)
    return x


def dose_history(pop: Population) -> tuple[Tensor, Tensor, Tensor]:
    """Dosing before each observation slot: ``(time after the last dose (B, T), amount of that
    dose (B, T), total amount given so far (B, T))``; where no dose precedes the slot, its
    time (after time 0) and zero amounts."""
    before = pop.dose_mask.unsqueeze(-2) & (
        pop.dose_time.unsqueeze(-2) <= pop.obs_time.unsqueeze(-1)
    )  # (B, T, D)
    dose_time = pop.dose_time.unsqueeze(-2).expand(before.shape)
    last = torch.where(before, dose_time, torch.full_like(dose_time, -math.inf)).argmax(-1)
    any_dose = before.any(-1)
    zero = torch.zeros_like(pop.obs_time)
    last_time = torch.gather(pop.dose_time, -1, last)
    since = torch.where(any_dose, pop.obs_time - last_time, pop.obs_time)
    amount = torch.where(any_dose, torch.gather(pop.dose_amt, -1, last), zero)
    total = (pop.dose_amt.unsqueeze(-2) * before).sum(-1)
    return since, amount, total


class AmortizedGuide(nn.Module):
    """DeepSets encoder of a subject's record → q(η_i) (mean and full Cholesky factor).

    Each observation becomes a feature vector (:meth:`observation_features`, scaled by
    constants set from the *fitting* population with :meth:`fit_normalization`, saved as
    buffers). One layer per observation (its cost grows with N·T, so the depth sits in the
    head, which runs once per subject), masked means of its output and of the raw features
    over each subject's observations (any number, padding masked out), then the head reads
    them with the baseline covariates and log(1 + number of observations). Output layer
    starts at zero: q starts at N(0, init_scale² I); its means are softly bounded at
    :data:`MAX_LOC` and the diagonal of L at about 3.

    The output is in standardized units z = L_Ω⁻¹ η (prior SDs):
    :class:`~deepnlme.inference.pyro.vi.VariationalEstimator` maps it to η with the model's
    current Ω, so the encoder need not follow Ω as it changes during a fit.

    Args:
        k: number of random effects K.
        n_covariates: C.
        hidden: width of the head's hidden layers (cost ∝ N).
        init_scale: initial SD of q.
        obs_hidden: width of the observation layer (cost ∝ N·T: the encoder's main cost).
    """

    n_features = 9  # per observation (see :meth:`observation_features`)

    def __init__(
        self,
        k: int,
        n_covariates: int,
        hidden: int = 64,
        init_scale: float = 0.1,
        obs_hidden: int = 16,
    ):
        super().__init__()
        self.k, self.n_covariates, self.hidden = int(k), int(n_covariates), int(hidden)
        self.obs_hidden = int(obs_hidden)
        self.obs_net = nn.Sequential(nn.Linear(self.n_features, self.obs_hidden), nn.SiLU())
        n_out = k + k * (k + 1) // 2
        self.head = nn.Sequential(
            nn.Linear(self.obs_hidden + self.n_features + n_covariates + 1, hidden),
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

    def observation_features(self, pop: Population, reference: Tensor | None = None) -> Tensor:
        """Scaled features of every observation slot ``(B, T, 9)`` (padding included), in
        :data:`ENCODER_DTYPE`: y - y_ref, the residual of the population prediction
        ``reference`` ``(B, T)`` on the scale of y (0 without one); time after the last dose
        (or after time 0 before any dose) s, log s, y = asinh(DV / (0.01 · typical DV)) (log DV
        down to 1% of the typical value, finite at DV ≤ 0), log of the last dose amount,
        total amount dosed so far, and s·y, s², y·log s: their means over a subject's
        observations are the sums of squares and products of least-squares fits of log DV
        against time (e.g. the terminal slope), which the head reads from the pooled raw
        features."""
        dtype = ENCODER_DTYPE
        t_scale, dv_scale, amt_scale = self.scales.to(dtype)
        since, amount, total = (x.to(dtype) for x in dose_history(pop))
        since = since / t_scale
        log_since = torch.log(since.clamp(min=0.0) + 0.01)
        y = torch.asinh(pop.obs_dv.to(dtype) / (0.01 * dv_scale)) / 5.0
        if reference is None:
            residual = torch.zeros_like(y)
        else:
            residual = y - torch.asinh(reference.detach().to(dtype) / (0.01 * dv_scale)) / 5.0
        return torch.stack(
            [
                residual,
                since,
                log_since,
                y,
                torch.log(amount / amt_scale + 0.01),
                total / amt_scale,
                since * y,
                since * since,
                log_since * y,
            ],
            -1,
        )

    def encode(self, pop: Population, reference: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """``(loc (N, K), scale_tril (N, K, K))`` for every subject of ``pop`` (one forward
        pass, computed in :data:`ENCODER_DTYPE`, returned in the data's dtype)."""
        dtype = ENCODER_DTYPE
        mask = pop.obs_mask
        n, t = mask.shape
        count = mask.sum(-1, keepdim=True).to(dtype)  # (N, 1)
        features = self.observation_features(pop, reference)  # (N, T, F)
        if pop.fully_observed:  # no padding: plain means over the slots
            hidden = _forward(self.obs_net, features.reshape(n * t, -1))
            pooled = torch.cat([hidden.reshape(n, t, -1).mean(-2), features.mean(-2)], -1)
        else:  # the real observations only, summed per subject
            subject = torch.arange(n, device=mask.device).unsqueeze(-1).expand_as(mask)[mask]
            real = features[mask]  # (M, F)
            hidden = torch.cat([_forward(self.obs_net, real), real], -1)
            total = hidden.new_zeros(n, hidden.shape[-1]).index_add(0, subject, hidden)
            pooled = total / count.clamp(min=1.0)
        cov = ((pop.covariates - self.cov_center) / self.cov_scale).to(dtype)
        out = _forward(self.head, torch.cat([pooled, cov, torch.log1p(count)], -1))
        out = out.to(pop.obs_time.dtype)
        k = self.k
        loc = MAX_LOC * torch.tanh(out[:, :k] / MAX_LOC)
        diag_raw = MAX_SCALE_RAW - nn.functional.softplus(MAX_SCALE_RAW - out[:, k : 2 * k])
        return loc, _lower(diag_raw, out[:, 2 * k :], k)

    def posterior(
        self, batch: SubjectBatch, reference: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """``(loc (B, K), scale_tril (B, K, K))`` of the batch's subjects (from their data and
        the population prediction ``reference`` ``(B, T)``, if given)."""
        return self.encode(batch.pop, reference)
