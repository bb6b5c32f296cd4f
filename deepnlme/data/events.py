"""Reading and validating NONMEM-style event tables (CSV).

Columns (names case-insensitive): ``ID, TIME, DV`` (required), ``AMT, EVID, MDV, CMT, RATE,
DUR, II, ADDL, SS`` (optional, NONMEM defaults), plus covariate columns. Cells holding ``.``,
nothing, ``NA`` or ``NaN`` (case-insensitive) are missing.

Rules, beyond NONMEM's own:

* ``AMT`` is required when the table has any dosing column (``EVID, RATE, DUR, II, ADDL,
  SS``); a table with none of them and no ``AMT`` holds observations only.
* Defaults for missing cells/columns: ``AMT`` 0; ``EVID`` 1 if ``AMT > 0`` else 0; ``MDV`` 0 on
  ``EVID`` 0 rows and 1 otherwise; ``CMT, RATE, DUR, II, ADDL, SS`` 0.
* Every row is exactly one of: observation (``EVID 0, MDV 0``), dose (``EVID 1`` or ``4``),
  reset (``EVID 3``), other (``EVID 2``, or ``EVID 0`` with ``MDV 1``). Nothing is dropped.
* ``MDV`` is ignored on rows with ``EVID != 0`` (they are never observations). ``RATE, DUR,
  II`` are ignored on non-dose rows; ``AMT > 0``, ``ADDL > 0`` or ``SS > 0`` there is an error.
* ``TIME`` must not decrease within a subject, even across resets (stricter than NONMEM), and
  the rows of a subject must be contiguous.
* Covariates may vary in time: missing cells take the last value of the subject (the first
  value for leading missing cells); a subject with no value at all is an error.
* IDs are compared as written (``1`` and ``01`` are different subjects); subjects keep the
  order of their first row.
* Empty trailing header names (a separator after the last column) are ignored; an empty name
  between columns is an error.
* Entirely empty lines are skipped but still counted in the row numbering, so ``row r`` is
  always the r-th record under the header. Trailing empty fields beyond the header are allowed.
* Separators: comma; else semicolon or tab when the header line has one and no comma; else
  runs of blanks (NONMEM's own layout). A decimal comma is not a number (an error, not a guess).
* Comments, as NONMEM reads them: a record whose first field starts with ``#`` (NONMEM's
  default ``IGNORE=#``), and, when the table has a column ``C`` (NONMEM's ``$INPUT C ...``
  with ``IGNORE=C``), a record whose ``C`` field holds anything but ``.`` or nothing. Comment
  records are skipped (still counted in the row numbering; ``EventTable.n_comments``).
* Numbers must be finite and at most :data:`MAX_MAGNITUDE` in absolute value (so that sums and
  squares stay finite in float32 and float64); larger values are an error, not a silent NaN.

Every problem raises :class:`DataValidationError` with the message
``"{file}: row {row}, column {COLUMN}: {problem}"``: ``row`` is 1-based (row 0 is the header,
used for problems with the columns themselves) and ``COLUMN`` is spelled as in the header, or
upper-case when the column is absent. Only the first problem found is reported.
"""

from __future__ import annotations

import codecs
import csv
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from deepnlme.data.errors import DataValidationError

REQUIRED_COLUMNS = ("ID", "TIME", "DV")
DOSING_COLUMNS = ("EVID", "RATE", "DUR", "II", "ADDL", "SS")
NUMERIC_COLUMNS = ("TIME", "DV", "AMT", "EVID", "MDV", "CMT", "RATE", "DUR", "II", "ADDL", "SS")
INTEGER_COLUMNS = ("EVID", "MDV", "CMT", "ADDL", "SS")
EVENT_COLUMNS = ("ID",) + NUMERIC_COLUMNS
MISSING_TOKENS = frozenset({"", ".", "na", "nan"})
#: Largest absolute value accepted in a numeric column (1e15: squares stay finite in float32).
MAX_MAGNITUDE = 1e15
#: Name of NONMEM's comment column (``$INPUT C ID TIME ...`` with ``IGNORE=C``).
COMMENT_COLUMN = "C"
DOSE_EVIDS = (1, 4)


