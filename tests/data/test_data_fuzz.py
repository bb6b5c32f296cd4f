"""Fuzz: malformed or unusual versions of one clean table (three Theophylline subjects).

Each table is either refused with one line naming the file, the row and the column, or
accepted with the clean table's log-likelihood (Laplace, at fixed parameters): never a different
likelihood in silence.
"""

from __future__ import annotations

import codecs
import re
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from deepnlme.data import DataValidationError, dataset_path, load_population
from deepnlme.inference import Laplace
from deepnlme.inference.feasibility import ObjectiveError
from deepnlme.inference.optimize import check_start
from deepnlme.model.zoo.pk import OneCmtOralModel

Table = tuple[list[str], list[list[str]]]


def clean() -> Table:
    """Header and the rows of subjects 1-3 (36 rows: a dose and 11 observations each)."""
    lines = dataset_path("theophylline").read_text().splitlines()
    header = lines[0].split(",")
    rows = [line.split(",") for line in lines[1:] if line.split(",")[0] in ("1", "2", "3")]
    return header, rows


def text(table: Table, sep: str = ",", eol: str = "\n") -> str:
    header, rows = table
    return eol.join(sep.join(r) for r in [header, *rows]) + eol


def col(table: Table, name: str) -> int:
    return [h.upper() for h in table[0]].index(name)


def setting(row: int, name: str, value: str) -> Callable[[Table], str]:
    """The table with data row ``row`` (1-based), column ``name`` set to ``value``."""

    def make(table: Table) -> str:
        table[1][row - 1][col(table, name)] = value
        return text(table)

    return make


def each_obs(name: str, value: str) -> Callable[[Table], str]:
    """The table with ``name`` set to ``value`` on every observation row."""

    def make(table: Table) -> str:
        for r in table[1]:
            if r[col(table, "EVID")] == "0":
                r[col(table, name)] = value
        return text(table)

    return make


def with_column(name: str, values: Callable[[int, list[str]], str], at: int = 0):
    """The table with a column ``name`` inserted at position ``at``."""

    def make(table: Table) -> str:
        header, rows = table
        header.insert(at, name)
        for i, r in enumerate(rows):
            r.insert(at, values(i, r))
        return text(table)

    return make


def inserted(at: int, line: str) -> Callable[[Table], str]:
    """The text with ``line`` inserted before data row ``at`` (1-based)."""

    def make(table: Table) -> str:
        lines = text(table).splitlines()
        lines.insert(at, line)
        return "\n".join(lines) + "\n"

    return make


def renamed_ids(table: Table) -> str:
    for r in table[1]:
        r[0] = f"subject {r[0]}/A"
    return text(table)


def reordered_subjects(table: Table) -> str:
    header, rows = table
    return text((header, [r for r in rows if r[0] == "3"] + [r for r in rows if r[0] != "3"]))


def no_evid_mdv_and_dots(table: Table) -> str:
    """NONMEM habits: no EVID/MDV columns, ``.`` for AMT and CMT on observation rows."""
    header, rows = table
    keep = [i for i, h in enumerate(header) if h not in ("EVID", "MDV")]
    rows = [[r[i] for i in keep] for r in rows]
    header = [header[i] for i in keep]
    for r in rows:
        if r[header.index("AMT")] == "0":
            r[header.index("AMT")] = r[header.index("CMT")] = "."
    return text((header, rows))


def only_doses(table: Table) -> str:
    header, rows = table
    return text((header, [r for r in rows if r[col(table, "EVID")] == "1"]))


def split_subject(table: Table) -> str:
    header, rows = table
    rows.append(rows.pop(5))  # an observation of subject 1 after subject 3
    return text((header, rows))


def swapped_times(table: Table) -> str:
    rows = table[1]
    t = col(table, "TIME")
    rows[3][t], rows[4][t] = rows[4][t], rows[3][t]
    return text(table)


def quoted(table: Table) -> str:
    """Every field in double quotes, numbers included."""
    header, rows = table
    return "".join(",".join(f'"{v}"' for v in r) + "\n" for r in [header, *rows])


def c_comment_row(table: Table) -> str:
    """NONMEM's ``C`` column: ``.`` on data rows, a commented-out observation in row 4."""
    lines = with_column("C", lambda i, r: ".")(table).splitlines()
    lines.insert(4, "C,1,0.3,0,99,0,0,0,79.6")
    return "\n".join(lines) + "\n"


