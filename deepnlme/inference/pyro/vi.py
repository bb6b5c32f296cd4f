"""Stochastic variational inference for NLME models (plain torch/Pyro, no Lightning).

The model runs as a Pyro program (:class:`~deepnlme.inference.pyro.program.NLMEProgram`);
the guide q(η_i) is per subject or amortized (:mod:`deepnlme.inference.pyro.guides`). The loss
of a minibatch is -ELBO (``elbo="trace"``: Pyro's ``Trace_ELBO`` with ``num_particles``
vectorized particles) or minus the importance-weighted bound of each subject
(``elbo="iwae"``: Σ_i log mean_p w_ip with ``num_particles`` draws, a tighter bound), scaled
N / B by the subjects plate. The fixed effects (θ, Ω, σ, network weights) are the model's own
parameters, optimized together with the guide's by any torch optimizer.

Reparameterization noise comes from a generator seeded by (seed, step): the draw of subject
i at step s is the same whichever process or batch evaluates it, so data-parallel runs
follow the single-process trajectory exactly.
"""

from __future__ import annotations

import math
import time
from dataclasses import replace

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from torch import Tensor, nn

from deepnlme.data.population import Population
from deepnlme.diagnostics.predictions import prediction_of
from deepnlme.inference.pyro.guides import AmortizedGuide, SubjectGuide
from deepnlme.inference.pyro.importance import importance_loglik, mode_proposal
from deepnlme.inference.pyro.program import (
    SUBJECT_DIM,
    NLMEProgram,
    SubjectBatch,
    eta_scale_tril,
    whole,
)
from deepnlme.model.base import NLMEModel

GUIDES = ("subject", "amortized")
ENCODER_TARGETS = ("laplace", "elbo")
ELBOS = ("trace", "iwae")


def gaussian_kl(loc_p: Tensor, tril_p: Tensor, loc_q: Tensor, tril_q: Tensor) -> Tensor:
    """KL(N(loc_p, L_p L_pᵀ) ‖ N(loc_q, L_q L_qᵀ)) ``(B,)`` for means ``(B, K)`` and lower
    Cholesky factors ``(B, K, K)``."""
    a = torch.linalg.solve_triangular(tril_q, tril_p, upper=False)  # L_q⁻¹ L_p
    d = torch.linalg.solve_triangular(tril_q, (loc_p - loc_q).unsqueeze(-1), upper=False)
    log_det = torch.diagonal(tril_q, dim1=-2, dim2=-1).log() - torch.diagonal(
        tril_p, dim1=-2, dim2=-1
    ).log()
    k = loc_p.shape[-1]
    return 0.5 * ((a**2).sum((-2, -1)) + (d**2).sum((-2, -1)) - k) + log_det.sum(-1)


class NonFiniteObjective(ArithmeticError):
    """The variational objective became NaN or infinite."""


