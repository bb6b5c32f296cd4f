"""Minibatch training of stochastic estimators (VI) through Lightning (orchestration only).

* :class:`SubjectSampler`: seeded shuffling of subject positions each epoch, cut into global
  batches of ``batch_subjects``; in data-parallel runs each rank takes its own disjoint slice
  of every global batch (so the union over ranks is the single-process batch).
* :class:`SubjectDataModule`: a DataLoader of :class:`SubjectBatch` es (positions + subjects).
* :class:`StochasticFitModule`: Adam with a cosine learning-rate schedule on the estimator's
  ``loss(batch)``; the guide is a submodule, so checkpoints hold guide, model, optimizer and
  schedule; the reparameterization noise is chosen by the global step, so a resumed fit
  follows the uninterrupted trajectory.
* :func:`fit_stochastic`: builds and runs the trainer for ``train.py``.
"""

from __future__ import annotations

import math
import signal
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from hydra.utils import instantiate
from lightning.pytorch.callbacks import Callback
from torch import Tensor
from torch.utils.data import DataLoader

from deepnlme.cli import Interrupted
from deepnlme.data.population import Population
from deepnlme.fitted import CHECKPOINT_KEY
from deepnlme.inference.optimize import STOP_STILL_RISING, still_rising
from deepnlme.inference.pyro.program import SubjectBatch
from deepnlme.inference.pyro.saem import save_convergence_plot
from deepnlme.inference.pyro.vi import NonFiniteObjective
from deepnlme.training.build import LAST_CHECKPOINT, quiet_lightning
from deepnlme.training.callbacks import EveryEpochs, FitProgressBar, FitTimer
from deepnlme.training.datamodule import PopulationDataModule
from deepnlme.training.interrupt import StopOnSignal

#: ``fit_style`` of the estimators fitted by :func:`fit_stochastic` (not full-batch L-BFGS).
STOCHASTIC = ("stochastic", "saem", "nuts", "mcem")
#: Checkpoint key of the SAEM chains and statistics (a killed SAEM fit resumes from them).
SAEM_KEY = "saem_state"
#: R-hat below which a NUTS fit is reported converged.
RHAT_CONVERGED = 1.01


class SubjectSampler:
    """Batches of subject positions ``0..N-1``: a permutation seeded by ``(seed, epoch)``, cut
    into global batches of ``batch_size``; rank r of R gets ``batch[r::R]`` of each.

    The epoch is :meth:`set_epoch`'s, or ``epoch_source()`` when given (the trainer's epoch,
    restored on resume)."""

    def __init__(
        self,
        n: int,
        batch_size: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        epoch_source: Callable[[], int] | None = None,
    ):
        self.n, self.batch_size, self.seed = int(n), int(batch_size), int(seed)
        self.rank, self.world_size = int(rank), int(world_size)
        self.epoch = 0
        self.epoch_source = epoch_source

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __iter__(self) -> Iterator[list[int]]:
        epoch = self.epoch if self.epoch_source is None else int(self.epoch_source())
        g = torch.Generator().manual_seed(self.seed * 7919 + epoch)
        order = torch.randperm(self.n, generator=g)
        for start in range(len(self)):
            batch = order[start * self.batch_size : (start + 1) * self.batch_size]
            yield batch[self.rank :: self.world_size].tolist()

    def __len__(self) -> int:
        return math.ceil(self.n / self.batch_size)


class SubjectDataModule(pl.LightningDataModule):
    """Minibatches of ``batch_subjects`` subjects of ``population`` (all when None).

    Args:
        population: the subjects to fit (tensors stay on the CPU here).
        batch_subjects: global batch size (subjects per step, over all ranks).
        seed: shuffling seed.
        dtype: floating dtype of the batches on the device.
    """

    def __init__(
        self,
        population: Population,
        batch_subjects: int | None,
        seed: int,
        dtype: torch.dtype | None = None,
    ):
        super().__init__()
        self.population = population
        n = len(population)
        self.batch_subjects = min(int(batch_subjects or n), n)
        self.seed = int(seed)
        self.dtype = dtype

    def _collate(self, positions: list[int]) -> SubjectBatch:
        index = torch.as_tensor(positions, dtype=torch.long)
        return SubjectBatch(index, self.population.subset(index))

    def train_dataloader(self) -> DataLoader:
        trainer = self.trainer
        rank, world = (trainer.global_rank, trainer.world_size) if trainer else (0, 1)
        if self.batch_subjects % world:
            raise ValueError(
                f"data.batch_subjects={self.batch_subjects} is not divisible by the "
                f"{world} devices"
            )
        sampler = SubjectSampler(
            len(self.population), self.batch_subjects, self.seed, rank, world,
            epoch_source=(lambda: trainer.current_epoch) if trainer else None,
        )
        positions = range(len(self.population))
        return DataLoader(positions, batch_sampler=sampler, collate_fn=self._collate)

    def transfer_batch_to_device(self, batch: Any, device: torch.device, dataloader_idx: int):
        if isinstance(batch, SubjectBatch):
            return batch.to(device, dtype=self.dtype)
        return super().transfer_batch_to_device(batch, device, dataloader_idx)


