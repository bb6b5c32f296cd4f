"""Event tables -> validated, padded tensors (:class:`Population`).

The names below load on first use, so that importing :mod:`deepnlme.data.events` or
:mod:`deepnlme.data.sources` (reading and checking a table: pandas only) does not import torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from deepnlme.data.build import build_population, check_compartments, load_population
    from deepnlme.data.datasets import DATASETS, dataset_path, load_dataset
    from deepnlme.data.errors import DataValidationError
    from deepnlme.data.events import EventTable, read_event_table
    from deepnlme.data.population import (
        RATE_MODELLED_DURATION,
        RATE_MODELLED_RATE,
        Population,
    )
    from deepnlme.data.split import split_heldout

_EXPORTS = {
    "DATASETS": "deepnlme.data.datasets",
    "RATE_MODELLED_DURATION": "deepnlme.data.population",
    "RATE_MODELLED_RATE": "deepnlme.data.population",
    "DataValidationError": "deepnlme.data.errors",
    "EventTable": "deepnlme.data.events",
    "Population": "deepnlme.data.population",
    "build_population": "deepnlme.data.build",
    "check_compartments": "deepnlme.data.build",
    "dataset_path": "deepnlme.data.datasets",
    "load_dataset": "deepnlme.data.datasets",
    "load_population": "deepnlme.data.build",
    "read_event_table": "deepnlme.data.events",
    "split_heldout": "deepnlme.data.split",
}

__all__ = [
    "DATASETS",
    "RATE_MODELLED_DURATION",
    "RATE_MODELLED_RATE",
    "DataValidationError",
    "EventTable",
    "Population",
    "build_population",
    "check_compartments",
    "dataset_path",
    "load_dataset",
    "load_population",
    "read_event_table",
    "split_heldout",
]


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
