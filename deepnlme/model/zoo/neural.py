"""Deep compartment model: an MLP maps (covariates, η) to one-compartment oral PK parameters.

Individual parameters (each ``(N,)``), with ``x`` the normalized covariates ``(N, C)`` and
``η ~ N(0, Ω)`` ``(N, K)`` (diagonal Ω, random effects ``eta1..etaK``)::

    (d_ka, d_cl, d_v) = B·tanh(NN(x, η) / B) + S·η
    ka = tvka · exp(d_ka),   cl = tvcl · exp(d_cl),   v = tvv · exp(d_v)

``B`` (``max_log_deviation``, default 3) bounds the network's contribution smoothly.
``S`` is a fixed skip connection (``eta_skip=True``): ``eta1`` adds to ``log ka``, ``eta2`` to
``log cl``, ``eta3`` to ``log v`` (the first ``min(K, 3)`` of them; further η only enter the
network). The network's output layer starts at zero, so the untrained model *is* the classical
:class:`~deepnlme.model.zoo.pk.OneCmtOralModel` (log-normal η on ka, cl, v) with the same θ,
Ω, σ. Concentration ``central / v`` (floored at ``min_prediction`` = 1e-30, reached only at
far-off trial parameters) with proportional (or additive/combined/lognormal) error.

Covariate inputs are normalized by fixed constants ``(x − center) / scale`` (defaults in
:data:`DEFAULT_NORMALIZATION`, overridable per covariate with ``normalization``); a training
script may instead call :meth:`NeuralPKModel.fit_normalization` on the *fitting* population
(never on data including held-out subjects). The network's weights and biases are fixed
effects with the Gaussian prior ``log p(w) = −½ · weight_decay · Σ w²`` (:meth:`log_prior`);
the first-layer weights on η may carry a stronger one (``eta_weight_decay``). That keeps the
network from cancelling the η skip: with the plain prior it does, Ω's variance of ``eta1``
inflates while the effective spread stays put, deep η excursions become cheap, and the inner
mode search of some subjects can land in the one-compartment model's flip-flop local minimum
(ka ↔ ke swapped) — a jump of the Laplace objective that stalls the outer L-BFGS
(``experiments/neural_pk/README.md``, "η as network inputs").
Call ``.double()`` for float64 (the network follows).
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from deepnlme.data.population import Population
from deepnlme.dynamics import OneCmtOral
from deepnlme.model.base import NLMEModel
from deepnlme.model.params import RandomEffects, positive
from deepnlme.model.zoo.pk import ResidualErrorMixin
from deepnlme.nn.mlp import CovariateEtaMLP, scaler_from_mapping

#: Reference ``(center, scale)`` of common covariates (units: WT kg, AGE years, SEX 0/1,
#: CRCL mL/min, HT cm, BMI kg/m², APGAR score): population-typical values, not data-fitted.
DEFAULT_NORMALIZATION: dict[str, tuple[float, float]] = {
    "WT": (70.0, 15.0),
    "AGE": (50.0, 20.0),
    "SEX": (0.5, 0.5),
    "CRCL": (100.0, 40.0),
    "HT": (170.0, 10.0),
    "BMI": (25.0, 5.0),
    "APGAR": (7.0, 2.0),
}

#: Output order of the network: deviations of log ka, log cl, log v.
PK_PARAMETERS = ("ka", "cl", "v")


class NeuralPKModel(ResidualErrorMixin, NLMEModel):
    """One-compartment oral model whose individual parameters come from an MLP of (cov, η).

    Args:
        covariates: names of the baseline covariates fed to the network (order = input order).
        n_eta: K, number of random effects ``eta1..etaK`` (diagonal Ω).
        hidden: widths of the hidden layers.
        activation: a smooth activation name (see :data:`deepnlme.nn.mlp.ACTIVATIONS`).
        weight_decay: strength λ of the L2 prior ``−½ λ Σ w²`` on network weights and biases.
        eta_weight_decay: strength of the L2 prior on the first-layer weights that multiply η
            (``None``: ``weight_decay``). Larger values keep the network's η-dependence small
            (see :meth:`log_prior`).
        normalization: ``{name: (center, scale)}`` overriding :data:`DEFAULT_NORMALIZATION`.
        error: residual error model (``proportional``, ``additive``, ``combined``,
            ``lognormal``).
        eta_skip: add ``eta1..eta3`` directly to log ka, log cl, log v (see module docstring).
        eta_inputs: feed η to the network (``False``: the network sees covariates only and η
            acts through the skip connection alone, a log-normal model with learned typical
            values ``NN(x)``; needs ``eta_skip``).
        max_log_deviation: bound B of the network's log-scale deviations, squashed smoothly
            as ``B · tanh(NN / B)`` (identity near 0; keeps parameters within a factor
            ``e^B`` of the typical values during wild line-search steps); ``None``: unbounded.
        min_prediction: floor of the predicted concentration (tiny: only far-off parameter
            values reach it; keeps proportional variances > 0); 0 disables it.
        omega: initial variances of η (one per random effect; default 0.1 each).
        tvka, tvcl, tvv: initial typical values (1/h, L/h, L); also settable with ``init=``.
        seed: seed of the network initialization.
    """

    def __init__(
        self,
        covariates: Sequence[str] = (),
        n_eta: int = 3,
        hidden: Sequence[int] = (8,),
        activation: str = "tanh",
        weight_decay: float = 15.0,
        eta_weight_decay: float | None = None,
        normalization: Mapping[str, Sequence[float]] | None = None,
        error: str = "proportional",
        eta_skip: bool = True,
        eta_inputs: bool = True,
        max_log_deviation: float | None = 3.0,
        min_prediction: float = 1e-30,
        omega: Sequence[float] | None = None,
        tvka: float = 1.0,
        tvcl: float = 4.0,
        tvv: float = 40.0,
        seed: int = 0,
    ):
        super().__init__()
        if n_eta < 0:
            raise ValueError(f"n_eta must be >= 0, got {n_eta}")
        if weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
        if eta_weight_decay is not None and eta_weight_decay < 0:
            raise ValueError(f"eta_weight_decay must be >= 0 or None, got {eta_weight_decay}")
        self.covariates = tuple(str(c) for c in covariates)
        self.weight_decay = float(weight_decay)
        self.eta_weight_decay = (
            self.weight_decay if eta_weight_decay is None else float(eta_weight_decay)
        )
        self.eta_skip = bool(eta_skip)
        self.eta_inputs = bool(eta_inputs)
        if not (self.eta_inputs or self.eta_skip) and n_eta > 0:
            raise ValueError("with eta_inputs=False and eta_skip=False the η would be unused")
        if max_log_deviation is not None and max_log_deviation <= 0:
            raise ValueError(f"max_log_deviation must be > 0 or None, got {max_log_deviation}")
        self.min_prediction = float(min_prediction)
        self.max_log_deviation = None if max_log_deviation is None else float(max_log_deviation)
        self.tvka = positive(tvka)
        self.tvcl = positive(tvcl)
        self.tvv = positive(tvv)
        if n_eta > 0:
            names = [f"eta{j + 1}" for j in range(n_eta)]
            self.omega = RandomEffects(names, list(omega) if omega is not None else None)
        self.declare_error(error)
        self.scaler, missing = scaler_from_mapping(
            self.covariates, normalization or {}, DEFAULT_NORMALIZATION
        )
        if missing:
            warnings.warn(
                f"NeuralPKModel: no normalization constants for covariates {missing}; "
                "they enter the network unscaled (pass normalization={name: [center, scale]} "
                "or call fit_normalization(fit_population))",
                stacklevel=2,
            )
        self.net = CovariateEtaMLP(
            len(self.covariates),
            n_eta if self.eta_inputs else 0,
            len(PK_PARAMETERS),
            hidden,
            activation,
            seed,
        )
        self.dynamics = OneCmtOral()

    # ------------------------------------------------------------------ inputs
    def covariate_matrix(self, cov: Mapping[str, Tensor], n: int, like: Tensor) -> Tensor:
        """The network's covariate input ``(N, C)`` in ``self.covariates`` order (unscaled)."""
        if not self.covariates:
            return like.new_zeros(n, 0)
        return torch.stack([cov[name].to(like.dtype) for name in self.covariates], dim=-1)

    @torch.no_grad()
    def fit_normalization(self, pop: Population) -> None:
        """Set the covariate scaling to means/SDs over ``pop``'s subjects (the fit split only)."""
        self.check_population(pop)
        x = torch.stack([pop.covariate(name) for name in self.covariates], dim=-1)
        self.scaler.fit(x)

    # ------------------------------------------------------------------ blocks
    def pre(self, p, eta, cov) -> dict[str, Tensor]:
        """``ka`` (1/h), ``cl`` (L/h), ``v`` (L), each ``(N,)``, from (covariates, η)."""
        n = next(iter((cov or eta).values())).shape[0]
        if len(eta):
            e = torch.stack([eta[name] for name in self.eta_names], dim=-1)  # (N, K)
        else:
            e = p.tvcl.new_zeros(n, 0)
        x = self.scaler(self.covariate_matrix(cov, n, e))
        dev = self.net(x, e if self.eta_inputs else e[:, :0])  # (N, 3)
        if self.max_log_deviation is not None:
            bound = self.max_log_deviation
            dev = bound * torch.tanh(dev / bound)
        if self.eta_skip and e.shape[-1]:
            k = min(e.shape[-1], len(PK_PARAMETERS))
            dev = torch.cat([dev[:, :k] + e[:, :k], dev[:, k:]], dim=-1)
        return {
            "ka": p.tvka * torch.exp(dev[:, 0]),
            "cl": p.tvcl * torch.exp(dev[:, 1]),
            "v": p.tvv * torch.exp(dev[:, 2]),
        }

    def derived(self, p, indiv, amounts, cov):
        conc = amounts.central / indiv.v[:, None]  # (N, T)
        if self.min_prediction > 0:
            # Far-off trial parameters (line searches) can underflow concentrations to 0 and
            # a proportional variance with them; the floor keeps every density finite.
            conc = conc.clamp_min(self.min_prediction)
        return self.observation(p, conc)

    def log_prior(self) -> Tensor:
        """``−½ · weight_decay · Σ w²`` over the network's weights and biases (a scalar), with
        ``eta_weight_decay`` instead of ``weight_decay`` for the first-layer weights on η."""
        total = self.net.sum_of_squares()
        if self.eta_weight_decay == self.weight_decay or self.net.n_eta == 0:
            return -0.5 * self.weight_decay * total
        eta = self.net.eta_sum_of_squares()
        return -0.5 * (self.weight_decay * (total - eta) + self.eta_weight_decay * eta)
