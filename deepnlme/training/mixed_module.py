"""Full-batch fits of formula models through Lightning (orchestration only; the math is
:mod:`deepnlme.mixed`).

Each epoch runs up to ``iterations_per_epoch`` iterations of bounded L-BFGS
(:func:`~deepnlme.mixed.optimizer.minimize_bounded`) on the problem's objective, from the point
the previous epoch reached; that point and the iteration counts are buffers of the module, so
the checkpoint written after every epoch (``RUN/checkpoints/last.ckpt``) resumes the fit. The
fit stops when the optimizer stops on its own (converged, or no progress) or after
``max_iter`` iterations in all. SIGINT/SIGTERM stop it after the current epoch.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch

from deepnlme.mixed.optimizer import OptimResult, minimize_bounded
from deepnlme.mixed.problem import FitProblem
from deepnlme.training.callbacks import EveryEpochs
from deepnlme.training.datamodule import SingleBatch

#: Key of the run's description in the training checkpoint.
METADATA_KEY = "deepnlme_mixed_run"


class BoundedFitModule(pl.LightningModule):
    """Steps a :class:`~deepnlme.mixed.problem.FitProblem` in pieces of L-BFGS-B iterations.

    Args:
        problem: objective, start, bounds and report of the fit.
        max_iter: iterations in all.
        iterations_per_epoch: iterations per training step (a checkpoint after each).
        gtol: projected-gradient tolerance of the optimizer.
        metadata: plain data saved in every checkpoint.
    """

    def __init__(self, problem: FitProblem, max_iter: int, iterations_per_epoch: int,
                 gtol: float = 1e-5, metadata: Mapping[str, Any] | None = None) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.problem = problem
        self.max_iter, self.per_epoch, self.gtol = int(max_iter), int(iterations_per_epoch), gtol
        self.metadata = dict(metadata or {})
        self.register_buffer("x", torch.as_tensor(problem.x0, dtype=torch.float64))
        self.register_buffer("counts", torch.zeros(2, dtype=torch.long))  # iterations, evals
        self.result: OptimResult | None = None

    def configure_optimizers(self) -> None:
        return None

    def training_step(self, batch: Any, batch_idx: int) -> None:
        done = int(self.counts[0])
        piece = minimize_bounded(
            self.problem.objective, self.x.detach().cpu().double().numpy(), self.problem.lower,
            self.problem.device, max_iter=max(1, min(self.per_epoch, self.max_iter - done)),
            gtol=self.gtol,
        )
        total = self.counts + torch.as_tensor([piece.n_iter, piece.n_eval],
                                              device=self.counts.device)
        self.result = OptimResult(piece.x, piece.fun, piece.grad_max, int(total[0]),
                                  int(total[1]), piece.success, piece.message)
        with torch.no_grad():
            self.x.copy_(torch.as_tensor(piece.x, dtype=self.x.dtype))
            self.counts.copy_(total)
        self.log_dict({"objective": piece.fun, "grad_max": piece.grad_max},
                      prog_bar=True, on_step=True, on_epoch=False, batch_size=1)
        stopped_itself = piece.n_iter < min(self.per_epoch, self.max_iter - done)
        if stopped_itself or piece.success or self.result.n_iter >= self.max_iter:
            self.trainer.should_stop = True
        return None

    def final(self) -> OptimResult:
        """The minimisation as one result (evaluated again at ``x`` after a resume that had
        nothing left to do)."""
        if self.result is not None:
            return self.result
        x = self.x.detach().cpu().double().numpy()
        opt = minimize_bounded(self.problem.objective, x, self.problem.lower,
                               self.problem.device, max_iter=1, gtol=self.gtol)
        return OptimResult(x, opt.fun, opt.grad_max, int(self.counts[0]), int(self.counts[1]),
                           opt.grad_max < self.gtol, "resumed from a finished fit")

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint[METADATA_KEY] = self.metadata


def fit_full_batch(problem: FitProblem, trainer_cfg: Mapping[str, Any], output_dir: Path,
                   max_iter: int, iterations_per_epoch: int,
                   ckpt_path: str | None = None, metadata: Mapping[str, Any] | None = None,
                   ) -> tuple[OptimResult, float, int | None]:
    """Run ``problem`` through the Lightning trainer of ``trainer_cfg`` (checkpoint every
    epoch, progress bar). Returns ``(optimizer result, fit seconds, signal received or
    None)``."""
    from deepnlme.training.build import LAST_CHECKPOINT, build_trainer
    from deepnlme.training.callbacks import FitTimer
    from deepnlme.training.interrupt import StopOnSignal

    module = BoundedFitModule(problem, max_iter, iterations_per_epoch, metadata=metadata)
    timer, stop = FitTimer(), StopOnSignal()
    epochs = max(1, math.ceil(max_iter / iterations_per_epoch))
    config = {**trainer_cfg, "log_every_n_steps": 1,
              "max_epochs": min(int(trainer_cfg.get("max_epochs") or epochs), epochs)}
    warnings.filterwarnings("ignore", message=r".*returned `None`, this fit will run with no")
    last = Path(output_dir) / "checkpoints" / f"{LAST_CHECKPOINT}.ckpt"
    trainer = build_trainer(config, output_dir, [timer, stop, EveryEpochs(last, 1)])
    trainer.fit(module, train_dataloaders=SingleBatch(torch.zeros(0)), ckpt_path=ckpt_path,
                weights_only=True)
    return module.final(), timer.seconds, stop.received
