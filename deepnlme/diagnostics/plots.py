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
