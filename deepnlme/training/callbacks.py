"""Callbacks of a fit: convergence (stop + record) and the wall time of the fit alone."""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback, TQDMProgressBar

from deepnlme.inference.optimize import (
    STOP_MAX_EPOCHS,
    RunawayWatch,
    check_start,
    is_converged,
    lbfgs_iterations,
    lbfgs_step_counts,
    objective_and_gradient,
    stop_after_step,
)
from deepnlme.model.params import RandomEffects


class ConvergenceMonitor(Callback):
    """Before the first step: check that the fit can start; after each epoch's L-BFGS step:
    evaluate, log, and stop the fit when done.

    The first batch of a fit (or of a resumed fit) must have observations and a finite
    objective, else :class:`~deepnlme.inference.feasibility.ObjectiveError` (one line naming
    the cause) ends the run. Stops when the loss is not finite, when max |gradient| < ``gtol``,
    after ``max_iter`` iterations in all, or when L-BFGS stopped on its own within the step
    (fewer iterations and evaluations than the step allows: its tolerance on the change of loss
    or parameters fired; "no progress"), or when a parameter has run off to a boundary of its
    domain or is running off to one (:class:`~deepnlme.inference.optimize.RunawayWatch`, from
    one epoch to the next; ``warnings`` names it): not converged, the data do not determine
    it (:func:`~deepnlme.inference.optimize.stop_after_step`, as ``fit`` decides). So a
    fit split into epochs ends where one long L-BFGS run would. Records ``n_iter``,
    ``grad_max``, ``loss``, ``loglik``, ``stop_reason`` and ``converged``
    (:func:`~deepnlme.inference.optimize.is_converged`: a finite objective, max |gradient| <
    ``converged_gtol``, and a stop of the optimizer's own; never after ``max_iter`` or
    ``max_epochs``); its state is saved in checkpoints.
    """

    def __init__(self, gtol: float, converged_gtol: float, max_iter: int) -> None:
        self.gtol = gtol
        self.converged_gtol = converged_gtol
        self.max_iter = max_iter
        self.n_iter = 0
        self.n_evals = 0
        self.grad_max = math.inf
        self.loss = math.inf
        self.loglik = -math.inf
        self.converged = False
        self.stop_reason = ""
        self.warnings: list[str] = []  # parameters running off (RunawayWatch)
        self._checked = False
        self._watch: RunawayWatch | None = None

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch, batch_idx
    ) -> None:
        if not self._checked:
            check_start(pl_module.objective, batch)
            self._checked = True
            self._watch = RunawayWatch(pl_module.estimator.model)
            self._watch.start(pl_module.objective, batch, lbfgs_iterations(trainer.optimizers[0]))

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch, batch_idx
    ) -> None:
        self.n_iter, self.n_evals, stopped_itself = lbfgs_step_counts(
            trainer.optimizers[0], self.n_iter, self.n_evals
        )
        n_iter = self.n_iter
        self.loss, self.loglik, self.grad_max = objective_and_gradient(pl_module.objective, batch)
        pl_module.log_dict(
            {"loss": self.loss, "loglik": self.loglik, "grad_max": self.grad_max},
            prog_bar=True,
            on_step=True,
            on_epoch=False,
            batch_size=1,
        )
        pl_module.log("n_iter", float(n_iter), on_step=True, on_epoch=False, batch_size=1)
        self.stop_reason, self.warnings = stop_after_step(
            pl_module.estimator.model, self._watch, self.loss, self.grad_max, self.gtol, n_iter,
            self.max_iter, stopped_itself,
        )
        self.converged = is_converged(
            self.loss, self.grad_max, self.converged_gtol, self.stop_reason
        )
        if self.stop_reason:
            trainer.should_stop = True

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self.stop_reason:
            self.stop_reason = STOP_MAX_EPOCHS
            self.converged = False

    def summary(self) -> dict[str, Any]:
        """``converged, n_iter, grad_max, stop_reason`` for results.json."""
        return {
            "converged": bool(self.converged),
            "n_iter": int(self.n_iter),
            "grad_max": float(self.grad_max),
            "stop_reason": self.stop_reason,
        }

    def state_dict(self) -> dict[str, Any]:
        return {
            "n_iter": self.n_iter,
            "n_evals": self.n_evals,
            "grad_max": self.grad_max,
            "loss": self.loss,
            "loglik": self.loglik,
            "converged": self.converged,
            "stop_reason": self.stop_reason,
            "warnings": list(self.warnings),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        for key, value in state_dict.items():
            setattr(self, key, value)


class FitTimer(Callback):
    """``seconds``: wall time from ``on_train_start`` to ``on_train_end`` (the fit alone)."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self._start: float | None = None

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._start = time.perf_counter()

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._start is not None:
            self.seconds = time.perf_counter() - self._start


class FitProgressBar(TQDMProgressBar):
    """Lightning's TQDM bar with the logged metrics (loss, loglik, ...) to 7 significant digits."""

    def get_metrics(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, Any]:
        metrics = super().get_metrics(trainer, pl_module)
        return {k: f"{v:.7g}" if isinstance(v, float) else v for k, v in metrics.items()}


class ParameterTrace(Callback):
    """Records the objective and the declared parameters (natural scale) at every objective
    evaluation of the fit; :meth:`table` keeps the best evaluation of each L-BFGS iteration
    (line-search trials that were not taken drop out) for the convergence plot."""

    def __init__(self, max_objective: float = 1e14) -> None:
        self.max_objective = max_objective
        self.records: list[dict[str, float]] = []

    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss) -> None:
        value = float(loss.detach())
        if not math.isfinite(value) or value >= self.max_objective:
            return
        record = {"iteration": float(lbfgs_iterations(trainer.optimizers[0])), "objective": value}
        # "objective": the fit's loss (-log likelihood - log prior)
        for name, p in pl_module.estimator.model.declared().items():
            flat = p.value().detach().reshape(-1).cpu().tolist()
            if len(flat) == 1:
                record[name] = flat[0]
            elif isinstance(p, RandomEffects):  # the variances, by η name
                k = p.k
                record.update({f"{name}[{n},{n}]": flat[i * k + i] for i, n in enumerate(p.names)})
            else:
                record.update({f"{name}[{i}]": v for i, v in enumerate(flat)})
        self.records.append(record)

    def table(self):
        """One row per iteration (its lowest objective): ``iteration``, ``objective`` (the
        fit's loss, -log likelihood), then one column per parameter entry; None if empty."""
        import pandas as pd

        if not self.records:
            return None
        frame = pd.DataFrame(self.records)
        best = frame.groupby("iteration")["objective"].idxmin()
        return frame.loc[best.to_numpy()].reset_index(drop=True)


class EveryEpochs(Callback):
    """Rewrites the checkpoint ``path`` at the end of every ``every``-th epoch (Lightning writes
    it to a temporary file moved into place), so that a killed fit leaves a recent state.
    Unlike ``ModelCheckpoint`` it does not count optimizer steps: SAEM takes none.

    ``stop``: a :class:`~deepnlme.training.interrupt.StopOnSignal`; the epoch in which it
    received a signal (the last one) is written too."""

    def __init__(self, path: Path, every: int, stop: Any = None):
        self.path, self.every, self.stop = Path(path), int(every), stop

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        stopping = self.stop is not None and self.stop.received is not None
        if stopping or (trainer.current_epoch + 1) % self.every == 0:
            trainer.save_checkpoint(self.path)
