"""Run outputs: the results.json summary and the CSV/PNG files of a run directory."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from deepnlme.diagnostics.estimates import estimates_table, omega_blocks, param_values
from deepnlme.diagnostics.evaluation import Evaluation
from deepnlme.diagnostics.metrics import objective_summary
from deepnlme.diagnostics.plots import save_gof
from deepnlme.model.base import NLMEModel


def likelihood_summary(model: NLMEModel, evaluation: Evaluation) -> dict[str, Any]:
    """``n_subjects, n_obs, loglik, ofv, ofv_nonmem, aic, bic, n_parameters`` of a fit."""
    pop = evaluation.population
    n_parameters = model.n_free_parameters()
    return {
        "n_subjects": len(pop),
        "n_obs": pop.n_obs,
        "loglik": evaluation.loglik,
        **objective_summary(evaluation.loglik, n_parameters, pop.n_obs),
        "n_parameters": n_parameters,
    }


def parameter_summary(model: NLMEModel) -> dict[str, Any]:
    """``params`` (every declared parameter, natural scale) and ``omega`` (per block)."""
    return {"params": param_values(model), "omega": omega_blocks(model)}


def _finite(value: Any) -> Any:
    """JSON-safe copy: non-finite floats become None (strict JSON has no NaN/Infinity)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Mapping):
        return {str(k): _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def to_json(value: Any, indent: int = 2, _level: int = 0) -> str:
    """Strict JSON, indented, with lists of scalars (and matrices' rows) kept on one line."""
    value = _finite(value)
    pad, inner = " " * indent * _level, " " * indent * (_level + 1)
    if isinstance(value, Mapping) and value:
        items = [
            f"{inner}{json.dumps(k)}: {to_json(v, indent, _level + 1)}" for k, v in value.items()
        ]
        return "{\n" + ",\n".join(items) + f"\n{pad}}}"
    if isinstance(value, list) and any(isinstance(v, (list, Mapping)) for v in value):
        items = [f"{inner}{to_json(v, indent, _level + 1)}" for v in value]
        return "[\n" + ",\n".join(items) + f"\n{pad}]"
    return json.dumps(value)


def write_results(path: str | Path, results: Mapping[str, Any]) -> Path:
    """Write ``results`` as strict JSON (:func:`to_json`)."""
    path = Path(path)
    path.write_text(to_json(results) + "\n")
    return path


def write_tables(
    out_dir: str | Path,
    evaluations: Sequence[Evaluation],
    model: NLMEModel | None = None,
    se: Mapping[str, Any] | None = None,
    predictions: pd.DataFrame | None = None,
) -> list[Path]:
    """``predictions.csv``, ``ebes.csv`` (all evaluations, with their split), ``estimates.csv``
    (when ``model`` is given; with an ``se`` column when ``se`` is) and ``gof.png`` in
    ``out_dir``. ``predictions``: the per-observation table to write (default: the
    evaluations' :meth:`~deepnlme.diagnostics.evaluation.Evaluation.prediction_table`)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if predictions is None:
        predictions = pd.concat([e.prediction_table() for e in evaluations], ignore_index=True)
    ebes = pd.concat([e.ebes for e in evaluations], ignore_index=True)
    written = [out / "predictions.csv", out / "ebes.csv"]
    predictions.to_csv(written[0], index=False)
    ebes.to_csv(written[1], index=False)
    if model is not None:
        written.append(out / "estimates.csv")
        estimates_table(model, se).to_csv(written[-1], index=False)
    written.append(save_gof(predictions, out / "gof.png"))
    return written
