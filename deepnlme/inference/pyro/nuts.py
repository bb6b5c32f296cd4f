"""Full Bayesian fit with Pyro's NUTS: priors on θ, Ω (LKJ + scale) and σ, several chains.

Every declared fixed effect (θ, σ) is sampled on its raw (unconstrained) scale with a
Normal(raw initial value, ``theta_sd``) prior — a log-normal prior around the initial estimate
for positive parameters; each Ω block is ``diag(sd) · L_corr`` with sd ~ HalfNormal
(``omega_scale``) and, for full blocks, L_corr ~ LKJCholesky(``lkj_concentration``).
:meth:`NUTSEstimator.program` writes the model as a Pyro program (non-centred η = L z).

Sampling runs Pyro's NUTS on the same density written as a potential function of one flat
unconstrained vector (:class:`FlatPosterior`), for three reasons of speed (Theophylline: one
chain of 100 + 100 iterations took 416 s on the program's own density, 10–20 s here):

* the random effects are centred, and an η whose typical value is mu-referenced
  (``tvcl·exp(η_cl)``) is sampled as ψ = log tvcl + η: with rich individual data the
  posterior of (log tvcl, η_cl,1..N) is a long ridge (only ψ is pinned by the data) that
  NUTS crosses with trees of depth 5–6; in ψ it is round (depth ~4);
* the model's parameters are substituted by the sampled tensors directly (no
  ``functional_call`` machinery per evaluation), and
* the potential is traced once with ``torch.jit.trace`` (``jit``), checked against the
  eager function at a nearby point (value and gradient), which halves the cost of a gradient.

Chains run one after another (reproducible; no worker processes), each from the initial
values jittered on the unconstrained scale. Diagnostics follow Vehtari et al. (2021):
rank-normalized split R-hat and bulk ESS.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import pyro
import pyro.distributions as dist
import torch
from pyro.infer import MCMC, NUTS
from pyro.ops.stats import effective_sample_size, split_gelman_rubin
from torch import Tensor, nn
from torch.func import functional_call

from deepnlme.data.population import Population
from deepnlme.inference.joint import NegLogJoint
from deepnlme.inference.pyro.program import conditional_loglik_sites
from deepnlme.inference.pyro.saem import ImportanceReports, mu_referenced
from deepnlme.model.base import NLMEModel
from deepnlme.model.domains import FullCovariance


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


class NUTSEstimator(ImportanceReports):
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
        centred: sample η_i (ψ_i for mu-referenced η) directly — rich individual data —
            rather than η_i = L z_i (non-centred; sparse data).
        full_mass: dense mass matrix adaptation.
        jit: sample on the posterior traced by ``torch.jit.trace`` (checked against the eager
            function; several times faster per gradient).
        init_jitter: SD of the N(0, ·) jitter of each chain's start on the unconstrained scale.
        progress: show Pyro's progress bar of each chain (off when the trainer's is).
        name: method name in reports.
    """

    fit_style = "nuts"

    def __init__(
        self,
        model: NLMEModel,
        num_samples: int = 500,
        warmup: int = 300,
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
        jit: bool = True,
        init_jitter: float = 0.3,
        progress: bool = True,
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
        self.jit, self.init_jitter, self.progress = bool(jit), float(init_jitter), bool(progress)
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

    def _initial(self, pop: Population) -> dict[str, Tensor]:
        """Starting point by site: θ and σ at their initial values, Ω's SDs at the model's,
        identity correlations, η = 0 (ψ at the typical values when centred)."""
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
        """Sample ``num_chains`` chains; sets the model to the posterior means.

        Chain c starts from the initial values jittered by N(0, ``init_jitter``²) on the
        unconstrained scale (seeded by ``seed + c``), so that R-hat compares chains that
        started apart."""
        chains: list[dict[str, Tensor]] = []
        posterior = FlatPosterior(self, pop)
        start = posterior.flatten(self._initial(pop))
        potential = posterior.compiled(start) if self.jit else posterior

        def potential_fn(u: dict[str, Tensor]) -> Tensor:
            return potential(u["u"])

        for c in range(self.num_chains):
            pyro.set_rng_seed(self.seed + c)
            g = torch.Generator().manual_seed(self.seed + c)
            jitter = torch.randn(start.shape, generator=g, dtype=start.dtype).to(start.device)
            kernel = NUTS(
                potential_fn=potential_fn,
                target_accept_prob=self.target_accept,
                max_tree_depth=self.max_tree_depth,
                full_mass=self.full_mass,
            )
            mcmc = MCMC(
                kernel, num_samples=self.num_samples, warmup_steps=self.warmup,
                initial_params={"u": start + self.init_jitter * jitter},
                disable_progbar=not self.progress,
            )
            mcmc.run()
            draws = mcmc.get_samples()["u"]
            with torch.no_grad():
                sites = [self._constrain(posterior.unflatten(u))[0] for u in draws]
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


@contextmanager
def substituted(model: NLMEModel, raws: dict[str, Tensor]) -> Iterator[None]:
    """Within the block, the declared parameters named in ``raws`` read the given raw tensors
    (graph inputs: gradients flow to them, and a traced function takes them as inputs)."""
    declared = model.declared()
    saved = {name: declared[name]._parameters["raw"] for name in raws}
    try:
        for name, value in raws.items():
            declared[name]._parameters["raw"] = value
        yield
    finally:
        for name, raw in saved.items():
            declared[name]._parameters["raw"] = raw


class FlatPosterior:
    """-log p(θ, Ω, σ, η | y) + const of a :class:`NUTSEstimator`'s model as a function of one
    flat unconstrained vector ``u`` ``(D,)``: θ and σ raw, log SDs and LKJ coordinates of Ω,
    then the random effects ``(N·K,)`` (row-major by subject).

    Random-effect coordinates: centred, η_i itself — except that an η_j whose typical value is
    mu-referenced (``tvcl·exp(η_cl)``, :func:`~deepnlme.inference.pyro.saem.mu_referenced`) is
    sampled as ψ_ij = log tvcl + η_ij, so that the typical value and the subjects' effects are
    not one long ridge of the posterior; non-centred, z_i with η_i = L z_i.
    """

    def __init__(self, estimator: NUTSEstimator, pop: Population):
        model = estimator.model
        self.estimator, self.model, self.pop = estimator, model, pop
        self.joint = NegLogJoint(model)
        layout = estimator._layout()
        self.names = [site for site, *_ in layout] + ["z"]
        self.shapes = [(size,) for _, _, size, _ in layout] + [(len(pop), model.n_eta)]
        self.sizes = [math.prod(shape) for shape in self.shapes]
        self.theta_names = estimator._theta_names()
        # the model's own Ω only enters as a term that cancels (constants when traced)
        self.omega_raw = {
            n: p.raw.detach() for n, p in model.declared().items() if p in model.random_effects()
        }
        self.mu: dict[int, str] = {}
        if estimator.centred:
            by_raw = {id(p.raw): n for n, p in model.declared().items()}
            for j, raw in mu_referenced(model, pop, diagonal_only=False).items():
                name = by_raw.get(id(raw))
                if name in self.theta_names:
                    self.mu[j] = name

    def unflatten(self, u: Tensor) -> dict[str, Tensor]:
        parts = torch.split(u, self.sizes)
        return {n: x.reshape(s) for n, x, s in zip(self.names, parts, self.shapes, strict=True)}

    def flatten(self, sites: dict[str, Tensor]) -> Tensor:
        """Inverse of :meth:`unflatten`; ``sites["z"]`` holds η (centred) or z."""
        z = sites["z"]
        if self.mu:
            z = z + self._offset({n: sites[n] for n in self.mu.values()}, z)
        return torch.cat([(z if n == "z" else sites[n]).flatten() for n in self.names])

    def _offset(self, raws: dict[str, Tensor], like: Tensor) -> Tensor:
        """``(K,)``: the raw typical value of each mu-referenced η (0 for the others)."""
        zero = like.new_zeros(())
        return torch.stack(
            [raws[self.mu[j]].reshape(()) if j in self.mu else zero for j in range(like.shape[-1])]
        )

    def eta(self, sites: dict[str, Tensor], chol: Tensor) -> Tensor:
        """η ``(N, K)`` from the unconstrained sites."""
        z = sites["z"]
        if not self.estimator.centred:
            return z @ chol.T
        return z - self._offset(sites, z) if self.mu else z

    def __call__(self, u: Tensor) -> Tensor:
        est, model = self.estimator, self.model
        raw = self.unflatten(u)
        sites, log_prior = est._constrain(raw)
        chol = est._eta_chol(sites)
        eta = self.eta(raw, chol)
        if est.centred:  # log N(η_i; 0, LLᵀ)
            w = torch.linalg.solve_triangular(chol, eta.T, upper=False)
            log_eta = -0.5 * (w * w).sum() - eta.shape[0] * torch.log(torch.diagonal(chol)).sum()
        else:
            log_eta = -0.5 * (raw["z"] ** 2).sum()
        with substituted(model, {**self.omega_raw, **{n: sites[n] for n in self.theta_names}}):
            # log p(y_i | η_i): the joint less the model's own prior of η
            loglik = -(self.joint(eta, self.pop).nll + model.eta_log_prior(eta)).sum()
        return -(loglik + log_prior + log_eta)

    def compiled(self, at: Tensor) -> Callable[[Tensor], Tensor]:
        """This function traced by ``torch.jit.trace`` at ``at`` (several times faster per
        gradient: no Python per evaluation); the eager function where tracing fails or the
        traced one disagrees with it (value or gradient) at a nearby point."""
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                traced = torch.jit.trace(self.__call__, (at.detach(),), check_trace=False)
            except Exception:  # noqa: BLE001 (any tracing failure: sample eagerly)
                return self
        g = torch.Generator().manual_seed(0)
        probe = at + 0.1 * torch.randn(at.shape, generator=g, dtype=at.dtype).to(at.device)
        values = []
        for f in (self, traced):
            x = probe.detach().requires_grad_(True)
            value = f(x)
            values.append((value.detach(), torch.autograd.grad(value, x)[0]))
        (v0, g0), (v1, g1) = values
        rtol = 1e-8 if at.dtype == torch.float64 else 1e-4  # same operations, same rounding
        if torch.allclose(v0, v1, rtol=rtol, atol=rtol) and torch.allclose(
            g0, g1, rtol=100 * rtol, atol=rtol
        ):
            return traced
        return self


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
