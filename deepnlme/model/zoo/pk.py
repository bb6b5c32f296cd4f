"""Classical pharmacokinetic models (Pumas-style parameter names).

Each model: log-normal individual parameters ``P_i = tvP · exp(η_P)``; concentration
``central / v``; residual error chosen by ``error`` (additive, proportional, combined,
lognormal) with SDs ``sigma_add`` / ``sigma_prop``.
"""

from __future__ import annotations

import torch

from deepnlme.dynamics import OneCmtIV, OneCmtOral, TwoCmtIV, TwoCmtOral
from deepnlme.likelihood import residual
from deepnlme.model.base import NLMEModel
from deepnlme.model.domains import Bounded
from deepnlme.model.params import Param, RandomEffects, positive

ERROR_MODELS = ("additive", "proportional", "combined", "lognormal")


class ResidualErrorMixin:
    """Declares σ parameters for the chosen error model and builds the observation model."""

    def declare_error(self, error: str, sigma_add: float = 0.5, sigma_prop: float = 0.1) -> None:
        if error not in ERROR_MODELS:
            raise ValueError(f"error must be one of {ERROR_MODELS}, got {error!r}")
        self.error = error
        if error in ("additive", "combined"):
            self.sigma_add = positive(sigma_add)
        if error in ("proportional", "combined", "lognormal"):
            self.sigma_prop = positive(sigma_prop)

    def observation(self, p, conc):
        if self.error == "additive":
            return residual.additive(conc, p.sigma_add)
        if self.error == "proportional":
            return residual.proportional(conc, p.sigma_prop)
        if self.error == "combined":
            return residual.combined(conc, p.sigma_add, p.sigma_prop)
        return residual.lognormal(conc, p.sigma_prop)


class OneCmtOralModel(ResidualErrorMixin, NLMEModel):
    """One compartment, first-order absorption: η on (ka, cl, v)."""

    def __init__(self, error: str = "additive", omega_structure: str = "diagonal"):
        super().__init__()
        self.tvka = positive(1.0)
        self.tvcl = positive(0.05)
        self.tvv = positive(0.5)
        self.omega = RandomEffects(["ka", "cl", "v"], [0.1, 0.1, 0.1], omega_structure)
        self.declare_error(error)
        self.dynamics = OneCmtOral()

    def pre(self, p, eta, cov):
        return {
            "ka": p.tvka * torch.exp(eta.ka),
            "cl": p.tvcl * torch.exp(eta.cl),
            "v": p.tvv * torch.exp(eta.v),
        }

    def derived(self, p, indiv, amounts, cov):
        return self.observation(p, amounts.central / indiv.v[:, None])


class OneCmtIVModel(ResidualErrorMixin, NLMEModel):
    """One compartment, IV bolus / infusion: η on (cl, v)."""

    def __init__(self, error: str = "proportional", omega_structure: str = "diagonal"):
        super().__init__()
        self.tvcl = positive(1.0)
        self.tvv = positive(10.0)
        self.omega = RandomEffects(["cl", "v"], [0.1, 0.1], omega_structure)
        self.declare_error(error)
        self.dynamics = OneCmtIV()

    def pre(self, p, eta, cov):
        return {"cl": p.tvcl * torch.exp(eta.cl), "v": p.tvv * torch.exp(eta.v)}

    def derived(self, p, indiv, amounts, cov):
        return self.observation(p, amounts.central / indiv.v[:, None])


class TwoCmtIVModel(ResidualErrorMixin, NLMEModel):
    """Two compartments, IV: η on (cl, v, q, vp)."""

    def __init__(self, error: str = "proportional", omega_structure: str = "diagonal"):
        super().__init__()
        self.tvcl = positive(1.0)
        self.tvv = positive(10.0)
        self.tvq = positive(1.0)
        self.tvvp = positive(20.0)
        self.omega = RandomEffects(["cl", "v", "q", "vp"], [0.1] * 4, omega_structure)
        self.declare_error(error)
        self.dynamics = TwoCmtIV()

    def pre(self, p, eta, cov):
        return {
            "cl": p.tvcl * torch.exp(eta.cl),
            "v": p.tvv * torch.exp(eta.v),
            "q": p.tvq * torch.exp(eta.q),
            "vp": p.tvvp * torch.exp(eta.vp),
        }

    def derived(self, p, indiv, amounts, cov):
        return self.observation(p, amounts.central / indiv.v[:, None])


class TwoCmtOralModel(ResidualErrorMixin, NLMEModel):
    """Two compartments, first-order absorption: η on (ka, cl, v, q, vp)."""

    def __init__(self, error: str = "proportional", omega_structure: str = "diagonal"):
        super().__init__()
        self.tvka = positive(1.0)
        self.tvcl = positive(1.0)
        self.tvv = positive(10.0)
        self.tvq = positive(1.0)
        self.tvvp = positive(20.0)
        self.omega = RandomEffects(["ka", "cl", "v", "q", "vp"], [0.1] * 5, omega_structure)
        self.declare_error(error)
        self.dynamics = TwoCmtOral()

    def pre(self, p, eta, cov):
        return {
            "ka": p.tvka * torch.exp(eta.ka),
            "cl": p.tvcl * torch.exp(eta.cl),
            "v": p.tvv * torch.exp(eta.v),
            "q": p.tvq * torch.exp(eta.q),
            "vp": p.tvvp * torch.exp(eta.vp),
        }

    def derived(self, p, indiv, amounts, cov):
        return self.observation(p, amounts.central / indiv.v[:, None])


class PhenoModel(NLMEModel):
    """NONMEM's pheno: CL = θ1·WT·e^η1, V = θ2·WT·(1 + θ3·[APGAR < 5])·e^η2, proportional error."""

    covariates = ("WT", "APGAR")

    def __init__(self):
        super().__init__()
        self.tvcl = positive(0.005)
        self.tvv = positive(1.0)
        self.apgar_v = Param(Bounded(-0.99, 10.0), 0.1)
        self.omega = RandomEffects(["cl", "v"], [0.03, 0.03])
        self.sigma_prop = positive(0.1)
        self.dynamics = OneCmtIV()

    def pre(self, p, eta, cov):
        low_apgar = (cov.APGAR < 5).to(cov.WT.dtype)
        return {
            "cl": p.tvcl * cov.WT * torch.exp(eta.cl),
            "v": p.tvv * cov.WT * (1 + p.apgar_v * low_apgar) * torch.exp(eta.v),
        }

    def derived(self, p, indiv, amounts, cov):
        return residual.proportional(amounts.central / indiv.v[:, None], p.sigma_prop)
