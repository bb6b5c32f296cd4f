"""Table sources of formula models: any CSV (``data=table data.path=FILE``) or a bundled
table (``data=insteval``), and the seeded split of rows into fit and held-out parts."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import pandas as pd

from deepnlme.data.errors import DataValidationError
from deepnlme.mixed.datasets import TABLES, table_path


def load_table(config: Mapping[str, Any]) -> tuple[pd.DataFrame, str]:
    """``(table, source name for messages)`` from a data config (``name``, ``path``)."""
    name = str(config.get("name"))
    if name in TABLES:
        path, source = table_path(name), name
    elif name in ("table", "csv"):
        if not config.get("path"):
            raise ValueError(f"data source {name!r} needs a file: set data.path=FILE.csv")
        path = config["path"]
        source = str(path)
    else:
        raise ValueError(
            f"formula models read tables: data=table data.path=FILE.csv or one of "
            f"{', '.join(sorted(TABLES))} (got data={name})"
        )
    try:
        table = pd.read_csv(path)
    except (OSError, ValueError) as exc:
        raise DataValidationError(f"{source}: cannot read the table: {exc}") from exc
    if table.empty:
        raise DataValidationError(f"{source}: the table has no rows")
    return table, source


def split_rows(
    table: pd.DataFrame, fraction: float, seed: int
) -> tuple[pd.DataFrame, pd.DataFrame | None]:
    """``(fit rows, held-out rows or None)``: a seeded random ``fraction`` of rows held out."""
    if fraction <= 0:
        return table, None
    if not 0 < fraction < 1:
        raise ValueError(f"data.heldout_fraction must be in [0, 1) (got {fraction})")
    rng = np.random.default_rng(seed)
    held = np.zeros(len(table), dtype=bool)
    held[rng.permutation(len(table))[: int(round(fraction * len(table)))]] = True
    return table[~held].reset_index(drop=True), table[held].reset_index(drop=True)
