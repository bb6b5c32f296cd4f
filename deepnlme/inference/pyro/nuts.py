"""Full Bayesian fit with Pyro's NUTS: priors on θ, Ω (LKJ + scale) and σ, several chains.

Every declared fixed effect (θ, σ) is sampled on
its raw (unconstrained) scale with a Normal(raw initial value, ``theta_sd``) prior — a
log-normal prior around the initial estimate for positive parameters; each Ω block is
``diag(sd) · L_corr`` with sd ~ HalfNormal(``omega_scale``) and, for full blocks,
L_corr ~ LKJCholesky(``lkj_concentration``); the random effects are sampled centred,
η_i ~ N(0, Ω) (or non-centred, η_i = L z_i with z_i ~ N(0, I)). :meth:`NUTSEstimator.program`
writes the non-centred form as a Pyro program; sampling runs NUTS on the same density written
directly as a potential function (several times faster per gradient than tracing the
program). The model's own parameters are substituted by the sampled values
(``torch.func.functional_call``), so any NLMEModel whose parameters are all declared runs
unchanged. Chains run one after another (reproducible; no worker processes).

Diagnostics follow Vehtari et al. (2021): rank-normalized split R-hat and bulk ESS.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pyro
import pyro.distributions as dist
import torch
from pyro.infer import MCMC, NUTS
from pyro.ops.stats import effective_sample_size, split_gelman_rubin
from torch import Tensor, nn
from torch.func import functional_call

from deepnlme.data.population import Population
from deepnlme.inference.inner import InnerOptions, find_modes
from deepnlme.inference.joint import NegLogJoint
from deepnlme.inference.pyro.importance import importance_loglik, mode_proposal
from deepnlme.inference.pyro.program import conditional_loglik_sites
from deepnlme.model.base import NLMEModel
from deepnlme.model.domains import FullCovariance


class _ConditionalLoglik(nn.Module):
    """``forward(eta, pop)``: log p(y_i | η_i) ``(N,)`` of ``model`` (for functional_call)."""

    def __init__(self, model: NLMEModel):
        super().__init__()
        self.model = model
        self.joint = NegLogJoint(model)

    def forward(self, eta: Tensor, pop: Population) -> Tensor:
        return -self.joint(eta, pop).nll - self.model.eta_log_prior(eta)


class _Observation(nn.Module):
    """``forward(eta, pop)``: the observation sites of ``model`` (for functional_call)."""

    def __init__(self, model: NLMEModel):
        super().__init__()
        self.model = model

    def forward(self, eta: Tensor, pop: Population) -> None:
        conditional_loglik_sites(self.model, eta, pop)


@dataclass
class PosteriorDraws:
    """Draws ``(chains, samples, ...)`` by site name, and the summary quantities."""

    sites: dict[str, Tensor]
    quantities: dict[str, Tensor]  # (chains, samples) each: natural-scale parameters


class NUTSEstimator:
    """NUTS on the full posterior of ``model`` given a population.

    Args:
        model: an NLMEModel with random effects whose trainable parameters are all declared.
        num_samples, warmup: draws kept and warm-up (adaptation) iterations per chain.
        num_chains: chains, run one after another.
        theta_sd: prior SD of every θ and σ on its raw scale (log scale when positive).
        omega_scale: HalfNormal scale of the random-effect SDs.
        lkj_concentration: LKJ prior concentration of full Ω blocks' correlations.
        target_accept, max_tree_depth: NUTS settings.
        is_samples: importance samples per subject for :meth:`subject_loglik`.
        seed: seed of chain c is ``seed + c``.
        centred: sample η_i directly (rich individual data) rather than η_i = L z_i
            (non-centred; sparse data).
        full_mass: dense mass matrix adaptation.
        name: method name in reports.
    """

    fit_style = "nuts"

    def __init__(
        self,
        model: NLMEModel,
        num_samples: int = 500,
        warmup: int = 500,
        num_chains: int = 4,
        theta_sd: float = 2.0,
        omega_scale: float = 1.0,
        lkj_concentration: float = 2.0,
        target_accept: float = 0.8,
        max_tree_depth: int = 8,
        is_samples: int = 2000,
        seed: int = 0,
        centred: bool = True,
        full_mass: bool = False,
        name: str = "nuts",
    ):
        if model.n_eta == 0:
            raise ValueError(f"method={name} needs random effects; {type(model).__name__} has none")
        if model.n_undeclared_parameters():
            raise ValueError(
                f"method={name} needs a model whose parameters are all declared (θ, Ω, σ); "
                f"{type(model).__name__} has {model.n_undeclared_parameters()} network weights"
            )
        self.model = model
        self.num_samples, self.warmup, self.num_chains = int(num_samples), int(warmup), int(
            num_chains
        )
        self.theta_sd, self.omega_scale = float(theta_sd), float(omega_scale)
        self.lkj_concentration = float(lkj_concentration)
        self.target_accept, self.max_tree_depth = float(target_accept), int(max_tree_depth)
        self.is_samples = int(is_samples)
        self.seed = int(seed)
        self.centred, self.full_mass = bool(centred), bool(full_mass)
        self.name = name
        self.observation = _Observation(model)
        self.draws: PosteriorDraws | None = None
        self._init_raw = {
            n: p.raw.detach().clone() for n, p in model.declared().items() if not p.fixed
        }

    # ------------------------------------------------------------------- the program
    def _theta_names(self) -> list[str]:
        blocks = {id(b) for b in self.model.random_effects()}
        return [n for n, p in self.model.declared().items() if id(p) not in blocks and not p.fixed]

    def program(self, pop: Population) -> None:
        """The Bayesian model as a Pyro program."""
        model = self.model
        params = {}
        for name in self._theta_names():
            init = self._init_raw[name]
            prior = dist.Normal(init, torch.full_like(init, self.theta_sd))
            params[f"model.{name}.raw"] = pyro.sample(name, prior.to_event(init.dim()))
        chols = []
        for name, block in model.declared().items():
            if block not in model.random_effects():
                continue
            like = block.raw.detach()
            sd = pyro.sample(
                f"{name}_sd",
                dist.HalfNormal(like.new_full((block.k,), self.omega_scale)).to_event(1),
            )
            if isinstance(block.domain, FullCovariance) and block.k > 1:
                corr = pyro.sample(
                    f"{name}_corr",
                    dist.LKJCholesky(block.k, like.new_tensor(self.lkj_concentration)),
                )
                chols.append(sd[:, None] * corr)
            else:
                chols.append(torch.diag(sd))
        chol = torch.block_diag(*chols)
        k = model.n_eta
        with pyro.plate("subjects", len(pop), dim=-1):
            z = pyro.sample("z", dist.Normal(chol.new_zeros(k), 1.0).to_event(1))
            eta = z @ chol.T
            functional_call(self.observation, params, (eta, pop), strict=False)

    # --------------------------------------------------------------------- sampling
    def _layout(self) -> list[tuple[str, str, int, object]]:
        """Blocks of the unconstrained vector: (site, kind, size, parameter)."""
        out = []
        for name in self._theta_names():
            out.append((name, "theta", self._init_raw[name].numel(), None))
        for name, block in self.model.declared().items():
            if block in self.model.random_effects():
                out.append((f"{name}_sd", "sd", block.k, block))
                if isinstance(block.domain, FullCovariance) and block.k > 1:
                    out.append((f"{name}_corr", "corr", block.k * (block.k - 1) // 2, block))
        return out

    def _constrain(self, u: dict[str, Tensor]) -> tuple[dict[str, Tensor], Tensor]:
        """Sites on their natural support and the log prior (Jacobians included)."""
        sites: dict[str, Tensor] = {}
        log_prior = u["z"].new_zeros(())
        corr_transform = dist.transforms.biject_to(dist.constraints.corr_cholesky)
        for site, kind, _, block in self._layout():
            x = u[site]
            if kind == "theta":
                init = self._init_raw[site]
                sites[site] = x.reshape(init.shape)
                log_prior = log_prior + dist.Normal(init.flatten(), self.theta_sd).log_prob(x).sum()
            elif kind == "sd":
                sd = torch.exp(x)
                sites[site] = sd
                log_prior = log_prior + (dist.HalfNormal(self.omega_scale).log_prob(sd) + x).sum()
            else:
                chol = corr_transform(x)
                sites[site] = chol
                lkj = dist.LKJCholesky(block.k, x.new_tensor(self.lkj_concentration))
                log_prior = (
                    log_prior + lkj.log_prob(chol) + corr_transform.log_abs_det_jacobian(x, chol)
                )
        return sites, log_prior

    def _eta_chol(self, sites: dict[str, Tensor]) -> Tensor:
        chols = []
        for name, block in self.model.declared().items():
            if block in self.model.random_effects():
                sd = sites[f"{name}_sd"]
                corr = sites.get(f"{name}_corr")
                chols.append(torch.diag(sd) if corr is None else sd[:, None] * corr)
        return torch.block_diag(*chols)

    def _potential(self, pop: Population):
        """-log p(θ, Ω, σ, z | y) + const as a function of the unconstrained sites."""
        joint = _ConditionalLoglik(self.model)

        def potential(u: dict[str, Tensor]) -> Tensor:
            sites, log_prior = self._constrain(u)
            chol = self._eta_chol(sites)
            if self.centred:  # η sampled directly: η_i ~ N(0, Ω)
                eta = u["z"]
                log_eta = dist.MultivariateNormal(
                    eta.new_zeros(eta.shape[-1]), scale_tril=chol
                ).log_prob(eta).sum()
            else:  # η_i = L z_i, z_i ~ N(0, I)
                eta = u["z"] @ chol.T
                log_eta = -0.5 * (u["z"] ** 2).sum()
            params = {f"model.{n}.raw": sites[n] for n in self._theta_names()}
            loglik = functional_call(joint, params, (eta, pop), strict=False).sum()
            return -(loglik + log_prior + log_eta)

        return potential

    def _initial(self, pop: Population) -> dict[str, Tensor]:
        init = {}
        for site, kind, _, block in self._layout():
            if kind == "theta":
                init[site] = self._init_raw[site].flatten().clone()
            elif kind == "sd":
                init[site] = torch.log(torch.diagonal(block.value().detach()).sqrt())
            else:
                init[site] = block.raw.new_zeros(block.k * (block.k - 1) // 2)
        init["z"] = pop.obs_time.new_zeros(len(pop), self.model.n_eta)
        return init

    def run(self, pop: Population) -> PosteriorDraws:
        """Sample ``num_chains`` chains; sets the model to the posterior means."""
        chains: list[dict[str, Tensor]] = []
        potential = self._potential(pop)
        for c in range(self.num_chains):
            pyro.set_rng_seed(self.seed + c)
            kernel = NUTS(
                potential_fn=potential,
                target_accept_prob=self.target_accept,
                max_tree_depth=self.max_tree_depth,
                full_mass=self.full_mass,
            )
            mcmc = MCMC(
                kernel, num_samples=self.num_samples, warmup_steps=self.warmup,
                initial_params=self._initial(pop), disable_progbar=True,
            )
            mcmc.run()
            draws = mcmc.get_samples()
            with torch.no_grad():
                sites = [
                    self._constrain({k: v[i] for k, v in draws.items()})[0]
                    for i in range(self.num_samples)
                ]
            chains.append({n: torch.stack([s_[n] for s_ in sites]) for n in sites[0]})
        stacked = {n: torch.stack([ch[n] for ch in chains]) for n in chains[0]}
        self.draws = PosteriorDraws(stacked, self._quantities(stacked))
        self._set_posterior_mean(stacked)
        return self.draws

    def _quantities(self, sites: dict[str, Tensor]) -> dict[str, Tensor]:
        """Natural-scale scalars ``(chains, samples)``: θ, σ (and log θ of positive ones),
        random-effect SDs and correlations, by name."""
        model = self.model
        out: dict[str, Tensor] = {}
        for name in self._theta_names():
            p = model.declared()[name]
            raw = sites[name]
            value = p.domain.to_natural(raw)
            if value.dim() == 2:
                out[name] = value
                if type(p.domain).__name__ == "Positive":
                    out[f"log_{name}"] = raw
            else:
                for j in range(value.shape[-1]):
                    out[f"{name}[{j}]"] = value[..., j]
        for name, block in model.declared().items():
            if block not in model.random_effects():
                continue
            sd = sites[f"{name}_sd"]
            for j, eta_name in enumerate(block.names):
                out[f"{name}_sd_{eta_name}"] = sd[..., j]
            corr_site = sites.get(f"{name}_corr")
            if corr_site is not None:
                corr = corr_site @ corr_site.transpose(-1, -2)
                for a in range(block.k):
                    for b in range(a):
                        out[f"{name}_corr_{block.names[b]}_{block.names[a]}"] = corr[..., a, b]
        return out

    @torch.no_grad()
    def _set_posterior_mean(self, sites: dict[str, Tensor]) -> None:
        model = self.model
        for name in self._theta_names():
            p = model.declared()[name]
            p.set_value(p.domain.to_natural(sites[name]).mean((0, 1)), name)
        for name, block in model.declared().items():
            if block not in model.random_effects():
                continue
            sd = sites[f"{name}_sd"]
            corr_site = sites.get(f"{name}_corr")
            if corr_site is None:
                cov = torch.diag_embed(sd * sd)
            else:
                chol = sd[..., :, None] * corr_site
                cov = chol @ chol.transpose(-1, -2)
            block.set_value(cov.mean((0, 1)), name)

    def summary(self) -> dict[str, dict[str, float]]:
        """Per quantity: mean, sd, q2.5, q97.5, rhat (rank-normalized split), ess_bulk."""
        table = {}
        for name, x in self.draws.quantities.items():
            flat = x.flatten()
            z = _rank_normalize(x)
            table[name] = {
                "mean": float(flat.mean()),
                "sd": float(flat.std()),
                "q2.5": float(torch.quantile(flat, 0.025)),
                "q97.5": float(torch.quantile(flat, 0.975)),
                "rhat": float(split_gelman_rubin(z, chain_dim=0, sample_dim=1)),
                "ess_bulk": float(effective_sample_size(z, chain_dim=0, sample_dim=1)),
            }
        return table

    # ------------------------------------------------------------------ diagnostics
    def subject_loglik(self, pop: Population, warm_start: bool = True) -> Tensor:
        """log p(y_i) ``(N,)`` at the posterior means, by importance sampling."""
        loc, scale_tril = mode_proposal(self.model, pop)
        return importance_loglik(
            self.model, pop, loc, scale_tril, self.is_samples, seed=self.seed
        ).subject_loglik

    def modes(self, pop: Population, warm_start: bool = True) -> Tensor:
        """Conditional modes η̂ ``(N, K)`` at the posterior means."""
        start = pop.obs_time.new_zeros(len(pop), self.model.n_eta)
        with torch.no_grad():
            joint = NegLogJoint(self.model)
            return find_modes(joint, start, pop, options=InnerOptions(gtol=1e-6)).eta

    def reset(self) -> None:
        """Nothing to forget."""


def _rank_normalize(x: Tensor) -> Tensor:
    """Rank-normalized draws ``(chains, samples)`` (Vehtari et al. 2021, eq. 14)."""
    flat = x.flatten()
    ranks = torch.empty_like(flat)
    ranks[flat.argsort()] = torch.arange(1, flat.numel() + 1, dtype=flat.dtype)
    p = (ranks - 0.375) / (flat.numel() + 0.25)
    return (math.sqrt(2.0) * torch.erfinv(2.0 * p - 1.0)).reshape(x.shape)


def save_trace_plot(estimator: NUTSEstimator, path) -> object:
    """Trace plot (one panel per quantity, one line per chain) as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    items = list(estimator.draws.quantities.items())
    cols = 3
    rows = math.ceil(len(items) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 2.2 * rows), squeeze=False)
    for ax, (name, x) in zip(axes.flat, items, strict=False):
        for chain in x:
            ax.plot(chain.numpy(), lw=0.5)
        ax.set_title(name, fontsize=9)
    for ax in list(axes.flat)[len(items) :]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path
