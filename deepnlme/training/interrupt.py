"""SIGINT/SIGTERM during a fit: finish the current step, keep its checkpoint, stop promptly.

SLURM sends SIGTERM before pre-empting a job, Ctrl-C sends SIGINT. Either one makes the fit stop
at the end of the current epoch (one full-batch L-BFGS step), after ``last.ckpt`` has been
written for that epoch; the command then exits with 128 + the signal number, and
``ckpt_path=RUN/checkpoints/last.ckpt`` resumes. A second signal stops at once (the previous
epoch's ``last.ckpt`` stays).
"""

from __future__ import annotations

import logging
import signal
import threading
from types import FrameType
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback

log = logging.getLogger(__name__)

#: Signals that stop a fit gracefully.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StopOnSignal(Callback):
    """Stops the fit after the step (``at_epoch_end=False``: full-batch fits, one step per
    epoch) or at the end of the epoch (``at_epoch_end=True``: minibatch fits, so that a resumed
    fit starts at an epoch boundary) in which SIGINT or SIGTERM arrived.

    The handlers are installed when training starts (replacing Lightning's SIGTERM handler, which
    would otherwise raise at the end of the epoch) and the previous ones restored when it ends.
    ``received`` is the signal number (None: no signal).
    """

    def __init__(self, at_epoch_end: bool = False) -> None:
        self.received: int | None = None
        self.at_epoch_end = at_epoch_end
        self._previous: dict[int, Any] = {}

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.received = None
        if threading.current_thread() is not threading.main_thread():
            return  # signal handlers can only be set from the main thread
        for signum in STOP_SIGNALS:
            self._previous[signum] = signal.signal(signum, self._handle)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        if self.received is not None:
            self._restore()
            raise KeyboardInterrupt(f"second {name}")
        self.received = signum
        log.warning(
            "%s received: stopping after the current step (its checkpoint is kept); "
            "send it again to stop at once", name,
        )

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch, batch_idx
    ) -> None:
        if self.received is not None and not self.at_epoch_end:
            trainer.should_stop = True

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.received is not None:
            trainer.should_stop = True

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._restore()

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        self._restore()

    def _restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
        self._previous = {}
