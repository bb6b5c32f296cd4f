"""The integration-error check: predictions against a finer solver, and its warning."""

from __future__ import annotations

import pytest
import torch

from deepnlme.data import load_dataset
from deepnlme.data.synthetic import COVARIATES, synthetic_pk_regimen
from deepnlme.diagnostics import Evaluation, integration_error, integration_warnings, predict
from deepnlme.diagnostics.solver_check import refined
from deepnlme.dynamics import OdeDynamics, OneCmtOral
from deepnlme.fitted import default_dtype
from deepnlme.model.zoo.neural_ode import NeuralODEPKModel
from deepnlme.model.zoo.pk import OneCmtOralModel


def evaluation(model, pop, split: str) -> Evaluation:
    """An evaluation at η = 0 (the check only needs the population, η̂ and predictions)."""
    eta = torch.zeros(len(pop), model.n_eta, dtype=torch.float64)
    return Evaluation(pop, torch.zeros(len(pop)), eta, predict(model, pop, eta), None, split)


def neural_ode(**solver) -> NeuralODEPKModel:
    with default_dtype(torch.float64):
        m = NeuralODEPKModel(COVARIATES, seed=3, **solver)
    output = m.dynamics.rhs.network.linears[-1].weight
    with torch.no_grad():  # a network that makes the elimination depend on the concentration
        output.copy_(3.0 * torch.randn(output.shape, generator=torch.Generator().manual_seed(0)))
    return m


def test_closed_form_models_have_no_check():
    model = OneCmtOralModel().double()
    pop = load_dataset("theophylline")
    assert integration_error(model, [evaluation(model, pop, "fit")]) is None
    assert integration_warnings(None) == []


def test_coarse_equal_steps_on_repeated_doses_warn_and_graded_steps_do_not():
    pop = synthetic_pk_regimen(5, seed=2, dtype=torch.float64)
    coarse = neural_ode(max_step=12.0)
    check = integration_error(coarse, [evaluation(coarse, pop, "heldout_regimen")])
    assert check["refined"] == "max_step 12 -> 1.5" and check["factor"] == 8
    errors = check["splits"]["heldout_regimen"]
    assert errors["pred"]["median"] > 0.01 and errors["pred"]["max"] >= errors["pred"]["median"]
    (warning,) = integration_warnings(check)
    assert warning.startswith("integration error: on the heldout_regimen subjects the "
                              "predictions differ by a median ")
    assert coarse.dynamics.max_step == 12.0  # restored after the check

    graded = neural_ode(max_step=6.0, step_growth=2.0, min_step=0.25)
    check = integration_error(graded, [evaluation(graded, pop, "heldout_regimen")])
    assert check["splits"]["heldout_regimen"]["pred"]["median"] < errors["pred"]["median"] / 3
    assert integration_warnings(check) == []


@pytest.mark.parametrize(
    ("solver", "change", "restored"),
    [
        ({"method": "dopri5", "rtol": 1e-6, "atol": 1e-8},
         "rtol 1e-06 -> 1.5625e-08, atol 1e-08 -> 1.5625e-10", ("rtol", 1e-6)),
        ({"method": "rk4", "max_step": 0.5}, "max_step 0.5 -> 0.0625", ("max_step", 0.5)),
        ({"method": "rk4", "min_steps": 4}, "min_steps 4 -> 32", ("min_steps", 4)),
    ],
)
def test_refined_tightens_each_kind_of_solver_and_restores_it(solver, change, restored):
    dynamics = OdeDynamics.linear(OneCmtOral, **solver)
    with refined(dynamics) as described:
        assert described == change
        name, value = restored
        assert getattr(dynamics, name) != value
    assert getattr(dynamics, name) == value


def test_an_ode_model_at_tight_tolerances_passes():
    pop = load_dataset("theophylline")
    model = OneCmtOralModel(error="additive").double()
    model.dynamics = OdeDynamics.linear(OneCmtOral, rtol=1e-8, atol=1e-10)
    check = integration_error(model, [evaluation(model, pop, "fit")])
    assert check["splits"]["fit"]["ipred"]["max"] < 1e-5
    assert integration_warnings(check) == []


def test_refined_graded_steps_shrink_every_step():
    dynamics = neural_ode(max_step=6.0, step_growth=2.0, min_step=0.25).dynamics
    with refined(dynamics) as described:
        assert described == ("step_growth 2 -> 0.25, min_step 0.25 -> 0.03125, max_step 6 -> "
                             "0.75")
    assert (dynamics.step_growth, dynamics.min_step, dynamics.max_step) == (2.0, 0.25, 6.0)
