"""Full-batch DataModule: the single batch of every epoch is the whole fit Population."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import lightning.pytorch as pl
import torch

from deepnlme.data.population import Population


class SingleBatch:
    """An iterable of exactly one batch (one full-batch step per epoch)."""

    def __init__(self, batch: Any):
        self.batch = batch

    def __iter__(self) -> Iterator[Any]:
        yield self.batch

    def __len__(self) -> int:
        return 1


class PopulationDataModule(pl.LightningDataModule):
    """Serves ``population`` as one batch; Lightning moves it to the device (and ``dtype``).

    Args:
        population: the subjects to fit (tensors stay on the CPU here).
        dtype: floating dtype of the batch on the device (None keeps the data's own).
    """

    def __init__(self, population: Population, dtype: torch.dtype | None = None):
        super().__init__()
        self.population = population
        self.dtype = dtype
        self._served: Population | None = None

    def train_dataloader(self) -> SingleBatch:
        return SingleBatch(self.population)

    def transfer_batch_to_device(self, batch: Any, device: torch.device, dataloader_idx: int):
        if isinstance(batch, Population):
            return self.served(device)
        return super().transfer_batch_to_device(batch, device, dataloader_idx)

    def served(self, device: torch.device) -> Population:
        """The population on ``device`` (and ``dtype``): one object for every epoch.

        Lightning hands each epoch a deep copy of the batch (a dataclass); serving the same
        object instead keeps what the population caches (its event grids) and lets a fit
        recognize the points it has evaluated (:class:`~deepnlme.inference.optimize.
        MemoizedObjective`): the point where one epoch's L-BFGS step ended is where the next
        one starts.
        """
        if self._served is None or self._served.device != torch.device(device):
            self._served = self.population.to(device, dtype=self.dtype)
        return self._served
