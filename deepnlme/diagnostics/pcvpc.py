"""Prediction-corrected VPC (Bergstrand et al. 2011), binned by time or time after dose,
stratified by a covariate.

Within each stratum, CMT and bin, each observed and simulated DV is multiplied by
median(PRED in the bin) / PRED of its observation (PRED: the population prediction, η = 0), so
that observations with different doses, covariates or times within a bin become comparable;
then the percentiles are compared as in :func:`~deepnlme.diagnostics.vpc.vpc_statistics`.
Observations whose PRED is not positive (e.g. at the time of an oral dose) cannot be corrected:
they are left out of the percentiles and of the bin's median PRED.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
import torch
from matplotlib.figure import Figure
from torch import Tensor

from deepnlme.data.population import Population
from deepnlme.diagnostics.vpc import (
    INTERVAL,
    QUANTILES,
    assign_bins,
    draw_vpc_panel,
    time_bin_edges,
    vpc_legend,
    vpc_statistics,
)


def time_after_dose(pop: Population) -> Tensor:
    """Time since the last dose at or before each observation (same reset epoch), ``(N, T)``
    in the data's time units; the observation time itself where no dose precedes it."""
    acts = (
        pop.dose_mask[:, None, :]
        & (pop.dose_time[:, None, :] <= pop.obs_time[:, :, None])
        & (pop.dose_epoch[:, None, :] == pop.obs_epoch[:, :, None])
    )  # (N, T, D)
    if acts.shape[-1] == 0:
        return pop.obs_time.clone()
    never = torch.full(acts.shape, -1.0, dtype=pop.obs_time.dtype, device=acts.device)
    last = torch.where(acts, pop.dose_time[:, None, :], never).max(-1).values
    return torch.where(last >= 0, pop.obs_time - last.clamp(min=0), pop.obs_time)


def strata_labels(values: np.ndarray, name: str, max_levels: int = 4) -> np.ndarray:
    """A label per value: ``name=v`` for up to ``max_levels`` distinct values, else two
    groups split at the median (``name<=m``, ``name>m``)."""
    values = np.asarray(values, dtype=float)
    levels = np.unique(values)
    if levels.size <= max_levels:
        return np.array([f"{name}={v:g}" for v in values])
    m = float(np.median(values))
    return np.where(values <= m, f"{name}<={m:g}", f"{name}>{m:g}")


def pcvpc_statistics(
    observed: pd.DataFrame,
    simulated: np.ndarray,
    bins: int = 8,
    quantiles: Sequence[float] = QUANTILES,
    interval: float = INTERVAL,
) -> pd.DataFrame:
    """Prediction-corrected VPC statistics.

    Args:
        observed: one row per observation (default RangeIndex) with columns X (binning
            variable: TIME or time after dose), DV, PRED, CMT and STRATUM.
        simulated: simulated DVs ``(K, n_obs)`` of the same observations, in the same order.
    Returns:
        The columns of :func:`vpc_statistics` (``time_*`` refer to X) plus STRATUM.
    """
    parts = []
    k = simulated.shape[0]
    for (stratum, cmt), obs in observed.groupby(["STRATUM", "CMT"], sort=True):
        rows = obs.index.to_numpy()
        x = obs["X"].to_numpy(dtype=float)
        edges = time_bin_edges(x, bins)
        which = assign_bins(x, edges)
        pred = obs["PRED"].to_numpy(dtype=float)
        factor = _correction(_bin_median(pred, which), pred)
        obs_pc = pd.DataFrame({"TIME": x, "DV": obs["DV"].to_numpy() * factor, "CMT": cmt})
        sim = simulated[:, rows] * factor[None, :]
        sim_pc = pd.DataFrame(
            {
                "REP": np.repeat(np.arange(1, k + 1), len(rows)),
                "TIME": np.tile(x, k),
                "DV": sim.reshape(-1),
                "CMT": cmt,
            }
        )
        stats = vpc_statistics(obs_pc, sim_pc, bins, quantiles, interval)
        stats.insert(0, "STRATUM", stratum)
        parts.append(stats)
    if not parts:
        raise ValueError("no observations for a VPC")
    return pd.concat(parts, ignore_index=True)