@dataclass(frozen=True)
class EventTable:
    """A validated event table.

    ``frame`` has one row per data row, indexed by the 0-based data-row number of the file
    (the record under the header is 0). Columns: ``ID`` (str), ``TIME, DV, AMT, RATE, DUR, II``
    (float64; ``DV`` is NaN where missing), ``EVID, MDV, CMT, ADDL, SS`` (int64), the requested
    covariates (float64, filled within subjects), then any other columns as raw strings. All
    names are upper-case. Times and amounts are in the file's units.
    """

    frame: pd.DataFrame
    covariates: tuple[str, ...]  # upper-case covariate column names, in requested order
    source: str  # the path as given
    columns: dict[str, str] = field(default_factory=dict)  # upper-case name -> name as written
    n_rows: int = 0  # data rows (all of them)
    n_obs: int = 0  # EVID 0 and MDV 0
    n_doses: int = 0  # EVID 1 or 4 (before ADDL expansion)
    n_resets: int = 0  # EVID 3
    n_other: int = 0  # EVID 2, or EVID 0 with MDV 1
    n_comments: int = 0  # comment records skipped (not in n_rows)

    def counts(self) -> dict[str, int]:
        """Row counts by kind; they add up to ``n_rows``."""
        return {
            "n_rows": self.n_rows,
            "n_obs": self.n_obs,
            "n_doses": self.n_doses,
            "n_resets": self.n_resets,
            "n_other": self.n_other,
        }


def _num(value: float) -> str:
    """Numbers in messages: integers without a decimal point, others at full precision."""
    return format(float(value), ".15g")


class _Reporter:
    """Builds the one error message naming the file, the row and the column."""

    def __init__(self, source: str, columns: dict[str, str] | None = None) -> None:
        self.source = source
        self.columns = columns or {}

    def error(self, row: int, column: str, problem: str) -> DataValidationError:
        name = self.columns.get(column, column)
        return DataValidationError(f"{self.source}: row {row}, column {name}: {problem}")

    def first(
        self, bad: pd.Series, column: str, problem: Callable[[int], str]
    ) -> None:
        """Raise for the first True of ``bad`` (indexed by 0-based data row)."""
        if bool(bad.any()):
            row0 = int(bad.index[bad.to_numpy()][0])
            raise self.error(row0 + 1, column, problem(row0))


# ------------------------------------------------------------------------- reading the file
def _separator(header_line: str) -> str | None:
    """The field separator of a table from its header line; None for runs of blanks."""
    for sep in (",", ";", "\t"):
        if sep in header_line:
            return sep
    return None if header_line.strip() and len(header_line.split()) > 1 else ","


def _split_records(text: str) -> list[list[str]]:
    """Records of the file's text (separator chosen from the header line)."""
    lines = text.splitlines()
    first = next((line for line in lines if line.strip()), "")
    sep = _separator(first)
    if sep is None:
        return [line.split() for line in lines]
    return list(csv.reader(lines, delimiter=sep))


def _decode(data: bytes, source: str) -> str:
    """Text of a table: UTF-16 with a byte-order mark, else UTF-8 (a BOM is dropped).

    Bytes that are not UTF-8 are an error naming the row and column they sit in."""
    if data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        return data.decode("utf-16")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        before = data[: exc.start].decode("utf-8-sig", errors="replace")
        lines = before.splitlines(keepends=True)
        row = before.count("\n")
        line = "" if before.endswith("\n") or not lines else lines[-1]
        header = data.split(b"\n", 1)[0].decode("utf-8-sig", errors="replace")
        sep = _separator(header)
        column = len(line.split(sep) if sep else line.split() or [""])
        names = _split_records(header)[0] if header.strip() else []
        name = names[column - 1].strip() if 0 < column <= len(names) else str(column)
        raise DataValidationError(
            f"{source}: row {row}, column {name}: byte 0x{data[exc.start]:02x} is not UTF-8 "
            "text; save the file as UTF-8"
        ) from None


