"""Goodness-of-fit plots from a predictions table (no pyplot state: safe on headless machines)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure


def gof_figure(table: pd.DataFrame) -> Figure:
    """DV vs PRED, DV vs IPRED (identity lines) and IWRES vs TIME, coloured by ``split``.

    ``table`` has the columns of :func:`~deepnlme.diagnostics.predictions.prediction_table`.
    """
    fig = Figure(figsize=(13, 4.2), layout="constrained")
    axes = fig.subplots(1, 3)
    splits = table["split"].unique() if "split" in table else [None]
    for split in splits:
        part = table if split is None else table[table["split"] == split]
        kw = {"s": 12, "alpha": 0.7, "label": split}
        axes[0].scatter(part["PRED"], part["DV"], **kw)
        axes[1].scatter(part["IPRED"], part["DV"], **kw)
        axes[2].scatter(part["TIME"], part["IWRES"], **kw)
    for ax, column in zip(axes[:2], ["PRED", "IPRED"], strict=True):
        values = np.concatenate([table[column].to_numpy(), table["DV"].to_numpy()])
        values = values[np.isfinite(values)]
        lo, hi = (values.min(), values.max()) if values.size else (0.0, 1.0)
        ax.plot([lo, hi], [lo, hi], color="black", linewidth=1)
        ax.set(xlabel=column, ylabel="DV", title=f"DV vs {column}")
    axes[2].axhline(0.0, color="black", linewidth=1)
    axes[2].set(xlabel="TIME", ylabel="IWRES", title="IWRES vs TIME")
    if len(splits) > 1:
        axes[0].legend()
    return fig


def save_gof(table: pd.DataFrame, path: str | Path) -> Path:
    """Write :func:`gof_figure` of ``table`` as a PNG at ``path``."""
    path = Path(path)
    gof_figure(table).savefig(path, dpi=100)
    return path


# --------------------------------------------------------------------- reviewer's plot set
def panel_figure(nrow: int, ncol: int, width: float, height: float, title: bool = False):
    """``(figure, axes (nrow, ncol))`` with fixed margins (inches) around panels of
    ``width`` x ``height`` inches: a constrained layout would double the drawing time of
    figures with many panels. ``title``: room for a figure title."""
    fig_w, fig_h = ncol * width + 0.3, nrow * height + 0.2 + 0.35 * title
    fig = Figure(figsize=(fig_w, fig_h))
    fig.subplots_adjust(
        left=0.75 / fig_w, right=1 - 0.2 / fig_w, bottom=0.6 / fig_h,
        top=1 - (0.4 + 0.35 * title) / fig_h, wspace=0.35, hspace=0.5,
    )
    return fig, fig.subplots(nrow, ncol, squeeze=False)


def loess(x: np.ndarray, y: np.ndarray, frac: float = 0.6, n_points: int = 50):
    """Local linear smoother (tricube weights, span ``frac`` of the points), evaluated on
    ``n_points`` values across the range of ``x``: returns ``(grid, fit)`` (empty when there
    are fewer than 5 finite points)."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    keep = np.isfinite(x) & np.isfinite(y)
    x, y = x[keep], y[keep]
    if x.size < 5 or np.ptp(x) == 0:
        return np.empty(0), np.empty(0)
    grid = np.linspace(x.min(), x.max(), n_points)
    k = max(int(np.ceil(frac * x.size)), 3)
    dist = np.abs(x[None, :] - grid[:, None])  # (G, n)
    h = np.sort(dist, axis=1)[:, k - 1][:, None]
    h = np.where(h > 0, h, 1.0)
    w = np.clip(1 - (dist / h) ** 3, 0, None) ** 3
    sw, swx, swy = w.sum(1), (w * x).sum(1), (w * y).sum(1)
    swxx, swxy = (w * x * x).sum(1), (w * x * y).sum(1)
    det = sw * swxx - swx**2
    safe = np.abs(det) > 1e-12 * np.maximum(sw * swxx, 1e-300)
    slope = np.where(safe, (sw * swxy - swx * swy) / np.where(safe, det, 1.0), 0.0)
    intercept = (swy - slope * swx) / np.where(sw > 0, sw, 1.0)
    return grid, intercept + slope * grid


def _scatter_smooth(ax, x, y) -> None:
    """Points and their :func:`loess` smoother (red)."""
    ax.scatter(x, y, s=10, alpha=0.6, color="tab:blue")
    gx, gy = loess(x, y)
    if gx.size:
        ax.plot(gx, gy, color="tab:red", linewidth=1.6, label="smoother")


def _identity(ax, *columns) -> None:
    values = np.concatenate([np.asarray(c, dtype=float) for c in columns])
    values = values[np.isfinite(values)]
    if ax.get_xscale() == "log":
        values = values[values > 0]
    if values.size:
        lo, hi = values.min(), values.max()
        ax.plot([lo, hi], [lo, hi], color="black", linewidth=1, label="identity")


