"""Validated event table -> :class:`Population` (padded, masked tensors).

Reset epochs: every row gets ``epoch`` = the number of resets at or before it within its
subject, in row order; resets are ``EVID 3`` and ``4`` rows and ``SS=1`` doses (so a reset row,
and an ``EVID 4`` or ``SS=1`` dose, opens the new epoch).

ADDL expansion: a dose with ``ADDL = n`` becomes the dose plus copies at ``TIME + k * II``
(``k = 1..n``) with the same amount, rate, duration and compartment, ``SS 0`` and ``II 0``. As
in NONMEM, a reset cancels the additional doses still pending: a copy is dropped when a reset
row of the subject lies after the original dose row with ``TIME <=`` the copy's time (a reset at
exactly the copy's time cancels it). Kept copies therefore share the original's epoch. The
number dropped is ``meta["n_addl_cancelled"]``.

Infusions: ``RATE > 0`` gives duration ``AMT / RATE``; ``DUR > 0`` (with ``RATE`` 0) gives rate
``AMT / DUR``; ``RATE`` -1 / -2 are kept as sentinels with duration 0 (the model supplies them).
``dose_ii`` holds ``II`` for steady-state doses (``SS`` 1/2) and 0 otherwise.

``meta`` holds the row counts of the table, ``columns`` (upper-case name -> name as written) and
``dose_row``: an ``(N, D)`` long tensor of the 0-based data row of each dose slot (the original
row for ADDL copies; -1 in padding), indexed by ``subject_index`` so it stays valid for subsets.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from deepnlme.data.errors import DataValidationError
from deepnlme.data.events import DOSE_EVIDS, EventTable, read_event_table
from deepnlme.data.population import Population


def _subject_starts(subj: np.ndarray) -> np.ndarray:
    """Index of the first entry of each entry's subject; ``subj`` is sorted, shape (n,)."""
    return np.searchsorted(subj, subj, side="left")


def _slots(subj: np.ndarray) -> tuple[np.ndarray, int]:
    """Slot position of each entry within its subject (``subj`` sorted) and the slot count."""
    pos = np.arange(len(subj)) - _subject_starts(subj)
    width = int(pos.max()) + 1 if len(pos) else 0
    return pos, max(width, 1)


def _epochs(subj: np.ndarray, reset: np.ndarray) -> np.ndarray:
    """Number of resets at or before each row within its subject; (n,) int64."""
    total = np.cumsum(reset, dtype=np.int64)
    start = _subject_starts(subj)
    return total - (total[start] - reset[start])


def _count_at_or_before(
    q_subj: np.ndarray, q_time: np.ndarray, r_subj: np.ndarray, r_time: np.ndarray
) -> np.ndarray:
    """For each query, the number of reference events of its subject with time <= its time."""
    if len(r_time) == 0:
        return np.zeros(len(q_time), dtype=np.int64)
    _, rank = np.unique(np.concatenate([r_time, q_time]), return_inverse=True)
    m = int(rank.max()) + 1
    r_key = np.sort(r_subj.astype(np.int64) * m + rank[: len(r_time)])
    q_key = q_subj.astype(np.int64) * m + rank[len(r_time):]
    first = np.searchsorted(r_key, q_subj.astype(np.int64) * m, side="left")
    return np.searchsorted(r_key, q_key, side="right") - first


def _pad(
    subj: np.ndarray, pos: np.ndarray, values: np.ndarray, shape: tuple[int, ...], fill=0
) -> np.ndarray:
    """Scatter per-entry ``values`` into an array of ``shape`` = (N, width, ...)."""
    out = np.full(shape, fill, dtype=values.dtype)
    out[subj, pos] = values
    return out


