"""Regimen specifications and dosing tables -> checked records and prediction designs."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from deepnlme.data.regimen import (
    Regimen,
    RegimenError,
    prediction_times,
    read_dosing_table,
    regimen_from_options,
    regimen_population,
)


def test_options_become_a_checked_record():
    r = regimen_from_options({"amt": 300, "ii": 12, "addl": 9, "rate": None})
    assert r == Regimen(amt=300.0, ii=12.0, addl=9)
    assert r.last_dose_time == 108.0 and r.infusion_duration == 0.0
    assert Regimen(amt=100.0, rate=25.0).check().infusion_duration == 4.0


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({}, "regimen.amt is required (the dose amount), e.g. regimen.amt=300"),
        ({"amt": 0}, "regimen.amt must be > 0 (the dose amount), got 0"),
        ({"amt": 10, "addl": 2}, "regimen.addl=2 repeats the dose but regimen.ii is 0: set "
         "regimen.ii to the dosing interval (> 0)"),
        ({"amt": 10, "addl": 1.5, "ii": 2}, "regimen.addl must be a whole number, got 1.5"),
        ({"amt": "x"}, "regimen.amt must be a number, got 'x'"),
        ({"amt": 10, "ii": -1}, "regimen.ii must be >= 0 (the dosing interval), got -1"),
        ({"amt": 10, "duration": -2}, "regimen.rate and regimen.duration must be >= 0 "
         "(0: bolus), got 0 and -2"),
    ],
)
def test_bad_options_are_one_clear_line(options, message):
    with pytest.raises(RegimenError) as err:
        regimen_from_options(options)
    assert str(err.value) == message


def test_dosing_table(tmp_path):
    path = tmp_path / "doses.csv"
    path.write_text("time,amt,ii,addl,rate\n0,100,12,2,0\n48,50,0,0,25\n")
    table = read_dosing_table(path)
    assert list(table["AMT"]) == [100.0, 50.0] and list(table["ADDL"]) == [2, 0]
    assert list(table["DUR"]) == [0.0, 0.0] and list(table["CMT"]) == [0, 0]
    times = prediction_times(table, n_times=5)
    assert times[-1] == pytest.approx(48 + 24) and {0.0, 12.0, 24.0, 48.0} <= set(times)
    path.write_text("TIME,AMT,II,ADDL\n0,100,0,3\n")
    with pytest.raises(RegimenError, match=r"doses.csv: row 2: addl=3 repeats the dose"):
        read_dosing_table(path)
    path.write_text("TIME,DOSE\n0,100\n")
    with pytest.raises(RegimenError, match=r"unknown column\(s\) \['DOSE'\]"):
        read_dosing_table(path)


def test_regimen_population_layout():
    doses = Regimen(amt=100.0, ii=12.0, addl=2, rate=50.0).frame()
    times = np.array([0.0, 1.0, 12.0, 30.0])
    pop = regimen_population(["a", "b"], np.array([[70.0], [80.0]]), ["WT"], doses, times,
                             dtype=torch.float64)
    assert pop.ids == ["a", "b"] and pop.covariate_names == ["WT"]
    assert torch.equal(pop.dose_time, torch.tensor([[0.0, 12.0, 24.0]] * 2, dtype=torch.float64))
    assert (pop.dose_duration == 2.0).all() and (pop.dose_rate == 50.0).all()
    assert torch.equal(pop.obs_time[1], torch.tensor(times, dtype=torch.float64))
    assert pop.covariate("WT").tolist() == [70.0, 80.0]
    per_subject = pd.DataFrame({"ID": ["a"], "TIME": [0.0], "AMT": [5.0], "II": [0.0],
                                "ADDL": [0], "RATE": [0.0], "DUR": [0.0], "CMT": [0]})
    with pytest.raises(RegimenError, match="no dose for subject b"):
        regimen_population(["a", "b"], np.zeros((2, 1)), ["WT"], per_subject, times)
