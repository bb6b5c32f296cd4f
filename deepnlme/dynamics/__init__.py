"""Dynamics: individual parameters + doses -> compartment amounts at observation times."""

from deepnlme.dynamics.base import Dynamics
from deepnlme.dynamics.closed_form import (
    LinearCompartmentModel,
    OneCmtIV,
    OneCmtOral,
    TwoCmtIV,
    TwoCmtOral,
)
from deepnlme.dynamics.dosing import Doses, resolve_doses
from deepnlme.dynamics.ode import LinearRhs, OdeDynamics

__all__ = [
    "Doses",
    "Dynamics",
    "LinearCompartmentModel",
    "LinearRhs",
    "OdeDynamics",
    "OneCmtIV",
    "OneCmtOral",
    "TwoCmtIV",
    "TwoCmtOral",
    "resolve_doses",
]
