"""The end-of-fit summary (console text, as NONMEM's output and Pumas' ``show(fit)``) and the
run's ``report.md`` (tables and the PNGs, for a reviewer who does not open CSVs)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pandas as pd

from deepnlme.diagnostics.coeftable import format_table, markdown_table
from deepnlme.diagnostics.covariance import CovarianceStep


def _fmt(value: Any, spec: str = ".4f") -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    return format(value, spec) if isinstance(value, (int, float)) else str(value)


def key_figures(results: Mapping[str, Any], step: CovarianceStep | None) -> list[str]:
    """Lines: data size, loglik/OFV, convergence, covariance step, NPDE moments."""
    lines = [
        f"model {results.get('model', '?')}, method {results.get('method', '?')}, "
        f"data {results.get('data', '?')}: {results.get('n_subjects', '?')} subjects, "
        f"{results.get('n_obs', '?')} observations",
        f"loglik {_fmt(results.get('loglik'))}   OFV (-2LL) {_fmt(results.get('ofv'))}   "
        f"OFV (NONMEM, no n·log 2π) {_fmt(results.get('ofv_nonmem'))}   "
        f"AIC {_fmt(results.get('aic'))}   BIC {_fmt(results.get('bic'))}",
    ]
    if "converged" in results:
        grad = _fmt(results.get("grad_max"), ".2e")
        lines.append(
            f"converged {results['converged']} (max |gradient| {grad}, "
            f"{results.get('n_iter', '?')} iterations, {results.get('stop_reason', '')})"
        )
    if step is not None:
        method = "R⁻¹ (inverse Hessian)" if step.method == "r" else "sandwich R⁻¹SR⁻¹"
        lines.append(
            f"covariance step ({method}): {step.status}; condition number "
            f"{_fmt(step.condition_number, '.4g')}"
        )
    if "diagnostics_seconds" in results:
        lines.append(f"diagnostics written in {results['diagnostics_seconds']:.1f} s")
    if "npde" in results:
        n = results["npde"]
        lines.append(
            f"NPDE ({n['n_sim']} simulations): mean {_fmt(n['mean'], '.3f')}, variance "
            f"{_fmt(n['variance'], '.3f')} (expected 0 and 1)"
        )
    return lines


def shrinkage_lines(shrink: pd.DataFrame | None) -> list[str]:
    """ETABAR and shrinkage, one line per η and one for ε."""
    if shrink is None:
        return []
    lines = []
    for row in shrink.itertuples(index=False):
        if row.eta.startswith("eps"):
            lines.append(f"ε-shrinkage (SD) {row.shrinkage_sd_pct:.1f}%")
        else:
            lines.append(
                f"η {row.eta}: ETABAR {row.etabar:.4g} (SE {row.se:.3g}, p = {row.p_value:.3f}), "
                f"shrinkage (SD) {row.shrinkage_sd_pct:.1f}%"
            )
    return lines


def console_summary(
    results: Mapping[str, Any],
    params: pd.DataFrame,
    step: CovarianceStep | None,
    shrink: pd.DataFrame | None,
) -> str:
    """The text printed at the end of a fit: key figures, parameter table, shrinkage."""
    rule = "-" * 100
    return "\n".join(
        [rule, *key_figures(results, step), rule, format_table(params), rule,
         *shrinkage_lines(shrink), rule]
    )


def write_report(
    path: str | Path,
    results: Mapping[str, Any],
    params: pd.DataFrame,
    step: CovarianceStep | None,
    shrink: pd.DataFrame | None,
    figures: Mapping[str, list[str]],
) -> Path:
    """``report.md``: key figures, parameter table, covariance step (correlations,
    eigenvalues), ETABAR and shrinkage, then every figure by section."""
    path = Path(path)
    parts = ["# Fit report", "", *[f"- {line}" for line in key_figures(results, step)], ""]
    parts += [
        "## Parameters",
        "",
        "Scales: θ natural; Ω as variance, SD and CV% (log-normal, 100·√(exp(ω²)−1)), "
        "off-diagonals as covariance and correlation; σ as SD and variance. "
        "95% CI = estimate ± 1.96·SE.",
        "",
        markdown_table(params),
        "",
    ]
    if step is not None:
        parts += ["## Covariance step", "", f"Method `{step.method}`, status: {step.status}.", ""]
        if step.ok:
            corr = pd.DataFrame(step.correlation.cpu().numpy(), columns=step.labels)
            corr.insert(0, "", step.labels)
            eig = ", ".join(f"{v:.4g}" for v in step.eigenvalues.tolist())
            parts += [
                "Correlation matrix of the estimates:",
                "",
                markdown_table(corr, digits=3),
                "",
                f"Eigenvalues of the correlation matrix: {eig}; condition number "
                f"{step.condition_number:.4g}.",
                "",
            ]
    if shrink is not None:
        parts += ["## ETABAR and shrinkage", "", markdown_table(shrink), ""]
    for section, names in figures.items():
        parts += [f"## {section}", ""]
        parts += [f"![{name}]({name})" for name in names]
        parts.append("")
    path.write_text("\n".join(parts))
    return path