def dv_pred_figure(table: pd.DataFrame) -> Figure:
    """DV vs PRED and DV vs IPRED on linear (top) and log-log (bottom) axes, with the identity
    line and a local linear smoother (red). ``table``: predictions with DV, PRED, IPRED."""
    fig, axes = panel_figure(2, 2, 4.8, 4.2)
    for row, log in enumerate((False, True)):
        for col, column in enumerate(("PRED", "IPRED")):
            ax = axes[row, col]
            part = table
            if log:
                part = table[(table[column] > 0) & (table["DV"] > 0)]
                ax.set(xscale="log", yscale="log")
                x, y = np.log10(part[column]), np.log10(part["DV"])
                ax.scatter(part[column], part["DV"], s=10, alpha=0.6, color="tab:blue")
                gx, gy = loess(x, y)
                if gx.size:
                    ax.plot(10**gx, 10**gy, color="tab:red", linewidth=1.6, label="smoother")
            else:
                _scatter_smooth(ax, part[column], part["DV"])
            _identity(ax, part[column], part["DV"])
            scale = "log scale" if log else "linear scale"
            ax.set(xlabel=column, ylabel="DV", title=f"DV vs {column} ({scale})")
    axes[0, 0].legend(fontsize="small")
    return fig


def residual_figure(table: pd.DataFrame, x_time: str = "TIME") -> Figure:
    """CWRES vs time, CWRES vs PRED, |IWRES| vs IPRED (and CWRES vs time after dose when the
    table has TAD), each with a smoother and reference lines (0, ±2 for CWRES)."""
    panels = [("TIME", "CWRES"), ("PRED", "CWRES"), ("IPRED", "|IWRES|")]
    if "TAD" in table:
        panels.insert(1, ("TAD", "CWRES"))
    fig, axes = panel_figure(1, len(panels), 4.4, 3.8)
    axes = axes[0]
    for ax, (x, y) in zip(axes, panels, strict=True):
        values = table["IWRES"].abs() if y == "|IWRES|" else table[y]
        _scatter_smooth(ax, table[x], values)
        if y == "CWRES":
            ax.axhline(0, color="black", linewidth=1)
            for level in (-2, 2):
                ax.axhline(level, color="0.5", linewidth=0.8, linestyle=":")
        xlabel = "time after dose" if x == "TAD" else x
        ax.set(xlabel=xlabel, ylabel=y, title=f"{y} vs {xlabel}")
    return fig


def qq_figure(table: pd.DataFrame, columns: tuple[str, ...] = ("CWRES", "NPDE")) -> Figure:
    """Normal QQ plots of the given residual columns (those present with finite values),
    with the identity line: points on it mean N(0, 1) residuals."""
    from scipy import stats

    columns = tuple(c for c in columns if c in table and np.isfinite(table[c]).any())
    fig, axes = panel_figure(1, max(len(columns), 1), 4.4, 4.0)
    axes = axes[0]
    for ax, column in zip(axes, columns, strict=False):
        values = np.sort(table[column].to_numpy(dtype=float))
        values = values[np.isfinite(values)]
        n = values.size
        theory = stats.norm.ppf((np.arange(1, n + 1) - 0.5) / n)
        ax.scatter(theory, values, s=10, alpha=0.6, color="tab:blue")
        lim = np.nanmax(np.abs(np.concatenate([theory, values]))) if n else 1.0
        ax.plot([-lim, lim], [-lim, lim], color="black", linewidth=1)
        ax.set(xlabel="N(0, 1) quantiles", ylabel=f"{column} quantiles", title=f"QQ plot, {column}")
        ax.text(0.03, 0.95, f"mean {values.mean():.3f}\nvariance {values.var(ddof=1):.3f}",
                transform=ax.transAxes, va="top", fontsize="small")
    return fig


def eta_histogram_figure(
    ebes: pd.DataFrame, eta_names: list[str], omega_sd: list[float], shrinkage: dict
) -> Figure:
    """Histogram of η̂ per random effect with the N(0, ω²) density of the model (line);
    the title gives the η-shrinkage (η̂ narrower than the line: shrinkage)."""
    from scipy import stats

    fig, axes = panel_figure(1, len(eta_names), 4.0, 3.4)
    axes = axes[0]
    for ax, name, sd in zip(axes, eta_names, omega_sd, strict=True):
        values = ebes[f"eta_{name}"].to_numpy(dtype=float)
        ax.hist(values, bins="auto", density=True, color="tab:blue", alpha=0.6, label="η̂")
        lim = max(3 * sd, np.abs(values).max() if values.size else 0)
        grid = np.linspace(-lim, lim, 200)
        ax.plot(grid, stats.norm.pdf(grid, scale=sd), color="black", label="N(0, ω²)")
        shr = shrinkage.get(name, float("nan"))
        ax.set(xlabel=f"eta_{name}", ylabel="density",
               title=f"η {name}: shrinkage {100 * shr:.1f}%")
    axes[0].legend(fontsize="small")
    return fig


