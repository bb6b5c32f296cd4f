"""Model API: parameter domains, declared parameters, random effects, the model base class."""

from deepnlme.model.base import Namespace, NLMEModel
from deepnlme.model.domains import (
    Bounded,
    DiagonalCovariance,
    Domain,
    FullCovariance,
    Positive,
    Real,
)
from deepnlme.model.params import Param, RandomEffects, positive

__all__ = [
    "Bounded",
    "DiagonalCovariance",
    "Domain",
    "FullCovariance",
    "NLMEModel",
    "Namespace",
    "Param",
    "Positive",
    "RandomEffects",
    "Real",
    "positive",
]