def _expand_doses(table: EventTable, subj: np.ndarray, epoch: np.ndarray, reset: np.ndarray):
    """Dose events after ADDL expansion, sorted by subject then time.

    Returns a dict of (n_events,) arrays ``subj, row, time, amt, rate, dur, cmt, ss, ii, epoch``
    and the number of cancelled copies.
    """
    f = table.frame
    is_dose = f["EVID"].isin(DOSE_EVIDS).to_numpy()
    d = np.flatnonzero(is_dose)
    addl = f["ADDL"].to_numpy()[d]
    src = np.repeat(d, addl + 1)  # row position of the original dose
    group_start = np.repeat(np.cumsum(addl + 1) - (addl + 1), addl + 1)
    k = np.arange(len(src)) - group_start  # 0 original, 1..ADDL copies
    col = {c: f[c].to_numpy()[src] for c in ("TIME", "AMT", "RATE", "DUR", "II", "CMT", "SS")}
    time = col["TIME"] + k * col["II"]
    ev_subj = subj[src]
    ev_epoch = epoch[src]
    r = np.flatnonzero(reset)
    at_time = _count_at_or_before(ev_subj, time, subj[r], f["TIME"].to_numpy()[r])
    keep = (k == 0) | (at_time == ev_epoch)

    rate_in, dur_in, amt = col["RATE"], col["DUR"], col["AMT"]
    with np.errstate(divide="ignore", invalid="ignore"):
        rate = np.where(rate_in != 0, rate_in, np.where(dur_in > 0, amt / dur_in, 0.0))
        dur = np.where(rate_in > 0, amt / rate_in, np.where(rate_in == 0, dur_in, 0.0))
    ss = np.where(k == 0, col["SS"], 0)
    out = {
        "subj": ev_subj,
        "row": f.index.to_numpy()[src],
        "k": k,
        "time": time,
        "amt": amt,
        "rate": rate,
        "dur": dur,
        "cmt": col["CMT"],
        "ss": ss,
        "ii": np.where(ss > 0, col["II"], 0.0),
        "epoch": ev_epoch,
    }
    out = {name: v[keep] for name, v in out.items()}
    order = np.lexsort((out["k"], out["row"], out["time"], out["subj"]))
    return {name: v[order] for name, v in out.items()}, int((~keep).sum())


def build_population(table: EventTable, dtype: torch.dtype | None = None) -> Population:
    """Padded tensors of a validated table (shapes in :class:`Population`).

    Args:
        table: output of :func:`read_event_table`.
        dtype: floating dtype of the float tensors; torch's default when None.
    """
    dtype = dtype or torch.get_default_dtype()
    f = table.frame
    subj, ids = f["ID"].factorize(sort=False)  # contiguous blocks, order of appearance
    subj = subj.astype(np.int64)
    n = len(ids)
    evid, ss = f["EVID"].to_numpy(), f["SS"].to_numpy()
    is_dose = np.isin(evid, DOSE_EVIDS)
    reset = (evid == 3) | (evid == 4) | (is_dose & (ss == 1))
    epoch = _epochs(subj, reset.astype(np.int64))
    covs = f[list(table.covariates)].to_numpy(dtype=np.float64).reshape(len(f), -1)

    def fl(a: np.ndarray) -> torch.Tensor:
        return torch.as_tensor(a, dtype=dtype)

    def lg(a: np.ndarray) -> torch.Tensor:
        return torch.as_tensor(a, dtype=torch.long)

    # observations
    o = np.flatnonzero((evid == 0) & (f["MDV"].to_numpy() == 0))
    o_subj = subj[o]
    o_pos, t_width = _slots(o_subj)
    n_cov = covs.shape[1]

    def obs(values: np.ndarray, fill=0) -> np.ndarray:
        return _pad(o_subj, o_pos, values, (n, t_width, *values.shape[1:]), fill)

    # doses
    dose, n_cancelled = _expand_doses(table, subj, epoch, reset)
    d_pos, d_width = _slots(dose["subj"])

    def dos(values: np.ndarray, fill=0) -> np.ndarray:
        return _pad(dose["subj"], d_pos, values, (n, d_width), fill)

    first_row = np.searchsorted(subj, np.arange(n), side="left")
    meta = {
        **table.counts(),
        "n_comments": table.n_comments,
        "n_dose_events": len(dose["time"]),
        "n_addl_cancelled": n_cancelled,
        "columns": dict(table.columns),
        "dose_row": lg(dos(dose["row"].astype(np.int64), fill=-1)),
    }
    return Population(
        ids=[str(i) for i in ids],
        covariate_names=list(table.covariates),
        obs_time=fl(obs(f["TIME"].to_numpy()[o])),
        obs_dv=fl(obs(f["DV"].to_numpy()[o])),
        obs_cmt=lg(obs(f["CMT"].to_numpy()[o].astype(np.int64))),
        obs_mask=torch.as_tensor(obs(np.ones(len(o), dtype=bool), fill=False)),
        obs_epoch=lg(obs(epoch[o])),
        obs_row=lg(obs(f.index.to_numpy()[o].astype(np.int64), fill=-1)),
        dose_time=fl(dos(dose["time"])),
        dose_amt=fl(dos(dose["amt"])),
        dose_rate=fl(dos(dose["rate"])),
        dose_duration=fl(dos(dose["dur"])),
        dose_cmt=lg(dos(dose["cmt"].astype(np.int64))),
        dose_ss=lg(dos(dose["ss"].astype(np.int64))),
        dose_ii=fl(dos(dose["ii"])),
        dose_mask=torch.as_tensor(dos(np.ones(len(dose["time"]), dtype=bool), fill=False)),
        dose_epoch=lg(dos(dose["epoch"].astype(np.int64))),
        covariates=fl(covs[first_row].reshape(n, n_cov)),
        obs_covariates=fl(obs(covs[o].reshape(len(o), n_cov))),
        subject_index=torch.arange(n, dtype=torch.long),
        source=table.source,
        meta=meta,
    )


