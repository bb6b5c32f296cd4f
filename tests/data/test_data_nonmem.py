"""NONMEM table habits: comment records (``C`` column, ``#``), ``.`` for missing values,
blank-separated tables; and numbers too large to compute with."""

from __future__ import annotations

import pytest
import torch

from deepnlme.data import DataValidationError, dataset_path, load_dataset, load_population

HEAD = "C,ID,TIME,DV,AMT,EVID,MDV,CMT"


def write(tmp_path, text: str, name: str = "nm.csv"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_comment_records_are_skipped_and_counted(tmp_path):
    path = write(
        tmp_path,
        f"{HEAD}\n"
        ".,1,0,.,100,1,1,1\n"
        "C,1,0.5,99,.,.,.,.\n"  # row 2: commented out (NONMEM IGNORE=C)
        "# 1,0.7,98  row 3: a comment line (NONMEM's default IGNORE=#)\n"
        ".,1,1,5,.,.,.,.\n"
        "x,1,1.5,97,.,.,.,.\n"  # row 5: any value but '.' marks a comment
        ".,1,2,4,.,.,.,0\n",
    )
    pop = load_population(path)
    assert pop.obs_dv[pop.obs_mask].tolist() == [5.0, 4.0]
    assert pop.obs_row[pop.obs_mask].tolist() == [3, 5]  # rows keep their numbers
    assert pop.meta["n_comments"] == 3 and pop.meta["n_rows"] == 3


def test_rows_after_comments_keep_their_numbers_in_messages(tmp_path):
    path = write(tmp_path, f"{HEAD}\n.,1,0,.,100,1,1,1\nC,comment\n.,1,1,abc,.,.,.,.\n")
    with pytest.raises(DataValidationError, match=r"nm.csv: row 3, column DV: expected a number"):
        load_population(path)


def test_comment_column_is_not_a_covariate(tmp_path):
    path = write(tmp_path, f"{HEAD}\n.,1,0,.,100,1,1,1\n.,1,1,5,.,.,.,.\n")
    with pytest.raises(DataValidationError) as refused:
        load_population(path, covariates=["c"])
    assert str(refused.value) == (
        f"{path}: row 0, column C: column C marks comment records (NONMEM's IGNORE=C) and "
        "cannot be a covariate; rename it"
    )


def test_only_comments_is_refused(tmp_path):
    path = write(tmp_path, f"{HEAD}\nC,1,0,.,100,1,1,1\n")
    with pytest.raises(DataValidationError) as refused:
        load_population(path)
    assert str(refused.value) == (
        f"{path}: row 1, column ID: the table has no data rows (1 comment records skipped)"
    )


def test_nonmem_layout_of_theophylline_equals_the_bundled_table(tmp_path):
    """C column of '.', blank-separated, no EVID/MDV, '.' for AMT and CMT on observations."""
    lines = dataset_path("theophylline").read_text().splitlines()
    out = ["C ID TIME AMT DV CMT WT"]
    for line in lines[1:]:
        sid, time, amt, dv, _evid, _mdv, cmt, wt = line.split(",")
        if amt == "0":
            amt = cmt = "."
        out.append(f".  {sid}  {time}  {amt}  {dv}  {cmt}  {wt}")
    pop = load_population(write(tmp_path, "\n".join(out) + "\n"), ["WT"])
    bundled = load_dataset("theophylline")
    for name in ("obs_time", "obs_dv", "obs_cmt", "obs_mask", "dose_time", "dose_amt",
                 "dose_cmt", "covariates"):
        assert torch.equal(getattr(pop, name), getattr(bundled, name)), name


@pytest.mark.parametrize(("column", "value"), [("DV", "1e308"), ("TIME", "2e15"), ("AMT", "-1e16")])
def test_numbers_beyond_1e15_are_refused(tmp_path, column, value):
    cells = {"TIME": "1", "DV": "5", "AMT": "0"}
    cells[column] = value
    path = write(
        tmp_path,
        f"ID,TIME,DV,AMT\n1,0,.,100\n1,{cells['TIME']},{cells['DV']},{cells['AMT']}\n",
    )
    with pytest.raises(DataValidationError) as refused:
        load_population(path)
    assert str(refused.value) == (
        f"{path}: row 2, column {column}: {value} is out of range: numbers must be at most "
        "1e+15 in absolute value; rescale the column's units"
    )
