"""Diagnostics: pure functions of a model, an estimator and a population (no Lightning).

EBEs, PRED/IPRED/IWRES, held-out metrics, parameter summaries, tables and plots, visual
predictive checks; the covariance step, parameter table, CWRES/NPDE, shrinkage, the reviewer's
plot set and report.md (:func:`write_all`).
"""

from deepnlme.diagnostics.covariance import covariance_step
from deepnlme.diagnostics.ebes import ebe_table
from deepnlme.diagnostics.estimates import (
    estimates_table,
    omega_blocks,
    param_values,
    standard_errors,
)
from deepnlme.diagnostics.evaluation import Evaluation, evaluate
from deepnlme.diagnostics.metrics import objective_summary
from deepnlme.diagnostics.plots import gof_figure, save_gof
from deepnlme.diagnostics.predictions import Predictions, predict, prediction_table, rmse
from deepnlme.diagnostics.report import (
    likelihood_summary,
    parameter_summary,
    write_results,
    write_tables,
)
from deepnlme.diagnostics.simulation import sample_eta, simulate
from deepnlme.diagnostics.solver_check import integration_error, integration_warnings
from deepnlme.diagnostics.vpc import save_vpc, vpc_coverage, vpc_figure, vpc_statistics
from deepnlme.diagnostics.write import DiagnosticOptions, write_all

__all__ = [
    "DiagnosticOptions",
    "Evaluation",
    "Predictions",
    "covariance_step",
    "ebe_table",
    "estimates_table",
    "evaluate",
    "gof_figure",
    "integration_error",
    "integration_warnings",
    "likelihood_summary",
    "objective_summary",
    "omega_blocks",
    "param_values",
    "parameter_summary",
    "predict",
    "prediction_table",
    "rmse",
    "sample_eta",
    "save_gof",
    "save_vpc",
    "simulate",
    "standard_errors",
    "vpc_coverage",
    "vpc_figure",
    "vpc_statistics",
    "write_all",
    "write_results",
    "write_tables",
]
