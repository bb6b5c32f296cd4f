"""The convergence callback's stopping rules and the fit timer, on toy objectives."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch

from deepnlme.data import load_dataset
from deepnlme.inference import OuterOptions
from deepnlme.training import ConvergenceMonitor, FitTimer, NLMEFitModule, PopulationDataModule


class Point(torch.nn.Module):
    """A 'model' whose only fixed effect is a point x in R²."""

    def __init__(self):
        super().__init__()
        self.x = torch.nn.Parameter(torch.tensor([-1.2, 1.0]))

    def log_prior(self) -> torch.Tensor:
        return torch.zeros(())


class ToyEstimator:
    """Estimator contract (``model``, ``loss(pop)``) with a closed-form objective of x."""

    def __init__(self, objective):
        self.model = Point()
        self.objective = objective

    def loss(self, pop) -> torch.Tensor:
        return self.objective(self.model.x)


def quadratic(x):
    return ((x - torch.tensor([1.0, -2.0], dtype=x.dtype)) ** 2).sum()


def rosenbrock(x):
    return (1 - x[0]) ** 2 + 100 * (x[1] - x[0] ** 2) ** 2


def run(
    objective, max_iter: int = 500, per_epoch: int = 20, max_epochs: int = 100,
    converged_gtol: float = 1e-3,
):
    estimator = ToyEstimator(objective)
    outer = OuterOptions(max_iter=max_iter, gtol=1e-8, converged_gtol=converged_gtol)
    monitor = ConvergenceMonitor(outer.gtol, outer.converged_gtol, outer.max_iter)
    timer = FitTimer()
    trainer = pl.Trainer(
        accelerator="cpu", precision="64-true", max_epochs=max_epochs, logger=False,
        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
        callbacks=[monitor, timer],
    )
    pop = load_dataset("theophylline")
    trainer.fit(NLMEFitModule(estimator, outer, per_epoch), datamodule=PopulationDataModule(pop))
    return estimator, monitor, timer, trainer


def test_stops_when_the_gradient_vanishes():
    estimator, monitor, timer, trainer = run(quadratic)
    assert monitor.stop_reason == "gradient below gtol"
    assert monitor.converged and monitor.grad_max < 1e-8
    assert torch.allclose(estimator.model.x, torch.tensor([1.0, -2.0], dtype=torch.float64))
    assert trainer.current_epoch < 5
    assert timer.seconds > 0
    assert monitor.loglik == pytest.approx(-monitor.loss)


def test_stops_at_max_iter_without_convergence():
    _, monitor, _, _ = run(rosenbrock, max_iter=8, per_epoch=4)
    assert monitor.stop_reason == "max_iter reached"
    assert monitor.n_iter >= 8
    assert not monitor.converged


def test_a_budget_is_never_converged_even_below_converged_gtol():
    _, monitor, _, _ = run(rosenbrock, max_iter=8, per_epoch=4, converged_gtol=1e9)
    assert monitor.stop_reason == "max_iter reached" and monitor.grad_max < 1e9
    assert not monitor.converged and monitor.summary()["converged"] is False
    _, monitor, _, _ = run(rosenbrock, per_epoch=4, max_epochs=2, converged_gtol=1e9)
    assert monitor.stop_reason == "max_epochs reached" and not monitor.converged


def test_max_epochs_is_reported():
    _, monitor, _, _ = run(rosenbrock, per_epoch=4, max_epochs=2)
    assert monitor.stop_reason == "max_epochs reached" and 2 <= monitor.n_iter <= 8


def test_state_round_trips():
    monitor = ConvergenceMonitor(1e-6, 1e-3, 10)
    monitor.n_iter, monitor.converged, monitor.stop_reason = 7, True, "no progress"
    restored = ConvergenceMonitor(1e-6, 1e-3, 10)
    restored.load_state_dict(monitor.state_dict())
    assert restored.summary() == monitor.summary()
