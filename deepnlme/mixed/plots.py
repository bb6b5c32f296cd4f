"""Criticism plots of a formula-model fit (no pyplot state): held-out residual histogram and
histograms of every random term's conditional modes (the tutorial's figures)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from deepnlme.mixed.result import ConditionalModes


def save_residual_histogram(residuals: np.ndarray, path: str | Path, title: str) -> Path:
    fig = Figure(figsize=(6, 4))
    ax = fig.subplots()
    ax.hist(residuals, bins=50, color="tab:blue", alpha=0.8)
    ax.set_xlabel("residual (observed − predicted)")
    ax.set_ylabel("rows")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return Path(path)


def save_effect_histograms(modes: list[ConditionalModes], path: str | Path) -> Path:
    panels = [(m.group, name, m.mode[:, j]) for m in modes for j, name in enumerate(m.names)]
    fig = Figure(figsize=(4 * len(panels), 3.5))
    axes = np.atleast_1d(fig.subplots(1, len(panels)))
    for ax, (group, name, values) in zip(axes, panels, strict=True):
        ax.hist(values, bins=min(50, max(5, len(values) // 4)), color="tab:green", alpha=0.8)
        ax.set_title(f"{group}: {name} ({len(values)} levels)")
        ax.set_xlabel("conditional mode")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return Path(path)
