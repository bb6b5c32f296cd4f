"""Neural-ODE PK model: depot → central with a network in the elimination term.

Individual parameters (each ``(N,)``), with ``x`` the normalized covariates ``(N, C)`` and
``η ~ N(0, Ω)`` ``(N, 3)`` (diagonal Ω, random effects ``ka, cl, v``: η on interpretable
parameters)::

    (d_ka, d_cl, d_v) = B·tanh(NN_pre(x) / B)                 covariate network (optional)
    cl = tvcl · exp(d_cl + η_cl),  v = tvv · exp(d_v + η_v)
    ka = k(0) + tvka · exp(d_ka + η_ka),    k(C) = cl / v · exp(g(C))   (elimination rate)

Dynamics (oral doses into the depot, CMT 1; observations of the central compartment, CMT 2)::

    dA1/dt = −ka · A1
    dA2/dt =  ka · A1 − cl · C · exp(g),      C = A2 / v
    g = B·tanh(NN_rhs(C, x, η) / B)

so the network modulates the clearance as a function of the concentration (saturable or
induced elimination), of the covariates and — with ``eta_inputs`` — of η (latent
individual effects, the DeepPumas "η as network inputs" pattern). The elimination flux stays
positive and vanishes at C = 0 whatever the network does. The absorption rate is the
elimination rate at zero concentration plus a log-normal excess (``absorption_above_elimination``;
no flip-flop). Both networks' output layers start at zero, so the untrained model *is* the
classical one-compartment oral model (log-normal η on cl, v and on ka − cl/v) with the same θ,
Ω, σ, and the neural ODE's predictions equal the closed form.
Concentration ``C = central / v`` (floored at ``min_prediction``) with proportional (or
additive/combined/lognormal) error. Network weights and biases carry the Gaussian prior
``−½ · weight_decay · Σ w²`` (:meth:`log_prior`). Call ``.double()`` for float64.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from deepnlme.dynamics import OdeDynamics
from deepnlme.dynamics.closed_form import phi1
from deepnlme.model.base import NLMEModel
from deepnlme.model.params import RandomEffects, positive
from deepnlme.model.zoo.neural import DEFAULT_NORMALIZATION, PK_PARAMETERS
from deepnlme.model.zoo.pk import ResidualErrorMixin
from deepnlme.nn.mlp import CovariateEtaMLP, scaler_from_mapping
from deepnlme.nn.rhs import CONTEXT, StateNetwork, UniversalRhs


def time_since_dose(start: Tensor, rate: Tensor | None, jump: Tensor) -> Tensor:
    """Time since the last dose at the start of each segment of an event grid, ``(N, K)``
    (inf before the first dose; detached).

    A segment starts at a dose when the previous segment ends with a jump (a bolus) or when an
    input rate rises (an infusion starts). ``start`` ``(N, K)``, ``rate`` ``(N, K, C)`` or
    None, ``jump`` ``(N, K, C)`` as in :meth:`OdeDynamics._integrate_grid`.
    """
    start = start.detach()
    bolus = jump.detach().abs().sum(-1) > 0  # (N, K): a dose at the end of segment k
    at_dose = torch.zeros_like(bolus)
    at_dose[:, 1:] = bolus[:, :-1]
    if rate is not None:
        r = rate.detach()
        at_dose[:, 1:] |= (r[:, 1:] > r[:, :-1]).any(-1)
        at_dose[:, 0] |= (r[:, 0] > 0).any(-1)
    last = torch.where(at_dose, start, -torch.inf).cummax(1).values
    return start - last


class OralEliminationDynamics(OdeDynamics):
    """Depot → central ODE with first-order absorption and a state-dependent elimination rate,
    integrated by a second-order exponential integrator on each subject's event grid.

    The right-hand side is ``rhs`` (any :class:`OdeDynamics` right-hand side of the form
    ``dA1 = −ka·A1 + r1``, ``dA2 = ka·A1 − k(C)·A2 + r2`` with ``C = A2 / v``);
    ``elimination_rate(C, indiv) -> k`` ``(N,)`` (1/h) gives its elimination rate. Dosing
    (boluses, infusions, lag, bioavailability, resets, steady state) is
    :class:`OdeDynamics`'; only the integration of each segment between events differs:
    ``ceil(length / max_step)`` equal steps (each subject's own segment decides) or, with
    ``step_growth``, steps graded by the time since the last dose (:meth:`_step_fractions`), each
    exact for the depot and, with the rate frozen at the average of its values at the step's
    start and at a predicted end (exponential Heun), exact in closed form for the central
    compartment. So a constant rate (a linear model) is integrated exactly whatever the step,
    and the scheme is stable for any step; the error of a varying rate is O(step²).
    ``integrator="ode"`` instead integrates ``rhs`` with torchdiffeq like :class:`OdeDynamics`
    (reference solutions in tests).
    """

    def __init__(
        self,
        rhs,
        elimination_rate,
        max_step: float = 2.0,
        integrator: str = "exponential",
        step_growth: float | None = None,
        min_step: float = 0.25,
        **ode_options,
    ):
        if max_step <= 0:
            raise ValueError(f"max_step must be > 0 (hours), got {max_step}")
        if integrator not in ("exponential", "ode"):
            raise ValueError(f"solver must be 'exponential' or 'ode', got {integrator!r}")
        if step_growth is not None and (step_growth <= 0 or not 0 < min_step <= max_step):
            raise ValueError(
                f"step_growth must be > 0 and 0 < min_step <= max_step, got {step_growth}, "
                f"{min_step}, {max_step}"
            )
        super().__init__(
            rhs, ("depot", "central"), default_dose_cmt=1, default_obs_cmt=2,
            required=("ka", "v"), **ode_options,
        )
        self.elimination_rate = elimination_rate
        self.max_step = float(max_step)
        self.exponential = integrator == "exponential"
        self.step_growth = None if step_growth is None else float(step_growth)
        self.min_step = float(min_step)

    @property
    def gradient_precision(self) -> float:
        """0 with the exponential integrator (steps from the event grid alone: the solution is
        smooth in the parameters), else :attr:`OdeDynamics.gradient_precision`."""
        return 0.0 if self.exponential else super().gradient_precision

    def _step_fractions(self, length: Tensor, since_dose: Tensor | None) -> Tensor:
        """Step lengths of each row as fractions of its segment, ``(B, n)`` (0 past a row's
        last step; detached: they depend on the event grid alone, so the solution stays a
        smooth function of the parameters and the batch does not matter).

        Equal steps of at most ``max_step``; with ``step_growth`` ρ and the time since the
        last dose ``since_dose`` ``(B,)`` at the segment's start (h; inf before any dose),
        graded steps ``h = clamp(ρ·τ, min_step, max_step)`` at time ``τ`` after the dose:
        short while the dose is absorbed and the elimination rate changes fast, long later.
        """
        total = length.detach()
        if self.step_growth is None or since_dose is None:
            steps = torch.ceil(total / self.max_step).clamp_min(1.0)  # (B,)
            j = torch.arange(int(steps.max()), dtype=total.dtype, device=total.device)
            return torch.where(j < steps[:, None], 1.0 / steps[:, None], 0.0)
        tau, remaining, hs = since_dose.detach().clone(), total.clone(), []
        while True:
            h = (self.step_growth * tau).clamp(self.min_step, self.max_step)
            h = torch.minimum(remaining, h)
            if hs and not bool((h > 0).any()):
                break
            hs.append(h)
            tau, remaining = tau + h, remaining - h
        return torch.stack(hs, 1) / total.clamp_min(torch.finfo(total.dtype).tiny)[:, None]

    def _integrate(
        self,
        x: Tensor,
        start: Tensor,
        length: Tensor,
        rate: Tensor,
        indiv: Mapping[str, Tensor],
        since_dose: Tensor | None = None,
    ) -> Tensor:
        """State after ``length`` ``(B,)`` h from ``x`` ``(B, 2)`` with constant inputs
        ``rate`` ``(B, 2)`` (amount/h); ``since_dose`` ``(B,)``: time since the last dose at
        the start (graded steps, :meth:`_step_fractions`)."""
        if not self.exponential:
            return super()._integrate(x, start, length, rate, indiv)
        # Each row its own steps, from its own segment alone: a subject's solution must not
        # depend on which other subjects share the batch (the mode search evaluates changing
        # subsets; a batch-wide count made l_i(η) differ between them).
        fractions = self._step_fractions(length, since_dose)  # (B, n)
        ka, v = indiv["ka"], indiv["v"]
        r1, r2 = rate[:, 0], rate[:, 1]
        a1, a2 = x[:, 0], x[:, 1]

        def central(k: Tensor) -> Tensor:
            # exact for a constant rate k > 0 over one step (direct formulas: fewer graph
            # nodes than series-guarded ones, and accurate in float64 for k·h > 1e-10)
            kh = k * h
            x = kh - kah
            x = torch.where(x.abs() < 1e-10, 1e-10, x)
            decay_k = torch.exp(-kh)
            psi = h * decay_k * torch.expm1(x) / x  # ∫ e^{−k(h−s)} e^{−ka s} ds
            phi = -torch.expm1(-kh) / k  # ∫ e^{−k(h−s)} ds
            return a2 * decay_k + (ka * a1 - r1) * psi + (r1 + r2) * phi

        uniform = self.step_growth is None or since_dose is None
        infusing = bool((r1.detach() != 0).any())
        for step in range(fractions.shape[1]):
            if step == 0 or not uniform:  # equal steps share these
                h = length * fractions[:, step]
                kah = ka * h
                decay = torch.exp(-kah)
                # depot gain from its infusion over one step
                depot_in = r1 * h * phi1(kah) if infusing else 0.0
            k0 = self.elimination_rate(a2 / v, indiv)
            k1 = self.elimination_rate(central(k0) / v, indiv)
            new_a2, new_a1 = central(0.5 * (k0 + k1)), a1 * decay + depot_in
            if step == 0:  # every row takes at least one step
                a2, a1 = new_a2, new_a1
            else:  # rows whose own steps are done keep their state
                moving = fractions[:, step] > 0
                a2, a1 = torch.where(moving, new_a2, a2), torch.where(moving, new_a1, a1)
        return torch.stack([a1, a2], dim=-1)

    def _integrate_grid(
        self,
        indiv: Mapping[str, Tensor],
        x0: Tensor,
        start: Tensor,
        length: Tensor,
        rate: Tensor | None,
        keep: Tensor,
        jump: Tensor,
    ) -> Tensor:
        """States ``(N, K, 2)`` at the end of every segment (``start``, ``length`` ``(N, K)``,
        inputs ``rate`` ``(N, K, 2)`` or None, ``keep`` False at resets, ``jump`` ``(N, K, 2)``
        added at each segment's end), by :meth:`_integrate` when ``exponential``, else by
        :class:`OdeDynamics`' solver."""
        if not self.exponential:
            return super()._integrate_grid(indiv, x0, start, length, rate, keep, jump)
        needed = (length.detach() > 0).any(0).tolist()
        since = None if self.step_growth is None else time_since_dose(start, rate, jump)
        x, states = x0, []
        for k in range(start.shape[1]):
            x = torch.where(keep[:, k, None], x, 0.0)
            if needed[k]:
                r = torch.zeros_like(x) if rate is None else rate[:, k]
                tau = None if since is None else since[:, k]
                x = self._integrate(x, start[:, k], length[:, k], r, indiv, tau)
            x = x + jump[:, k]
            states.append(x)
        return torch.stack(states, 1)


class NeuralODEPKModel(ResidualErrorMixin, NLMEModel):
    """One-compartment oral model whose elimination is ``cl · C · exp(NN(C, x, η))``.

    Args:
        covariates: baseline covariates fed to the networks (order = input order).
        hidden: hidden widths of the right-hand-side network.
        activation: a smooth activation (see :data:`deepnlme.nn.mlp.ACTIVATIONS`).
        eta_inputs: feed η to the right-hand-side network as well (besides η on ka, cl, v).
        covariate_network: hidden widths of the covariate network for (ka, cl, v) (``[]``:
            a log-linear covariate model, one linear layer; ``None``: no covariate effects
            besides the right-hand-side network's).
        weight_decay: strength λ of the L2 prior ``−½ λ Σ w²`` on every network weight.
        max_log_deviation: bound B of the networks' log-scale outputs (``B·tanh(·/B)``).
        conc_scale: concentration scale of the network input ``C / conc_scale`` (mg/L).
        normalization: ``{name: (center, scale)}`` overriding
            :data:`~deepnlme.model.zoo.neural.DEFAULT_NORMALIZATION`.
        error: residual error model.
        solver: ``"exponential"`` (the second-order exponential integrator of
            :class:`OralEliminationDynamics`, steps of at most ``max_step`` h) or ``"ode"``
            (torchdiffeq through :class:`OdeDynamics`, with ``rtol``, ``atol`` and
            ``solver_options``, e.g. ``{"method": "dopri5"}`` is the default).
        step_growth, min_step: graded steps of the exponential integrator, ``h =
            clamp(step_growth · τ, min_step, max_step)`` at time ``τ`` (h) after the last
            dose (None: equal steps of at most ``max_step``).
        min_prediction: floor of the predicted concentration (0 disables it).
        omega: initial variances of η_ka, η_cl, η_v.
        tvka, tvcl, tvv: initial typical values (1/h, L/h, L).
        seed: seed of the networks' initialization.
        absorption_above_elimination: ``ka = k(0) + tvka·exp(d_ka + η_ka)``, the absorption
            rate in excess of the elimination rate at zero concentration ``k(0) = cl/v·
            exp(g(0))`` (the fastest elimination of a saturable process), instead of
            ``ka = tvka·exp(d_ka + η_ka)``. Rules out the flip-flop solutions (absorption
            slower than elimination, the same curve with ka and k swapped and V rescaled):
            they are a second local minimum of each subject's conditional density, behind a
            barrier, in which warm-started mode searches got stuck, so that the objective
            depended on the search's history and L-BFGS stalled.
        output_bias: train the output-layer biases of both networks. False (default): they
            stay at zero, as they only duplicate ``log tvka``, ``log tvcl``, ``log tvv`` (flat
            directions held by the weight prior alone, which slow L-BFGS down).
    """

    def __init__(
        self,
        covariates: Sequence[str] = (),
        hidden: Sequence[int] = (8,),
        activation: str = "tanh",
        eta_inputs: bool = False,
        covariate_network: Sequence[int] | None = (4,),
        weight_decay: float = 1.0,
        max_log_deviation: float = 3.0,
        conc_scale: float = 5.0,
        normalization: Mapping[str, Sequence[float]] | None = None,
        error: str = "proportional",
        solver: str = "exponential",
        max_step: float = 2.0,
        step_growth: float | None = None,
        min_step: float = 0.25,
        rtol: float = 1e-6,
        atol: float = 1e-9,
        solver_options: Mapping | None = None,
        min_prediction: float = 1e-30,
        omega: Sequence[float] | None = None,
        tvka: float = 1.0,
        tvcl: float = 5.0,
        tvv: float = 40.0,
        seed: int = 0,
        absorption_above_elimination: bool = True,
        output_bias: bool = False,
    ):
        super().__init__()
        if weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
        if max_log_deviation <= 0 or conc_scale <= 0:
            raise ValueError(
                f"max_log_deviation and conc_scale must be > 0, got {max_log_deviation}, "
                f"{conc_scale}"
            )
        self.covariates = tuple(str(c) for c in covariates)
        self.weight_decay = float(weight_decay)
        self.max_log_deviation = float(max_log_deviation)
        self.eta_inputs = bool(eta_inputs)
        self.absorption_above_elimination = bool(absorption_above_elimination)
        self.min_prediction = float(min_prediction)
        self.tvka = positive(tvka)
        self.tvcl = positive(tvcl)
        self.tvv = positive(tvv)
        self.omega = RandomEffects(list(PK_PARAMETERS), list(omega) if omega else None)
        self.declare_error(error)
        self.scaler, missing = scaler_from_mapping(
            self.covariates, normalization or {}, DEFAULT_NORMALIZATION
        )
        if missing:
            warnings.warn(
                f"NeuralODEPKModel: no normalization constants for covariates {missing}; "
                "they enter the networks unscaled (pass normalization={name: [center, scale]})",
                stacklevel=2,
            )
        n_cov = len(self.covariates)
        self.pre_net = (
            CovariateEtaMLP(n_cov, 0, len(PK_PARAMETERS), covariate_network, activation, seed)
            if covariate_network is not None and n_cov
            else None
        )
        network = StateNetwork(
            n_state=1,
            n_covariates=n_cov,
            n_eta=len(PK_PARAMETERS) if self.eta_inputs else 0,
            n_out=1,
            hidden=hidden,
            activation=activation,
            state_scale=[float(conc_scale)],
            scaler=self.scaler,
            l2=self.weight_decay,
            seed=seed + 1,
        )
        if not output_bias:  # the typical values carry the intercepts: no redundant direction
            outputs = [network.linears[-1]]
            if self.pre_net is not None:
                outputs.append(self.pre_net.layers[-1])
            for layer in outputs:
                layer.bias.requires_grad_(False)
        rhs = UniversalRhs(network, self._features, self._elimination, self._absorption)
        options = dict(solver_options or {})
        self.dynamics = OralEliminationDynamics(
            rhs,
            self.elimination_rate,
            max_step=max_step,
            integrator=solver,
            step_growth=step_growth,
            min_step=min_step,
            method=str(options.pop("method", "dopri5")),
            rtol=rtol,
            atol=atol,
            options=options,
        )

    # --------------------------------------------------------------- right-hand side
    @staticmethod
    def _features(amounts: Tensor, indiv: Mapping[str, Tensor]) -> Tensor:
        """Network state input: the central concentration ``(N, 1)`` (mg/L)."""
        return (amounts[:, 1] / indiv["v"])[:, None]

    def _modifier(self, out: Tensor) -> Tensor:
        """Clearance multiplier ``exp(B·tanh(out/B))`` ``(N,)`` of the network output."""
        bound = self.max_log_deviation
        return torch.exp(bound * torch.tanh(out[:, 0] / bound))

    def _elimination(self, out: Tensor, amounts: Tensor, indiv: Mapping[str, Tensor]) -> Tensor:
        """Rates ``(N, 2)``: ``−cl · C · exp(B·tanh(out/B))`` on the central compartment."""
        flux = indiv["cl"] * (amounts[:, 1] / indiv["v"]) * self._modifier(out)
        return torch.stack([torch.zeros_like(flux), -flux], dim=-1)

    def elimination_rate(self, conc: Tensor, indiv: Mapping[str, Tensor]) -> Tensor:
        """First-order elimination rate ``k = cl / v · exp(g(C))`` ``(N,)`` (1/h) at the
        central concentration ``conc`` ``(N,)`` (``indiv`` prepared by the right-hand side)."""
        rhs = self.dynamics.rhs
        out = rhs.network(conc[:, None], indiv[CONTEXT])
        return indiv["cl"] / indiv["v"] * self._modifier(out)

    @staticmethod
    def _absorption(t: Tensor, amounts: Tensor, indiv: Mapping[str, Tensor]) -> Tensor:
        """Mechanistic part ``(N, 2)``: first-order absorption depot → central."""
        flow = indiv["ka"] * amounts[:, 0]
        return torch.stack([-flow, flow], dim=-1)

    # --------------------------------------------------------------- blocks
    def covariate_matrix(self, cov: Mapping[str, Tensor], like: Tensor) -> Tensor:
        """Raw covariates ``(N, C)`` in ``self.covariates`` order."""
        if not self.covariates:
            return like.new_zeros(like.shape[0], 0)
        return torch.stack([cov[name].to(like.dtype) for name in self.covariates], dim=-1)

    def pre(self, p, eta, cov) -> dict[str, Tensor]:
        """``ka`` (1/h), ``cl`` (L/h), ``v`` (L) ``(N,)``, and the networks' inputs ``_x``
        (raw covariates ``(N, C)``) and ``_eta`` (``(N, 3)``, when η feeds the network)."""
        e = torch.stack([eta[name] for name in PK_PARAMETERS], dim=-1)  # (N, 3)
        x = self.covariate_matrix(cov, e)
        dev = e
        if self.pre_net is not None:
            bound = self.max_log_deviation
            out = self.pre_net(self.scaler(x), e[:, :0])
            dev = dev + bound * torch.tanh(out / bound)
        indiv = {
            "cl": p.tvcl * torch.exp(dev[:, 1]),
            "v": p.tvv * torch.exp(dev[:, 2]),
            "_x": x,
        }
        if self.eta_inputs:
            indiv["_eta"] = e
        ka = p.tvka * torch.exp(dev[:, 0])
        if self.absorption_above_elimination:
            rhs = self.dynamics.rhs
            indiv = rhs.prepare(indiv)  # the network's per-subject context, computed once
            ka = ka + self.elimination_rate(torch.zeros_like(ka), indiv)
        indiv["ka"] = ka
        return indiv

    def derived(self, p, indiv, amounts, cov):
        conc = amounts.central / indiv.v[:, None]  # (N, T)
        if self.min_prediction > 0:
            conc = conc.clamp_min(self.min_prediction)
        return self.observation(p, conc)

    def log_prior(self) -> Tensor:
        """``−½ · weight_decay · Σ w²`` over both networks' weights and biases (a scalar)."""
        total = self.dynamics.rhs.log_prior()
        if self.pre_net is not None:
            total = total - 0.5 * self.weight_decay * self.pre_net.sum_of_squares()
        return total
