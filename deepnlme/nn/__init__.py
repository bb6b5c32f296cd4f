"""Neural-network blocks for NLME models (inputs: covariates, random effects η, ODE states)."""

from deepnlme.nn.mlp import ACTIVATIONS, CovariateEtaMLP, CovariateScaler, scaler_from_mapping
from deepnlme.nn.rhs import StateNetwork, UniversalRhs

__all__ = [
    "ACTIVATIONS",
    "CovariateEtaMLP",
    "CovariateScaler",
    "StateNetwork",
    "UniversalRhs",
    "scaler_from_mapping",
]
