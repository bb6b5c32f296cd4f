"""Malformed event tables: each kind is rejected with one exact message."""

from __future__ import annotations

from pathlib import Path

import pytest

from deepnlme.data import (
    DataValidationError,
    check_compartments,
    load_population,
    read_event_table,
)

HEAD = "ID,TIME,DV,AMT,EVID,MDV,CMT"

# (name, csv text, covariates, expected message after "{file}: ")
CASES = [
    (
        "missing_required_column",
        "ID,TIME\n1,0\n",
        (),
        "row 0, column DV: required column DV is missing; columns: ID, TIME",
    ),
    (
        "missing_amt_with_dosing_column",
        "ID,TIME,DV,Evid\n1,0,.,1\n",
        (),
        "row 0, column AMT: column AMT is required when column Evid is present; "
        "columns: ID, TIME, DV, Evid",
    ),
    (
        "duplicate_column",
        "ID,TIME,DV,Wt,WT\n1,0,1,70,70\n",
        (),
        "row 0, column WT: duplicate column name (column 4 is 'Wt'; names are "
        "case-insensitive)",
    ),
    (
        "covariate_column_absent",
        "ID,TIME,DV,WT\n1,0,1,70\n",
        ("AGE",),
        "row 0, column AGE: requested covariate column 'AGE' is not in the table; "
        "available columns: ID, TIME, DV, WT",
    ),
    (
        "covariate_is_event_column",
        "ID,TIME,DV,WT\n1,0,1,70\n",
        ("time",),
        "row 0, column TIME: TIME is an event column and cannot be a covariate",
    ),
    (
        "unnamed_column",
        "ID,,TIME,DV\n1,0,0,1\n",
        (),
        "row 0, column 2: the column has no name",
    ),
    (
        "empty_table",
        "ID,TIME,DV\n",
        (),
        "row 1, column ID: the table has no data rows",
    ),
    (
        "field_count_short",
        "ID,TIME,DV\n1,0,1\n1,1\n",
        (),
        "row 2, column DV: the row has 2 fields but the header has 3 columns",
    ),
    (
        "field_count_long",
        "ID,TIME,DV\n1,0,1,5\n",
        (),
        "row 1, column 4: the row has 4 fields but the header has 3 columns",
    ),
    (
        "missing_id",
        "ID,TIME,DV\n1,0,1\n.,1,2\n",
        (),
        "row 2, column ID: ID is missing",
    ),
    (
        "non_numeric",
        "id,time,dv\n1,0,1\n1,abc,2\n",
        (),
        "row 2, column time: expected a number, got 'abc'",
    ),
    (
        "non_finite",
        "ID,TIME,DV\n1,0,inf\n",
        (),
        "row 1, column DV: expected a number, got 'inf'",
    ),
    (
        "non_numeric_covariate",
        "ID,TIME,DV,WT\n1,0,1,heavy\n",
        ("wt",),
        "row 1, column WT: expected a number, got 'heavy'",
    ),
    (
        "missing_time",
        "ID,TIME,DV\n1,0,1\n1,.,2\n",
        (),
        "row 2, column TIME: TIME is missing",
    ),
    (
        "time_backwards",
        "ID,TIME,DV\n1,0,1\n1,2,2\n1,1.5,3\n",
        (),
        "row 3, column TIME: TIME 1.5 is before the previous row's TIME 2 within ID '1'; "
        "sort the rows of each subject by time",
    ),
    (
        "negative_amt",
        f"{HEAD}\n1,0,.,-5,1,1,1\n",
        (),
        "row 1, column AMT: AMT must be >= 0; got -5",
    ),
    (
        "dose_amt_zero",
        f"{HEAD}\n1,0,.,0,1,1,1\n",
        (),
        "row 1, column AMT: AMT is 0 on a dose row (EVID 1); doses need AMT > 0",
    ),
    (
        "dose_amt_missing",
        f"{HEAD}\n1,0,.,.,4,1,1\n",
        (),
        "row 1, column AMT: AMT is missing on a dose row (EVID 4); doses need AMT > 0",
    ),
    (
        "amt_on_observation_row",
        f"{HEAD}\n1,0,3,100,0,0,1\n",
        (),
        "row 1, column AMT: AMT 100 on a non-dose row (EVID 0); use EVID 1 for a dose",
    ),
    (
        "dv_missing_on_observation",
        f"{HEAD}\n1,0,.,100,1,1,1\n1,1,,0,0,0,0\n",
        (),
        "row 2, column DV: DV is missing on an observation row (EVID 0, MDV 0); "
        "set MDV to 1 to keep the row without an observation",
    ),
    (
        "dv_nan_on_observation",
        "ID,TIME,DV\n1,0,NaN\n",
        (),
        "row 1, column DV: DV is missing on an observation row (EVID 0, MDV 0); "
        "set MDV to 1 to keep the row without an observation",
    ),
    (
        "evid_out_of_range",
        f"{HEAD}\n1,0,1,0,5,0,0\n",
        (),
        "row 1, column EVID: EVID must be one of 0, 1, 2, 3, 4; got 5",
    ),
    (
        "mdv_not_binary",
        f"{HEAD}\n1,0,1,0,0,2,0\n",
        (),
        "row 1, column MDV: MDV must be 0 or 1; got 2",
    ),
    (
        "cmt_negative",
        f"{HEAD}\n1,0,.,10,1,1,-1\n",
        (),
        "row 1, column CMT: CMT must be a non-negative integer (0 = model default); got -1",
    ),
    (
        "cmt_not_integer",
        f"{HEAD}\n1,0,.,10,1,1,1.5\n",
        (),
        "row 1, column CMT: CMT must be a non-negative integer (0 = model default); got 1.5",
    ),
    (
        "rate_invalid",
        "ID,TIME,DV,AMT,RATE\n1,0,.,10,-3\n",
        (),
        "row 1, column RATE: RATE must be >= 0, -1 (rate modelled) or -2 (duration modelled);"
        " got -3",
    ),
    (
        "rate_and_dur",
        "ID,TIME,DV,AMT,RATE,DUR\n1,0,.,10,5,2\n",
        (),
        "row 1, column DUR: DUR 2 conflicts with RATE 5; give either RATE or DUR",
    ),
    (
        "addl_without_ii",
        "ID,TIME,DV,AMT,ADDL,II\n1,0,.,10,3,0\n",
        (),
        "row 1, column II: ADDL 3 needs II > 0; got II 0",
    ),
    (
        "addl_without_ii_column",
        "ID,TIME,DV,AMT,ADDL\n1,0,.,10,3\n",
        (),
        "row 1, column II: ADDL 3 needs II > 0; got II 0",
    ),
    (
        "addl_on_observation_row",
        "ID,TIME,DV,AMT,EVID,ADDL,II\n1,0,1,0,0,3,12\n",
        (),
        "row 1, column ADDL: ADDL 3 on a non-dose row (EVID 0); use EVID 1 for a dose",
    ),
    (
        "ss_without_ii",
        "ID,TIME,DV,AMT,SS,II\n1,0,.,10,1,.\n",
        (),
        "row 1, column II: SS 1 (steady state) needs II > 0; got II 0",
    ),
    (
        "ss_out_of_range",
        "ID,TIME,DV,AMT,SS,II\n1,0,.,10,3,12\n",
        (),
        "row 1, column SS: SS must be 0, 1 or 2; got 3",
    ),
    (
        "id_not_contiguous",
        "ID,TIME,DV\n1,0,1\n1,1,1\n2,0,1\n1,2,1\n",
        (),
        "row 4, column ID: ID '1' appears again after other IDs (its first block ends at "
        "row 2); the rows of a subject must be contiguous",
    ),
    (
        "covariate_missing_for_subject",
        "ID,TIME,DV,Wt\n1,0,1,70\n2,0,1,.\n2,1,1,\n",
        ("WT",),
        "row 2, column Wt: covariate Wt is missing on every row of ID '2'",
    ),
]


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "table.csv"
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    ("text", "covariates", "expected"),
    [c[1:] for c in CASES],
    ids=[c[0] for c in CASES],
)
def test_malformed_table_message(tmp_path, text, covariates, expected):
    path = _write(tmp_path, text)
    with pytest.raises(DataValidationError) as info:
        read_event_table(path, covariates=covariates)
    assert str(info.value) == f"{path}: {expected}"