class VariationalEstimator:
    """Variational fit of ``model``: ``loss(batch)`` to minimize, q(η) for diagnostics.

    Args:
        model: an NLMEModel with random effects.
        guide: ``"subject"`` or ``"amortized"``.
        elbo: ``"trace"`` (ELBO) or ``"iwae"`` (importance-weighted bound per subject).
        num_particles: draws of η per subject and step.
        hidden: width of the amortized encoder's head.
        obs_hidden: width of its per-observation layer.
        init_scale: initial SD of q(η_i).
        seed: seed of the reparameterization noise.
        is_samples: importance samples per subject for :meth:`subject_loglik`.
        encoder_steps: amortized guide: Adam steps of the encoder alone at the fitted
            parameters after the fit (:meth:`after_fit`; 0: none).
        encoder_lr: their initial learning rate (cosine schedule down to 2% of it).
        encoder_batch: subjects per step of that phase (None: all).
        encoder_simulations: simulated copies of the fitted population's design added to its
            subjects for that phase (0: the fitted subjects only).
        encoder_target: what that phase fits the encoder to, ``"laplace"`` or ``"elbo"``
            (:meth:`fit_encoder`).
        residual_input: the encoder also reads the population prediction of each
            observation (:meth:`q`; one model evaluation more per encoder pass). More
            accurate at fixed parameters; in joint fits of the deep compartment model the
            objective diverged with it.
        name: method name in reports.
    """

    fit_style = "stochastic"

    def __init__(
        self,
        model: NLMEModel,
        guide: str = "subject",
        elbo: str = "trace",
        num_particles: int = 1,
        hidden: int = 64,
        obs_hidden: int = 16,
        init_scale: float = 0.1,
        seed: int = 0,
        is_samples: int = 500,
        encoder_steps: int = 0,
        encoder_lr: float = 0.003,
        encoder_batch: int | None = None,
        encoder_simulations: int = 0,
        encoder_target: str = "laplace",
        residual_input: bool = False,
        name: str = "vi",
    ):
        if guide not in GUIDES:
            raise ValueError(f"unknown guide {guide!r}; method.guide must be one of {GUIDES}")
        if elbo not in ELBOS:
            raise ValueError(f"unknown elbo {elbo!r}; method.elbo must be one of {ELBOS}")
        if int(num_particles) < 1:
            raise ValueError(f"method.num_particles must be >= 1, got {num_particles}")
        if model.n_eta == 0:
            raise ValueError(
                f"method={name} needs random effects; {type(model).__name__} has none"
            )
        self.model = model
        self.guide_kind = guide
        self.elbo = elbo
        self.num_particles = int(num_particles)
        self.hidden = int(hidden)
        self.obs_hidden = int(obs_hidden)
        self.init_scale = float(init_scale)
        self.seed = int(seed)
        self.is_samples = int(is_samples)
        self.encoder_steps = int(encoder_steps)
        self.encoder_lr = float(encoder_lr)
        self.encoder_batch = None if encoder_batch is None else int(encoder_batch)
        self.encoder_simulations = int(encoder_simulations)
        if encoder_target not in ENCODER_TARGETS:
            raise ValueError(
                f"unknown encoder target {encoder_target!r}; method.estimator.encoder_target "
                f"must be one of {ENCODER_TARGETS}"
            )
        self.encoder_target = encoder_target
        self.residual_input = bool(residual_input)
        self.name = name
        self.guide: nn.Module | None = None
        self.program: NLMEProgram | None = None
        self.step = 0  # set by the training loop: selects the reparameterization noise
        self.fit_ids: list[str] | None = None

    # --------------------------------------------------------------------------- set-up
    def setup(self, pop: Population) -> nn.Module:
        """Create the guide for the fitting population ``pop`` (N subjects); returns it."""
        k = self.model.n_eta
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)  # the encoder's initial weights follow the seed
            if self.guide_kind == "subject":
                self.guide = SubjectGuide(len(pop), k, self.init_scale)
            else:
                n_cov = len(pop.covariate_names)
                self.guide = AmortizedGuide(
                    k, n_cov, self.hidden, self.init_scale, self.obs_hidden
                )
                self.guide.fit_normalization(pop)
        dtype = pop.obs_time.dtype
        self.guide.to(dtype=dtype, device=pop.device)
        self.program = NLMEProgram(self.model, len(pop))
        self.fit_ids = list(pop.ids)
        return self.guide

    def load_checkpoint_state(self, state_dict: dict[str, Tensor], prefix: str = "guide.") -> None:
        """Rebuild the guide from a checkpoint's ``state_dict`` (keys ``guide.*``)."""
        state = {k.removeprefix(prefix): v for k, v in state_dict.items() if k.startswith(prefix)}
        if self.guide_kind == "subject":
            n, k = state["loc"].shape
            self.guide = SubjectGuide(n, k)
        else:
            n_cov = state["cov_center"].shape[0]
            self.guide = AmortizedGuide(
                self.model.n_eta, n_cov, self.hidden, obs_hidden=self.obs_hidden
            )
        dtype = next(iter(self.model.parameters())).dtype
        self.guide.to(dtype=dtype)
        self.guide.load_state_dict(state)

    # ---------------------------------------------------------------------- the objective
    def _noise(self, batch: SubjectBatch, particles: int) -> Tensor:
        """Standard normal draws ``(particles, B, K)`` fixed by (seed, step, subject)."""
        n = self.program.n_subjects
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + int(self.step))
        dtype = batch.pop.obs_time.dtype
        eps = torch.randn(particles, n, self.model.n_eta, generator=g, dtype=dtype)
        return eps[:, batch.index.cpu()].to(batch.pop.device)

    def population_prediction(self, pop: Population) -> Tensor:
        """The model at η = 0 for every observation slot of ``pop`` ``(N, T)`` (no gradient):
        what the encoder reads with ``residual_input``."""
        with torch.no_grad():
            eta0 = pop.obs_time.new_zeros(len(pop), self.model.n_eta)
            return prediction_of(self.model.observe(eta0, pop))

    def q(
        self, batch: SubjectBatch, reference: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """q(η_i) of the batch's subjects, ``(loc (B, K), scale_tril (B, K, K))``.

        With ``residual_input`` the encoder also reads the population prediction of each
        observation (:meth:`population_prediction` of the batch, or ``reference`` ``(B, T)``
        when the caller has it), i.e. the residuals of the typical subject. It speaks in
        prior SDs (z = L_Ω⁻¹ η) and its output is mapped by the current L_Ω (the gradient
        flows through L_Ω too: with L_Ω held constant there, fits of the deep compartment
        model at lr 0.02 ended in a non-finite objective)."""
        if not isinstance(self.guide, AmortizedGuide):
            return self.guide.posterior(batch)
        if not self.residual_input:
            reference = None
        elif reference is None:
            reference = self.population_prediction(batch.pop)
        loc, scale_tril = self.guide.posterior(batch, reference)
        prior = eta_scale_tril(self.model)
        return loc @ prior.T, prior @ scale_tril

    def pyro_guide(self, batch: SubjectBatch) -> Tensor:
        """The guide as a Pyro program: η_i = loc_i + L_i ε_i at site ``eta``."""
        loc, scale_tril = self.q(batch)
        particles = self._particles
        eps = self._noise(batch, particles)
        eta = loc + torch.einsum("bkj,pbj->pbk", scale_tril, eps)
        if not self._vectorized:
            eta = eta[0]
        log_q = dist.MultivariateNormal(loc, scale_tril=scale_tril).log_prob(eta)
        n = self.program.n_subjects
        with pyro.plate("subjects", n, subsample=batch.index, dim=SUBJECT_DIM):
            pyro.sample("eta", dist.Delta(eta, log_density=log_q, event_dim=1))
        return eta

    _particles = 1
    _vectorized = False

    def loss(self, batch: SubjectBatch) -> Tensor:
        """-bound for a minibatch (scaled to the population), minus the fixed effects' prior."""
        # no argument validation: a NaN parameter must reach the finiteness check below
        with pyro.validation_enabled(False):
            value = self._trace_loss(batch) if self.elbo == "trace" else self._iwae_loss(batch)
        if not bool(torch.isfinite(value)):
            raise NonFiniteObjective(
                f"the {self.elbo} objective is not finite at step {self.step} "
                "(lower method.lr, or check initial estimates)"
            )
        return value

    def _trace_loss(self, batch: SubjectBatch) -> Tensor:
        self._particles, self._vectorized = self.num_particles, self.num_particles > 1
        elbo = pyro.infer.Trace_ELBO(
            num_particles=self.num_particles,
            vectorize_particles=self.num_particles > 1,
            max_plate_nesting=1,
        )
        return elbo.differentiable_loss(self.program, self.pyro_guide, batch)

    def _iwae_loss(self, batch: SubjectBatch) -> Tensor:
        """-(N/B) Σ_i log mean_p exp(log p(y_i, η_ip) - log q(η_ip)) - log prior(θ)."""
        self._particles, self._vectorized = self.num_particles, True
        with pyro.plate("particles", self.num_particles, dim=-2):
            guide_trace = poutine.trace(self.pyro_guide).get_trace(batch)
            model_trace = poutine.trace(
                poutine.replay(self.program, trace=guide_trace)
            ).get_trace(batch)
        log_w = -guide_trace.nodes["eta"]["fn"].log_prob(guide_trace.nodes["eta"]["value"])
        for name, site in model_trace.nodes.items():
            if site["type"] == "sample" and name != "log_prior":
                log_w = log_w + site["fn"].log_prob(site["value"])
        bound = torch.logsumexp(log_w, 0) - math.log(self.num_particles)  # (B,)
        scale = self.program.n_subjects / len(batch.index)
        return -(scale * bound.sum() + self.model.log_prior())

    # ------------------------------------------------------------- amortization gap
    def encoder_population(self, pop: Population, replicates: int) -> Population:
        """``pop``'s subjects followed by ``replicates`` simulated copies of its design
        (η ~ N(0, Ω), DV from the model's residual distribution, seeded by ``seed``): data
        for the encoder phase on which the encoder cannot overfit ``pop``'s few subjects."""
        if replicates <= 0:
            return pop
        from deepnlme.diagnostics.npde import simulate_dv

        g = torch.Generator().manual_seed(self.seed * 7_919 + 1)
        n = len(pop)
        rows = pop.subset(torch.arange(n, device=pop.device).repeat(replicates + 1))
        simulated = simulate_dv(self.model, rows, 1, g)[0].to(rows.obs_dv)  # (len(rows), T)
        observed = (torch.arange(len(rows), device=pop.device) < n).unsqueeze(-1)
        dv = torch.where(observed, rows.obs_dv, simulated)
        return replace(rows, obs_dv=torch.where(rows.obs_mask, dv, torch.zeros_like(dv)))

    def fit_encoder(
        self,
        pop: Population,
        steps: int,
        batch_subjects: int | None,
        lr: float,
        lr_final: float = 0.02,
        target: str = "laplace",
    ) -> list[float]:
        """Train the amortized encoder alone at the model's current (fitted) parameters.

        The joint fit moves θ, Ω, σ and the encoder together, so at its end the encoder lags
        behind the final parameters (the amortization gap). This phase holds the model fixed
        and trains the encoder only, ``steps`` Adam steps on seeded minibatches of ``pop``'s
        subjects (``batch_subjects``; None: all), the learning rate falling from ``lr`` to
        ``lr * lr_final`` (cosine), towards ``target``:

        * ``"laplace"``: each subject's Laplace approximation N(η̂_i, H_i⁻¹) (modes found once,
          batched, before the steps): minimizes the mean symmetric KL between q(η_i) and it,
          in closed form: no sampling noise, no likelihood evaluation per step. (KL(q ‖ ·)
          alone lets a few subjects with very narrow posteriors dominate; KL(· ‖ q) alone
          stalls with q wide and its mean unlearned.)
        * ``"elbo"``: the ELBO (noisy; steep where the data pin η down, e.g. proportional
          error with long elimination phases).

        Returns the loss of each step (symmetric KL per subject, or -ELBO per subject).
        """
        if not isinstance(self.guide, AmortizedGuide):
            raise ValueError("fit_encoder needs method.guide=amortized")
        if target not in ENCODER_TARGETS:
            raise ValueError(
                f"unknown encoder target {target!r}; method.estimator.encoder_target must be "
                f"one of {ENCODER_TARGETS}"
            )
        n = len(pop)
        batch_subjects = min(int(batch_subjects or n), n)
        total = max(int(steps), 1)
        optimizer = torch.optim.Adam(list(self.guide.parameters()), lr=lr)
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer,
            lambda s: lr_final + (1 - lr_final) * 0.5 * (1 + math.cos(math.pi * min(s / total, 1))),
        )
        g = torch.Generator().manual_seed(self.seed * 7_919 + 2)
        frozen = [p for p in self.model.parameters() if p.requires_grad]
        program, self.program = self.program, NLMEProgram(self.model, n)
        laplace = mode_proposal(self.model, pop) if target == "laplace" else None
        # the model is fixed: the encoder's residual input is computed once, not every step
        reference = (
            self.population_prediction(pop) if laplace is not None and self.residual_input else None
        )
        losses: list[float] = []
        try:
            for p in frozen:
                p.requires_grad_(False)
            while len(losses) < int(steps):
                order = torch.randperm(n, generator=g).to(pop.device)
                for index in order.split(batch_subjects)[: int(steps) - len(losses)]:
                    self.step += 1
                    optimizer.zero_grad()
                    batch = SubjectBatch(index, pop.subset(index))
                    if laplace is None:
                        loss = self.loss(batch)
                        value = float(loss.detach()) / n
                    else:
                        loc, scale_tril = self.q(
                            batch, None if reference is None else reference[index]
                        )
                        mode, mode_tril = laplace[0][index], laplace[1][index]
                        loss = gaussian_kl(loc, scale_tril, mode, mode_tril) + gaussian_kl(
                            mode, mode_tril, loc, scale_tril
                        )
                        loss = loss.mean()
                        value = float(loss.detach())
                    loss.backward()
                    optimizer.step()
                    schedule.step()
                    losses.append(value)
        finally:
            for p in frozen:
                p.requires_grad_(True)
            self.program = program
        return losses

    def after_fit(self, pop: Population) -> dict[str, float]:
        """The encoder phase after the joint fit on ``pop`` (amortized guide and
        ``encoder_steps`` > 0; nothing otherwise): :meth:`fit_encoder` on ``pop`` and
        ``encoder_simulations`` simulated copies of its design. Returns its summary for
        results.json (``encoder_seconds``)."""
        if not isinstance(self.guide, AmortizedGuide) or self.encoder_steps <= 0:
            return {}
        param = next(iter(self.model.parameters()))
        pop = pop.to(param.device, dtype=param.dtype)
        start = time.perf_counter()
        data = self.encoder_population(pop, self.encoder_simulations)
        self.fit_encoder(
            data, self.encoder_steps, self.encoder_batch, self.encoder_lr,
            target=self.encoder_target,
        )
        return {"encoder_seconds": time.perf_counter() - start}

    # ------------------------------------------------------------------- diagnostics
    def _is_fitted(self, pop: Population) -> bool:
        return self.fit_ids is not None and list(pop.ids) == self.fit_ids

    def posterior(self, pop: Population) -> tuple[Tensor, Tensor]:
        """q(η_i) ``(loc (N, K), scale_tril (N, K, K))`` for ``pop``'s subjects: the encoder's
        output (any subjects), the per-subject guide's (the fitted subjects), else the Laplace
        approximation at each subject's mode (new subjects with a per-subject guide)."""
        if isinstance(self.guide, AmortizedGuide) or (
            self.guide is not None and self._is_fitted(pop)
        ):
            with torch.no_grad():
                loc, scale_tril = self.q(whole(pop))
            return loc.detach(), scale_tril.detach()
        return mode_proposal(self.model, pop)

    def subject_loglik(self, pop: Population, warm_start: bool = True) -> Tensor:
        """log p(y_i) ``(N,)`` by importance sampling (``is_samples`` draws, Student-t): from
        q(η_i) mixed half and half with the Laplace approximation (a defensive component) for
        the fitted subjects, from the Laplace approximation at each subject's mode
        (searched from η = 0) for any other subjects, whatever the guide. An encoder's q on
        new subjects or a new regimen can miss the posterior by far, and a poor proposal
        biases the estimate down (the main job's held-out regimen: -1.4e7 from the encoder's
        q against -14.5 from the Laplace approximation)."""
        defensive = None
        if self._is_fitted(pop):
            loc, scale_tril = self.posterior(pop)
            defensive = mode_proposal(self.model, pop, loc)
        else:
            loc, scale_tril = mode_proposal(self.model, pop)
        result = importance_loglik(
            self.model, pop, loc, scale_tril, self.is_samples, seed=self.seed,
            defensive=defensive,
        )
        return result.subject_loglik

    def modes(self, pop: Population, warm_start: bool = True) -> Tensor:
        """Posterior means of q(η_i) ``(N, K)`` (the EBEs of a variational fit)."""
        return self.posterior(pop)[0]

    @torch.no_grad()
    def elbo_value(self, pop: Population, particles: int = 64, seed: int = 1) -> float:
        """ELBO of all of ``pop`` (the fitted subjects) with ``particles`` draws per subject
        (fewer for large populations: at most 200,000 subject draws in one evaluation)."""
        particles = max(1, min(particles, 200_000 // max(len(pop), 1)))
        step, self.step = self.step, -1 - seed
        self._particles, self._vectorized = particles, True
        try:
            elbo = pyro.infer.Trace_ELBO(
                num_particles=particles, vectorize_particles=True, max_plate_nesting=1
            )
            with pyro.validation_enabled(False):
                loss = elbo.differentiable_loss(self.program, self.pyro_guide, whole(pop))
            return -float(loss)
        finally:
            self.step = step

    def reset(self) -> None:
        """Nothing to forget (q(η) is a function of the data)."""