def _read_records(
    path: str | Path, source: str
) -> tuple[list[str], list[int], list[list[str]], int]:
    """Header and data records of the table; returns (header, 0-based row numbers, records,
    number of comment records skipped)."""
    try:
        records = _split_records(_decode(Path(path).read_bytes(), source))
    except FileNotFoundError:
        raise DataValidationError(f"{source}: file not found") from None
    except (OSError, csv.Error) as exc:
        raise DataValidationError(f"{source}: cannot read the file: {exc}") from None
    if not records or not any(h.strip() for h in records[0]):
        raise DataValidationError(f"{source}: row 0, column ID: the file has no header line")
    header = [h.strip() for h in records[0]]
    while not header[-1]:
        header.pop()  # trailing separators after the last column name
    width = len(header)
    upper = [h.upper() for h in header]
    comment_col = upper.index(COMMENT_COLUMN) if COMMENT_COLUMN in upper else None
    index: list[int] = []
    rows: list[list[str]] = []
    n_comments = 0
    for row0, rec in enumerate(records[1:]):
        if not rec or not any(f.strip() for f in rec):
            continue  # an empty line
        if rec[0].lstrip().startswith("#") or (
            comment_col is not None
            and comment_col < len(rec)
            and rec[comment_col].strip().lower() not in ("", ".")
        ):
            n_comments += 1
            continue
        if len(rec) > width and any(f.strip() for f in rec[width:]):
            raise DataValidationError(
                f"{source}: row {row0 + 1}, column {width + 1}: the row has {len(rec)} fields "
                f"but the header has {width} columns"
            )
        if len(rec) < width:
            raise DataValidationError(
                f"{source}: row {row0 + 1}, column {header[len(rec)]}: the row has {len(rec)} "
                f"fields but the header has {width} columns"
            )
        for pos, value in enumerate(rec[:width]):
            if "\x00" in value:
                raise DataValidationError(
                    f"{source}: row {row0 + 1}, column {header[pos]}: the field holds a NUL "
                    "byte (a binary file, or text not in UTF-8?)"
                )
        index.append(row0)
        rows.append(rec[:width])
    return header, index, rows, n_comments


def _canonical_columns(header: list[str], report: _Reporter) -> list[str]:
    """Upper-case column names; duplicates (case-insensitive) are an error."""
    seen: dict[str, int] = {}
    canonical = []
    for pos, name in enumerate(header):
        if not name:
            raise DataValidationError(
                f"{report.source}: row 0, column {pos + 1}: the column has no name"
            )
        upper = name.upper()
        if upper in seen:
            first = seen[upper]
            raise DataValidationError(
                f"{report.source}: row 0, column {name}: duplicate column name (column "
                f"{first + 1} is {header[first]!r}; names are case-insensitive)"
            )
        seen[upper] = pos
        canonical.append(upper)
    return canonical


def _check_columns(canonical: list[str], header: list[str], report: _Reporter) -> None:
    """Required columns: ID, TIME, DV always; AMT when any dosing column is present."""
    listing = ", ".join(header)
    for col in REQUIRED_COLUMNS:
        if col not in canonical:
            raise report.error(0, col, f"required column {col} is missing; columns: {listing}")
    dosing = [c for c in DOSING_COLUMNS if c in canonical]
    if dosing and "AMT" not in canonical:
        raise report.error(
            0, "AMT", f"column AMT is required when column {report.columns[dosing[0]]} is "
            f"present; columns: {listing}"
        )


def _check_covariates(
    covariates: Sequence[str], canonical: list[str], header: list[str], report: _Reporter
) -> list[str]:
    """Upper-case names of the requested covariate columns (duplicates removed)."""
    if isinstance(covariates, str):
        covariates = (covariates,)
    names: list[str] = []
    for cov in covariates:
        upper = str(cov).strip().upper()
        if upper not in canonical:
            raise report.error(
                0, upper, f"requested covariate column {cov!r} is not in the table; "
                f"available columns: {', '.join(header)}"
            )
        if upper in EVENT_COLUMNS:
            raise report.error(
                0, upper, f"{report.columns[upper]} is an event column and cannot be a covariate"
            )
        if upper == COMMENT_COLUMN:
            raise report.error(
                0, upper, f"column {report.columns[upper]} marks comment records (NONMEM's "
                "IGNORE=C) and cannot be a covariate; rename it"
            )
        if upper not in names:
            names.append(upper)
    return names


# ----------------------------------------------------------------------- parsing the values
def _is_missing(raw: pd.Series) -> pd.Series:
    return raw.str.lower().isin(MISSING_TOKENS)


def _parse_numeric(raw: pd.Series, column: str, report: _Reporter) -> pd.Series:
    """Float64 values of a column (NaN where missing); anything else non-numeric is an error."""
    missing = _is_missing(raw)
    values = pd.to_numeric(raw.where(~missing), errors="coerce").astype("float64")
    bad = ~missing & ~np.isfinite(values)
    report.first(bad, column, lambda r: f"expected a number, got {raw[r]!r}")
    report.first(
        values.abs() > MAX_MAGNITUDE, column,
        lambda r: f"{raw[r]} is out of range: numbers must be at most {MAX_MAGNITUDE:.0e} in "
        "absolute value; rescale the column's units",
    )
    return values


