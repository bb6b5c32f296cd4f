"""Neural-network blocks for NLME models (inputs: covariates and random effects η)."""

from deepnlme.nn.mlp import ACTIVATIONS, CovariateEtaMLP, CovariateScaler, scaler_from_mapping

__all__ = ["ACTIVATIONS", "CovariateEtaMLP", "CovariateScaler", "scaler_from_mapping"]
