"""In-memory NONMEM-style event tables (pandas) -> :class:`Population`, through the same
builder as files (:func:`deepnlme.data.build.build_population`), so that generated data
(synthetic populations, dosing regimens to simulate) follow exactly the semantics of a CSV.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
import torch

from deepnlme.data.build import build_population
from deepnlme.data.events import DOSE_EVIDS, NUMERIC_COLUMNS, EventTable
from deepnlme.data.population import Population

#: NONMEM defaults of the optional event columns.
DEFAULTS = {"DV": 0.0, "AMT": 0.0, "EVID": 0, "MDV": 0, "CMT": 0, "RATE": 0.0, "DUR": 0.0,
            "II": 0.0, "ADDL": 0, "SS": 0}
INTEGER_COLUMNS = ("EVID", "MDV", "CMT", "ADDL", "SS")


def population_from_frame(
    frame: pd.DataFrame,
    covariates: Sequence[str] = (),
    source: str = "table",
    dtype: torch.dtype | None = None,
) -> Population:
    """A :class:`Population` from an event table built in code (rows already in time order).

    ``frame`` needs ``ID`` and ``TIME``; missing event columns (and missing values in
    them) take NONMEM defaults (``EVID`` 1 where ``AMT > 0``, ``MDV`` 1 where ``EVID != 0``,
    others 0). Covariate columns are carried in the order of ``covariates``.
    The frame is trusted (generated, not read): only the builder's own checks apply.
    """
    f = frame.reset_index(drop=True).copy()
    f.columns = [str(c).upper() for c in f.columns]
    covariates = [str(c).upper() for c in covariates]
    given = set(f.columns)
    for column, default in DEFAULTS.items():
        f[column] = f[column].fillna(default) if column in given else default
    if "EVID" not in given:
        f["EVID"] = (f["AMT"] > 0).astype(np.int64)
    if "MDV" not in given:
        f["MDV"] = (f["EVID"] != 0).astype(np.int64)
    for column in NUMERIC_COLUMNS:
        f[column] = f[column].astype(np.int64 if column in INTEGER_COLUMNS else np.float64)
    for column in covariates:
        f[column] = f[column].astype(np.float64)
    f["ID"] = f["ID"].astype(str)
    f = f[["ID", *NUMERIC_COLUMNS, *covariates]]
    evid = f["EVID"]
    table = EventTable(
        frame=f,
        covariates=tuple(covariates),
        source=source,
        columns={c: c for c in f.columns},
        n_rows=len(f),
        n_obs=int(((evid == 0) & (f["MDV"] == 0)).sum()),
        n_doses=int(evid.isin(DOSE_EVIDS).sum()),
        n_resets=int((evid == 3).sum()),
        n_other=int(((evid == 2) | ((evid == 0) & (f["MDV"] != 0))).sum()),
    )
    return build_population(table, dtype=dtype)