def load_population(
    path: str | Path, covariates: Sequence[str] = (), dtype: torch.dtype | None = None
) -> Population:
    """Read, validate and build in one step (see :func:`read_event_table`)."""
    return build_population(read_event_table(path, covariates), dtype=dtype)


def check_compartments(pop: Population, n_compartments: int, source: str | None = None) -> None:
    """Raise :class:`DataValidationError` if a record's CMT exceeds ``n_compartments``.

    The message names the first offending data row (observation or dose) and column CMT;
    ``source`` defaults to ``pop.source``.
    """
    source = pop.source if source is None else source
    column = pop.meta.get("columns", {}).get("CMT", "CMT")
    bad_obs = (pop.obs_mask & (pop.obs_cmt > n_compartments)).cpu()
    bad_dose = (pop.dose_mask & (pop.dose_cmt > n_compartments)).cpu()
    found: list[tuple[int, int]] = []  # (0-based row, cmt)
    if bool(bad_obs.any()):
        rows = pop.obs_row.cpu()[bad_obs]
        found += list(zip(rows.tolist(), pop.obs_cmt.cpu()[bad_obs].tolist(), strict=True))
    if bool(bad_dose.any()):
        cmts = pop.dose_cmt.cpu()[bad_dose]
        dose_row = pop.meta.get("dose_row")
        if dose_row is None:
            i, j = (int(x) for x in bad_dose.nonzero()[0])
            raise DataValidationError(
                f"{source}: ID {pop.ids[i]}, dose at TIME {float(pop.dose_time[i, j]):.15g}, "
                f"column {column}: CMT {int(cmts[0])} exceeds the model's {n_compartments} "
                "compartments"
            )
        slots = dose_row[pop.subject_index.cpu()][:, : bad_dose.shape[1]]
        found += list(zip(slots[bad_dose].tolist(), cmts.tolist(), strict=True))
    if found:
        row0, cmt = min(found)
        raise DataValidationError(
            f"{source}: row {row0 + 1}, column {column}: CMT {cmt} exceeds the model's "
            f"{n_compartments} compartments (valid: 0 = model default, 1..{n_compartments})"
        )
