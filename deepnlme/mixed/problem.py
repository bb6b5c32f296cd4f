"""A formula-model fit as one bounded minimisation (what the full-batch runners step through):
the objective of x, its start and lower bounds, and the report at a minimiser.

* Gaussian ``ml``/``reml``: x = θ, the profiled deviance (:mod:`.lmm`);
* ``laplace``: x = (β, τ, θ), the Laplace objective (:mod:`.glmm`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from deepnlme.mixed import families
from deepnlme.mixed.design import MixedDesign
from deepnlme.mixed.glmm import LaplaceObjective, glmm_result
from deepnlme.mixed.lmm import ProfiledDeviance, lmm_result
from deepnlme.mixed.optimizer import OptimResult
from deepnlme.mixed.result import MixedFit


@dataclass
class FitProblem:
    """``objective(x) -> scalar`` (float64 torch, on ``device``) to minimise subject to
    ``x >= lower`` from ``x0``; ``report(opt, fit_seconds)`` is the fit at a minimiser."""

    objective: Callable[[torch.Tensor], torch.Tensor]
    x0: np.ndarray
    lower: np.ndarray
    device: torch.device
    report: Callable[[OptimResult, float], MixedFit]


def fit_problem(design: MixedDesign, family: str, link: str | None, method: str,
                se: bool = True) -> FitProblem:
    """The minimisation of ``method`` (``ml``, ``reml`` or ``laplace``) for ``design``;
    raises ValueError for a family/link the method does not fit."""
    device = design.y.device
    if family == "gaussian":
        if link not in (None, "identity"):
            raise ValueError(f"family gaussian has only the identity link (got {link!r})")
        deviance = ProfiledDeviance(design, reml=method == "reml")
        return FitProblem(deviance, deviance.initial(), deviance.lower_bounds(), device,
                          lambda opt, seconds: lmm_result(design, deviance, opt, seconds))
    laplace = LaplaceObjective(design, family, families.check_family(family, link))
    return FitProblem(laplace, laplace.initial(), laplace.lower_bounds(), device,
                      lambda opt, seconds: glmm_result(design, laplace, opt, se, seconds))
