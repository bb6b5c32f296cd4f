"""LightningModule: the Lightning face of an estimator (orchestration only, no math).

Each training epoch is one full-batch step of L-BFGS (``iterations_per_epoch`` iterations); the
loss is whatever the injected estimator says (e.g. -Σ_i log p(y_i) for Laplace/FOCEI).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor

from deepnlme.data.population import Population
from deepnlme.fitted import CHECKPOINT_KEY
from deepnlme.inference.optimize import MemoizedObjective, OuterOptions, make_lbfgs, trainable


class NLMEFitModule(pl.LightningModule):
    """Fits ``estimator.model`` (a submodule here) by minimizing ``estimator.loss(batch)``.

    Args:
        estimator: object with ``.model`` and ``.loss(pop) -> scalar``.
        outer: L-BFGS options (lr, tolerances, history).
        iterations_per_epoch: L-BFGS iterations per Lightning epoch (per ``step`` call).
        metadata: plain data saved in every checkpoint under ``"deepnlme"``
            (see :func:`deepnlme.fitted.checkpoint_metadata`).
    """

    def __init__(
        self,
        estimator: Any,
        outer: OuterOptions | None = None,
        iterations_per_epoch: int = 20,
        metadata: Mapping[str, Any] | None = None,
    ):
        super().__init__()
        self.estimator = estimator
        self.objective = MemoizedObjective(estimator)  # no point evaluated twice
        self.model = estimator.model
        self.outer = outer or OuterOptions()
        self.iterations_per_epoch = int(iterations_per_epoch)
        self.metadata = dict(metadata or {})

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return make_lbfgs(trainable(self.model), self.outer, max_iter=self.iterations_per_epoch)

    def training_step(self, batch: Population, batch_idx: int) -> Tensor:
        return self.objective.loss(batch)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint[CHECKPOINT_KEY] = self.metadata
