"""Visual predictive check (VPC): observed vs simulated percentiles of DV in bins of TIME.

Tables (pandas, one row per observation): ``observed`` has the columns TIME, DV and CMT (e.g.
:func:`~deepnlme.diagnostics.predictions.observation_table` of the data); ``simulated`` has
the same columns plus REP, the replicate number (e.g. ``simulations.csv`` of
``simulate.py``). TIME is in the data's time units, DV in its units. Each observed CMT is
checked on its own, with quantile bins of its observed times; the simulated rows of a CMT
are put into the same bins.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch

#: Percentiles of DV compared per bin (5th, 50th, 95th).
QUANTILES = (0.05, 0.5, 0.95)
#: Probability of the interval across replicates of each simulated percentile.
INTERVAL = 0.9
#: Columns of :func:`vpc_statistics`.
STAT_COLUMNS = [
    "CMT", "bin", "time_lo", "time_hi", "time_mid", "n_obs", "quantile",
    "observed", "sim_lo", "sim_median", "sim_hi",
]


def time_bin_edges(time: np.ndarray, bins: int) -> np.ndarray:
    """Edges ``(B + 1,)`` of quantile bins of ``time`` ``(n,)``: B ≤ ``bins`` bins holding
    about equal numbers of times (edges that coincide, from tied times, are merged)."""
    if bins < 1:
        raise ValueError(f"the number of VPC bins must be >= 1 (got {bins})")
    time = np.asarray(time, dtype=float)
    if time.size == 0:
        raise ValueError("no observations to bin")
    edges = np.unique(np.quantile(time, np.linspace(0.0, 1.0, bins + 1)))
    return edges if edges.size > 1 else np.repeat(edges, 2)


def assign_bins(time: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """0-based bin ``(n,)`` of each time: bin k is ``[edges[k], edges[k+1])``, the last bin
    closed; times outside the edges go to the first or last bin."""
    index = np.searchsorted(edges, np.asarray(time, dtype=float), side="right") - 1
    return np.clip(index, 0, len(edges) - 2)


def _check_probabilities(quantiles: Sequence[float], interval: float) -> tuple[float, ...]:
    qs = tuple(float(q) for q in quantiles)
    if not qs or not all(0.0 < q < 1.0 for q in qs) or not 0.0 < interval < 1.0:
        raise ValueError(
            f"VPC quantiles and interval must lie in (0, 1) (got {list(qs)}, {interval})"
        )
    return qs


def vpc_statistics(
    observed: pd.DataFrame,
    simulated: pd.DataFrame,
    bins: int = 8,
    quantiles: Sequence[float] = QUANTILES,
    interval: float = INTERVAL,
) -> pd.DataFrame:
    """Observed percentiles of DV per CMT and time bin, and their simulated intervals.

    For each observed CMT and each bin of :func:`time_bin_edges` of its observed times, and
    each ``quantile`` q: ``observed`` is the q-quantile of the observed DVs in the bin; the
    q-quantile of the simulated DVs in the bin is taken in every replicate, and ``sim_lo``,
    ``sim_median``, ``sim_hi`` are the (1 - interval)/2, 0.5 and (1 + interval)/2 quantiles
    of those across replicates (NaN if no replicate has rows in the bin).

    Returns:
        One row per (CMT, bin, quantile), columns :data:`STAT_COLUMNS`: ``bin`` (0-based),
        ``time_lo``/``time_hi`` (bin edges), ``time_mid`` (median observed TIME in the bin),
        ``n_obs`` (observations in the bin), ``quantile`` and the percentile values (DV units).
    """
    qs = _check_probabilities(quantiles, interval)
    spread = [(1.0 - interval) / 2.0, 0.5, (1.0 + interval) / 2.0]
    parts = []
    for cmt, obs in observed.groupby("CMT", sort=True):
        edges = time_bin_edges(obs["TIME"].to_numpy(), bins)
        obs_bin = assign_bins(obs["TIME"].to_numpy(), edges)
        sim = simulated[simulated["CMT"] == cmt]
        sim_bin = assign_bins(sim["TIME"].to_numpy(), edges)
        by_bin = obs.groupby(obs_bin)
        observed_q = by_bin["DV"].quantile(list(qs)).rename("observed")
        per_rep = sim.groupby([sim["REP"].to_numpy(), sim_bin])["DV"].quantile(list(qs))
        per_rep.index.names = ["REP", "bin", "quantile"]
        bands = per_rep.groupby(level=["bin", "quantile"]).quantile(spread).unstack()
        bands = bands.reindex(columns=spread).set_axis(["sim_lo", "sim_median", "sim_hi"], axis=1)
        table = observed_q.to_frame()
        table.index.names = ["bin", "quantile"]
        table = table.join(bands).reset_index()
        bin_index = table["bin"].to_numpy()
        table.insert(0, "CMT", cmt)
        table["time_lo"] = edges[bin_index]
        table["time_hi"] = edges[bin_index + 1]
        table["time_mid"] = by_bin["TIME"].median().reindex(bin_index).to_numpy()
        table["n_obs"] = by_bin.size().reindex(bin_index).to_numpy()
        parts.append(table)
    if not parts:
        raise ValueError("no observations for a VPC")
    return pd.concat(parts, ignore_index=True)[STAT_COLUMNS]


def vpc_coverage(stats: pd.DataFrame) -> float:
    """Fraction of the observed percentiles of ``stats`` (:func:`vpc_statistics`) inside their
    simulated interval ``[sim_lo, sim_hi]`` (rows with NaN count as outside)."""
    inside = (stats["observed"] >= stats["sim_lo"]) & (stats["observed"] <= stats["sim_hi"])
    return float(inside.mean()) if len(stats) else float("nan")


def vpc_figure(
    observed: pd.DataFrame,
    simulated: pd.DataFrame,
    bins: int = 8,
    quantiles: Sequence[float] = QUANTILES,
    interval: float = INTERVAL,
    log_y: bool = False,
    stats: pd.DataFrame | None = None,
) -> Figure:
    """The VPC plot: one panel per observed CMT (TIME on x, DV on y).

    Raw observations as grey points; observed percentiles per bin as lines through the bins'
    median times (the percentile nearest 0.5 solid red, the others dashed blue); the
    simulated ``interval`` of each percentile as a shaded band of the same colour; bin edges
    as thin vertical lines. Lines and bands span the whole observed time range: the first
    and last bins' values are held to the outer bin edges. ``stats``: :func:`vpc_statistics`
    of the same tables and arguments when already computed.
    """
    if stats is None:
        stats = vpc_statistics(observed, simulated, bins, quantiles, interval)
    cmts = list(stats["CMT"].unique())
    qs = sorted(stats["quantile"].unique())
    central = min(qs, key=lambda q: abs(q - 0.5))
    fig = Figure(figsize=(6.4 * len(cmts), 4.8), layout="constrained")
    axes = fig.subplots(1, len(cmts), squeeze=False)[0]
    for ax, cmt in zip(axes, cmts, strict=True):
        obs = observed[observed["CMT"] == cmt]
        part = stats[stats["CMT"] == cmt]
        draw_vpc_panel(ax, obs, part, central, log_y)
        title = "VPC" if len(cmts) == 1 else f"VPC, CMT {cmt}"
        ax.set(xlabel="TIME", ylabel="DV", title=title)
    fig.legend(handles=vpc_legend(qs, central, interval), fontsize="small",
               loc="outside lower center", ncol=3 if len(cmts) > 1 else 2)
    return fig


def draw_vpc_panel(
    ax, obs: pd.DataFrame, part: pd.DataFrame, central: float, log_y: bool = False
) -> None:
    """Draw one VPC panel on ``ax``: the points of ``obs`` (TIME, DV), and the observed
    percentiles and simulated bands of ``part`` (rows of :func:`vpc_statistics`)."""
    part = part.sort_values(["quantile", "bin"])
    ax.scatter(obs["TIME"], obs["DV"], s=9, color="0.55", alpha=0.6, zorder=1)
    for q, rows in part.groupby("quantile"):
        colour, style, alpha = _style(q == central)
        x, lo, hi, mid = _span(rows)
        ax.fill_between(x, lo, hi, color=colour, alpha=alpha, linewidth=0, zorder=2)
        ax.plot(x, mid, color=colour, linestyle=style, linewidth=1.8, zorder=3)
        ax.plot(rows["time_mid"], rows["observed"], color=colour, linestyle="",
                marker="o", markersize=3, zorder=3)
    for edge in np.unique(np.concatenate([part["time_lo"], part["time_hi"]])):
        ax.axvline(edge, color="0.85", linewidth=0.6, zorder=0)
    if log_y:
        _log_axis(ax, obs["DV"], part)


def _span(rows: pd.DataFrame) -> tuple[np.ndarray, ...]:
    """``(x, sim_lo, sim_hi, observed)`` of one percentile's rows (sorted by bin), from the
    first bin's lower edge through the bins' median times to the last bin's upper edge."""
    x = np.concatenate([[rows["time_lo"].iloc[0]], rows["time_mid"], [rows["time_hi"].iloc[-1]]])

    def held(column: str) -> np.ndarray:
        v = rows[column].to_numpy()
        return np.concatenate([v[:1], v, v[-1:]])

    return x, held("sim_lo"), held("sim_hi"), held("observed")


