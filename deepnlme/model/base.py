"""The model contract: an NLME model is a torch ``nn.Module`` with Pumas-like blocks.

===========  ======================================================================
Pumas        deepnlme
===========  ======================================================================
@param       attributes that are :class:`Param` (θ, σ) or :class:`RandomEffects` (Ω)
@random      :class:`RandomEffects` blocks: η ~ MvNormal(0, Ω), named elements
@covariates  class attribute ``covariates = ("WT", ...)``
@pre         method ``pre(p, eta, cov) -> dict`` of individual parameters, each ``(N,)``
@dynamics    attribute ``dynamics`` (a :class:`~deepnlme.dynamics.base.Dynamics`)
@derived     method ``derived(p, indiv, amounts, cov)`` -> residual model / distribution
===========  ======================================================================

Inside the blocks ``p``, ``eta``, ``cov`` and ``amounts`` are namespaces: ``p.tvcl`` is
θ on its natural scale, ``eta.cl`` is ``(N,)``, ``cov.WT`` is ``(N,)`` (baseline value),
``amounts.central`` is ``(N, T)``.

Initial estimates: every model accepts ``init={"tvcl": 0.1, "omega": [0.1, 0.1]}`` and
``fixed=["tvka"]`` keyword arguments (handled by the base class, whatever the subclass's
own ``__init__`` signature). Other trainable submodules (neural networks) are fixed effects
too; their penalty (e.g. an L2 prior on weights) is returned by :meth:`log_prior`.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn

from deepnlme.data.population import Population
from deepnlme.dynamics.base import Dynamics
from deepnlme.model.params import Param, RandomEffects


class Namespace(Mapping):
    """Read-only attribute access to a dict of tensors: ``ns.cl`` == ``ns["cl"]``."""

    def __init__(self, values: Mapping[str, Tensor], what: str = "value"):
        object.__setattr__(self, "_values", dict(values))
        object.__setattr__(self, "_what", what)

    def __getattr__(self, name: str) -> Tensor:
        try:
            return self._values[name]
        except KeyError:
            raise AttributeError(
                f"no {self._what} named {name!r}; available: {sorted(self._values)}"
            ) from None

    def __getitem__(self, name: str) -> Tensor:
        return self._values[name]

    def __iter__(self):
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)


class Amounts(Namespace):
    """Compartment amounts ``(N, T)`` by name, computed when ``derived`` first asks for them.

    Only the compartments a model observes enter the graphs that the estimators differentiate
    (up to third order), so a compartment nobody reads is never computed where the dynamics
    can skip it (see :meth:`Dynamics.amounts`).
    """

    def __init__(self, dynamics: Dynamics, indiv: Mapping[str, Tensor], pop: Population):
        super().__init__({}, "compartment")
        object.__setattr__(self, "_source", (dynamics, indiv, pop))

    def __getitem__(self, name: str) -> Tensor:
        if name not in self._values:
            dynamics, indiv, pop = self._source
            if name not in dynamics.compartments:
                raise KeyError(name)
            self._values.update(dynamics.amounts(indiv, pop, (name,)))
        return self._values[name]

    def __getattr__(self, name: str) -> Tensor:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(
                f"no compartment named {name!r}; available: {list(self._source[0].compartments)}"
            ) from None

    def __iter__(self):
        return iter(self._source[0].compartments)

    def __len__(self) -> int:
        return len(self._source[0].compartments)


class NLMEModel(nn.Module):
    """Base class of all models; subclasses declare parameters and write the blocks."""

    covariates: Sequence[str] = ()
    # ``dynamics`` (a Dynamics submodule) is assigned in a subclass's __init__; models
    # without one (direct observation models) leave it unset.

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if "__init__" not in cls.__dict__:
            return
        user_init = cls.__init__

        @functools.wraps(user_init)
        def __init__(self, *args, init: Mapping | None = None, fixed: Sequence[str] = (), **kw):
            user_init(self, *args, **kw)
            if type(self) is cls:
                self.apply_init(init or {}, fixed)

        cls.__init__ = __init__

    # ------------------------------------------------------------ declarations
    def declared(self) -> dict[str, Param]:
        """Declared parameters (θ, Ω, σ) by name, in declaration order."""
        return {n: m for n, m in self.named_children() if isinstance(m, Param)}

    def random_effects(self) -> list[RandomEffects]:
        """Random-effect blocks in declaration order (η is their concatenation)."""
        return [m for m in self.declared().values() if isinstance(m, RandomEffects)]

    @property
    def eta_names(self) -> list[str]:
        return [n for block in self.random_effects() for n in block.names]

    @property
    def n_eta(self) -> int:
        return len(self.eta_names)

    def apply_init(self, init: Mapping, fixed: Sequence[str] = ()) -> None:
        """Set initial estimates by name (natural scale) and fix the named parameters."""
        params = self.declared()
        for name in list(init) + list(fixed):
            if name not in params:
                raise KeyError(
                    f"{type(self).__name__} has no parameter {name!r}; "
                    f"declared parameters: {list(params)}"
                )
        for name, value in init.items():
            if hasattr(value, "items") or hasattr(value, "__iter__") and not isinstance(value, str):
                value = _to_plain(value)
            params[name].set_value(value, name)
        for name in fixed:
            params[name].fix()

    def param_values(self) -> dict[str, Tensor]:
        """Every declared parameter on its natural scale."""
        return {n: p.value() for n, p in self.declared().items()}

    def n_free_parameters(self) -> int:
        """Free scalars: declared parameters plus every other trainable weight."""
        return sum(p.n_free() for p in self.declared().values()) + self.n_undeclared_parameters()

    def n_undeclared_parameters(self) -> int:
        """Trainable scalars that are not declared parameters (e.g. network weights)."""
        declared = {id(p.raw) for p in self.declared().values()}
        trainable = [w for w in self.parameters() if w.requires_grad]
        return sum(w.numel() for w in trainable if id(w) not in declared)

    # -------------------------------------------------------------- user blocks
    def pre(self, p: Namespace, eta: Namespace, cov: Namespace) -> dict[str, Tensor]:
        """Individual parameters, each ``(N,)``."""
        raise NotImplementedError

    def derived(self, p: Namespace, indiv: Namespace, amounts: Namespace, cov: Namespace):
        """Distribution of the observations ``(N, T)``: a GaussianResidual or a Distribution."""
        raise NotImplementedError

    def log_prior(self) -> Tensor:
        """Log prior density of the fixed effects (penalties, e.g. L2 on weights); default 0."""
        return torch.zeros((), dtype=torch.get_default_dtype())

    # ----------------------------------------------------------------- evaluation
    def split_eta(self, eta: Tensor) -> Namespace:
        """``(N, n_eta)`` tensor → namespace of ``(N,)`` tensors by random-effect name."""
        return Namespace({n: eta[:, j] for j, n in enumerate(self.eta_names)}, "random effect")

    def individual_parameters(self, eta: Tensor, pop: Population) -> dict[str, Tensor]:
        """Run ``pre`` for η ``(N, n_eta)``; returns individual parameters, each ``(N,)``."""
        p = Namespace(self.param_values(), "parameter")
        cov = Namespace(pop.baseline_covariates(), "covariate")
        return self.pre(p, self.split_eta(eta), cov)

    def observe(self, eta: Tensor, pop: Population):
        """Distribution of every observation slot given η ``(N, n_eta)``; batch shape ``(N, T)``."""
        p = Namespace(self.param_values(), "parameter")
        cov = Namespace(pop.baseline_covariates(), "covariate")
        indiv = self.pre(p, self.split_eta(eta), cov)
        dynamics: Dynamics | None = getattr(self, "dynamics", None)
        amt = Namespace({}, "compartment") if dynamics is None else Amounts(dynamics, indiv, pop)
        return self.derived(p, Namespace(indiv, "individual parameter"), amt, cov)

    def eta_log_prior(self, eta: Tensor) -> Tensor:
        """log p(η) under MvNormal(0, Ω) per block, summed; η ``(N, n_eta)`` → ``(N,)``."""
        total = eta.new_zeros(eta.shape[0])
        start = 0
        for block in self.random_effects():
            total = total + block.log_prob(eta[:, start : start + block.k])
            start += block.k
        return total

    def eta_sd(self) -> Tensor:
        """Prior standard deviations of η, ``sqrt(diag Ω)`` ``(n_eta,)``."""
        return torch.cat([torch.diagonal(b.value()).sqrt() for b in self.random_effects()])

    def eta_precision(self) -> Tensor:
        """Block-diagonal Ω⁻¹, ``(n_eta, n_eta)``."""
        return torch.block_diag(*[b.precision() for b in self.random_effects()])

    def check_population(self, pop: Population) -> None:
        """Raise if the data lacks a covariate the model declares."""
        missing = [c for c in self.covariates if c not in pop.covariate_names]
        if missing:
            raise ValueError(
                f"{type(self).__name__} needs covariates {list(self.covariates)}; "
                f"{pop.source or 'the data'} provides {pop.covariate_names} "
                f"(set data.covariates to include {missing})"
            )


def _to_plain(value):
    """OmegaConf containers and nested sequences → nested Python lists."""
    if hasattr(value, "items"):
        return {k: _to_plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)) or type(value).__name__ == "ListConfig":
        return [_to_plain(v) for v in value]
    return value