def eta_covariate_figure(ebes: pd.DataFrame, eta_names: list[str], covariates: pd.DataFrame):
    """η̂ (rows) against each covariate (columns), with a smoother and a zero line (a box per
    level for covariates with at most 4 values): a trend suggests a covariate effect the
    model lacks. None when there are no covariates."""
    if covariates.shape[1] == 0:
        return None
    names = list(covariates.columns)
    fig, axes = panel_figure(len(eta_names), len(names), 3.2, 2.6, title=True)
    for i, eta in enumerate(eta_names):
        for j, cov in enumerate(names):
            ax = axes[i, j]
            x = covariates[cov].to_numpy(dtype=float)
            y = ebes[f"eta_{eta}"].to_numpy(dtype=float)
            levels = np.unique(x[np.isfinite(x)])
            if levels.size <= 4:  # categorical: a box per level
                ax.boxplot([y[x == v] for v in levels], positions=range(levels.size))
                ax.set_xticks(range(levels.size), [f"{v:g}" for v in levels])
            else:
                _scatter_smooth(ax, x, y)
            ax.axhline(0, color="black", linewidth=0.8)
            ax.set(xlabel=cov, ylabel=f"eta_{eta}")
    fig.suptitle("η̂ vs covariates")
    return fig


def individual_figures(
    table: pd.DataFrame,
    curves: pd.DataFrame | None = None,
    per_page: int = 12,
    max_pages: int | None = None,
) -> list[Figure]:
    """Individual fits, ``per_page`` subjects a page (at most ``max_pages`` pages, the first
    subjects): observations (points), IPRED (solid) and PRED (dashed). ``curves`` (ID, TIME,
    IPRED, PRED on a fine time grid) draws smooth lines; without it lines join the
    observation times."""
    ids = list(dict.fromkeys(table["ID"]))
    if max_pages is not None:
        ids = ids[: per_page * max_pages]
    figures = []
    for start in range(0, len(ids), per_page):
        page = ids[start : start + per_page]
        ncol = min(4, len(page))
        nrow = -(-len(page) // ncol)
        # fixed margins: a constrained layout of many panels costs seconds per page
        fig = Figure(figsize=(3.4 * ncol, 2.6 * nrow + 0.6))
        fig.subplots_adjust(left=0.07, right=0.98, bottom=0.5 / (2.6 * nrow + 0.6) + 0.04,
                            top=1 - 0.1 / nrow, wspace=0.25, hspace=0.45)
        axes = fig.subplots(nrow, ncol, squeeze=False).ravel()
        for ax, sid in zip(axes, page, strict=False):
            obs = table[table["ID"] == sid]
            lines = obs if curves is None else curves[curves["ID"] == sid]
            ax.plot(lines["TIME"], lines["IPRED"], color="tab:blue", linewidth=1.3, label="IPRED")
            ax.plot(lines["TIME"], lines["PRED"], color="tab:orange", linewidth=1.1,
                    linestyle="--", label="PRED")
            ax.scatter(obs["TIME"], obs["DV"], s=14, color="black", zorder=3, label="DV")
            ax.set_title(f"ID {sid}", fontsize="medium")
            ax.tick_params(labelsize="small")
            ax.locator_params(nbins=4)  # fewer tick labels: quicker to draw, easier to read
        for ax in axes[len(page):]:
            ax.set_axis_off()
        axes[0].legend(fontsize="x-small")
        fig.supxlabel("TIME")
        fig.supylabel("DV")
        figures.append(fig)
    return figures


def convergence_figure(trace: pd.DataFrame) -> Figure:
    """Objective and every estimated scalar (natural scale) against the iteration count.
    ``trace``: one row per recorded iteration, columns ``iteration``, ``ofv`` and one per
    parameter entry."""
    columns = [c for c in trace.columns if c != "iteration"]
    ncol = min(4, len(columns))
    nrow = -(-len(columns) // ncol)
    fig = Figure(figsize=(3.4 * ncol, 2.6 * nrow + 0.7))
    fig.subplots_adjust(left=0.07, right=0.98, bottom=0.6 / (2.6 * nrow + 0.7) + 0.03,
                        top=1 - 0.45 / (2.6 * nrow + 0.7) - 0.05, wspace=0.35, hspace=0.45)
    axes = fig.subplots(nrow, ncol, squeeze=False).ravel()
    for ax, column in zip(axes, columns, strict=False):
        ax.plot(trace["iteration"], trace[column], marker="o", markersize=2.5, linewidth=1.2)
        ax.set_title(column, fontsize="medium")
        ax.tick_params(labelsize="small")
    for ax in axes[len(columns):]:
        ax.set_axis_off()
    fig.supxlabel("L-BFGS iteration")
    fig.suptitle("Parameter convergence")
    return fig