class StochasticFitModule(pl.LightningModule):
    """Minimizes ``estimator.loss(batch)`` over the model's and the guide's parameters.

    Args:
        estimator: object with ``model``, ``guide`` (an ``nn.Module``), ``step`` and
            ``loss(batch) -> scalar``.
        lr: Adam learning rate at the start.
        lr_final: fraction of ``lr`` reached at the end of the cosine schedule.
        total_steps: optimizer steps of the whole fit (length of the schedule).
        n_subjects: N, to report the bound per population.
        metadata: plain data saved in every checkpoint (see ``deepnlme.fitted``).
    """

    def __init__(
        self,
        estimator: Any,
        lr: float,
        lr_final: float,
        total_steps: int,
        metadata: Mapping[str, Any] | None = None,
    ):
        super().__init__()
        self.estimator = estimator
        self.model = estimator.model
        self.guide = estimator.guide
        self.lr, self.lr_final, self.total_steps = float(lr), float(lr_final), int(total_steps)
        self.metadata = dict(metadata or {})

    def configure_optimizers(self):
        params = [p for p in self.parameters() if p.requires_grad]
        optimizer = torch.optim.Adam(params, lr=self.lr)
        total, final = max(self.total_steps, 1), self.lr_final

        def factor(step: int) -> float:
            return final + (1.0 - final) * 0.5 * (1.0 + math.cos(math.pi * min(step / total, 1)))

        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    def training_step(self, batch: SubjectBatch, batch_idx: int) -> Tensor:
        self.estimator.step = int(self.global_step)
        loss = self.estimator.loss(batch)
        self.log("elbo", -loss.detach(), prog_bar=True, on_step=True, on_epoch=False,
                 batch_size=len(batch.index))
        return loss

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint[CHECKPOINT_KEY] = self.metadata


class SAEMFitModule(pl.LightningModule):
    """One SAEM iteration per training step (the estimator does its own E- and M-steps);
    checkpoints hold the estimator's state (chains, statistics, random stream, history), so
    that a resumed fit continues on the uninterrupted trajectory.

    Args:
        estimator: a :class:`~deepnlme.inference.pyro.saem.SAEMEstimator` (set up).
        metadata: plain data saved in every checkpoint.
    """

    def __init__(self, estimator: Any, metadata: Mapping[str, Any] | None = None):
        super().__init__()
        self.automatic_optimization = False
        self.estimator = estimator
        self.model = estimator.model
        self.metadata = dict(metadata or {})
        self._rows: Population | None = None

    def configure_optimizers(self):
        return None

    def training_step(self, batch: Population, batch_idx: int) -> None:
        if self._rows is None:
            self._rows = self.estimator.chain_rows(batch)
        record = self.estimator.iterate(self._rows)
        self.log("q", record["q"], prog_bar=True, on_step=True, on_epoch=False, batch_size=1)
        return None

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint[CHECKPOINT_KEY] = self.metadata
        checkpoint[SAEM_KEY] = self.estimator.state_dict()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if SAEM_KEY not in checkpoint:
            raise ValueError("the checkpoint holds no SAEM state: resume it with its own method")
        self.estimator.load_state_dict(checkpoint[SAEM_KEY])


