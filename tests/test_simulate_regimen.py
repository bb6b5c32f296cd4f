"""simulate.py with a new dosing regimen: predictions, intervals, plot; bad regimens as one line."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

import simulate as simulate_module
from tests.test_cli import user_error
from tests.test_simulate import commands_in_process, theo_ckpt  # noqa: F401 (fixtures)

COLUMNS = ["ID", "TIME", "PRED", "IPRED", "CMT", "P_LO", "P_MEDIAN", "P_HI"]


def test_regimen_for_fitted_subjects(commands_in_process, theo_ckpt, tmp_path):  # noqa: F811
    r = commands_in_process(
        simulate_module.simulate, "simulate", tmp_path, f"ckpt_path={theo_ckpt}",
        "regimen.amt=300", "regimen.ii=12", "regimen.addl=9", "n_replicates=40",
    )
    table = pd.read_csv(tmp_path / "regimen.csv")
    assert list(table.columns) == COLUMNS
    assert (tmp_path / "regimen.png").stat().st_size > 0
    assert r["n_subjects"] == 12 and table["ID"].nunique() == 12
    one = table[table["ID"] == table["ID"].iloc[0]]
    assert one["TIME"].max() == pytest.approx(9 * 12 + 24)
    for t in 12.0 * np.arange(10):
        assert (np.abs(one["TIME"] - t) < 1e-12).any()  # every dose time is on the grid
    assert (table["P_LO"] <= table["P_MEDIAN"]).all() and (table["P_MEDIAN"] <= table["P_HI"]).all()
    # accumulation: the linear model's trough before the last dose exceeds the one before the
    # second dose (superposition of 9 earlier doses)
    trough = {t: one.loc[(one["TIME"] - t).abs() < 1e-9, "PRED"].iloc[0] for t in (12.0, 108.0)}
    assert trough[108.0] > 1.2 * trough[12.0]
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["regimen"]["amt"] == 300 and saved["n_replicates"] == 40


def test_regimen_infusion_and_new_subject(commands_in_process, theo_ckpt, tmp_path):  # noqa: F811
    commands_in_process(
        simulate_module.simulate, "simulate", tmp_path, f"ckpt_path={theo_ckpt}",
        "regimen.amt=320", "regimen.duration=4", "+regimen.covariates={WT: 70}",
        "n_replicates=30", "regimen.n_times=25",
    )
    table = pd.read_csv(tmp_path / "regimen.csv")
    assert set(table["ID"].astype(str)) == {"new"} and "IPRED" not in table
    # zero-order input: the concentration still rises at 3 h and falls after the end (4 h)
    pred = table.set_index("TIME")["PRED"]
    assert pred.loc[3.0] > pred.loc[2.0] > 0
    assert pred.loc[24.0] < pred.max()


def test_regimen_from_a_dosing_table(commands_in_process, theo_ckpt, tmp_path):  # noqa: F811
    path = tmp_path / "doses.csv"
    pd.DataFrame({"time": [0.0, 24.0], "amt": [320.0, 160.0]}).to_csv(path, index=False)
    commands_in_process(
        simulate_module.simulate, "simulate", tmp_path, f"ckpt_path={theo_ckpt}",
        f"regimen.path={path}", "n_replicates=20",
    )
    table = pd.read_csv(tmp_path / "regimen.csv")
    assert table["TIME"].max() == pytest.approx(48.0)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["regimen.amt=-5"], "error: regimen.amt must be > 0 (the dose amount), got -5"),
        (
            ["regimen.amt=300", "regimen.addl=9"],
            "error: regimen.addl=9 repeats the dose but regimen.ii is 0: set regimen.ii to the "
            "dosing interval (> 0)",
        ),
        (
            ["regimen.amt=300", "regimen.rate=10", "regimen.duration=2"],
            "error: give regimen.rate or regimen.duration for an infusion, not both "
            "(duration = amt / rate)",
        ),
    ],
)
def test_bad_regimen_is_one_line(
    overrides, message, commands_in_process, theo_ckpt, capsys, tmp_path  # noqa: F811
):
    with pytest.raises(SystemExit) as stopped:
        commands_in_process(
            simulate_module.simulate, "simulate", tmp_path, f"ckpt_path={theo_ckpt}", *overrides
        )
    assert stopped.value.code == 1
    assert capsys.readouterr().err.strip().splitlines() == [message]


def test_bad_dosing_table_names_file_row_and_column(theo_ckpt, tmp_path):  # noqa: F811
    path = tmp_path / "doses.csv"
    path.write_text("TIME,AMT\n0,100\n12,abc\n")
    line = user_error(f"ckpt_path={theo_ckpt}", f"regimen.path={path}", script="simulate.py")
    assert line == f"error: {path}: row 3, column AMT: not a number ('abc')"