def _parse_ids(raw: pd.Series, report: _Reporter) -> pd.Series:
    """Subject IDs as written; missing IDs and split blocks of one ID are errors."""
    report.first(_is_missing(raw), "ID", lambda r: "ID is missing")
    ids = raw.astype(str)
    starts = ids.ne(ids.shift())
    block_ids = ids[starts]
    again = block_ids.duplicated()
    if bool(again.any()):
        row0 = int(block_ids.index[again.to_numpy()][0])
        sid = ids[row0]
        first_end = int(ids.index[(ids.index < row0) & (ids == sid).to_numpy()][-1])
        raise report.error(
            row0 + 1, "ID", f"ID {sid!r} appears again after other IDs (its first block ends "
            f"at row {first_end + 1}); the rows of a subject must be contiguous"
        )
    return ids


def _check_domain(
    values: pd.Series,
    column: str,
    ok: Callable[[pd.Series], pd.Series],
    expected: str,
    report: _Reporter,
) -> None:
    """Non-missing values outside ``ok`` are an error: ``{column} must be {expected}``."""
    bad = values.notna() & ~ok(values)
    report.first(bad, column, lambda r: f"{column} must be {expected}; got {_num(values[r])}")


def _is_int(v: pd.Series) -> pd.Series:
    return v == np.round(v)


def _check_domains(num: dict[str, pd.Series], report: _Reporter) -> None:
    """Value ranges of the event columns that are present."""
    rules: dict[str, tuple[Callable[[pd.Series], pd.Series], str]] = {
        "EVID": (lambda v: v.isin([0, 1, 2, 3, 4]), "one of 0, 1, 2, 3, 4"),
        "MDV": (lambda v: v.isin([0, 1]), "0 or 1"),
        "CMT": (lambda v: _is_int(v) & (v >= 0), "a non-negative integer (0 = model default)"),
        "SS": (lambda v: v.isin([0, 1, 2]), "0, 1 or 2"),
        "ADDL": (lambda v: _is_int(v) & (v >= 0), "a non-negative integer"),
        "AMT": (lambda v: v >= 0, ">= 0"),
        "RATE": (
            lambda v: (v >= 0) | v.isin([-1, -2]),
            ">= 0, -1 (rate modelled) or -2 (duration modelled)",
        ),
        "DUR": (lambda v: v >= 0, ">= 0"),
        "II": (lambda v: v >= 0, ">= 0"),
    }
    for column, (ok, expected) in rules.items():
        if column in num:
            _check_domain(num[column], column, ok, expected, report)


# ------------------------------------------------------------------- defaults and semantics
def _with_defaults(num: dict[str, pd.Series], index: pd.Index) -> pd.DataFrame:
    """Event columns with NONMEM defaults filled in (see the module docstring)."""
    absent = pd.Series(np.nan, index=index, dtype="float64")
    get = {c: num.get(c, absent) for c in NUMERIC_COLUMNS}
    amt = get["AMT"].fillna(0.0)
    evid = get["EVID"].fillna((amt > 0).astype("float64"))
    mdv = get["MDV"].fillna((evid != 0).astype("float64"))
    out = pd.DataFrame(
        {
            "TIME": get["TIME"],
            "DV": num["DV"],
            "AMT": amt,
            "EVID": evid.astype("int64"),
            "MDV": mdv.astype("int64"),
        },
        index=index,
    )
    for col in ("CMT", "ADDL", "SS"):
        out[col] = get[col].fillna(0.0).astype("int64")
    for col in ("RATE", "DUR", "II"):
        out[col] = get[col].fillna(0.0)
    return out[list(NUMERIC_COLUMNS)]


def _check_doses(ev: pd.DataFrame, amt_missing: pd.Series, report: _Reporter) -> None:
    """Dose rows need AMT > 0, consistent RATE/DUR and II > 0 for ADDL and SS."""
    evid = ev["EVID"]
    dose = evid.isin(DOSE_EVIDS)
    report.first(
        dose & amt_missing, "AMT",
        lambda r: f"AMT is missing on a dose row (EVID {evid[r]}); doses need AMT > 0",
    )
    report.first(
        dose & (ev["AMT"] == 0), "AMT",
        lambda r: f"AMT is 0 on a dose row (EVID {evid[r]}); doses need AMT > 0",
    )
    for col in ("AMT", "ADDL", "SS"):
        report.first(
            ~dose & (ev[col] > 0), col,
            lambda r, c=col: f"{c} {_num(ev[c][r])} on a non-dose row (EVID {evid[r]}); "
            f"use EVID 1 for a dose",
        )
    report.first(
        dose & (ev["RATE"] != 0) & (ev["DUR"] > 0), "DUR",
        lambda r: f"DUR {_num(ev['DUR'][r])} conflicts with RATE {_num(ev['RATE'][r])}; "
        "give either RATE or DUR",
    )
    report.first(
        dose & (ev["ADDL"] > 0) & (ev["II"] <= 0), "II",
        lambda r: f"ADDL {ev['ADDL'][r]} needs II > 0; got II {_num(ev['II'][r])}",
    )
    report.first(
        dose & (ev["SS"] > 0) & (ev["II"] <= 0), "II",
        lambda r: f"SS {ev['SS'][r]} (steady state) needs II > 0; got II {_num(ev['II'][r])}",
    )