def _style(central: bool) -> tuple[str, str, float]:
    """``(colour, line style, band alpha)`` of the central or an outer percentile."""
    return ("tab:red", "-", 0.3) if central else ("tab:blue", "--", 0.2)


def vpc_legend(qs: list[float], central: float, interval: float) -> list:
    """Legend entries of :func:`vpc_figure`, each once: points, observed percentiles, and the
    simulated interval of each group of percentiles (central, outer)."""
    handles: list = [Line2D([], [], color="0.55", marker="o", linestyle="", label="observations")]
    for group in ([central], [q for q in qs if q != central]):
        if group:
            colour, style, alpha = _style(group[0] == central)
            names = "/".join(f"{100 * q:g}th" for q in group)
            handles += [
                Line2D([], [], color=colour, linestyle=style, marker="o", markersize=3,
                       label=f"observed {names}"),
                Patch(color=colour, alpha=alpha,
                      label=f"simulated {names}, {interval:.0%} interval"),
            ]
    return handles


def _log_axis(ax, dv: pd.Series, part: pd.DataFrame) -> None:
    """Log y-axis limited to the positive values shown (non-positive ones are not drawn)."""
    values = np.concatenate(
        [dv.to_numpy(), part[["observed", "sim_lo", "sim_hi"]].to_numpy().ravel()]
    )
    positive = values[np.isfinite(values) & (values > 0)]
    ax.set_yscale("log")
    if positive.size:
        ax.set_ylim(positive.min() / 1.5, positive.max() * 1.5)


def save_vpc(
    observed: pd.DataFrame, simulated: pd.DataFrame, path: str | Path, **kwargs
) -> Path:
    """Write :func:`vpc_figure` of the tables (``kwargs`` passed on) as a PNG at ``path``."""
    path = Path(path)
    vpc_figure(observed, simulated, **kwargs).savefig(path, dpi=100)
    return path
