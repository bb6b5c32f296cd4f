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

    def train_dataloader(self) -> SingleBatch:
        return SingleBatch(self.population)

    def transfer_batch_to_device(self, batch: Any, device: torch.device, dataloader_idx: int):
        if isinstance(batch, Population):
            return batch.to(device, dtype=self.dtype)
        return super().transfer_batch_to_device(batch, device, dataloader_idx)
