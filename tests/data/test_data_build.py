"""Event semantics and tensor layout of build_population."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from deepnlme.data import (
    RATE_MODELLED_DURATION,
    RATE_MODELLED_RATE,
    load_population,
    read_event_table,
)


def _load(tmp_path: Path, text: str, **kwargs):
    path = tmp_path / "events.csv"
    path.write_text(text)
    return load_population(path, **kwargs)


def _values(t: torch.Tensor, mask: torch.Tensor, i: int = 0) -> list:
    return t[i][mask[i]].tolist()


def test_addl_expansion_is_sorted_and_keeps_dose_fields(tmp_path):
    pop = _load(
        tmp_path,
        "ID,TIME,DV,AMT,EVID,MDV,CMT,ADDL,II\n"
        "1,0,.,100,1,1,1,2,12\n"
        "1,6,.,50,1,1,2,0,0\n"
        "1,30,5,0,0,0,0,0,0\n",
    )
    m = pop.dose_mask
    assert _values(pop.dose_time, m) == [0.0, 6.0, 12.0, 24.0]
    assert _values(pop.dose_amt, m) == [100.0, 50.0, 100.0, 100.0]
    assert _values(pop.dose_cmt, m) == [1, 2, 1, 1]
    assert _values(pop.dose_ss, m) == [0, 0, 0, 0]
    assert _values(pop.dose_epoch, m) == [0, 0, 0, 0]
    assert pop.meta["dose_row"][0].tolist() == [0, 1, 0, 0]
    assert pop.meta["n_doses"] == 2 and pop.meta["n_dose_events"] == 4


def test_infusion_rate_and_duration(tmp_path):
    pop = _load(
        tmp_path,
        "ID,TIME,DV,AMT,RATE,DUR\n"
        "1,0,.,100,50,0\n"
        "1,1,.,100,.,4\n"
        "1,2,.,100,-2,.\n"
        "1,3,.,100,-1,0\n"
        "1,4,.,100,0,0\n",
    )
    m = pop.dose_mask
    assert _values(pop.dose_rate, m) == [
        50.0, 25.0, RATE_MODELLED_DURATION, RATE_MODELLED_RATE, 0.0
    ]
    assert _values(pop.dose_duration, m) == [2.0, 4.0, 0.0, 0.0, 0.0]


def test_steady_state_fields_and_reset(tmp_path):
    pop = _load(
        tmp_path,
        "ID,TIME,DV,AMT,EVID,SS,II,ADDL\n"
        "1,0,.,100,1,1,12,1\n"
        "1,2,4,0,0,0,0,0\n"
        "1,24,.,100,1,2,8,0\n"
        "1,25,3,0,0,0,0,0\n",
    )
    m = pop.dose_mask
    assert _values(pop.dose_time, m) == [0.0, 12.0, 24.0]
    assert _values(pop.dose_ss, m) == [1, 0, 2]
    assert _values(pop.dose_ii, m) == [12.0, 0.0, 8.0]
    # the SS=1 dose is a reset: it opens epoch 1; SS=2 adds without reset
    assert _values(pop.dose_epoch, m) == [1, 1, 1]
    assert _values(pop.obs_epoch, pop.obs_mask) == [1, 1]


def test_reset_epochs(tmp_path):
    pop = _load(
        tmp_path,
        "ID,TIME,DV,AMT,EVID,MDV\n"
        "1,0,.,100,1,1\n"
        "1,1,5,0,0,0\n"
        "1,2,.,0,3,1\n"
        "1,3,6,0,0,0\n"
        "1,4,.,80,4,1\n"
        "1,4,7,0,0,0\n"
        "2,0,8,0,0,0\n",
    )
    assert _values(pop.obs_epoch, pop.obs_mask) == [0, 1, 2]
    assert _values(pop.dose_epoch, pop.dose_mask) == [0, 2]
    assert _values(pop.obs_epoch, pop.obs_mask, 1) == [0]
    assert pop.meta["n_resets"] == 1 and pop.meta["n_doses"] == 2


def test_reset_cancels_pending_additional_doses(tmp_path):
    pop = _load(
        tmp_path,
        "ID,TIME,DV,AMT,EVID,MDV,ADDL,II\n"
        "1,0,.,100,1,1,5,12\n"
        "1,24,.,0,3,1,0,0\n"
        "1,30,5,0,0,0,0,0\n",
    )
    # copies at 12 kept; 24 (same time as the reset), 36, 48, 60 cancelled
    assert _values(pop.dose_time, pop.dose_mask) == [0.0, 12.0]
    assert _values(pop.dose_epoch, pop.dose_mask) == [0, 0]
    assert pop.meta["n_addl_cancelled"] == 4
    assert _values(pop.obs_epoch, pop.obs_mask) == [1]


def test_mdv_and_other_rows_are_counted_not_dropped(tmp_path):
    text = (
        "ID,TIME,DV,AMT,EVID,MDV\n"
        "1,0,.,100,1,1\n"
        "1,1,5,0,0,1\n"  # EVID 0 with MDV 1: kept, not an observation
        "1,2,.,0,2,.\n"  # other event
        "1,3,6,0,0,.\n"  # MDV defaults to 0 on EVID 0
        "1,4,.,0,3,1\n"  # reset
    )
    path = tmp_path / "events.csv"
    path.write_text(text)
    table = read_event_table(path)
    assert table.counts() == {
        "n_rows": 5, "n_obs": 1, "n_doses": 1, "n_resets": 1, "n_other": 2
    }
    assert table.frame["MDV"].tolist() == [1, 1, 1, 0, 1]
    pop = load_population(path)
    assert _values(pop.obs_time, pop.obs_mask) == [3.0]
    assert _values(pop.obs_row, pop.obs_mask) == [3]


def test_defaults_without_evid_and_mdv(tmp_path):
    pop = _load(tmp_path, "ID,TIME,DV,AMT\n1,0,.,100\n1,1,5,.\n")
    assert _values(pop.dose_amt, pop.dose_mask) == [100.0]
    assert _values(pop.obs_dv, pop.obs_mask) == [5.0]


def test_observation_only_table_without_amt(tmp_path):
    pop = _load(tmp_path, "ID,TIME,DV\nA,0,1\nA,1,2\nB,0,3\n")
    assert pop.ids == ["A", "B"]
    assert pop.dose_mask.shape == (2, 1) and not pop.dose_mask.any()
    assert pop.obs_mask.sum(1).tolist() == [2, 1]


def test_covariates_locf_and_baseline(tmp_path):
    pop = _load(
        tmp_path,
        "ID,TIME,DV,wt,Sex,NOTE\n"
        "1,0,1,.,0,a\n"
        "1,1,2,70,.,b\n"
        "1,2,3,,.,c\n"
        "1,3,4,75,1,d\n"
        "2,0,5,60,1,e\n",
        covariates=("WT", "sex"),
    )
    assert pop.covariate_names == ["WT", "SEX"]
    assert pop.covariates.tolist() == [[70.0, 0.0], [60.0, 1.0]]
    assert pop.obs_covariates[0].tolist() == [[70.0, 0.0], [70.0, 0.0], [70.0, 0.0], [75.0, 1.0]]
    assert pop.covariate("WT").tolist() == [70.0, 60.0]


def test_table_frame_columns(tmp_path):
    path = tmp_path / "events.csv"
    path.write_text("id,Time,DV,wt,Note\n7,0,1,70,x\n")
    table = read_event_table(path, covariates=["Wt"])
    assert list(table.frame.columns) == [
        "ID", "TIME", "DV", "AMT", "EVID", "MDV", "CMT", "RATE", "DUR", "II", "ADDL", "SS",
        "WT", "NOTE",
    ]
    assert table.frame["NOTE"].tolist() == ["x"]
    assert table.columns["TIME"] == "Time"
    assert table.covariates == ("WT",)


def test_padding_masks_and_dtypes(tmp_path):
    pop = _load(
        tmp_path,
        "ID,TIME,DV,AMT,WT\n"
        "1,0,.,10,70\n1,1,2,0,70\n1,2,3,0,70\n1,3,.,10,70\n1,4,4,0,70\n"
        "2,0,5,0,60\n",
        covariates=("WT",),
    )
    assert pop.obs_time.shape == (2, 3) and pop.dose_time.shape == (2, 2)
    assert pop.obs_mask.tolist() == [[True, True, True], [True, False, False]]
    assert pop.dose_mask.tolist() == [[True, True], [False, False]]
    assert pop.obs_time[1].tolist() == [0.0, 0.0, 0.0]
    assert pop.obs_dv[1].tolist() == [5.0, 0.0, 0.0]
    assert pop.obs_row.tolist() == [[1, 2, 4], [5, -1, -1]]
    assert pop.dose_amt[1].tolist() == [0.0, 0.0]
    assert pop.meta["dose_row"].tolist() == [[0, 3], [-1, -1]]
    assert pop.obs_covariates[1, :, 0].tolist() == [60.0, 0.0, 0.0]
    assert pop.obs_mask.dtype == torch.bool and pop.dose_mask.dtype == torch.bool
    for name in ("obs_cmt", "obs_epoch", "obs_row", "dose_cmt", "dose_ss", "dose_epoch"):
        assert getattr(pop, name).dtype == torch.long, name
    assert pop.obs_time.dtype == torch.get_default_dtype()
    assert pop.subject_index.tolist() == [0, 1]
    assert pop.n_obs == 4 and len(pop) == 2


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_dtype_argument(tmp_path, dtype):
    pop = _load(tmp_path, "ID,TIME,DV,AMT\n1,0,.,10\n1,1,2,0\n", dtype=dtype)
    assert pop.obs_time.dtype == dtype and pop.dose_amt.dtype == dtype
    assert pop.covariates.shape == (1, 0) and pop.obs_covariates.shape == (1, 1, 0)
