"""Dosing regimens to simulate: a command-line specification or a dosing-table CSV, checked,
and turned into a :class:`Population` of subjects on that regimen with a prediction grid.

A regimen is NONMEM dose records: amount ``amt`` at ``time`` into ``cmt`` (0: the model's
default), repeated ``addl`` more times every ``ii``; a zero-order infusion with ``rate``
(amount/time) or ``duration``. Problems are raised as :class:`RegimenError` with one line
naming the option (or file, row and column).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from deepnlme.data.frames import population_from_frame
from deepnlme.data.population import Population

#: Columns of a dosing table (case-insensitive); TIME and AMT are required.
DOSE_COLUMNS = ("ID", "TIME", "AMT", "II", "ADDL", "RATE", "DUR", "CMT")


class RegimenError(ValueError):
    """A regimen that makes no sense (one line naming the option, or file, row and column)."""


@dataclass(frozen=True)
class Regimen:
    """One dose record (units of the model's data: amount, time)."""

    amt: float
    ii: float = 0.0
    addl: int = 0
    rate: float = 0.0
    duration: float = 0.0
    cmt: int = 0
    time: float = 0.0

    def check(self, where: str = "regimen") -> Regimen:
        """Raise :class:`RegimenError` unless the record makes sense; returns itself."""
        values = {"amt": self.amt, "ii": self.ii, "rate": self.rate,
                  "duration": self.duration, "time": self.time}
        for name, value in values.items():
            if not math.isfinite(value):
                raise RegimenError(f"{where}.{name} must be a finite number, got {value}")
        if self.amt <= 0:
            raise RegimenError(f"{where}.amt must be > 0 (the dose amount), got {self.amt:g}")
        if self.time < 0:
            raise RegimenError(f"{where}.time must be >= 0, got {self.time:g}")
        if self.ii < 0:
            raise RegimenError(f"{where}.ii must be >= 0 (the dosing interval), got {self.ii:g}")
        if self.addl < 0:
            raise RegimenError(f"{where}.addl must be >= 0 (additional doses), got {self.addl}")
        if self.addl > 0 and self.ii <= 0:
            raise RegimenError(
                f"{where}.addl={self.addl} repeats the dose but {where}.ii is {self.ii:g}: "
                f"set {where}.ii to the dosing interval (> 0)"
            )
        if self.rate < 0 or self.duration < 0:
            raise RegimenError(
                f"{where}.rate and {where}.duration must be >= 0 (0: bolus), got "
                f"{self.rate:g} and {self.duration:g}"
            )
        if self.rate > 0 and self.duration > 0:
            raise RegimenError(
                f"give {where}.rate or {where}.duration for an infusion, not both "
                f"(duration = amt / rate)"
            )
        if self.cmt < 0:
            raise RegimenError(f"{where}.cmt must be >= 0 (0: the model's default), got {self.cmt}")
        return self

    @property
    def infusion_duration(self) -> float:
        """Duration of each dose (0 for a bolus)."""
        return self.amt / self.rate if self.rate > 0 else self.duration

    @property
    def last_dose_time(self) -> float:
        return self.time + self.addl * self.ii

    def frame(self) -> pd.DataFrame:
        """The record as a one-row dosing table (columns of :data:`DOSE_COLUMNS` but ID)."""
        return pd.DataFrame([{
            "TIME": self.time, "AMT": self.amt, "II": self.ii, "ADDL": self.addl,
            "RATE": self.rate, "DUR": self.duration if self.rate == 0 else 0.0, "CMT": self.cmt,
        }])


def _number(value, name: str, integer: bool = False) -> float | int:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise RegimenError(f"regimen.{name} must be a number, got {value!r}") from None
    if integer:
        if not number.is_integer():
            raise RegimenError(f"regimen.{name} must be a whole number, got {value!r}")
        return int(number)
    return number


def regimen_from_options(options: Mapping) -> Regimen:
    """A checked :class:`Regimen` from ``{amt, ii, addl, rate, duration, cmt, time}`` (None
    or missing entries take the defaults; ``amt`` is required)."""
    if options.get("amt") is None:
        raise RegimenError("regimen.amt is required (the dose amount), e.g. regimen.amt=300")
    fields = {"amt": False, "ii": False, "addl": True, "rate": False, "duration": False,
              "cmt": True, "time": False}
    values = {
        name: _number(options[name], name, integer)
        for name, integer in fields.items()
        if options.get(name) is not None
    }
    return Regimen(**values).check()


def read_dosing_table(path: str | Path) -> pd.DataFrame:
    """A dosing-table CSV: one dose record per row, columns (case-insensitive) ``TIME, AMT``
    and optionally ``ID`` (per-subject regimens), ``II, ADDL, RATE, DUR, CMT``.

    Returns the table with upper-case columns and defaults filled (``ID`` kept only when
    given). Raises :class:`RegimenError` naming file, row (1-based, header = row 1) and column.
    """
    source = str(path)
    try:
        raw = pd.read_csv(path, dtype=str, skipinitialspace=True)
    except FileNotFoundError:
        raise RegimenError(f"{source}: no such dosing table") from None
    except (OSError, pd.errors.ParserError, pd.errors.EmptyDataError) as exc:
        raise RegimenError(f"{source}: cannot read the dosing table ({exc})") from None
    raw.columns = [str(c).strip().upper() for c in raw.columns]
    unknown = [c for c in raw.columns if c not in DOSE_COLUMNS]
    if unknown:
        raise RegimenError(
            f"{source}: unknown column(s) {unknown}; a dosing table has {list(DOSE_COLUMNS)}"
        )
    for column in ("TIME", "AMT"):
        if column not in raw.columns:
            raise RegimenError(f"{source}: column {column} is required in a dosing table")
    if raw.empty:
        raise RegimenError(f"{source}: the dosing table has no rows")
    table = pd.DataFrame(index=raw.index)
    if "ID" in raw.columns:
        table["ID"] = raw["ID"].str.strip()
    defaults = {"II": 0.0, "ADDL": 0, "RATE": 0.0, "DUR": 0.0, "CMT": 0}
    for column in ("TIME", "AMT", "II", "ADDL", "RATE", "DUR", "CMT"):
        if column not in raw.columns:
            table[column] = defaults[column]
            continue
        values = pd.to_numeric(raw[column], errors="coerce")
        bad = values.isna()
        if bad.any():
            row = int(np.flatnonzero(bad.to_numpy())[0])
            text = raw[column].iloc[row]
            raise RegimenError(f"{source}: row {row + 2}, column {column}: not a number ({text!r})")
        table[column] = values
    for row, record in enumerate(table.itertuples(index=False)):
        regimen = Regimen(
            amt=float(record.AMT), ii=float(record.II), addl=_whole(record.ADDL, source, row),
            rate=float(record.RATE), duration=float(record.DUR),
            cmt=_whole(record.CMT, source, row), time=float(record.TIME),
        )
        try:
            regimen.check("")
        except RegimenError as exc:
            message = str(exc).replace(".", "", 1).lstrip()
            raise RegimenError(f"{source}: row {row + 2}: {message}") from None
    return table


def _whole(value: float, source: str, row: int) -> int:
    if not float(value).is_integer():
        raise RegimenError(f"{source}: row {row + 2}: ADDL and CMT must be whole numbers")
    return int(value)


def prediction_times(doses: pd.DataFrame, n_times: int = 97, t_end: float | None = None):
    """A prediction grid ``(n_times,)`` from 0 to ``t_end`` (default: the last dose time plus
    one interval, at least 24 time units), with every dose time added (doses act on an
    observation at their own time, so troughs are on the grid)."""
    if n_times < 2:
        raise RegimenError(f"regimen.n_times must be >= 2, got {n_times}")
    last = doses["TIME"] + doses["ADDL"] * doses["II"]
    if t_end is None:
        tail = max(float(doses["II"].max()), 24.0)
        t_end = float(last.max()) + tail
    if t_end <= 0:
        raise RegimenError(f"regimen.t_end must be > 0, got {t_end:g}")
    starts = [t + k * ii for t, ii, n in zip(doses["TIME"], doses["II"], doses["ADDL"],
                                             strict=True) for k in range(int(n) + 1)]
    grid = np.union1d(np.linspace(0.0, t_end, n_times), [s for s in starts if s <= t_end])
    return grid


def regimen_population(
    ids: Sequence[str],
    covariates: np.ndarray,
    covariate_names: Sequence[str],
    doses: pd.DataFrame,
    times: np.ndarray,
    obs_cmt: int = 0,
    dtype: torch.dtype | None = None,
) -> Population:
    """Subjects ``ids`` (covariates ``(N, C)``) on the dosing table ``doses`` (rows for every
    subject, or per subject when it has an ``ID`` column), observed at ``times`` in
    ``obs_cmt`` (0: the model's default); DV is 0 (nothing observed: a design to predict)."""
    ids = [str(i) for i in ids]
    covariates = np.asarray(covariates, dtype=np.float64).reshape(len(ids), len(covariate_names))
    rows = []
    for i, subject in enumerate(ids):
        mine = doses[doses["ID"] == subject] if "ID" in doses.columns else doses
        if mine.empty:
            raise RegimenError(f"the dosing table has no dose for subject {subject}")
        dose_rows = mine.drop(columns=[c for c in ("ID",) if c in mine.columns]).assign(
            ID=subject, EVID=1, MDV=1, DV=0.0, _order=0
        )
        obs_rows = pd.DataFrame({"ID": subject, "TIME": times, "AMT": 0.0, "EVID": 0, "MDV": 0,
                                 "DV": 0.0, "CMT": obs_cmt, "_order": 1})
        both = pd.concat([dose_rows, obs_rows], ignore_index=True)
        for j, name in enumerate(covariate_names):
            both[name] = covariates[i, j]
        rows.append(both.sort_values(["TIME", "_order"], kind="stable"))
    frame = pd.concat(rows, ignore_index=True).drop(columns="_order")
    return population_from_frame(frame, covariate_names, "regimen", dtype)