def _check_observations(ev: pd.DataFrame, report: _Reporter) -> None:
    """Observation rows (EVID 0, MDV 0) need a DV."""
    obs = (ev["EVID"] == 0) & (ev["MDV"] == 0)
    report.first(
        obs & ev["DV"].isna(), "DV",
        lambda r: "DV is missing on an observation row (EVID 0, MDV 0); "
        "set MDV to 1 to keep the row without an observation",
    )


def _check_time_order(ids: pd.Series, time: pd.Series, report: _Reporter) -> None:
    """TIME must not decrease within a subject."""
    report.first(time.isna(), "TIME", lambda r: "TIME is missing")
    prev = time.shift()
    back = ids.eq(ids.shift()) & (time < prev)
    report.first(
        back, "TIME",
        lambda r: f"TIME {_num(time[r])} is before the previous row's TIME {_num(prev[r])} "
        f"within ID {ids[r]!r}; sort the rows of each subject by time",
    )


def _fill_covariates(
    ids: pd.Series, num: dict[str, pd.Series], covariates: list[str], report: _Reporter
) -> pd.DataFrame:
    """Covariates carried forward (then backward) within subjects; all-missing is an error."""
    frame = pd.DataFrame({c: num[c] for c in covariates}, index=ids.index)
    if not covariates:
        return frame
    groups = frame.groupby(ids.to_numpy(), sort=False)
    filled = groups.ffill().groupby(ids.to_numpy(), sort=False).bfill()
    first_row = ~ids.eq(ids.shift())
    for c in covariates:
        report.first(
            first_row & filled[c].isna(), c,
            lambda r, c=c: f"covariate {report.columns[c]} is missing on every row of "
            f"ID {ids[r]!r}",
        )
    return filled


# ------------------------------------------------------------------------------ entry point
def read_event_table(path: str | Path, covariates: Sequence[str] = ()) -> EventTable:
    """Read and validate a NONMEM-style CSV event table.

    Args:
        path: CSV file; messages name it as given.
        covariates: covariate columns to carry (case-insensitive); stored upper-case.

    Raises:
        DataValidationError: the first problem found, naming file, row and column.
    """
    source = str(path)
    header, index, rows, n_comments = _read_records(path, source)
    report = _Reporter(source)
    canonical = _canonical_columns(header, report)
    report.columns = dict(zip(canonical, header, strict=True))
    _check_columns(canonical, header, report)
    covs = _check_covariates(covariates, canonical, header, report)
    if not rows:
        skipped = f" ({n_comments} comment records skipped)" if n_comments else ""
        raise report.error(1, "ID", f"the table has no data rows{skipped}")

    raw = pd.DataFrame(rows, columns=canonical, index=pd.Index(index, dtype="int64"))
    raw = raw.apply(lambda s: s.str.strip())
    ids = _parse_ids(raw["ID"], report)
    num = {
        c: _parse_numeric(raw[c], c, report)
        for c in [*NUMERIC_COLUMNS, *covs]
        if c in canonical
    }
    _check_domains(num, report)
    ev = _with_defaults(num, raw.index)
    amt_missing = num["AMT"].isna() if "AMT" in num else pd.Series(True, index=raw.index)
    _check_doses(ev, amt_missing, report)
    _check_observations(ev, report)
    _check_time_order(ids, ev["TIME"], report)
    cov_frame = _fill_covariates(ids, num, covs, report)

    others = [c for c in canonical if c not in EVENT_COLUMNS and c not in covs]
    frame = pd.concat([ids.rename("ID"), ev, cov_frame, raw[others]], axis=1)
    obs = (ev["EVID"] == 0) & (ev["MDV"] == 0)
    dose = ev["EVID"].isin(DOSE_EVIDS)
    reset = ev["EVID"] == 3
    return EventTable(
        frame=frame,
        covariates=tuple(covs),
        source=source,
        columns=report.columns,
        n_rows=len(frame),
        n_obs=int(obs.sum()),
        n_doses=int(dose.sum()),
        n_resets=int(reset.sum()),
        n_other=int((~obs & ~dose & ~reset).sum()),
        n_comments=n_comments,
    )
