"""A linear mixed model written as an NLME model, whose marginal likelihood is known exactly."""

import torch

from deepnlme.data.population import Population
from deepnlme.likelihood import residual
from deepnlme.model import NLMEModel, RandomEffects, positive
from deepnlme.model.params import Param


class RandomSlopeModel(NLMEModel):
    """y_it = (b0 + η0) + (b1 + η1)·t + ε, ε ~ N(0, σ²), η ~ N(0, Ω) full."""

    def __init__(self):
        super().__init__()
        self.b0 = Param(init=1.0)
        self.b1 = Param(init=0.5)
        self.omega = RandomEffects(["int", "slope"], [[0.5, 0.1], [0.1, 0.2]], "full")
        self.sigma = positive(0.3)

    def pre(self, p, eta, cov):
        return {"a": p.b0 + eta.int, "b": p.b1 + eta.slope}

    def derived(self, p, indiv, amounts, cov):
        return residual.additive(indiv.a[:, None] + indiv.b[:, None] * self.t, p.sigma)

    def observe(self, eta, pop):
        self.t = pop.obs_time
        return super().observe(eta, pop)


def exact_loglik(model: RandomSlopeModel, pop: Population) -> float:
    """Σ_i log N(y_i; X_i b, Z_i Ω Z_iᵀ + σ² I) over each subject's real observations."""
    total = 0.0
    p = model.param_values()
    for i in range(len(pop)):
        m = pop.obs_mask[i]
        t = pop.obs_time[i][m]
        y = pop.obs_dv[i][m]
        z = torch.stack([torch.ones_like(t), t], -1)
        cov = z @ p["omega"] @ z.T + p["sigma"] ** 2 * torch.eye(len(t))
        dist = torch.distributions.MultivariateNormal(p["b0"] + p["b1"] * t, cov)
        total += dist.log_prob(y).item()
    return total


def random_slope_population(n: int = 6, seed: int = 0) -> Population:
    """n subjects with 3..n+2 observations each (ragged, padded), no doses."""
    g = torch.Generator().manual_seed(seed)
    counts = [3 + i % 4 for i in range(n)]
    t_max = max(counts)
    time = torch.zeros(n, t_max)
    dv = torch.zeros(n, t_max)
    mask = torch.zeros(n, t_max, dtype=torch.bool)
    for i, c in enumerate(counts):
        t = torch.arange(c, dtype=torch.float64)
        a = 1.0 + 0.7 * torch.randn((), generator=g)
        b = 0.5 + 0.4 * torch.randn((), generator=g)
        time[i, :c] = t
        dv[i, :c] = a + b * t + 0.3 * torch.randn(c, generator=g)
        mask[i, :c] = True
    zl = torch.zeros(n, t_max, dtype=torch.long)
    zd = torch.zeros(n, 1)
    return Population(
        ids=[str(i + 1) for i in range(n)],
        covariate_names=[],
        obs_time=time,
        obs_dv=dv,
        obs_cmt=zl,
        obs_mask=mask,
        obs_epoch=zl.clone(),
        obs_row=zl.clone(),
        dose_time=zd,
        dose_amt=zd.clone(),
        dose_rate=zd.clone(),
        dose_duration=zd.clone(),
        dose_cmt=zd.long(),
        dose_ss=zd.long(),
        dose_ii=zd.clone(),
        dose_mask=zd.bool(),
        dose_epoch=zd.long(),
        covariates=torch.zeros(n, 0),
        obs_covariates=torch.zeros(n, t_max, 0),
        subject_index=torch.arange(n),
    )
