"""The fit loop: no point evaluated twice (MemoizedObjective), and parameters running off to a
boundary of their domain caught long before they reach it (RunawayWatch)."""

from __future__ import annotations

import torch
from torch import Tensor

from deepnlme.inference import Laplace, fit
from deepnlme.inference.laplace import LaplaceEstimator
from deepnlme.inference.optimize import STOP_RUNAWAY, MemoizedObjective, trainable
from deepnlme.inference.uncertainty import BOUNDARY_RAW
from deepnlme.likelihood import residual
from deepnlme.model.params import positive
from tests.inference.linear_model import RandomSlopeModel, random_slope_population


class Counting(LaplaceEstimator):
    """Laplace that records the parameters of every evaluation of its objective."""

    def __init__(self, model):
        super().__init__(model, hessian="exact", interaction=True, name="laplace")
        self.points: list[Tensor] = []

    def loss(self, pop):
        self.points.append(torch.cat([p.detach().flatten() for p in trainable(self.model)]))
        return super().loss(pop)


def test_memoized_objective_evaluates_a_point_once_with_its_gradient():
    pop = random_slope_population(n=6, seed=1)
    est = Counting(RandomSlopeModel())
    objective = MemoizedObjective(est)
    params = trainable(est.model)
    objective.loss(pop).backward()
    first = [p.grad.clone() for p in params]
    for p in params:
        p.grad = None
    again = objective.loss(pop)  # remembered: value and gradient, no evaluation
    again.backward()
    assert len(est.points) == 1 and objective.evaluations == 1
    for p, g in zip(params, first, strict=True):
        torch.testing.assert_close(p.grad, g, rtol=0, atol=0)
    direct = Laplace(est.model)  # the objective itself at the same point
    for p in params:
        p.grad = None
    loss = direct.loss(pop)
    loss.backward()
    assert float(again.detach()) == float(loss.detach())
    for p, g in zip(params, first, strict=True):
        torch.testing.assert_close(p.grad, g, rtol=1e-9, atol=1e-12)
    with torch.no_grad():
        assert float(objective.loss(pop)) == float(loss)
        params[0].add_(0.1)
    objective.loss(pop)  # another point: evaluated
    other = random_slope_population(n=6, seed=1)
    objective.loss(other)  # another population: evaluated
    assert objective.evaluations == len(est.points) == 3


def test_a_fit_evaluates_no_point_twice():
    pop = random_slope_population(n=8, seed=3)
    est = Counting(RandomSlopeModel())
    result = fit(est, pop)
    assert result.converged
    assert result.n_evals == len(est.points)
    distinct = {tuple(p.tolist()) for p in est.points}
    assert len(distinct) == len(est.points)


class Saturating(RandomSlopeModel):
    """The random-slope model with a saturable slope ``vmax·t/(km + t)`` in place of
    ``b1·t``: on linear data the fit prefers km → ∞ with vmax/km fixed (like Michaelis–Menten
    elimination on concentrations far below km), with ever smaller gains."""

    def __init__(self):
        super().__init__()
        del self.b1
        self.vmax = positive(5.0)
        self.km = positive(10.0)

    def pre(self, p, eta, cov):
        return {"a": p.b0 + eta.int, "b": eta.slope}

    def derived(self, p, indiv, amounts, cov):
        t = self.t
        mean = indiv.a[:, None] + p.vmax * t / (p.km + t) + indiv.b[:, None] * t
        return residual.additive(mean, p.sigma)


def test_a_parameter_running_off_stops_the_fit_long_before_the_boundary():
    pop = random_slope_population(n=40, seed=0)
    linear = fit(Laplace(RandomSlopeModel()), pop)
    assert linear.converged and not linear.warnings  # no false alarm
    model = Saturating()
    result = fit(Laplace(model), pop)
    assert result.stop_reason == STOP_RUNAWAY and not result.converged
    assert float(model.km.raw.detach()) < BOUNDARY_RAW  # caught on the way
    assert len(result.warnings) >= 1
    assert any(w.startswith("km = ") and "is running off to a boundary of its domain (positive)"
               in w and "fix it or simplify the model" in w for w in result.warnings)
    # where it stopped, the fit is as good as the linear model's (the limit km → ∞)
    assert abs(result.loss - linear.loss) < 0.1


def test_runaway_watch_names_the_random_effect_whose_variance_runs_off():
    """Checked against the previous check: a variance falling by more than a factor e while
    the objective hardly falls is named by its η; the same fall with a real gain is not."""
    from deepnlme.inference.optimize import RunawayWatch
    from deepnlme.model.zoo.pk import OneCmtOralModel

    model = OneCmtOralModel()
    watch = RunawayWatch(model)
    assert watch.check(100.0, 0) == []  # the first check only records
    with torch.no_grad():
        model.omega.raw[1] -= 1.5
    (message,) = watch.check(100.0 - 0.005, 5)
    assert message.startswith("omega (variance of η cl) = ")
    assert "running off to a boundary of its domain" in message and "over the last 5" in message
    with torch.no_grad():
        model.omega.raw[1] -= 1.5
    assert watch.check(90.0, 10) == []  # a real gain: a profile with a slope
