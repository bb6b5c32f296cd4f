"""Fixtures for the dynamics tests: a Population built by hand from per-subject records."""

from __future__ import annotations

import pytest
import torch

from deepnlme.data.population import Population


def dose(time, amt, rate=0.0, cmt=0, ss=0, ii=0.0, epoch=0, dur=None) -> dict:
    """One dose record; ``dur`` defaults to AMT/RATE for RATE > 0 (else 0)."""
    if dur is None:
        dur = amt / rate if rate > 0 else 0.0
    return dict(time=time, amt=amt, rate=rate, dur=dur, cmt=cmt, ss=ss, ii=ii, epoch=epoch)


def build_population(subjects: list[dict], dtype=torch.float64, device="cpu") -> Population:
    """Padded Population from ``[{"doses": [dose(...), ...], "obs": [t or (t, epoch), ...]}]``.

    Padding holds zeros, as the data layer writes it.
    """
    n = len(subjects)
    n_obs = max(1, max(len(s["obs"]) for s in subjects))
    n_dose = max(1, max(len(s["doses"]) for s in subjects))
    kw = dict(device=device)
    obs_time = torch.zeros(n, n_obs, dtype=dtype, **kw)
    obs_epoch = torch.zeros(n, n_obs, dtype=torch.long, **kw)
    obs_mask = torch.zeros(n, n_obs, dtype=torch.bool, **kw)
    obs_row = torch.full((n, n_obs), -1, dtype=torch.long, **kw)
    floats = ("time", "amt", "rate", "dur", "ii")
    fields = {k: torch.zeros(n, n_dose, dtype=dtype, **kw) for k in floats}
    ints = {k: torch.zeros(n, n_dose, dtype=torch.long, **kw) for k in ("cmt", "ss", "epoch")}
    dose_mask = torch.zeros(n, n_dose, dtype=torch.bool, **kw)
    for i, subj in enumerate(subjects):
        for j, o in enumerate(subj["obs"]):
            t, ep = (o, 0) if not isinstance(o, tuple) else o
            obs_time[i, j], obs_epoch[i, j], obs_mask[i, j], obs_row[i, j] = t, ep, True, j
        for j, d in enumerate(subj["doses"]):
            for k in floats:
                fields[k][i, j] = d[k]
            for k in ("cmt", "ss", "epoch"):
                ints[k][i, j] = d[k]
            dose_mask[i, j] = True
    return Population(
        ids=[str(i + 1) for i in range(n)],
        covariate_names=[],
        obs_time=obs_time,
        obs_dv=torch.zeros_like(obs_time),
        obs_cmt=torch.zeros_like(obs_epoch),
        obs_mask=obs_mask,
        obs_epoch=obs_epoch,
        obs_row=obs_row,
        dose_time=fields["time"],
        dose_amt=fields["amt"],
        dose_rate=fields["rate"],
        dose_duration=fields["dur"],
        dose_cmt=ints["cmt"],
        dose_ss=ints["ss"],
        dose_ii=fields["ii"],
        dose_mask=dose_mask,
        dose_epoch=ints["epoch"],
        covariates=torch.zeros(n, 0, dtype=dtype, **kw),
        obs_covariates=torch.zeros(n, n_obs, 0, dtype=dtype, **kw),
        subject_index=torch.arange(n, **kw),
        source="test",
    )


@pytest.fixture
def make_pop():
    """``make_pop(subjects, dtype=..., device=...)`` -> Population (see build_population)."""
    return build_population


@pytest.fixture
def make_dose():
    """``make_dose(time, amt, rate=0, cmt=0, ss=0, ii=0, epoch=0, dur=None)`` -> dose dict."""
    return dose