ACCEPT = None
# (name, table text from the clean table, None (accepted) or (row, column) of the refusal)
CASES: list[tuple[str, Callable[[Table], str | bytes], tuple[int, str] | None]] = [
    ("clean", text, ACCEPT),
    ("bom", lambda t: codecs.BOM_UTF8 + text(t).encode(), ACCEPT),
    ("utf16", lambda t: text(t).encode("utf-16"), ACCEPT),
    ("crlf", lambda t: text(t, eol="\r\n"), ACCEPT),
    ("semicolons", lambda t: text(t, sep=";"), ACCEPT),
    ("tabs", lambda t: text(t, sep="\t"), ACCEPT),
    ("blanks_nonmem_layout", lambda t: text(t, sep="   "), ACCEPT),
    ("quoted_fields", quoted, ACCEPT),
    ("spaces_around_values", lambda t: text(t, sep=" , "), ACCEPT),
    ("trailing_separator", lambda t: text(t, eol=",\n"), ACCEPT),
    ("lower_case_header", lambda t: text(t).replace(text(t).split("\n")[0],
                                                    text(t).split("\n")[0].lower()), ACCEPT),
    ("string_ids", renamed_ids, ACCEPT),
    ("subjects_reordered", reordered_subjects, ACCEPT),
    ("blank_lines", inserted(5, ""), ACCEPT),
    ("hash_comment_line", inserted(3, "# 1,5,0,99,0,0,0,79.6 excluded sample"), ACCEPT),
    ("c_column_all_dots", with_column("C", lambda i, r: "."), ACCEPT),
    ("c_column_comment_row", c_comment_row, ACCEPT),
    ("cmt_dot_on_observations", each_obs("CMT", "."), ACCEPT),
    ("nonmem_defaults_and_dots", no_evid_mdv_and_dots, ACCEPT),
    ("scientific_notation", each_obs("AMT", "0e0"), ACCEPT),
    ("extra_text_column", with_column("NOTE", lambda i, r: f"note {i}", at=8), ACCEPT),
    ("duplicate_column_other_case", with_column("dv", lambda i, r: r[3], at=8), (0, "dv")),
    ("nul_byte", setting(3, "DV", "2\x0084"), (3, "DV")),
    ("not_utf8", lambda t: text(t).replace("6.57", "6.57\udcff").encode(
        "utf-8", "surrogateescape"), (4, "DV")),
    ("dv_1e308", setting(2, "DV", "1e308"), (2, "DV")),
    ("time_1e308", setting(12, "TIME", "1e308"), (12, "TIME")),
    ("amt_overflow", setting(1, "AMT", "1e400"), (1, "AMT")),
    ("dv_inf", setting(5, "DV", "inf"), (5, "DV")),
    ("dv_minus_infinity", setting(5, "DV", "-Infinity"), (5, "DV")),
    ("dv_nan_on_observation", setting(6, "DV", "NaN"), (6, "DV")),
    ("dv_empty_on_observation", setting(6, "DV", ""), (6, "DV")),
    ("wt_huge", setting(7, "WT", "-1e300"), (7, "WT")),
    ("decimal_comma", lambda t: text(t, sep=";").replace("6.57", "6,57"), (4, "DV")),
    ("too_many_fields", setting(8, "WT", "79.6,1"), (8, "9")),
    ("too_few_fields", lambda t: text(t).replace("1,0.57,0,6.57,0,0,0,79.6",
                                                 "1,0.57,0,6.57"), (4, "EVID")),
    ("split_subject", split_subject, (36, "ID")),
    ("time_backwards", swapped_times, (5, "TIME")),
    ("negative_amt", setting(13, "AMT", "-4.4"), (13, "AMT")),
    ("unknown_evid", setting(9, "EVID", "7"), (9, "EVID")),
    ("only_doses", only_doses, (0, "DV")),
]


def load(path: Path):
    return load_population(path, ["WT"], dtype=torch.float64)


@pytest.fixture(scope="module")
def estimator():
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        return Laplace(OneCmtOralModel(error="additive"))
    finally:
        torch.set_default_dtype(old)


@pytest.fixture(scope="module")
def clean_loglik(estimator, tmp_path_factory) -> float:
    path = tmp_path_factory.mktemp("clean") / "clean.csv"
    path.write_text(text(clean()))
    return estimator.loglik(load(path), warm_start=False)


def test_at_least_thirty_cases():
    assert len(CASES) >= 30 and len({name for name, _, _ in CASES}) == len(CASES)


@pytest.mark.parametrize(("name", "make", "expected"), CASES, ids=[c[0] for c in CASES])
def test_refused_with_row_and_column_or_same_likelihood(
    name, make, expected, estimator, clean_loglik, tmp_path: Path
):
    content = make(clean())
    path = tmp_path / f"{name}.csv"
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content, newline="")
    try:
        pop = load(path)
        check_start(estimator, pop)
    except (DataValidationError, ObjectiveError) as exc:
        message = str(exc)
        assert expected is not None, f"refused: {message}"
        row, column = expected
        assert "\n" not in message
        assert re.match(rf"{re.escape(str(path))}: row {row}, column {column}: \S", message), (
            message
        )
        return
    assert expected is None, f"accepted; expected a refusal at row {expected[0]}"
    assert pop.n_obs == 33 and len(pop) == 3
    loglik = estimator.loglik(pop, warm_start=False)
    assert loglik == pytest.approx(clean_loglik, rel=1e-12, abs=1e-9)
