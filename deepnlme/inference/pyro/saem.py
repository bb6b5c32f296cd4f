"""Stochastic approximation EM (SAEM) as in Monolix / saemix, for any NLME model.

Each iteration k:

1. **E-step (simulation)**: Metropolis–Hastings kernels on η, batched over all subjects and
   ``n_chains`` chains per subject (saemix's kernels): ``mcmc[0]`` independent proposals from
   the prior N(0, Ω), ``mcmc[1]`` component-wise random walks, ``mcmc[2]`` random walks on the
   whole vector; the random-walk scales adapt toward an acceptance rate of 0.4.
2. **Stochastic approximation**: Q_k(θ) = Q_{k-1}(θ) + γ_k (log p(y, η^(k); θ) - Q_{k-1}(θ)),
   with γ_k = 1 for the ``n_explore`` exploration iterations and γ_k = 1/(k - n_explore) for
   the ``n_smooth`` smoothing iterations; Q_k is kept exactly as the average of the complete
   log-likelihood over the samples drawn since the last γ = 1 iteration.
3. **M-step**: Ω in closed form (the average of η ηᵀ over those samples; diagonal blocks keep
   the diagonal), σ of an additive error model in closed form (mean squared residual at the
   new θ), everything else (θ, other σ, network weights) by L-BFGS steps on Q_k.
   During the first ``n_anneal`` iterations Ω's variances shrink by at most a factor
   ``anneal`` per iteration (simulated annealing: the chains keep exploring).

Mu-referencing (Monolix): a fixed effect whose raw value enters the individual parameters
exactly as an η does (``cl = tvcl·exp(η_cl)``: log tvcl and η_cl are interchangeable; found by
comparing derivatives, :func:`mu_referenced`) is estimated in closed form as the mean of the
sampled ψ = raw + η, and its η's variance about that mean; the chains are shifted so that ψ is
unchanged. Without it a typical value would move only as fast as EM's missing-information
rate allows (very slowly when each subject's data are rich).

Plain torch; ``iterate`` is one SAEM iteration (what a Lightning step calls).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

from deepnlme.data.population import Population
from deepnlme.inference.inner import InnerOptions, find_modes
from deepnlme.inference.joint import NegLogJoint
from deepnlme.inference.pyro.importance import importance_loglik, mode_proposal
from deepnlme.inference.pyro.program import repeat_subjects
from deepnlme.inference.pyro.vi import NonFiniteObjective
from deepnlme.model.base import NLMEModel
from deepnlme.model.domains import DiagonalCovariance

#: Target acceptance rate of the random-walk kernels.
TARGET_ACCEPTANCE = 0.4


@dataclass
class SAEMState:
    """Chains and the samples that define Q_k (kept in checkpoints)."""

    eta: Tensor  # (C·N, K) current η of every chain (row c·N + i: chain c of subject i)
    scale_single: Tensor  # (K,) random-walk SD of the component-wise kernel
    scale_block: Tensor  # (K,) random-walk SD of the block kernel
    samples: list[Tensor] = field(default_factory=list)  # ψ draws of Q_k (L-BFGS M-step only)
    sum1: Tensor | None = None  # (K,) Σ ψ over the draws of Q_k (all chains and subjects)
    sum2: Tensor | None = None  # (K, K) Σ ψ ψᵀ
    count: int = 0  # number of ψ rows summed
    ssr: float = 0.0  # Σ squared residuals of those draws (additive σ)
    n_res: float = 0.0  # number of residuals summed
    iteration: int = 0


@torch.no_grad()
def mu_referenced(
    model: NLMEModel, pop: Population, diagonal_only: bool = True
) -> dict[int, Tensor]:
    """``{j: raw}``: η_j paired with a scalar raw fixed effect that enters every individual
    parameter exactly as η_j does — shifting raw by h and η_j by -h changes nothing (checked
    at a random probe point), e.g. log tvcl for ``tvcl·exp(η_cl)``; with ``diagonal_only``
    only η of diagonal Ω blocks are paired (SAEM's closed-form M-step)."""
    k = model.n_eta
    g = torch.Generator().manual_seed(1)
    eta = (0.3 * torch.randn(len(pop), k, generator=g, dtype=pop.obs_time.dtype)).to(pop.device)
    diagonal = []
    for block in model.random_effects():
        diagonal += [isinstance(block.domain, DiagonalCovariance) or not diagonal_only] * block.k
    omega = {id(b.raw) for b in model.random_effects()}
    candidates = [
        p for p in model.parameters() if p.requires_grad and p.numel() == 1 and id(p) not in omega
    ]

    def values(e: Tensor) -> Tensor:
        indiv = model.individual_parameters(e, pop)
        return torch.stack([v.expand(len(pop)) for v in indiv.values()], -1)

    base = values(eta)
    h = 0.1
    pairs: dict[int, Tensor] = {}
    for j in range(k):
        if not diagonal[j]:
            continue
        moved = eta.clone()
        moved[:, j] -= h
        for raw in candidates:
            if any(raw is r for r in pairs.values()):
                continue
            raw.add_(h)
            try:
                shifted, only_raw = values(moved), values(eta)
            finally:
                raw.sub_(h)
            if torch.allclose(shifted, base, rtol=1e-10, atol=0) and not torch.allclose(
                only_raw, base, rtol=1e-6, atol=0
            ):
                pairs[j] = raw
                break
    return pairs


class ImportanceReports:
    """What the reports ask of an estimator without a posterior approximation of its own
    (SAEM, MCEM, NUTS): importance-sampled log p(y_i) around each subject's mode, and the
    modes. Needs ``model``, ``is_samples`` and ``seed``."""

    model: NLMEModel
    is_samples: int
    seed: int

    def subject_loglik(self, pop: Population, warm_start: bool = True) -> Tensor:
        """log p(y_i) ``(N,)`` by importance sampling around each subject's mode."""
        loc, scale_tril = mode_proposal(self.model, pop)
        return importance_loglik(
            self.model, pop, loc, scale_tril, self.is_samples, seed=self.seed
        ).subject_loglik

    def modes(self, pop: Population, warm_start: bool = True) -> Tensor:
        """Conditional modes η̂ ``(N, K)`` (MAP EBEs, as saemix reports)."""
        start = pop.obs_time.new_zeros(len(pop), self.model.n_eta)
        with torch.no_grad():
            joint = NegLogJoint(self.model)
            return find_modes(joint, start, pop, options=InnerOptions(gtol=1e-6)).eta

    def reset(self) -> None:
        """Nothing to forget."""


class SAEMEstimator(ImportanceReports):
    """SAEM fit of ``model`` (one :meth:`iterate` per iteration; Lightning drives the loop).

    Args:
        model: an NLMEModel with random effects.
        n_explore, n_smooth: iterations of the two phases (saemix: 300, 100; more smoothing
            here: the chains are cheap and the estimates' Monte Carlo error shrinks).
        n_anneal: iterations with simulated annealing of Ω (and σ).
        anneal: largest factor by which a variance may shrink per annealing iteration.
        n_chains: chains per subject (default: enough for 200 chains in all).
        mcmc: iterations of the three kernels per SAEM iteration (saemix: 2, 2, 2).
        m_steps: L-BFGS iterations of the M-step per SAEM iteration.
        is_samples: importance samples per subject for :meth:`subject_loglik`.
        seed: seed of the chains.
        name: method name in reports.
    """

    fit_style = "saem"

    def __init__(
        self,
        model: NLMEModel,
        n_explore: int = 300,
        n_smooth: int = 200,
        n_anneal: int = 100,
        anneal: float = 0.95,
        n_chains: int | None = None,
        mcmc: tuple[int, int, int] | list[int] = (2, 2, 2),
        m_steps: int = 4,
        is_samples: int = 2000,
        seed: int = 0,
        name: str = "saem",
    ):
        if model.n_eta == 0:
            raise ValueError(
                f"method={name} needs random effects; {type(model).__name__} has none"
            )
        self.model = model
        self.n_explore, self.n_smooth = int(n_explore), int(n_smooth)
        self.n_anneal, self.anneal = int(n_anneal), float(anneal)
        self.n_chains = n_chains
        self.mcmc = [int(m) for m in mcmc]
        self.m_steps = int(m_steps)
        self.is_samples = int(is_samples)
        self.seed = int(seed)
        self.name = name
        self.joint = NegLogJoint(model)
        self.state: SAEMState | None = None
        self.history: list[dict[str, float]] = []
        self._generator = torch.Generator().manual_seed(self.seed)
        self._mu: dict[int, Tensor] = {}
        self._sigma_closed_form = (
            getattr(model, "error", None) == "additive" and hasattr(model, "sigma_add")
        )

    @property
    def n_iterations(self) -> int:
        return self.n_explore + self.n_smooth

    # --------------------------------------------------------------------------- E-step
    def _randn(self, *shape: int, like: Tensor) -> Tensor:
        return torch.randn(shape, generator=self._generator, dtype=like.dtype).to(like.device)

    def _rand(self, n: int, like: Tensor) -> Tensor:
        return torch.rand(n, generator=self._generator, dtype=like.dtype).to(like.device)

    def _conditional(self, eta: Tensor, rows: Population) -> Tensor:
        """log p(y_i | η_i) ``(C·N,)``."""
        return -self.joint(eta, rows).nll - self.model.eta_log_prior(eta)

    @torch.no_grad()
    def _e_step(self, rows: Population) -> dict[str, float]:
        """The MCMC kernels; returns acceptance rates."""
        s = self.state
        model = self.model
        eta = s.eta
        cond = self._conditional(eta, rows)
        prior = model.eta_log_prior(eta)
        chol = torch.block_diag(*[b.cholesky() for b in model.random_effects()])
        n, k = eta.shape
        rates = {}
        accepted = 0.0
        for _ in range(self.mcmc[0]):  # kernel 1: proposals from the prior
            prop = self._randn(n, k, like=eta) @ chol.T
            c_new = self._conditional(prop, rows)
            ok = torch.log(self._rand(n, eta)) < c_new - cond
            eta = torch.where(ok[:, None], prop, eta)
            cond = torch.where(ok, c_new, cond)
            accepted += float(ok.double().mean())
        prior = model.eta_log_prior(eta)
        rates["acc_prior"] = accepted / max(self.mcmc[0], 1)
        for kernel, scale in ((1, s.scale_single), (2, s.scale_block)):
            acc = torch.zeros(k, dtype=eta.dtype, device=eta.device)
            for _ in range(self.mcmc[kernel]):
                dims = range(k) if kernel == 1 else [None]
                for j in dims:
                    step = self._randn(n, k, like=eta) * scale
                    if j is not None:
                        step = torch.zeros_like(step).index_copy(1, torch.tensor([j]),
                                                                step[:, j : j + 1])
                    prop = eta + step
                    c_new, p_new = self._conditional(prop, rows), model.eta_log_prior(prop)
                    ok = torch.log(self._rand(n, eta)) < c_new + p_new - cond - prior
                    eta = torch.where(ok[:, None], prop, eta)
                    cond, prior = torch.where(ok, c_new, cond), torch.where(ok, p_new, prior)
                    rate = ok.double().mean()
                    if j is None:
                        acc += rate
                    else:
                        acc[j] += rate
            if self.mcmc[kernel]:
                acc = acc / self.mcmc[kernel]
                scale.mul_(1.0 + 0.4 * (acc - TARGET_ACCEPTANCE))
                rates[f"acc_rw{kernel}"] = float(acc.mean())
        s.eta = eta
        return rates

    # --------------------------------------------------------------------------- M-step
    def _offset(self, like: Tensor) -> Tensor:
        """``(K,)``: the raw value of each η's mu-referenced fixed effect (0 for the others)."""
        out = like.new_zeros(self.model.n_eta)
        for j, raw in self._mu.items():
            out[j] = raw.detach().reshape(())
        return out

    def _m_step(self, rows: Population, annealing: bool) -> float:
        """Closed-form μ (mu-referenced θ), Ω (and additive σ), L-BFGS on the other θ.

        Q_k is the average of log p(y, ψ^(m); θ) over the samples m since the last γ = 1
        iteration; its ψ-statistics (Σψ, Σψψᵀ) are running sums, so μ and Ω cost nothing
        more per sample. Samples themselves are kept only when some θ needs L-BFGS steps.
        Returns the complete-data log-likelihood of the current sample (per chain).
        """
        model, st = self.model, self.state
        old = self._offset(st.eta)
        count = st.count
        with torch.no_grad():
            for j, raw in self._mu.items():
                raw.fill_(st.sum1[j] / count)
        new = self._offset(st.eta)
        st.eta = st.eta + (old - new)  # same ψ, new centre
        with torch.no_grad():
            # mean of (ψ - o)(ψ - o)ᵀ from the running sums, o the new offsets
            second = (
                st.sum2 - torch.outer(new, st.sum1) - torch.outer(st.sum1, new)
            ) / count + torch.outer(new, new)
            start = 0
            for block in model.random_effects():
                if not block.fixed:
                    omega = second[start : start + block.k, start : start + block.k]
                    if isinstance(block.domain, DiagonalCovariance):
                        omega = torch.diag(torch.diagonal(omega))
                    if annealing:
                        d_new = torch.diagonal(omega)
                        d = torch.maximum(d_new, self.anneal * torch.diagonal(block.value()))
                        r = (d / d_new).sqrt()
                        omega = omega * r[:, None] * r[None, :]
                    block.set_value(0.5 * (omega + omega.T))
                start += block.k
        params = self._theta_params()
        chains = len(rows) // self._n_subjects
        if params:  # Q over every stored sample
            psi = torch.cat(st.samples)
            q_rows = repeat_subjects(rows, len(st.samples))
            eta_all = psi - new
            scale = float(len(st.samples) * chains)
            optimizer = torch.optim.LBFGS(
                params, lr=1.0, max_iter=self.m_steps, line_search_fn="strong_wolfe",
                tolerance_grad=1e-9, tolerance_change=1e-12,
            )

            def closure() -> Tensor:
                optimizer.zero_grad()
                loss = -self._q(eta_all, q_rows) / scale
                loss.backward()
                return loss

            optimizer.step(closure)
        with torch.no_grad():
            if self._sigma_closed_form and not model.sigma_add.fixed:
                if params:  # residuals of every stored sample at the new θ
                    obs = model.observe(eta_all, q_rows)
                    mask = q_rows.obs_mask
                    r2 = ((q_rows.obs_dv - obs.mean) ** 2 * mask).sum() / mask.sum()
                else:  # predictions depend on ψ only: residuals of a sample never change
                    obs = model.observe(st.eta, rows)
                    mask = rows.obs_mask
                    st.ssr += float(((rows.obs_dv - obs.mean) ** 2 * mask).sum())
                    st.n_res += float(mask.sum())
                    r2 = torch.as_tensor(st.ssr / st.n_res, dtype=st.eta.dtype)
                old_var = model.sigma_add.value() ** 2
                var = torch.maximum(r2, self.anneal * old_var) if annealing else r2
                model.sigma_add.set_value(var.sqrt())
            return float(self._q(st.eta, rows)) / chains

    def _theta_params(self) -> list[Tensor]:
        """Trainable parameters of the gradient M-step (all but Ω and a closed-form σ)."""
        skip = {id(b.raw) for b in self.model.random_effects()}
        skip |= {id(raw) for raw in self._mu.values()}
        if self._sigma_closed_form:
            skip.add(id(self.model.sigma_add.raw))
        return [p for p in self.model.parameters() if p.requires_grad and id(p) not in skip]

    def _q(self, eta: Tensor, rows: Population) -> Tensor:
        """Σ log p(y, η; θ) over the stored samples (+ log prior of θ per subject set)."""
        return -self.joint(eta, rows).nll.sum() + self.model.log_prior()

    # ----------------------------------------------------------------------- the loop
    def setup(self, pop: Population) -> None:
        """Start the chains at η = 0 (C chains per subject)."""
        n, k = len(pop), self.model.n_eta
        chains = self.n_chains or max(1, math.ceil(200 / max(n, 1)))
        self.n_chains = chains
        self._n_subjects = n
        self._mu = mu_referenced(self.model, pop)
        sd = self.model.eta_sd().detach()
        ref = pop.obs_time
        self.state = SAEMState(
            eta=ref.new_zeros(chains * n, k),
            scale_single=(0.5 * sd).to(ref),
            scale_block=(0.3 * sd).to(ref),
        )
        self.history = []

    #: SAEMState fields saved in checkpoints (with the random stream and the history).
    _STATE_FIELDS = (
        "eta", "scale_single", "scale_block", "samples", "sum1", "sum2", "count", "ssr",
        "n_res", "iteration",
    )

    def state_dict(self) -> dict:
        """The chains, Q_k's statistics, the iteration, the random stream and the history
        (plain tensors, numbers and lists: loadable with ``weights_only``)."""
        s = self.state
        return {
            **{name: getattr(s, name) for name in self._STATE_FIELDS},
            "generator": self._generator.get_state(),
            "history": list(self.history),
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue from :meth:`state_dict` (after :meth:`setup` on the same population): the
        next iteration is the one an uninterrupted fit would have run."""
        if self.state is None or state["eta"].shape != self.state.eta.shape:
            raise ValueError(
                "the checkpoint's SAEM chains do not match this fit (other data or n_chains)"
            )
        like = self.state.eta
        for name in self._STATE_FIELDS:
            value = state[name]
            if isinstance(value, Tensor):
                value = value.to(like.device)
            elif isinstance(value, list):
                value = [v.to(like.device) for v in value]
            setattr(self.state, name, value)
        self._generator.set_state(state["generator"])
        self.history = list(state["history"])

    def chain_rows(self, pop: Population) -> Population:
        """``pop`` repeated once per chain (rows of :attr:`SAEMState.eta`)."""
        return repeat_subjects(pop, self.n_chains)

    def iterate(self, rows: Population) -> dict[str, float]:
        """One SAEM iteration on the chain rows (:meth:`chain_rows`); returns its logs."""
        s = self.state
        k = s.iteration
        rates = self._e_step(rows)
        psi = s.eta.detach() + self._offset(s.eta)
        if k < self.n_explore or s.sum1 is None:  # exploration: γ = 1, Q_k is this sample's
            s.samples, s.count, s.ssr, s.n_res = [], 0, 0.0, 0.0
            s.sum1, s.sum2 = torch.zeros_like(psi[0]), psi.new_zeros(psi.shape[1], psi.shape[1])
        if self._theta_params():
            s.samples.append(psi)
        s.sum1, s.sum2 = s.sum1 + psi.sum(0), s.sum2 + psi.T @ psi
        s.count += psi.shape[0]
        q = self._m_step(rows, annealing=k < self.n_anneal)
        if not math.isfinite(q):
            raise NonFiniteObjective(
                f"SAEM: the complete-data log-likelihood is not finite at iteration {k}"
            )
        s.iteration += 1
        record = {"iteration": float(k), "q": q, **rates, **self._trajectory()}
        self.history.append(record)
        return record

    def _trajectory(self) -> dict[str, float]:
        """Every scalar of θ, Ω's variances and σ by name (for the convergence plot)."""
        out = {}
        for name, value in self.model.param_values().items():
            if value.ndim == 0:
                out[name] = float(value.detach())
            elif value.ndim == 2:
                for j, v in enumerate(torch.diagonal(value).tolist()):
                    out[f"{name}[{j}]"] = v
            else:
                for j, v in enumerate(value.flatten().tolist()):
                    out[f"{name}[{j}]"] = v
        return out

    def fit(self, pop: Population) -> list[dict[str, float]]:
        """All iterations on ``pop`` without Lightning (scripts and tests)."""
        self.setup(pop)
        rows = self.chain_rows(pop)
        for _ in range(self.n_iterations):
            self.iterate(rows)
        return self.history


def save_convergence_plot(history: list[dict[str, float]], path, n_explore: int):
    """Parameter trajectories against the iteration (one panel each) as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    skip = {"iteration", "q", "acc_prior", "acc_rw1", "acc_rw2"}
    names = [n for n in history[0] if n not in skip] + ["q"]
    cols = 4
    rows = math.ceil(len(names) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.4 * rows), squeeze=False)
    it = [h["iteration"] for h in history]
    for ax, name in zip(axes.flat, names, strict=False):
        ax.plot(it, [h[name] for h in history], lw=1)
        ax.axvline(n_explore, color="grey", ls=":", lw=0.8)
        ax.set_title(name if name != "q" else "complete-data loglik", fontsize=9)
    for ax in list(axes.flat)[len(names) :]:
        ax.axis("off")
    fig.suptitle("SAEM convergence (dotted: start of smoothing)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