def test_error_is_value_error_and_names_path_as_given(tmp_path, monkeypatch):
    _write(tmp_path, "ID,TIME\n1,0\n")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match=r"^table\.csv: row 0, column DV: "):
        read_event_table("table.csv")


def test_file_not_found(tmp_path):
    path = tmp_path / "nope.csv"
    with pytest.raises(DataValidationError) as info:
        read_event_table(path)
    assert str(info.value) == f"{path}: file not found"


def test_empty_file(tmp_path):
    path = _write(tmp_path, "")
    with pytest.raises(DataValidationError) as info:
        read_event_table(path)
    assert str(info.value) == f"{path}: row 0, column ID: the file has no header line"


def test_blank_lines_keep_row_numbering(tmp_path):
    path = _write(tmp_path, "ID,TIME,DV\n1,0,1\n\n1,x,2\n")
    with pytest.raises(DataValidationError) as info:
        read_event_table(path)
    assert str(info.value) == f"{path}: row 3, column TIME: expected a number, got 'x'"


def test_trailing_separators_are_allowed(tmp_path):
    path = _write(tmp_path, "ID,TIME,DV,\n1,0,1,\n1,1,2\n")
    assert read_event_table(path).n_obs == 2


def test_check_compartments_names_observation_row(tmp_path):
    path = _write(tmp_path, f"{HEAD}\n1,0,.,10,1,1,1\n1,1,5,0,0,0,3\n")
    pop = load_population(path)
    check_compartments(pop, 3)
    with pytest.raises(DataValidationError) as info:
        check_compartments(pop, 2)
    assert str(info.value) == (
        f"{path}: row 2, column CMT: CMT 3 exceeds the model's 2 compartments "
        "(valid: 0 = model default, 1..2)"
    )


def test_check_compartments_names_dose_row_after_subset(tmp_path):
    text = (
        "ID,TIME,DV,AMT,cmt,ADDL,II\n"
        "1,0,.,10,1,0,0\n1,1,5,0,0,0,0\n"
        "2,0,.,10,1,0,0\n2,1,.,10,4,2,12\n2,2,5,0,0,0,0\n"
    )
    path = _write(tmp_path, text)
    pop = load_population(path)
    with pytest.raises(DataValidationError) as info:
        check_compartments(pop.subset([1]), 2, source="my.csv")
    assert str(info.value) == (
        "my.csv: row 4, column cmt: CMT 4 exceeds the model's 2 compartments "
        "(valid: 0 = model default, 1..2)"
    )
    check_compartments(pop.subset([0]), 2)
