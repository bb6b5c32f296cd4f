"""No silent bad fit: a fit must start at a finite objective with observations to fit, is
converged only where the criterion holds at the optimizer's own stop, and reports signs of
non-identifiability."""

from __future__ import annotations

import math

import pytest
import torch

from deepnlme.data import load_dataset
from deepnlme.inference import Laplace, OuterOptions, fit
from deepnlme.inference.feasibility import INFEASIBLE_LOSS, ObjectiveError
from deepnlme.inference.optimize import (
    STOP_BOUNDARY,
    check_start,
    convergence_warning,
    is_converged,
)
from deepnlme.inference.uncertainty import (
    boundary_warnings,
    identifiability_warnings,
    parameter_covariance,
)
from deepnlme.model.params import Param, positive
from deepnlme.model.zoo.pk import OneCmtOralModel
from tests.inference.linear_model import RandomSlopeModel, random_slope_population


def test_proportional_error_at_a_zero_prediction_is_one_line_naming_the_observation():
    pop = load_dataset("theophylline")
    estimator = Laplace(OneCmtOralModel(error="proportional"))
    with pytest.raises(ObjectiveError) as refused:
        check_start(estimator, pop)
    assert str(refused.value) == (
        "theophylline: row 2, column DV: ID 1, TIME 0, DV 0.74: the log-likelihood is not "
        "finite at the starting estimates (OneCmtOralModel at η = 0): the residual variance "
        "there is 0 (prediction 0, and a proportional error scales with it); use a combined "
        "error model (model.error=combined), or set MDV to 1 on observations before the first "
        "dose takes effect (e.g. pre-dose zeros)"
    )
    # The fit refuses to start rather than report the initial estimates as converged.
    with pytest.raises(ObjectiveError):
        fit(estimator, pop)
    # The remedy the message names works.
    check_start(Laplace(OneCmtOralModel(error="combined")), pop)


def test_lognormal_error_at_a_zero_prediction_names_the_observation():
    pop = load_dataset("theophylline")
    with pytest.raises(ObjectiveError, match=r"^theophylline: row 2, column DV: ID 1, TIME 0, "
                       r"DV 0.74: .* a log-normal error needs a positive DV and prediction"):
        check_start(Laplace(OneCmtOralModel(error="lognormal")), pop)


def test_no_observations_is_refused():
    pop = load_dataset("theophylline")
    doses_only = pop.subset(list(range(len(pop))))
    doses_only.obs_mask = torch.zeros_like(pop.obs_mask)
    doses_only.meta = {**pop.meta, "n_obs": 0}
    with pytest.raises(ObjectiveError) as refused:
        fit(Laplace(OneCmtOralModel()), doses_only)
    assert str(refused.value) == (
        "theophylline: row 0, column DV: the table has no observations (rows with EVID 0 and "
        "MDV 0 and a DV); nothing to fit"
    )


def test_convergence_rule():
    assert is_converged(10.0, 1e-4, 1e-3, "no progress")
    assert is_converged(10.0, 1e-7, 1e-3, "gradient below gtol")
    assert not is_converged(10.0, 1e-4, 1e-3, "max_iter reached")  # a budget is not an optimum
    assert not is_converged(10.0, 1e-4, 1e-3, "max_epochs reached")
    assert not is_converged(INFEASIBLE_LOSS, 0.0, 1e-3, "gradient below gtol")  # the barrier
    assert not is_converged(math.nan, 0.0, 1e-3, "gradient below gtol")
    assert not is_converged(10.0, 2e-3, 1e-3, "no progress")
    assert convergence_warning(True, "no progress", 1e-4, 1e-3) is None
    assert convergence_warning(False, "max_iter reached", 1e-4, 1e-3).startswith(
        "the fit did not converge: it stopped with max_iter reached, max |gradient| 0.0001"
    )


def test_max_iter_is_not_converged_even_with_a_small_gradient():
    pop = random_slope_population(n=6, seed=1)
    for max_iter in (3, 5):  # 3: L-BFGS's evaluation budget (1.25 per iteration) ends it first
        options = OuterOptions(max_iter=max_iter, converged_gtol=1e9)
        result = fit(Laplace(RandomSlopeModel()), pop, options)
        assert result.stop_reason == "max_iter reached" and result.n_iter <= max_iter
        assert result.grad_max < 1e9 and not result.converged


class Confounded(RandomSlopeModel):
    """The random-slope model with a second intercept: b0 and b2 enter only as b0 + b2."""

    def __init__(self):
        super().__init__()
        self.b2 = Param(init=0.0)

    def pre(self, p, eta, cov):
        return {"a": p.b0 + p.b2 + eta.int, "b": p.b1 + eta.slope}


def test_identifiability_warnings_from_the_covariance_step():
    pop = random_slope_population(n=8, seed=3)
    good = Laplace(RandomSlopeModel())
    assert fit(good, pop).converged
    cov = parameter_covariance(good, pop)
    assert cov.condition_number < 100
    assert identifiability_warnings(good.model, cov) == []  # no false alarm on a good fit

    bad = Laplace(Confounded())
    fit(bad, pop)
    warnings = identifiability_warnings(bad.model, parameter_covariance(bad, pop))
    assert warnings and all(w.startswith("covariance step: ") for w in warnings)
    assert any("not positive definite" in w or "condition number" in w for w in warnings)


def test_relative_standard_error_and_boundary_warnings():
    pop = random_slope_population(n=8, seed=3)
    estimator = Laplace(RandomSlopeModel())
    fit(estimator, pop)
    cov = parameter_covariance(estimator, pop)
    cov.se["sigma"] = torch.tensor(50.0) * estimator.model.sigma.value().detach()
    (warning,) = identifiability_warnings(estimator.model, cov)
    assert warning.startswith("covariance step: sigma = ") and "(5e+03% of the estimate)" in warning

    model = OneCmtOralModel(init={"tvcl": 1.1e10})  # a clearance run off to infinity
    assert boundary_warnings(model) == [
        "tvcl = 1.1e+10 has run off to a boundary of its domain (positive): the data may not "
        "determine it; fix it or simplify the model"
    ]
    assert boundary_warnings(OneCmtOralModel()) == []


class Unidentified(RandomSlopeModel):
    """The random-slope model with a positive parameter the likelihood does not depend on,
    started where an unidentified estimate ends up: beyond the boundary check."""

    def __init__(self):
        super().__init__()
        self.unused = positive(1e9)


def test_a_fit_with_a_parameter_at_a_boundary_is_not_converged():
    pop = random_slope_population(n=8, seed=3)
    good = Laplace(RandomSlopeModel())
    result = fit(good, pop)
    assert result.converged and result.stop_reason != STOP_BOUNDARY
    model = Unidentified()  # the others at their optimum
    model.load_state_dict(good.model.state_dict(), strict=False)
    result = fit(Laplace(model), pop)
    assert result.grad_max < 1e-3  # the criterion on the gradient alone would hold
    assert result.stop_reason == STOP_BOUNDARY
    assert not result.converged
