"""Estimators (marginal likelihood by Laplace/FOCEI/FOCE) and the outer optimizer."""

from deepnlme.inference.inner import InnerOptions, find_modes
from deepnlme.inference.laplace import FOCE, FOCEI, Laplace, LaplaceEstimator
from deepnlme.inference.optimize import FitResult, OuterOptions, fit

__all__ = [
    "FOCE",
    "FOCEI",
    "FitResult",
    "InnerOptions",
    "Laplace",
    "LaplaceEstimator",
    "OuterOptions",
    "find_modes",
    "fit",
]
