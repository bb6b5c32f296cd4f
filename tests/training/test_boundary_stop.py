"""A fit whose parameter runs off to a boundary of its domain stops there, not converged."""

from __future__ import annotations

import lightning.pytorch as pl
import torch

from deepnlme.data import load_dataset
from deepnlme.inference import OuterOptions
from deepnlme.inference.optimize import STOP_BOUNDARY, STOP_RUNAWAY
from deepnlme.inference.uncertainty import BOUNDARY_RAW
from deepnlme.model.params import positive
from deepnlme.training import ConvergenceMonitor, NLMEFitModule, PopulationDataModule


class RunAway(torch.nn.Module):
    """A 'model' with one positive parameter k whose objective keeps falling as k → ∞."""

    def __init__(self):
        super().__init__()
        self.k = positive(1.0)

    def declared(self):
        return {"k": self.k}

    def log_prior(self) -> torch.Tensor:
        return torch.zeros(())


class RunAwayEstimator:
    def __init__(self):
        self.model = RunAway()

    def loss(self, pop) -> torch.Tensor:
        return torch.exp(-0.1 * self.model.k.raw).sum()  # gradient 0.016 at the boundary


def fitted_monitor(estimator) -> ConvergenceMonitor:
    """The monitor of a Lightning fit of ``estimator`` (L-BFGS, 4 iterations per epoch)."""
    outer = OuterOptions(max_iter=500, gtol=1e-8)
    monitor = ConvergenceMonitor(outer.gtol, outer.converged_gtol, outer.max_iter)
    trainer = pl.Trainer(
        accelerator="cpu", precision="64-true", max_epochs=100, logger=False,
        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
        callbacks=[monitor],
    )
    pop = load_dataset("theophylline")
    trainer.fit(NLMEFitModule(estimator, outer, 4), datamodule=PopulationDataModule(pop))
    return monitor


def test_a_parameter_at_a_boundary_stops_the_fit_not_converged():
    estimator = RunAwayEstimator()
    monitor = fitted_monitor(estimator)
    assert monitor.stop_reason == STOP_BOUNDARY
    assert not monitor.converged and monitor.summary()["converged"] is False
    assert float(estimator.model.k.raw) > BOUNDARY_RAW
    assert monitor.n_iter < 500


class FlatEstimator(RunAwayEstimator):
    def loss(self, pop) -> torch.Tensor:
        return (1.0 / (1.0 + self.model.k.raw) ** 2).sum()  # ever flatter as k → ∞


def test_a_parameter_running_off_stops_the_fit_before_the_boundary():
    """The monitor compares each epoch's end with the previous one's (RunawayWatch): k
    grows by a factor e or more per epoch while the objective hardly falls: the fit stops,
    not converged, long before k reaches the boundary, and names k."""
    estimator = FlatEstimator()
    monitor = fitted_monitor(estimator)
    assert monitor.stop_reason == STOP_RUNAWAY and not monitor.converged
    assert float(estimator.model.k.raw.detach()) < BOUNDARY_RAW
    (warning,) = monitor.warnings
    assert warning.startswith("k = ") and "running off to a boundary of its domain" in warning
    assert monitor.state_dict()["warnings"] == monitor.warnings  # kept in checkpoints