class BoundMonitor(Callback):
    """Records the bound of each epoch (mean over its steps) and the number of steps.

    A finite VI fit is converged when its bound has levelled off (:func:`still_rising`);
    SAEM's complete-data log-likelihood is recorded but not judged that way."""

    def __init__(self) -> None:
        self.values: list[float] = []
        self.bounds: list[float] = []
        self.elbo = -math.inf
        self.n_iter = 0
        self.judge_plateau = True

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.n_iter += 1
        if isinstance(pl_module, SAEMFitModule):  # the complete-data log-likelihood
            self.judge_plateau = False
            self.values.append(float(pl_module.estimator.history[-1]["q"]))
            return
        loss = outputs["loss"] if isinstance(outputs, Mapping) else outputs
        self.values.append(-float(loss))

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if self.values:
            self.elbo = sum(self.values) / len(self.values)
            self.bounds.append(self.elbo)
        self.values = []

    def summary(self) -> dict[str, Any]:
        rising = self.judge_plateau and still_rising(self.bounds)
        return {
            "converged": math.isfinite(self.elbo) and not rising,
            "n_iter": self.n_iter,
            "stop_reason": STOP_STILL_RISING if rising else "schedule completed",
        }

    def state_dict(self) -> dict[str, Any]:
        return {"elbo": self.elbo, "n_iter": self.n_iter, "bounds": list(self.bounds)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.elbo, self.n_iter = state_dict["elbo"], state_dict["n_iter"]
        self.bounds = list(state_dict.get("bounds", []))


def fit_stochastic(
    method_cfg: Mapping[str, Any],
    trainer_cfg: Mapping[str, Any],
    estimator: Any,
    pop: Population,
    batch_subjects: int | None,
    seed: int,
    dtype: torch.dtype,
    output_dir: str | Path,
    metadata: Mapping[str, Any],
    ckpt_path: str | Path | None = None,
    extra_callbacks: list[Callback] | None = None,
) -> tuple[pl.Trainer, dict[str, Any]]:
    """Fit ``estimator`` on ``pop``: in minibatches for ``method_cfg["epochs"]`` epochs (VI),
    or one full-batch SAEM iteration per epoch (SAEM, then ``saem_convergence.png``).

    Returns the trainer and ``{converged, n_iter, stop_reason, fit_seconds}``. A non-finite
    objective raises :class:`NonFiniteObjective` (one line for the user). SIGINT/SIGTERM stop
    the fit at the end of the current epoch, write ``last.ckpt`` there and raise
    :class:`~deepnlme.cli.Interrupted` (``ckpt_path=`` that file resumes on the same
    trajectory).
    """
    quiet_lightning()
    show = bool(trainer_cfg.get("enable_progress_bar", True))
    if estimator.fit_style == "nuts":
        estimator.progress = estimator.progress and show
        return None, _run_nuts(estimator, pop, output_dir, metadata)
    if estimator.fit_style == "mcem":
        return None, _run_mcem(estimator, pop, output_dir, metadata, show)
    devices = trainer_cfg.get("devices", 1)
    if estimator.fit_style == "saem":
        if devices not in (1, "1", None) or trainer_cfg.get("strategy", "auto") != "auto":
            raise ValueError("method=saem runs on one device (full batch): set trainer.devices=1")
        estimator.setup(pop)
        data = PopulationDataModule(pop, dtype)
        epochs, steps_per_epoch = estimator.n_iterations, 1
        module = SAEMFitModule(estimator, metadata)
    else:
        data = SubjectDataModule(pop, batch_subjects, seed, dtype)
        if isinstance(devices, int) and data.batch_subjects % devices:
            raise ValueError(
                f"data.batch_subjects={data.batch_subjects} is not divisible by the "
                f"{devices} devices"
            )
        estimator.setup(pop)
        epochs = int(method_cfg["epochs"])
        steps_per_epoch = math.ceil(len(pop) / data.batch_subjects)
        module = StochasticFitModule(
            estimator,
            float(method_cfg["lr"]),
            float(method_cfg.get("lr_final", 0.02)),
            epochs * steps_per_epoch,
            metadata,
        )
    every = max(1, math.ceil(int(method_cfg.get("checkpoint_every", 200)) / steps_per_epoch))
    last = Path(output_dir) / "checkpoints" / f"{LAST_CHECKPOINT}.ckpt"
    stop = StopOnSignal(at_epoch_end=True)
    checkpoints = EveryEpochs(last, every, stop)
    monitor, timer = BoundMonitor(), FitTimer()
    callbacks: list[Callback] = [monitor, timer, stop, *(extra_callbacks or [])]
    config = dict(trainer_cfg)
    if config.get("enable_progress_bar", True):
        callbacks.append(FitProgressBar(refresh_rate=max(1, steps_per_epoch * every // 4)))
    callbacks.append(checkpoints)  # last: the other callbacks' epoch ends are in its state
    config.update(max_epochs=epochs, use_distributed_sampler=False, log_every_n_steps=50,
                  enable_checkpointing=False)  # EveryEpochs writes the one checkpoint
    trainer = instantiate(config, callbacks=callbacks, default_root_dir=str(output_dir))
    trainer.fit(module, datamodule=data, ckpt_path=ckpt_path, weights_only=True)
    if stop.received is not None:
        raise Interrupted(
            f"fit interrupted by {signal.Signals(stop.received).name} after {monitor.n_iter} "
            f"steps; resume with ckpt_path={last}",
            stop.received,
        )
    after_fit = getattr(estimator, "after_fit", None)  # e.g. VI's encoder phase
    finished = after_fit(pop) if after_fit is not None else {}
    trainer.save_checkpoint(last)
    if estimator.fit_style == "saem" and trainer.global_rank == 0:
        save_convergence_plot(
            estimator.history, Path(output_dir) / "saem_convergence.png", estimator.n_explore
        )
    summary = monitor.summary()
    if summary["stop_reason"] == STOP_STILL_RISING:
        summary["warnings"] = [
            "the fit did not converge: its bound was still rising over the last epochs "
            f"(ELBO {monitor.elbo:.6g}); fit longer (method.epochs) or check the learning rate"
        ]
    return trainer, {**summary, "fit_seconds": timer.seconds, **finished}


def _run_nuts(
    estimator: Any, pop: Population, output_dir: str | Path, metadata: Mapping[str, Any]
) -> dict[str, Any]:
    """NUTS chains (no training loop): posterior.csv, trace.png and a checkpoint at the
    posterior means; returns the summary for results.json (``posterior`` table included)."""
    import pandas as pd

    from deepnlme.inference.pyro.nuts import save_trace_plot

    out = Path(output_dir)
    start = time.perf_counter()
    estimator.run(pop)
    seconds = time.perf_counter() - start
    table = estimator.summary()
    out.mkdir(parents=True, exist_ok=True)
    frame = pd.DataFrame.from_dict(table, orient="index").rename_axis("parameter")
    frame.to_csv(out / "posterior.csv")
    save_trace_plot(estimator, out / "trace.png")
    _save_model_checkpoint(estimator.model, out, metadata)
    rhat = max(row["rhat"] for row in table.values())
    return {
        "converged": bool(rhat < RHAT_CONVERGED),
        "n_iter": estimator.num_chains * (estimator.warmup + estimator.num_samples),
        "stop_reason": f"{estimator.num_chains} chains sampled (max R-hat {rhat:.4f})",
        "fit_seconds": seconds,
        "posterior": table,
    }


def _save_model_checkpoint(model: Any, out: Path, metadata: Mapping[str, Any]) -> None:
    """``out/checkpoints/last.ckpt`` with the model's parameters (fits without a training loop:
    nothing else to resume)."""
    (out / "checkpoints").mkdir(parents=True, exist_ok=True)
    state = {f"model.{k}": v for k, v in model.state_dict().items()}
    torch.save({"state_dict": state, CHECKPOINT_KEY: dict(metadata)},
               out / "checkpoints" / "last.ckpt")


def _run_mcem(
    estimator: Any, pop: Population, output_dir: str | Path, metadata: Mapping[str, Any],
    progress: bool,
) -> dict[str, Any]:
    """MCEM-HMC iterations (no training loop; a progress bar with -log p(y, η)) and a
    checkpoint at the estimates; returns the summary for results.json."""
    from tqdm.auto import tqdm

    out = Path(output_dir)
    bar = tqdm(total=estimator.n_iterations, desc="MCEM", disable=not progress, leave=False)

    def advance(it: int, loss: float) -> None:
        bar.update(1)
        if it % 20 == 0:
            bar.set_postfix(complete_loglik=f"{-loss:.2f}")

    start = time.perf_counter()
    try:
        result = estimator.fit(pop, callback=advance)
    finally:
        bar.close()
    seconds = time.perf_counter() - start
    _save_model_checkpoint(estimator.model, out, metadata)
    return {
        "converged": True,
        "n_iter": estimator.n_iterations,
        "stop_reason": (
            f"{estimator.n_iterations} iterations (HMC acceptance {result.accept_rate:.2f}, "
            f"step size {result.step_size:.3g})"
        ),
        "fit_seconds": seconds,
        "hmc_accept_rate": result.accept_rate,
    }


__all__ = [
    "BoundMonitor",
    "NonFiniteObjective",
    "SAEMFitModule",
    "STOCHASTIC",
    "STOP_STILL_RISING",
    "StochasticFitModule",
    "SubjectDataModule",
    "SubjectSampler",
    "fit_stochastic",
]
