"""Training through Lightning: the module (estimator injected), full-batch data, callbacks.

Lightning only orchestrates here; the math lives in ``deepnlme.inference`` and the models.
Config-driven construction (Hydra) is in :mod:`deepnlme.training.build`. The names below load
on first use, so that importing :mod:`deepnlme.training.build` (data checks) does not import
Lightning.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from deepnlme.inference.optimize import objective_and_gradient
    from deepnlme.training.callbacks import (
        ConvergenceMonitor,
        FitProgressBar,
        FitTimer,
        ParameterTrace,
    )
    from deepnlme.training.datamodule import PopulationDataModule
    from deepnlme.training.module import NLMEFitModule

_EXPORTS = {
    "ConvergenceMonitor": "deepnlme.training.callbacks",
    "FitProgressBar": "deepnlme.training.callbacks",
    "FitTimer": "deepnlme.training.callbacks",
    "NLMEFitModule": "deepnlme.training.module",
    "ParameterTrace": "deepnlme.training.callbacks",
    "PopulationDataModule": "deepnlme.training.datamodule",
    "objective_and_gradient": "deepnlme.inference.optimize",
}

__all__ = [
    "ConvergenceMonitor",
    "FitProgressBar",
    "FitTimer",
    "NLMEFitModule",
    "ParameterTrace",
    "PopulationDataModule",
    "objective_and_gradient",
]


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
