"""Evaluation of a model at fixed parameters on a set of subjects: η̂, log-likelihood, tables.

The one place where an estimator's per-subject results are turned into diagnostics; used after
a fit (fit and held-out subjects) and by :class:`deepnlme.fitted.FittedModel` on new subjects.
"""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd
from torch import Tensor

from deepnlme.data.population import Population
from deepnlme.diagnostics.ebes import ebe_table
from deepnlme.diagnostics.predictions import Predictions, predict, prediction_table, rmse
from deepnlme.model.base import NLMEModel


@dataclass
class Evaluation:
    """Results for N subjects at fixed parameters."""

    population: Population
    subject_loglik: Tensor  # (N,) marginal log-likelihood of each subject
    eta: Tensor  # (N, K) empirical Bayes estimates η̂
    predictions: Predictions  # PRED / IPRED / IWRES, each (N, T)
    ebes: pd.DataFrame  # per subject: ID, split, loglik, eta_<name>, individual parameters
    split: str

    @property
    def loglik(self) -> float:
        """Marginal log-likelihood of all N subjects (all constants included)."""
        return float(self.subject_loglik.sum())

    def metrics(self) -> dict[str, float | int]:
        """``n_subjects, n_obs, loglik, rmse_ipred`` (at η̂) and ``rmse_pred`` (at η = 0)."""
        pop = self.population
        return {
            "n_subjects": len(pop),
            "n_obs": pop.n_obs,
            "loglik": self.loglik,
            "rmse_ipred": rmse(self.predictions.ipred, pop),
            "rmse_pred": rmse(self.predictions.pred, pop),
        }

    def prediction_table(self) -> pd.DataFrame:
        """Per observation: ID, TIME, DV, PRED, IPRED, IWRES, CMT, split."""
        return prediction_table(self.population, self.predictions, self.split)


def evaluate(model: NLMEModel, estimator, pop: Population, split: str = "fit") -> Evaluation:
    """η̂ from each subject's own data (modes found from η = 0), log-likelihood, predictions.

    ``estimator`` is any object with ``subject_loglik(pop, warm_start)`` and ``modes(pop)``
    (e.g. :class:`~deepnlme.inference.laplace.LaplaceEstimator`); parameters stay fixed.
    """
    subject_loglik = estimator.subject_loglik(pop, warm_start=False).detach()
    eta = estimator.modes(pop)  # warm-started at the modes just found
    ebes = ebe_table(model, pop, eta, subject_loglik, split)
    return Evaluation(pop, subject_loglik, eta, predict(model, pop, eta), ebes, split)
