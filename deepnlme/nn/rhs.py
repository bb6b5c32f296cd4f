"""Network blocks for ODE right-hand sides: ``NN(state, η, covariates[, t])``.

Inside an ODE solve the right-hand side is evaluated at every stage of every step, while η
and the covariates are constant per subject. :class:`StateNetwork` therefore splits its first
layer: :meth:`StateNetwork.context` computes the constant inputs' contribution once per
forward (``(N, H)``), and :meth:`StateNetwork.forward` adds the state (and time) part at each
evaluation. :class:`UniversalRhs` turns a network into an ``OdeDynamics`` right-hand side,
alone or added to known mechanistic terms (a universal differential equation).

Both DeepPumas patterns fit here: η as network inputs (latent individual effects, through
:meth:`StateNetwork.context`) and η on interpretable parameters (the model's ``pre`` puts η on
e.g. a clearance that the mechanistic term or the network's ``term`` uses).

Only smooth activations are offered (:data:`deepnlme.nn.mlp.ACTIVATIONS`): the Laplace
objective differentiates the solution twice with respect to η and once more with respect to
the weights.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from deepnlme.nn.mlp import ACTIVATIONS, CovariateScaler

#: Key of the per-subject context ``(N, H)`` in the ``indiv`` dict a right-hand side receives.
CONTEXT = "_context"


class StateNetwork(nn.Module):
    """MLP ``f(state, t, x, η)`` → ``(N, n_out)`` with a per-subject precomputed context.

    Inputs: ``state`` ``(N, S)`` normalized as ``(state − state_center) / state_scale``;
    optionally the time ``t`` ``(N,)`` divided by ``time_scale``; covariates ``x`` ``(N, C)``
    normalized by ``scaler`` (a :class:`CovariateScaler`; none: used as given); η ``(N, K)``.
    Layers ``[S (+1) + C + K] → hidden … → n_out`` with ``activation`` between them.
    Weights start at PyTorch's default bounds from a private generator seeded by ``seed``;
    with ``zero_last`` the output layer starts at zero (the untrained network outputs 0).

    The L2/L1 weight prior is :meth:`log_prior`: ``−½ · l2 · Σ w² − l1 · Σ |w|`` over every
    weight and bias (L1 is not differentiable at 0; keep ``l1 = 0`` for Laplace fits unless
    the weights stay away from 0).
    """

    def __init__(
        self,
        n_state: int,
        n_covariates: int = 0,
        n_eta: int = 0,
        n_out: int = 1,
        hidden: Sequence[int] = (8,),
        activation: str = "tanh",
        state_center: Sequence[float] | None = None,
        state_scale: Sequence[float] | None = None,
        time_scale: float | None = None,
        scaler: CovariateScaler | None = None,
        l2: float = 0.0,
        l1: float = 0.0,
        seed: int = 0,
        zero_last: bool = True,
    ):
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(
                f"activation must be one of {sorted(ACTIVATIONS)} (smooth, as the Laplace "
                f"objective differentiates through it), got {activation!r}"
            )
        if n_state < 1:
            raise ValueError(f"the network needs at least one state input, got n_state={n_state}")
        if l2 < 0 or l1 < 0:
            raise ValueError(f"weight prior strengths must be >= 0, got l2={l2}, l1={l1}")
        if time_scale is not None and time_scale <= 0:
            raise ValueError(f"time_scale must be > 0 or None, got {time_scale}")
        self.n_state = int(n_state)
        self.n_covariates = int(n_covariates)
        self.n_eta = int(n_eta)
        self.n_out = int(n_out)
        self.uses_time = time_scale is not None
        self.time_scale = float(time_scale) if time_scale is not None else 1.0
        self.l2, self.l1 = float(l2), float(l1)
        center = [0.0] * self.n_state if state_center is None else list(state_center)
        scale = [1.0] * self.n_state if state_scale is None else list(state_scale)
        self.state_scaler = CovariateScaler(center, scale)
        if len(center) != self.n_state:
            raise ValueError(f"state_center/state_scale need {self.n_state} values, got {center}")
        self.scaler = scaler
        n_dynamic = self.n_state + int(self.uses_time)
        sizes = [n_dynamic + self.n_covariates + self.n_eta, *[int(h) for h in hidden]]
        sizes.append(self.n_out)
        generator = torch.Generator().manual_seed(int(seed))
        self.linears = nn.ModuleList(
            nn.Linear(a, b) for a, b in zip(sizes[:-1], sizes[1:], strict=True)
        )
        with torch.no_grad():
            for layer in self.linears:
                bound = 1.0 / math.sqrt(layer.in_features)
                layer.weight.uniform_(-bound, bound, generator=generator)
                layer.bias.uniform_(-bound, bound, generator=generator)
            if zero_last:
                self.linears[-1].weight.zero_()
                self.linears[-1].bias.zero_()
        self.activation = ACTIVATIONS[activation]()
        self.n_dynamic = n_dynamic

    def context(self, x: Tensor | None = None, eta: Tensor | None = None) -> Tensor:
        """First-layer pre-activation of the constant inputs (plus bias), ``(N, H0)``.

        ``x`` ``(N, C)`` raw covariates (normalized here), ``eta`` ``(N, K)``; either may be
        None when the network takes none.
        """
        first = self.linears[0]
        parts = []
        if self.n_covariates:
            if x is None or x.shape[-1] != self.n_covariates:
                raise ValueError(f"expected covariates (N, {self.n_covariates}), got {x}")
            parts.append(self.scaler(x) if self.scaler is not None else x)
        if self.n_eta:
            if eta is None or eta.shape[-1] != self.n_eta:
                raise ValueError(f"expected η (N, {self.n_eta}), got {eta}")
            parts.append(eta)
        if not parts:
            return first.bias.expand(1, -1)
        inputs = torch.cat([p.to(first.weight.dtype) for p in parts], dim=-1)
        return F.linear(inputs, first.weight[:, self.n_dynamic :], first.bias)

    def forward(self, state: Tensor, context: Tensor, t: Tensor | None = None) -> Tensor:
        """``state`` ``(N, S)``, ``context`` from :meth:`context` ``(N or 1, H0)``, ``t``
        ``(N,)`` when the network uses time → ``(N, n_out)``."""
        first = self.linears[0]
        z = self.state_scaler(state)
        if self.uses_time:
            if t is None:
                raise ValueError("this network takes the time t as an input")
            t = t.expand(state.shape[0]) if t.dim() == 0 else t
            z = torch.cat([z, (t / self.time_scale)[:, None].to(z.dtype)], dim=-1)
        h = F.linear(z, first.weight[:, : self.n_dynamic]) + context
        for layer in self.linears[1:]:
            h = layer(self.activation(h))
        return h

    def sum_of_squares(self) -> Tensor:
        """Σ w² over every weight and bias (a scalar)."""
        return sum((w * w).sum() for w in self.linears.parameters())

    def log_prior(self) -> Tensor:
        """``−½ · l2 · Σ w² − l1 · Σ |w|`` (a scalar)."""
        total = -0.5 * self.l2 * self.sum_of_squares()
        if self.l1 > 0:
            total = total - self.l1 * sum(w.abs().sum() for w in self.linears.parameters())
        return total


Term = Callable[[Tensor, Tensor, Mapping[str, Tensor]], Tensor]


class UniversalRhs(nn.Module):
    """``dA/dt = mechanistic(t, A, indiv) + term(NN(features(A, indiv), context, t), A, indiv)``.

    An ``OdeDynamics`` right-hand side (``t`` ``(N,)``, amounts ``A`` ``(N, C)``, ``indiv``
    dict of per-subject tensors → ``(N, C)``).

    Args:
        network: the :class:`StateNetwork`.
        features: ``(A, indiv) -> (N, S)`` the network's state inputs (e.g. a concentration).
        term: ``(out, A, indiv) -> (N, C)`` maps the network output ``(N, n_out)`` to rates;
            None: the output is the rate vector itself (``n_out = C``, the whole right-hand
            side when ``mechanistic`` is None).
        mechanistic: known part of the right-hand side (same signature as an ``OdeDynamics``
            rhs; may define ``prepare``); None for a purely neural right-hand side.

    ``indiv`` may carry the network's constant inputs as ``"_x"`` (covariates ``(N, C)``) and
    ``"_eta"`` (η ``(N, K)``); :meth:`prepare` turns them into the context once per solve. A
    ``"_context"`` entry already in ``indiv`` is used as is.
    """

    def __init__(
        self,
        network: StateNetwork,
        features: Callable[[Tensor, Mapping[str, Tensor]], Tensor],
        term: Term | None = None,
        mechanistic: Callable | None = None,
    ):
        super().__init__()
        self.network = network
        self.features = features
        self.term = term
        self.mechanistic = mechanistic

    def prepare(self, indiv: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """``indiv`` plus the network's context (``"_context"``, ``(N, H0)``)."""
        out = dict(indiv)
        prepare = getattr(self.mechanistic, "prepare", None)
        if prepare is not None:
            out = dict(prepare(out))
        if CONTEXT not in out:
            out[CONTEXT] = self.network.context(out.get("_x"), out.get("_eta"))
        return out

    def forward(self, t: Tensor, amounts: Tensor, indiv: Mapping[str, Tensor]) -> Tensor:
        context = indiv[CONTEXT] if CONTEXT in indiv else self.prepare(indiv)[CONTEXT]
        out = self.network(self.features(amounts, indiv), context, t)
        rate = out if self.term is None else self.term(out, amounts, indiv)
        if self.mechanistic is not None:
            rate = rate + self.mechanistic(t, amounts, indiv)
        return rate

    def log_prior(self) -> Tensor:
        """The network's weight prior (a scalar)."""
        return self.network.log_prior()
