"""The parameter table of a fit (NONMEM's final estimates and SEs, Pumas' ``coeftable``).

One row per estimated number and scale. Each row says its scale:

- θ: ``natural`` (the value the model uses);
- Ω diagonal: ``variance`` (ω², as NONMEM's OMEGA), then ``SD`` (ω) and ``CV% (log-normal)``
  = 100·√(exp(ω²) − 1);
- Ω off-diagonal: ``covariance``, then ``correlation``;
- σ (declared parameters named ``sigma*``, residual SDs by this project's convention):
  ``SD`` (the declared value), then ``variance`` (σ², as NONMEM's SIGMA).

Standard errors of derived rows (SD, CV%, correlation, σ²) follow by the delta method from the
covariance of the estimates; %RSE = 100·SE/|estimate|; 95% CI = estimate ± 1.96·SE (Wald).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import pandas as pd
import torch
from torch import Tensor

from deepnlme.diagnostics.covariance import CovarianceStep, entry_label, table_index
from deepnlme.model.base import NLMEModel
from deepnlme.model.params import RandomEffects

#: Columns of :func:`parameter_table`.
COLUMNS = ["parameter", "scale", "estimate", "se", "rse_pct", "ci_lower", "ci_upper", "fixed"]
#: Normal quantile of the two-sided 95% interval.
Z95 = 1.959963984540054


def _is_sigma(name: str) -> bool:
    return name.lower().startswith("sigma")


def _rows_of(name: str, p) -> list[tuple[str, str, Callable[[Tensor], Tensor], list[str]]]:
    """``(label, scale, f, base labels)`` per row of one parameter: the row's value is
    ``f(x)`` of the natural-scale base entries ``x`` named by ``base labels``."""
    rows = []
    for index in table_index(p):
        label = entry_label(name, p, index)
        if isinstance(p, RandomEffects):
            i, j = index
            if i == j:
                rows += [
                    (label, "variance", lambda x: x[0], [label]),
                    (label, "SD", lambda x: x[0].clamp(min=0).sqrt(), [label]),
                    (
                        label,
                        "CV% (log-normal)",
                        lambda x: 100 * torch.expm1(x[0]).clamp(min=0).sqrt(),
                        [label],
                    ),
                ]
            else:
                var_i = entry_label(name, p, (i, i))
                var_j = entry_label(name, p, (j, j))
                rows += [
                    (label, "covariance", lambda x: x[0], [label]),
                    (
                        label,
                        "correlation",
                        lambda x: x[0] / (x[1] * x[2]).clamp(min=0).sqrt(),
                        [label, var_i, var_j],
                    ),
                ]
        elif _is_sigma(name):
            rows += [
                (label, "SD", lambda x: x[0], [label]),
                (label, "variance", lambda x: x[0] * x[0], [label]),
            ]
        else:
            rows.append((label, "natural", lambda x: x[0], [label]))
    return rows


def parameter_table(model: NLMEModel, step: CovarianceStep | None = None) -> pd.DataFrame:
    """The parameter table (columns :data:`COLUMNS`), SEs from ``step`` when given and
    successful (NaN otherwise, and for fixed parameters)."""
    have_cov = step is not None and step.ok
    position = {label: k for k, label in enumerate(step.labels)} if have_cov else {}
    table = []
    for name, p in model.declared().items():
        value = p.value().detach().cpu()
        for label, scale, f, base in _rows_of(name, p):
            # natural-scale base values, looked up by label on this parameter's value
            x = torch.tensor([_base_value(name, p, value, b) for b in base], dtype=torch.float64)
            estimate = float(f(x))
            se = math.nan
            if have_cov and not p.fixed and all(b in position for b in base):
                idx = [position[b] for b in base]
                xr = x.clone().requires_grad_(True)
                (grad,) = torch.autograd.grad(f(xr), xr)
                cov = step.covariance.cpu().to(torch.float64)[idx][:, idx]
                var = float(grad @ cov @ grad)
                se = math.sqrt(var) if var >= 0 else math.nan
            rse = 100 * se / abs(estimate) if estimate != 0 else math.nan
            table.append(
                {
                    "parameter": label,
                    "scale": scale,
                    "estimate": estimate,
                    "se": se,
                    "rse_pct": rse,
                    "ci_lower": estimate - Z95 * se,
                    "ci_upper": estimate + Z95 * se,
                    "fixed": bool(p.fixed),
                }
            )
    return pd.DataFrame(table, columns=COLUMNS)


def _base_value(name: str, p, value: Tensor, label: str) -> float:
    for index in table_index(p):
        if entry_label(name, p, index) == label:
            return float(value[index]) if index else float(value)
    raise KeyError(label)


def format_table(table: pd.DataFrame) -> str:
    """The parameter table as aligned text (console summary, report)."""
    lines = [
        f"{'parameter':<20} {'scale':<17} {'estimate':>12} {'SE':>11} {'%RSE':>7} "
        f"{'95% CI':>25}"
    ]
    for row in table.itertuples(index=False):
        se = "fixed" if row.fixed else _num(row.se)
        rse = "" if row.fixed or not math.isfinite(row.rse_pct) else f"{row.rse_pct:.1f}"
        ci = "" if not math.isfinite(row.se) else f"[{_num(row.ci_lower)}, {_num(row.ci_upper)}]"
        lines.append(
            f"{row.parameter:<20} {row.scale:<17} {_num(row.estimate):>12} {se:>11} "
            f"{rse:>7} {ci:>25}"
        )
    return "\n".join(lines)


def markdown_table(frame: pd.DataFrame, digits: int = 4) -> str:
    """A data frame as a Markdown table, numbers to ``digits`` significant digits."""

    def cell(v) -> str:
        if isinstance(v, float):
            return "" if math.isnan(v) else f"{v:.{digits}g}"
        return str(v)

    head = "| " + " | ".join(map(str, frame.columns)) + " |"
    rule = "|" + "---|" * len(frame.columns)
    body = ["| " + " | ".join(cell(v) for v in row) + " |" for row in frame.itertuples(False)]
    return "\n".join([head, rule, *body])


def _num(v: float) -> str:
    return "" if not math.isfinite(v) else f"{v:.5g}"
