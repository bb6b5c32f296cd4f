"""A run's data table, read and checked before torch loads (start-up time of data errors).

:func:`read_data` reads a ``"csv"`` data source's table with pandas alone; the commands pass it
on to :func:`deepnlme.training.build.load_data`, which builds the tensors from it without
reading the file again. Problems are raised as in ``load_data``: a
:class:`~deepnlme.data.errors.DataValidationError` as it is, anything else the user can fix as a
one-line :class:`~deepnlme.cli.SetupError` naming the data source.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from typing import Any

from omegaconf import DictConfig, OmegaConf

from deepnlme.cli import SetupError, one_line
from deepnlme.data.errors import DataValidationError
from deepnlme.data.events import EventTable
from deepnlme.data.sources import read_from_config


def plain(config: DictConfig | Mapping) -> dict[str, Any]:
    """Resolved config as plain dicts/lists."""
    if isinstance(config, DictConfig):
        return OmegaConf.to_container(config, resolve=True)  # type: ignore[return-value]
    return dict(config)


@contextlib.contextmanager
def data_errors(config: Mapping[str, Any]) -> Iterator[None]:
    """Re-raise problems with the data source of ``config`` as the user sees them."""
    try:
        yield
    except DataValidationError:
        raise
    except (ValueError, TypeError, ImportError, OSError) as exc:
        raise SetupError(f"data {config.get('name')!r}: {one_line(exc)}") from exc


def read_data(data_cfg: DictConfig | Mapping) -> EventTable | None:
    """The validated table of a ``"csv"`` data config (split keys ignored); None for the other
    sources. Loads pandas, not torch."""
    config = plain(data_cfg)
    with data_errors(config):
        return read_from_config(config)