def pcvpc_table(
    pop: Population,
    pred: Tensor,
    x: str = "TAD",
    stratify: str | None = None,
) -> pd.DataFrame:
    """Observed rows for :func:`pcvpc_statistics`: X (``"TIME"`` or ``"TAD"``), DV, PRED
    ``(N, T)`` masked, CMT and STRATUM (``stratify``: a covariate name, or None for one
    stratum "all")."""
    mask = pop.obs_mask.cpu()
    if x not in ("TIME", "TAD"):
        raise ValueError(f"pcVPC x must be TIME or TAD (got {x!r})")
    xs = pop.obs_time if x == "TIME" else time_after_dose(pop)
    table = pd.DataFrame(
        {
            "X": xs.detach().cpu()[mask].numpy(),
            "DV": pop.obs_dv.detach().cpu()[mask].numpy(),
            "PRED": pred.detach().cpu()[mask].numpy(),
            "CMT": pop.obs_cmt.cpu()[mask].numpy(),
        }
    )
    if stratify is None:
        table["STRATUM"] = "all"
    else:
        if stratify not in pop.covariate_names:
            raise ValueError(
                f"cannot stratify the VPC by {stratify!r}: covariates are {pop.covariate_names}"
            )
        c = pop.covariate_names.index(stratify)
        values = pop.obs_covariates[..., c].detach().cpu()[mask].numpy()
        table["STRATUM"] = strata_labels(values, stratify)
    return table


def pcvpc_figure(
    observed: pd.DataFrame,
    stats: pd.DataFrame,
    x_label: str = "time after dose",
    log_y: bool = False,
    interval: float = INTERVAL,
) -> Figure:
    """One panel per stratum and CMT: prediction-corrected observations (points), observed
    percentiles and simulated intervals (as :func:`~deepnlme.diagnostics.vpc.vpc_figure`)."""
    groups = list(stats.groupby(["STRATUM", "CMT"], sort=True).groups)
    qs = sorted(stats["quantile"].unique())
    central = min(qs, key=lambda q: abs(q - 0.5))
    ncol = min(len(groups), 3)
    nrow = -(-len(groups) // ncol)
    fig = Figure(figsize=(5.2 * ncol, 4.2 * nrow), layout="constrained")
    axes = fig.subplots(nrow, ncol, squeeze=False).ravel()
    for ax, (stratum, cmt) in zip(axes, groups, strict=False):
        obs = observed[(observed["STRATUM"] == stratum) & (observed["CMT"] == cmt)]
        part = stats[(stats["STRATUM"] == stratum) & (stats["CMT"] == cmt)]
        pc = _corrected(obs, part)
        draw_vpc_panel(ax, pc, part, central, log_y)
        title = "pcVPC" if stratum == "all" else f"pcVPC, {stratum}"
        if observed["CMT"].nunique() > 1:
            title += f", CMT {cmt}"
        ax.set(xlabel=x_label, ylabel="prediction-corrected DV", title=title)
    for ax in axes[len(groups):]:
        ax.set_axis_off()
    fig.legend(handles=vpc_legend(qs, central, interval), fontsize="small",
               loc="outside lower center", ncol=3 if ncol > 1 else 2)
    return fig


def _corrected(obs: pd.DataFrame, part: pd.DataFrame) -> pd.DataFrame:
    """Points (TIME = X, DV = prediction-corrected DV) of one panel, binned like ``part``."""
    edges = np.unique(np.concatenate([part["time_lo"], part["time_hi"]]))
    x = obs["X"].to_numpy(dtype=float)
    which = assign_bins(x, edges)
    pred = obs["PRED"].to_numpy(dtype=float)
    factor = _correction(_bin_median(pred, which), pred)
    return pd.DataFrame({"TIME": x, "DV": obs["DV"].to_numpy() * factor})


def _bin_median(pred: np.ndarray, which: np.ndarray) -> np.ndarray:
    """Per observation, the median of the positive PREDs of its bin (NaN if none)."""
    positive = pd.Series(np.where(pred > 0, pred, np.nan))
    return positive.groupby(which).median().reindex(which).to_numpy()


def _correction(median: np.ndarray, pred: np.ndarray) -> np.ndarray:
    """median(PRED in bin) / PRED per observation; NaN where PRED is not positive (e.g.
    before absorption): such observations cannot be corrected and are left out."""
    with np.errstate(divide="ignore", invalid="ignore"):
        factor = median / pred
    return np.where((pred > 0) & np.isfinite(factor), factor, np.nan)
