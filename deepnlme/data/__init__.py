"""Event tables -> validated, padded tensors (:class:`Population`)."""

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
