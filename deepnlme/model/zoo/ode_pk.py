"""Pharmacokinetic models without a closed form, integrated by :class:`OdeDynamics`.

:class:`TwoCmtMMOralModel`: depot → central ⇄ peripheral with Michaelis–Menten elimination
from the central compartment (saturable clearance), η on (ka, vmax, v), Pumas-style names::

    d depot/dt      = -ka·depot
    d central/dt    =  ka·depot - vmax·C/(km + C) - q·(C - peripheral/vp),   C = central/v
    d peripheral/dt =  q·(C - peripheral/vp)

Units follow the data: with doses in mg/kg and concentrations in mg/L (Theophylline) ``v``
and ``vp`` are L/kg, ``q`` L/h/kg, ``vmax`` mg/h/kg and ``km`` mg/L.

Theophylline's concentrations stay in the linear range: a Laplace fit there sends ``vmax``
and ``km`` to very large values with ``vmax/km`` (≈ 0.038 L/h/kg, the clearance) determined;
data with saturation (higher doses) identify both.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from deepnlme.dynamics import OdeDynamics
from deepnlme.model.base import NLMEModel
from deepnlme.model.params import RandomEffects, positive
from deepnlme.model.zoo.pk import ResidualErrorMixin

MM_REQUIRED = ("ka", "vmax", "km", "v", "q", "vp")


class TwoCmtMMRhs:
    """Right-hand side above, ``rhs(t, amounts, p)``: ``amounts`` ``(N, 3)`` (depot, central,
    peripheral) -> ``(N, 3)`` in amount per time unit; ``p`` holds ``(N,)`` individual
    parameters. :meth:`prepare` computes once per solve what does not change within it (the
    scale from amounts to concentrations): each evaluation takes twelve operations instead of
    fourteen (a solve's cost, forwards and backwards, is mostly per operation)."""

    def prepare(self, p: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """``p`` plus ``"_to_conc"`` ``(N, 3)``: (1, 1/v, 1/vp)."""
        v = p["v"]
        return {**p, "_to_conc": torch.stack([torch.ones_like(v), 1.0 / v, 1.0 / p["vp"]], -1)}

    def __call__(self, t: Tensor, amounts: Tensor, p: Mapping[str, Tensor]) -> Tensor:
        to_conc = p["_to_conc"] if "_to_conc" in p else self.prepare(p)["_to_conc"]
        depot, conc, conc_p = (amounts * to_conc).unbind(-1)
        absorption = p["ka"] * depot
        elimination = p["vmax"] * conc / (p["km"] + conc)
        distribution = p["q"] * (conc - conc_p)
        out = absorption - (elimination + distribution)
        return torch.stack([-absorption, out, distribution], dim=-1)


two_cmt_mm_rhs = TwoCmtMMRhs()


def two_cmt_mm_dynamics(**solver) -> OdeDynamics:
    """:class:`OdeDynamics` of :data:`two_cmt_mm_rhs` (doses into depot, observed in central);
    ``solver`` goes to the constructor (method, rtol, atol, max_step, ...)."""
    return OdeDynamics(
        two_cmt_mm_rhs, ("depot", "central", "peripheral"), 1, 2, MM_REQUIRED, **solver
    )


class TwoCmtMMOralModel(ResidualErrorMixin, NLMEModel):
    """Two compartments, first-order absorption, Michaelis–Menten elimination (ODE)."""

    def __init__(
        self,
        error: str = "additive",
        omega_structure: str = "diagonal",
        solver: Mapping | None = None,
    ):
        super().__init__()
        self.tvka = positive(1.5)
        self.tvvmax = positive(0.5)
        self.tvkm = positive(10.0)
        self.tvv = positive(0.45)
        self.tvq = positive(0.1)
        self.tvvp = positive(0.5)
        self.omega = RandomEffects(["ka", "vmax", "v"], [0.3, 0.1, 0.05], omega_structure)
        self.declare_error(error)
        self.dynamics = two_cmt_mm_dynamics(**dict(solver or {}))

    def pre(self, p, eta, cov):
        ones = torch.ones_like(eta.ka)
        return {
            "ka": p.tvka * torch.exp(eta.ka),
            "vmax": p.tvvmax * torch.exp(eta.vmax),
            "km": p.tvkm * ones,
            "v": p.tvv * torch.exp(eta.v),
            "q": p.tvq * ones,
            "vp": p.tvvp * ones,
        }

    def derived(self, p, indiv, amounts, cov):
        return self.observation(p, amounts.central / indiv.v[:, None])
