"""Training through Lightning: the module (estimator injected), full-batch data, callbacks.

Lightning only orchestrates here; the math lives in ``deepnlme.inference`` and the models.
Config-driven construction (Hydra) is in :mod:`deepnlme.training.build`.
"""

from deepnlme.inference.optimize import objective_and_gradient
from deepnlme.training.callbacks import (
    ConvergenceMonitor,
    FitProgressBar,
    FitTimer,
    ParameterTrace,
)
from deepnlme.training.datamodule import PopulationDataModule
from deepnlme.training.module import NLMEFitModule

__all__ = [
    "ConvergenceMonitor",
    "FitProgressBar",
    "FitTimer",
    "NLMEFitModule",
    "ParameterTrace",
    "PopulationDataModule",
    "objective_and_gradient",
]
